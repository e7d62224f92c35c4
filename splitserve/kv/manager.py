"""KV cache manager: which blocks each request holds, prefix-cache lookups, allocation.

Plain Python over plain data (no torch, no clock): the scheduler calls it, the simulator will too.

A request's blocks cover its tokens in order; block j holds tokens [j*B, (j+1)*B). Only full
blocks are hashed and cached. When a request's blocks are freed they go back in reverse order,
so its tail (least likely to be shared) is evicted first.

With tiers below the pool (`attach_tiers`; kv/tiers.py is the real one) a prompt's prefix hit
runs on past the pool into them:

    blocks [0, d)       in the pool           (touched: a reference each)
    blocks [d, d + t)   in DRAM or on disk    (new blocks, loaded in allocate_slots)
    blocks [d + t, ..)  computed

The tiers object answers five calls — find_run(hashes) -> the tiers of their leading run,
costs() -> (load seconds per block by tier, recompute seconds per block | None),
load(hash, block_id) -> bool, offload(hash, block_id), computed(hash, block_id) — so this
code stays plain (no torch, no files, no sockets, no clock).

A run of loads is cut where loading stops paying (`worth_loading`: Mooncake's rule, move a
prefix only when that is cheaper than recomputing it): a block costs its tier's load time
against the compute time it saves.
"""

from __future__ import annotations

from splitserve.kv.block_pool import BlockPool, KVBlock
from splitserve.kv.hashing import extend_block_hashes
from splitserve.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def find_tier_run(hashes, find, match) -> list[str]:
    """The tiers holding the leading run of `hashes`, up to the first none holds: `find(h)`
    names the worker's own tier holding h (or None), `match(hashes)` says how many leading
    ones the shared store holds (None: no store). The store is asked once per run of blocks
    the worker's own tiers miss. (kv/tiers.py and sim/tiers.py both answer find_run so.)"""
    out: list[str] = []
    i, n = 0, len(hashes)
    while i < n:
        tier = find(hashes[i])
        if tier is not None:
            out.append(tier)
            i += 1
            continue
        m = match(list(hashes[i:])) if match is not None else 0
        if m == 0:
            break
        out.append("shared")
        out.extend(find(h) or "shared" for h in hashes[i + 1:i + m])
        i += m
    return out


def worth_loading(run: list[str], load_s: dict[str, float], recompute_s: float | None) -> int:
    """How many leading blocks of `run` (the tier of each) to load rather than recompute:
    the count that saves the most time, each block saving `recompute_s` less its tier's
    load time (blocks are chained: a block is only usable after every block before it).
    Unmeasured costs (a tier never loaded from, no forward timed yet): load."""
    if recompute_s is None:
        return len(run)
    best = saved = 0.0
    k = 0
    for i, tier in enumerate(run):
        saved += recompute_s - load_s.get(tier, 0.0)
        if saved > best:
            best, k = saved, i + 1
    return k


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, root_hash: bytes, enable_caching: bool = True):
        self.block_size = block_size
        self.root_hash = root_hash
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        # prefix-cache statistics (queried tokens vs hit tokens)
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.hit_tokens_by_tier: dict[str, int] = {"device": 0}
        self.tiers = None

    def attach_tiers(self, tiers) -> None:
        """Keep evicted blocks in `tiers` and look prompts up there after the pool."""
        self.tiers = tiers
        self.pool.on_evict = tiers.offload
        for name in ("dram", "disk", "shared"):
            self.hit_tokens_by_tier.setdefault(name, 0)

    def set_caching(self, enabled: bool) -> None:
        """Prefix caching on or off from now on. Off forgets every unreferenced cached block;
        a block a request still holds keeps its hash (its content stays what the hash says
        until it is allocated again, which forgets the hash), so turning it on again is safe."""
        if not enabled:
            self.pool.reset_prefix_cache()
        self.enable_caching = self.pool.enable_caching = enabled

    # -- hashes ----------------------------------------------------------------------------
    def update_hashes(self, req: Request) -> list[bytes]:
        if len(req.block_hashes) < req.num_tokens // self.block_size:
            extend_block_hashes(req.block_hashes, req.all_token_ids, self.block_size, self.root_hash)
        return req.block_hashes

    # -- lookups ---------------------------------------------------------------------------
    def get_computed_blocks(self, req: Request, whole: bool = False) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of req's full blocks, leaving at least one token to compute
        (the model must run on the last token to produce logits) unless `whole` (a decode
        worker's reservation: the prefill worker computes the rest). Takes no references."""
        if not self.enable_caching:
            return [], 0
        hashes = self.update_hashes(req)
        hit: list[KVBlock] = []
        for h in hashes[:self._hit_limit(req, whole)]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hit.append(b)
        return hit, len(hit) * self.block_size

    def prefix_hit(self, req: Request, whole: bool = False
                   ) -> tuple[list[KVBlock], list[tuple[bytes, str]], int]:
        """The prompt's whole prefix hit: (pool blocks, tier loads, tokens they cover), as
        allocate_slots and count_lookup take them."""
        computed, num_hit = self.get_computed_blocks(req, whole)
        loads = self.tier_hits(req, len(computed), whole)
        return computed, loads, num_hit + len(loads) * self.block_size

    def _hit_limit(self, req: Request, whole: bool) -> int:
        """How many leading blocks may hit: every full one (`whole`), or those before the
        last token."""
        return (req.num_tokens if whole else req.num_tokens - 1) // self.block_size

    def tier_hits(self, req: Request, start: int, whole: bool = False) -> list[tuple[bytes, str]]:
        """(hash, tier) of the prompt's blocks from block `start` on (the pool's hit ends
        there) that the tiers hold, up to the first they do not (or one the pool holds again:
        hits are one run of pool blocks, then one run of loads). `whole`: every full block
        may hit (see get_computed_blocks)."""
        if self.tiers is None or not self.enable_caching:
            return []
        hashes = self.update_hashes(req)
        want = []
        for h in hashes[start:self._hit_limit(req, whole)]:
            if self.pool.lookup(h) is not None:
                break
            want.append(h)
        if not want:
            return []
        run = self.tiers.find_run(want)
        run = run[:worth_loading(run, *self.tiers.costs())]
        return list(zip(want, run))

    def count_lookup(self, num_tokens: int, num_hit: int, loads=()) -> None:
        """A request first admitted with `num_hit` of its `num_tokens` prompt tokens from the
        cache (`loads` of them from the tiers: tier_hits' answer): the prefix-cache statistics
        count each request once (one that waits for blocks is looked up again every step; a
        preempted one is not counted again)."""
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_hit
        by_tier = self.hit_tokens_by_tier
        for _, tier in loads:
            by_tier[tier] += self.block_size
        by_tier["device"] += num_hit - len(loads) * self.block_size

    def num_blocks_needed(self, req: Request, num_new_tokens: int, computed: list[KVBlock] = (),
                          loads=()) -> int:
        held = len(self.req_blocks.get(req.request_id, ())) + len(computed)
        total = (req.num_computed_tokens + (len(computed) + len(loads)) * self.block_size
                 + num_new_tokens)
        return max(0, cdiv(total, self.block_size) - held)

    def can_allocate(self, req: Request, num_new_tokens: int, computed: list[KVBlock] = (),
                     loads=()) -> bool:
        # hits on cached (unreferenced) blocks leave the free queue when touched
        evictable_hits = sum(1 for b in computed if b.ref_cnt == 0)
        need = self.num_blocks_needed(req, num_new_tokens, computed, loads)
        return need <= self.pool.num_free_blocks - evictable_hits

    # -- transitions -----------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list[KVBlock] = (),
                       loads=()) -> bool:
        """Make req hold blocks for num_computed_tokens + (|computed| + |loads|)*B +
        num_new_tokens tokens, the first |loads| new blocks loaded from the tiers (`loads`:
        tier_hits' answer, for a request that holds nothing yet). Returns False (changing
        nothing but evictions) when there are not enough free blocks, or when a load fails
        (the tier lost or refused the block: looked up again, it is a miss)."""
        need = self.num_blocks_needed(req, num_new_tokens, computed, loads)
        if not computed and need == 0:
            return True  # most decode steps: the last block has room
        if not self.can_allocate(req, num_new_tokens, computed, loads):
            return False
        blocks = self.req_blocks.setdefault(req.request_id, [])
        n0 = len(blocks)
        if computed:
            self.pool.touch(computed)
            blocks.extend(computed)
        if need:
            new = self.pool.allocate(need)
            blocks.extend(new)
            for (h, _), b in zip(loads, new):
                if not self.tiers.load(h, b.block_id):
                    added = blocks[n0:]
                    del blocks[n0:]
                    if not blocks:
                        del self.req_blocks[req.request_id]
                    self.pool.free(reversed(added))
                    return False
                self.pool.cache(b, h)
        return True

    def cache_blocks(self, req: Request, num_tokens: int) -> None:
        """Register req's full blocks among its first num_tokens tokens in the prefix cache.
        Called once the KV for those tokens is (or, within this step, will be) written."""
        if not self.enable_caching:
            return
        blocks = self.req_blocks.get(req.request_id, ())
        n_full = min(num_tokens // self.block_size, len(blocks))
        if n_full == 0:
            return
        hashes = self.update_hashes(req)
        computed = self.tiers.computed if self.tiers is not None else None
        for j in range(n_full):
            if self.pool.cache(blocks[j], hashes[j]) and computed is not None:
                computed(hashes[j], blocks[j].block_id)

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.pop(req.request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def check_integrity(self) -> None:
        self.pool.check_integrity(self.req_blocks.values())

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

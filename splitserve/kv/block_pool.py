"""A pool of fixed-size KV blocks: reference counts, an LRU free queue, a hash -> block map.

Every block is in exactly one of three states:

    in use   ref_cnt > 0                      held by one or more requests
    cached   ref_cnt == 0 and block_hash set  in the free queue, still findable by hash
    free     ref_cnt == 0, no hash            in the free queue

so  free + cached + in use == num_blocks.  The free queue is ordered by eviction priority
(front = evicted first); a cached block is evicted (its hash forgotten) only when it is popped
for a new allocation. Removal from the middle of the queue (a cache hit on a free block) is O(1).

Blocks never used yet are the queue's front, in id order (nothing is ever put before them, and
they are popped first), so they are kept as a count, not as objects: a block's KVBlock is made
when it is first allocated. A pool of a GPU's 10^5 blocks costs nothing until used (the
simulator builds thousands of pools).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from splitserve.errors import IntegrityError


class NoFreeBlocksError(RuntimeError):
    pass


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hash={h})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks: list[KVBlock] = []  # blocks [0, len) were used at least once
        # used blocks that are free or cached, in eviction order (after the never-used ones)
        self._free: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, KVBlock] = {}
        self.num_evictions = 0
        # KV events (router/prefix_index.py), when a list: (True, hash) when a hash becomes
        # findable, (False, hash) when it is forgotten, in that order; the owner drains it
        self.events: list[tuple[bool, bytes]] | None = None
        # called as (hash, block id) for a cached block about to be reused, while its content
        # is still intact (kv/tiers.py keeps a copy)
        self.on_evict = None

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free plus cached (evictable)."""
        return self.num_blocks - len(self.blocks) + len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return sum(1 for i in self._free if self.blocks[i].block_hash is not None)

    def usage(self) -> dict[str, int]:
        cached = self.num_cached_blocks
        return {
            "total": self.num_blocks,
            "in_use": self.num_blocks - self.num_free_blocks,
            "cached": cached,
            "free": self.num_free_blocks - cached,
        }

    def cached_hashes(self) -> list[bytes]:
        """Every hash findable now (a KV snapshot: router/prefix_index.py)."""
        return list(self._cached)

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    # -- transitions -----------------------------------------------------------------------
    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks found by hash (taking cached ones off the free queue)."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self._free[b.block_id]
            b.ref_cnt += 1

    def allocate(self, n: int) -> list[KVBlock]:
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {n} KV blocks, {self.num_free_blocks} free")
        out = []
        fresh = min(n, self.num_blocks - len(self.blocks))
        for _ in range(fresh):  # the queue's front: never used, no hash to forget
            b = KVBlock(len(self.blocks))
            self.blocks.append(b)
            b.ref_cnt = 1
            out.append(b)
        for _ in range(n - fresh):
            block_id, _ = self._free.popitem(last=False)
            b = self.blocks[block_id]
            if b.block_hash is not None:
                if self.on_evict is not None:
                    self.on_evict(b.block_hash, b.block_id)
                del self._cached[b.block_hash]
                if self.events is not None:
                    self.events.append((False, b.block_hash))
                b.block_hash = None
                self.num_evictions += 1
            b.ref_cnt = 1
            out.append(b)
        return out

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the queue's tail in the order
        given (so pass the blocks least worth keeping first)."""
        for b in blocks:
            if b.ref_cnt <= 0:
                raise RuntimeError(f"double free of {b}")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self._free[b.block_id] = None

    def cache(self, block: KVBlock, block_hash: bytes) -> bool:
        """Register a full block under its hash; True when it is new to the cache. A block
        already cached under another id keeps the map entry (the duplicate stays private to
        its request and is freed uncached)."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        if self.events is not None:
            self.events.append((True, block_hash))
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash of an unreferenced block."""
        for b in list(self._cached.values()):
            if b.ref_cnt == 0:
                del self._cached[b.block_hash]
                if self.events is not None:
                    self.events.append((False, b.block_hash))
                b.block_hash = None

    # -- invariants ------------------------------------------------------------------------
    def check_integrity(self, holders: Iterable[Iterable[KVBlock]] = ()) -> None:
        """Raise IntegrityError if the pool is inconsistent. `holders`: each request's block
        list; each block's ref_cnt must equal the number of holders that name it."""
        refs = [0] * self.num_blocks
        for blocks in holders:
            for b in blocks:
                refs[b.block_id] += 1
        for b in self.blocks:
            if b.ref_cnt != refs[b.block_id]:
                raise IntegrityError(f"{b}: {refs[b.block_id]} holders")
            if (b.ref_cnt == 0) != (b.block_id in self._free):
                raise IntegrityError(f"{b}: free-queue mismatch")
            if b.block_hash is not None and self._cached.get(b.block_hash) is not b:
                raise IntegrityError(f"{b}: hash map mismatch")
        hashed = sum(b.block_hash is not None for b in self.blocks)
        if len(self._cached) != hashed:
            raise IntegrityError(f"{len(self._cached)} cached hashes for {hashed} hashed blocks")
        if [b.block_id for b in self.blocks] != list(range(len(self.blocks))):
            raise IntegrityError("block ids out of order")
        u = self.usage()
        if u["free"] + u["cached"] + u["in_use"] != u["total"]:
            raise IntegrityError(f"usage does not add up: {u}")

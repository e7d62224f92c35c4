"""The router's global prefix index: which worker's KV cache holds which blocks, kept from the
workers' KV events (what each stores and evicts, in order), and for a prompt's chained block
hashes the longest cached prefix on every worker.

Plain Python over plain data (the simulator can drive it too). Each worker's events carry a
sequence number that starts at 0 with a snapshot (its whole cache: at registration, and again
whenever the router asks); an event batch out of sequence means the index lost track of that
worker: its entries are dropped and `apply` says so (the caller asks for a snapshot).

    holders[h] = {worker ids that hold block hash h in some tier: the pool, DRAM or disk}
    held[w][h] = the tiers of w holding h, as bits (TIER_BITS)
    longest(h_0 .. h_n-1): for each worker, the k of the longest run h_0 .. h_k-1 it holds
    (chained hashes: h_k names the whole prefix up to block k, so a worker holding h_k with a
    gap before it still has to compute the gap; the run is what it can skip)

Cost: one dict lookup per prompt block while some worker still matches, plus one set
intersection per block over the workers still matching: linear in the prompt's blocks, and
independent of how many blocks the cluster caches.

A shared tier (kv/store.py) is a holder of its own (`add_shared`: its events come from the
store, not from a worker) whose blocks every worker can load: `longest_shared` answers, beside
each worker's run, the run every worker has through it.
"""

from __future__ import annotations

from itertools import chain

# a worker's pool, and the tiers below it (kv/tiers.py)
TIER_BITS = {"device": 1, "dram": 2, "disk": 4, "shared": 8}
# the holder id of the shared store (kv/store.py) in the index, fed by its event feed
STORE_ID = "kv-store"


class PrefixIndex:
    def __init__(self):
        self._holders: dict[bytes, set[str]] = {}
        # worker -> hash -> tier bits (also to drop a worker at once)
        self._held: dict[str, dict[bytes, int]] = {}
        self._seq: dict[str, int] = {}  # worker -> the next event batch's number
        self.resyncs = 0  # event batches that came out of sequence
        self._shared: set[str] = set()  # holders every worker can load from

    # -- what the workers say --------------------------------------------------------------
    def snapshot(self, worker_id: str, hashes, tier_events=()) -> None:
        """The worker's whole cache (sequence 0): its pool's hashes and, as (tier, True, hash),
        its tiers'; replaces what the index had of it."""
        self.drop(worker_id)
        self._held[worker_id] = {}
        self._seq[worker_id] = 1
        self._update(worker_id, [(True, h) for h in hashes], tier_events)

    def apply(self, worker_id: str, seq: int, events, tier_events=()) -> bool:
        """One batch of the worker's events — (True, hash) stored, (False, hash) evicted, for
        its pool; (tier, stored, hash) for the tiers below — each list in the order it made
        them. False when it is not the batch expected: the worker's entries are dropped until
        its next snapshot."""
        if self._seq.get(worker_id) != seq:
            self.drop(worker_id)
            self.resyncs += 1
            return False
        self._seq[worker_id] = seq + 1
        self._update(worker_id, events, tier_events)
        return True

    def _update(self, worker_id: str, events, tier_events) -> None:
        # each tier's events apply in order; tiers are independent bits, so the pool's list
        # and the tiers' may be applied one after the other
        held = self._held[worker_id]
        for tier, stored, h in chain((("device", s, h) for s, h in events), tier_events):
            bit = TIER_BITS[tier]
            was = held.get(h, 0)
            now = was | bit if stored else was & ~bit
            if now == was:
                continue
            if now:
                held[h] = now
                if not was:
                    self._holders.setdefault(h, set()).add(worker_id)
            else:
                del held[h]
                ws = self._holders[h]
                ws.discard(worker_id)
                if not ws:
                    del self._holders[h]

    def drop(self, worker_id: str) -> None:
        """Forget the worker (it died, or its events went out of sequence)."""
        self._seq.pop(worker_id, None)
        for h in self._held.pop(worker_id, ()):
            ws = self._holders.get(h)
            if ws is not None:
                ws.discard(worker_id)
                if not ws:
                    del self._holders[h]

    def add_shared(self, holder_id: str) -> None:
        """`holder_id` (fed like a worker: snapshot, apply) is a tier every worker loads from."""
        self._shared.add(holder_id)

    def remove_shared(self, holder_id: str) -> None:
        self.drop(holder_id)
        self._shared.discard(holder_id)

    # -- what the router asks --------------------------------------------------------------
    def longest(self, hashes) -> dict[str, int]:
        """worker id -> how many of the prompt's leading blocks it caches (workers holding
        none are left out)."""
        return self.longest_shared(hashes)[0]

    def longest_shared(self, hashes) -> tuple[dict[str, int], int]:
        """(worker id -> how many of the prompt's leading blocks it can hit, the run every
        worker can hit through a shared tier). A worker left out of the map has the second;
        one in it has at least that. Shared holders are not in the map."""
        out: dict[str, int] = {}
        alive: set[str] | None = None  # None: every worker (only shared blocks so far)
        shared = self._shared
        common = k = 0
        for k, h in enumerate(hashes):
            holders = self._holders.get(h)
            if not holders:
                break
            if shared and not shared.isdisjoint(holders):
                if alive is None:
                    common = k + 1
                continue  # every worker still in the run can load it
            if alive is None:
                alive = set(holders)
            elif not holders >= alive:
                for w in alive - holders:
                    out[w] = k
                alive &= holders
                if not alive:
                    break
        else:
            k = len(hashes)
        for w in alive or ():
            out[w] = k
        return out, common

    def holds(self, worker_id: str, tier: str | None = None) -> set[bytes]:
        """The hashes the worker holds (in `tier` only, when given)."""
        held = self._held.get(worker_id, {})
        if tier is None:
            return set(held)
        bit = TIER_BITS[tier]
        return {h for h, bits in held.items() if bits & bit}

    @property
    def num_blocks(self) -> int:
        """Distinct block hashes cached anywhere."""
        return len(self._holders)

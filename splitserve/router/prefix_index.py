"""The router's global prefix index: which worker's KV cache holds which blocks, kept from the
workers' KV events (what each stores and evicts, in order), and for a prompt's chained block
hashes the longest cached prefix on every worker.

Plain Python over plain data (the simulator can drive it too). Each worker's events carry a
sequence number that starts at 0 with a snapshot (its whole cache: at registration, and again
whenever the router asks); an event batch out of sequence means the index lost track of that
worker: its entries are dropped and `apply` says so (the caller asks for a snapshot).

    holders[h] = {worker ids whose pool caches block hash h}
    longest(h_0 .. h_n-1): for each worker, the k of the longest run h_0 .. h_k-1 it holds
    (chained hashes: h_k names the whole prefix up to block k, so a worker holding h_k with a
    gap before it still has to compute the gap; the run is what it can skip)

Cost: one dict lookup per prompt block while some worker still matches, plus one set
intersection per block over the workers still matching: linear in the prompt's blocks, and
independent of how many blocks the cluster caches.
"""

from __future__ import annotations


class PrefixIndex:
    def __init__(self):
        self._holders: dict[bytes, set[str]] = {}
        self._held: dict[str, set[bytes]] = {}  # worker -> its hashes (to drop a worker at once)
        self._seq: dict[str, int] = {}  # worker -> the next event batch's number
        self.resyncs = 0  # event batches that came out of sequence

    # -- what the workers say --------------------------------------------------------------
    def snapshot(self, worker_id: str, hashes) -> None:
        """The worker's whole cache (sequence 0): replaces what the index had of it."""
        self.drop(worker_id)
        held = self._held[worker_id] = set(hashes)
        for h in held:
            self._holders.setdefault(h, set()).add(worker_id)
        self._seq[worker_id] = 1

    def apply(self, worker_id: str, seq: int, events) -> bool:
        """One batch of the worker's events — (True, hash) stored, (False, hash) evicted — in
        the order it made them. False when it is not the batch expected: the worker's entries
        are dropped until its next snapshot."""
        if self._seq.get(worker_id) != seq:
            self.drop(worker_id)
            self.resyncs += 1
            return False
        self._seq[worker_id] = seq + 1
        held = self._held[worker_id]
        for stored, h in events:
            if stored:
                if h not in held:
                    held.add(h)
                    self._holders.setdefault(h, set()).add(worker_id)
            elif h in held:
                held.discard(h)
                ws = self._holders[h]
                ws.discard(worker_id)
                if not ws:
                    del self._holders[h]
        return True

    def drop(self, worker_id: str) -> None:
        """Forget the worker (it died, or its events went out of sequence)."""
        self._seq.pop(worker_id, None)
        for h in self._held.pop(worker_id, ()):
            ws = self._holders.get(h)
            if ws is not None:
                ws.discard(worker_id)
                if not ws:
                    del self._holders[h]

    # -- what the router asks --------------------------------------------------------------
    def longest(self, hashes) -> dict[str, int]:
        """worker id -> how many of the prompt's leading blocks it caches (workers holding
        none are left out)."""
        out: dict[str, int] = {}
        alive: set[str] | None = None
        k = 0
        for k, h in enumerate(hashes):
            holders = self._holders.get(h)
            if not holders:
                break
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
        return out

    def holds(self, worker_id: str) -> set[bytes]:
        return set(self._held.get(worker_id, ()))

    @property
    def num_blocks(self) -> int:
        """Distinct block hashes cached anywhere."""
        return len(self._holders)

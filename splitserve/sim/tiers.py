"""The KV tiers on the virtual clock: a plain model of the calls kv/tiers.py answers for the
KV manager (find_run, costs, load, offload, computed), so the simulated worker's EngineCore
runs the same prefix-hit path through the tiers as the real one.

    SimTiers   one worker's host DRAM tier (LRU, blocks) and, when the deployment has one,
               the shared store's client
    SimStore   the shared tier every simulated worker puts into and loads from (LRU, blocks);
               its changes feed the router's prefix index as the real store's feed does

Time: a block loaded costs its tier's time per block (bytes / the tier's bandwidth), charged
to the step that loads it (the real loads are synchronous, inside scheduling). Puts to the
store cost the worker nothing (the real ones are sent by a background thread). Not modelled:
the disk tier, a store that fails or refuses, and the measured fetch-or-recompute rule (the
costs here are the model's, and recomputing is never priced: a run is always loaded, which
is what the rule decides on the CPU this was measured on).
"""

from __future__ import annotations

from collections import OrderedDict

from splitserve.kv.manager import find_tier_run


class SimStore:
    def __init__(self, capacity_blocks: int):
        if capacity_blocks < 1:
            raise ValueError("the shared store holds no block")
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[bytes, None] = OrderedDict()
        self.events: list[tuple[bool, bytes]] = []  # (stored, hash), in order, for the index

    def put(self, h: bytes) -> None:
        if h in self._blocks:
            self._blocks.move_to_end(h)
            return
        while len(self._blocks) >= self.capacity:
            victim, _ = self._blocks.popitem(last=False)
            self.events.append((False, victim))
        self._blocks[h] = None
        self.events.append((True, h))

    def match(self, hashes) -> int:
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def get(self, h: bytes) -> bool:
        if h not in self._blocks:
            return False
        self._blocks.move_to_end(h)
        return True


class SimTiers:
    def __init__(self, dram_blocks: int, store: SimStore | None, load_s: dict[str, float]):
        self.dram_blocks = dram_blocks
        self._dram: OrderedDict[bytes, None] = OrderedDict()
        self.store = store
        self.load_s = load_s  # seconds per block loaded, by tier
        self.events: list[tuple[str, bool, bytes]] = []  # (tier, stored, hash), for the index
        self.pending_s = 0.0  # load time the next step pays

    def find(self, h: bytes) -> str | None:
        if h in self._dram:
            self._dram.move_to_end(h)
            return "dram"
        return None

    def find_run(self, hashes) -> list[str]:
        """As kv/tiers.KVTiers.find_run: the worker's own tier first, the store for the rest."""
        return find_tier_run(hashes, self.find, self.store.match if self.store is not None else None)

    def costs(self) -> tuple[dict[str, float], float | None]:
        return self.load_s, None

    def load(self, h: bytes, block_id: int) -> bool:
        if h in self._dram:
            tier = "dram"
        elif self.store is not None and self.store.get(h):
            tier = "shared"
        else:
            return False
        self.pending_s += self.load_s.get(tier, 0.0)
        return True

    def offload(self, h: bytes, block_id: int) -> None:
        if not self.dram_blocks:
            return
        if h in self._dram:
            self._dram.move_to_end(h)
            return
        if len(self._dram) >= self.dram_blocks:
            victim, _ = self._dram.popitem(last=False)
            self.events.append(("dram", False, victim))
        self._dram[h] = None
        self.events.append(("dram", True, h))

    def computed(self, h: bytes, block_id: int) -> None:
        if self.store is not None:
            self.store.put(h)

    def take_load_s(self) -> float:
        s, self.pending_s = self.pending_s, 0.0
        return s

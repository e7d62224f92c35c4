"""Tiers below the KV pool: blocks the pool evicts go to host DRAM, then to files on a local
disk, and come back by copy instead of recompute.

    pool (device) ──evict──► DRAM tier (a host tensor of fixed slots, LRU)
                                 │ its LRU, when full
                                 ▼
                             disk tier (one file per block in a directory, bounded bytes, LRU)

    load: DRAM ─► pool block   or   disk ─► pool block (checksum checked; a bad file is deleted
          and the block recomputed, never served)

    shared (kv/store.py, one store process for every worker): each block the worker computes
          is put there as soon as its KV is written (in the background), so another worker
          loads it instead of computing it; looked up after the worker's own tiers

The tiers are inclusive: a block loaded back stays in the tier it came from (an entry is
dropped only by its tier's LRU), so a block evicted from the pool again costs no copy.

Only the KV manager calls in (kv/manager.py: `find_run` while it looks up a prompt, `costs`
to weigh loading against recomputing, `load` for each block it allocates for a hit,
`offload` for each cached block the pool evicts, `computed` for each block the worker
computed; all inside scheduling or right after the forward, before the next step can
overwrite a block). That code stays plain: this class is handed to it, and the simulator can
hand it a plain model of the same calls.

Costs: each tier's load time per block and the engine's compute time per block are measured
here (moving averages; the engine reports its forwards: `note_compute`), so the manager can
apply Mooncake's rule: load a prefix held elsewhere only when moving it is cheaper than
recomputing it.

A disk file:  magic (8 B) | block hash (16 B) | blake2b-128 of the payload (16 B) | payload
(the block's K and V of every layer, the pool's dtype, [layers, 2, block_size, kv heads, dim]).
A file that is short, names another hash, or whose payload does not match its checksum is
corrupt: counted, deleted, and the load refused.

`events`, when a list, gets (tier, stored, hash) as hashes enter and leave each tier (the
router's prefix index, router/prefix_index.py), in order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict

import torch

from splitserve.errors import SplitServeError
from splitserve.kv.cache import KVCache
from splitserve.kv.manager import find_tier_run

log = logging.getLogger(__name__)

MAGIC = b"SSKVBLK1"
HEADER = len(MAGIC) + 16 + 16


class KVTiers:
    def __init__(self, kv: KVCache, dram_blocks: int = 0, disk_dir: str | None = None,
                 disk_blocks: int = 0, shared=None):
        if dram_blocks < 0 or disk_blocks < 0:
            raise SplitServeError("tier sizes must be >= 0 blocks")
        if disk_dir is not None and disk_blocks > 0 and dram_blocks == 0:
            raise SplitServeError("a disk KV tier needs a DRAM tier above it (--kv-host-gb)")
        self.kv = kv
        L, _, _, B, H, D = kv.kv.shape
        self.block_shape = (L, 2, B, H, D)
        self.block_nbytes = L * 2 * B * H * D * kv.kv.element_size()
        # DRAM: slots of one host tensor; hash -> slot in LRU order (front = oldest)
        self.dram = (torch.empty((L, 2, dram_blocks, B, H, D), dtype=kv.kv.dtype, device="cpu")
                     if dram_blocks else None)
        self.dram_blocks = dram_blocks
        self._dram: OrderedDict[bytes, int] = OrderedDict()
        self._dram_free = list(range(dram_blocks - 1, -1, -1))
        # disk: hash -> present, LRU order; files named by the hash
        self.disk_dir = disk_dir if disk_blocks else None
        self.disk_blocks = disk_blocks
        self._disk: OrderedDict[bytes, None] = OrderedDict()
        if self.disk_dir is not None:
            os.makedirs(self.disk_dir, exist_ok=True)
            self._adopt_disk()
        self.events: list[tuple[str, bool, bytes]] | None = None
        # bytes copied between tiers: (from, to) -> bytes
        self.moved: dict[tuple[str, str], int] = {}
        self.corrupt = 0  # disk blocks refused (checksum, size or name wrong; unreadable)
        self.lost = 0  # disk blocks the index named whose file was gone
        # the shared tier: a store_client.KVStoreClient (or anything with put/get/match)
        self.shared = shared
        # measured seconds per block: a load from each tier, and a recompute (None: not yet)
        self.load_s: dict[str, float] = {}
        self.recompute_s: float | None = None

    # -- what the manager calls ------------------------------------------------------------
    def find(self, block_hash: bytes) -> str | None:
        """The tier holding the block ("dram", "disk"), or None. Marks it recently used."""
        if block_hash in self._dram:
            self._dram.move_to_end(block_hash)
            return "dram"
        if block_hash in self._disk:
            self._disk.move_to_end(block_hash)
            return "disk"
        return None

    def find_run(self, hashes) -> list[str]:
        """The tiers holding the leading run of `hashes` ("dram", "disk", "shared"), up to
        the first none holds. The worker's own tiers first; the store is asked once per run
        of blocks they miss."""
        return find_tier_run(hashes, self.find,
                             self.shared.match if self.shared is not None else None)

    def costs(self) -> tuple[dict[str, float], float | None]:
        """(seconds per block loaded, by tier; seconds per block recomputed, or None)."""
        return self.load_s, self.recompute_s

    def note_compute(self, tokens: int, seconds: float) -> None:
        """The engine ran a forward of `tokens` prompt tokens in `seconds`."""
        if tokens > 0 and seconds > 0:
            self.recompute_s = _ewma(self.recompute_s, seconds / tokens * self.kv.block_size)

    def computed(self, block_hash: bytes, block_id: int) -> None:
        """The worker computed block `block_id` (its KV is written): share it."""
        if self.shared is None:
            return
        try:  # (one copy, out of the pool; the client sends that buffer as it is)
            self.shared.put(block_hash,
                            self.kv.kv[:, :, block_id].contiguous().view(torch.uint8).numpy())
        except Exception:  # noqa: BLE001
            log.exception("KV tier: sharing a block failed; it is not shared")

    def load(self, block_hash: bytes, block_id: int) -> bool:
        """Copy the block into pool block `block_id`. False (nothing written that matters: the
        caller recomputes) when no tier holds it any more, its disk file is bad, or the copy
        raised (the caller's bookkeeping must not be left half done)."""
        try:
            return self._load(block_hash, block_id)
        except Exception:  # noqa: BLE001 - a miss, and the block is recomputed
            log.exception("KV tier: loading a block failed; recomputing it")
            return False

    def _load(self, block_hash: bytes, block_id: int) -> bool:
        t0 = time.perf_counter()
        slot = self._dram.get(block_hash)
        if slot is not None:
            self.kv.kv[:, :, block_id].copy_(self.dram[:, :, slot])
            return self._loaded("dram", t0)
        if block_hash in self._disk:
            payload, tier = self._read(block_hash), "disk"
        elif self.shared is not None:
            payload, tier = self.shared.get(block_hash), "shared"
            if payload is not None and len(payload) != self.block_nbytes:
                self.shared.refuse(block_hash, f"has {len(payload)} bytes, not "
                                   f"{self.block_nbytes}")
                payload = None
        else:
            return False
        if payload is None:
            return False
        if not isinstance(payload, memoryview) or payload.readonly:
            payload = bytearray(payload)  # (the disk's bytes; the store's buffer is its own)
        block = torch.frombuffer(payload, dtype=torch.uint8)
        self.kv.kv[:, :, block_id].copy_(block.view(self.kv.kv.dtype).view(self.block_shape))
        return self._loaded(tier, t0)

    def _loaded(self, tier: str, t0: float) -> bool:
        self.load_s[tier] = _ewma(self.load_s.get(tier), time.perf_counter() - t0)
        self._count(tier, "device")
        return True

    def offload(self, block_hash: bytes, block_id: int) -> None:
        """The pool is about to reuse block `block_id`, which holds `block_hash`: keep a copy
        (best effort: a copy that raises is dropped, the pool's allocation goes on)."""
        if self.dram is None:
            return
        try:
            self._offload(block_hash, block_id)
        except Exception:  # noqa: BLE001
            log.exception("KV tier: keeping an evicted block failed; it is dropped")

    def _offload(self, block_hash: bytes, block_id: int) -> None:
        if block_hash in self._dram:
            self._dram.move_to_end(block_hash)
            return
        slot = self._dram_slot()
        try:
            self.dram[:, :, slot].copy_(self.kv.kv[:, :, block_id])
        except Exception:
            self._dram_free.append(slot)  # the slot is not lost with the copy
            raise
        self._dram[block_hash] = slot
        self._count("device", "dram")
        self._event("dram", True, block_hash)

    def hashes(self) -> dict[str, list[bytes]]:
        """Every hash each tier holds now (a snapshot for the prefix index)."""
        return {"dram": list(self._dram), "disk": list(self._disk)}

    # -- DRAM ------------------------------------------------------------------------------
    def _dram_slot(self) -> int:
        if self._dram_free:
            return self._dram_free.pop()
        victim, slot = self._dram.popitem(last=False)
        self._event("dram", False, victim)
        if self.disk_dir is not None:
            self._write(victim, self.dram[:, :, slot])
        return slot

    # -- disk ------------------------------------------------------------------------------
    def _path(self, block_hash: bytes) -> str:
        return os.path.join(self.disk_dir, block_hash.hex() + ".kv")

    def _adopt_disk(self) -> None:
        """Files a previous run of this worker left (oldest first): indexed, checked on load."""
        found = []
        for name in os.listdir(self.disk_dir):
            if name.endswith(".kv.tmp"):  # a write cut short (the process died)
                try:
                    os.unlink(os.path.join(self.disk_dir, name))
                except OSError:
                    pass
                continue
            stem, ext = os.path.splitext(name)
            if ext != ".kv" or len(stem) != 32:
                continue
            try:
                h = bytes.fromhex(stem)
                found.append((os.path.getmtime(os.path.join(self.disk_dir, name)), h))
            except (ValueError, OSError):
                continue
        for _, h in sorted(found):
            self._disk[h] = None
        while len(self._disk) > self.disk_blocks:
            self._disk_drop(next(iter(self._disk)), event=False)

    def _write(self, block_hash: bytes, block: torch.Tensor) -> None:
        if block_hash in self._disk:
            self._disk.move_to_end(block_hash)
            return
        while len(self._disk) >= self.disk_blocks:
            self._disk_drop(next(iter(self._disk)))
        payload = block.contiguous().view(torch.uint8).numpy().tobytes()
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        tmp = self._path(block_hash) + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + block_hash + digest)
                f.write(payload)
            os.replace(tmp, self._path(block_hash))  # never a half-written block under its name
        except OSError as e:
            log.warning("KV disk tier: could not write a block (%s); it is dropped", e)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        self._disk[block_hash] = None
        self._count("dram", "disk")
        self._event("disk", True, block_hash)

    def _read(self, block_hash: bytes) -> bytes | None:
        path = self._path(block_hash)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.lost += 1
            self._disk_drop(block_hash, unlink=False)
            return None
        except OSError:
            data = b""
        payload = data[HEADER:]
        ok = (len(data) == HEADER + self.block_nbytes and data[:len(MAGIC)] == MAGIC
              and data[len(MAGIC):len(MAGIC) + 16] == block_hash
              and hashlib.blake2b(payload, digest_size=16).digest() == data[len(MAGIC) + 16:HEADER])
        if not ok:
            self.corrupt += 1
            log.warning("KV disk tier: block %s is corrupt; recomputing it", block_hash.hex()[:12])
            self._disk_drop(block_hash)
            return None
        return payload

    def _disk_drop(self, block_hash: bytes, unlink: bool = True, event: bool = True) -> None:
        self._disk.pop(block_hash, None)
        if unlink:
            try:
                os.unlink(self._path(block_hash))
            except OSError:
                pass
        if event:
            self._event("disk", False, block_hash)

    # -- bookkeeping -----------------------------------------------------------------------
    def _count(self, src: str, dst: str) -> None:
        self.moved[(src, dst)] = self.moved.get((src, dst), 0) + self.block_nbytes

    def _event(self, tier: str, stored: bool, block_hash: bytes) -> None:
        if self.events is not None:
            self.events.append((tier, stored, block_hash))

    def moved_bytes(self) -> dict[tuple[str, str], int]:
        """Bytes copied between tiers, (from, to) -> bytes (what the store took included)."""
        out = dict(self.moved)
        if self.shared is not None and self.shared.put_bytes:
            out[("device", "shared")] = self.shared.put_bytes
        return out

    def usage(self) -> dict[str, int]:
        return {"dram_blocks": len(self._dram), "dram_capacity": self.dram_blocks,
                "disk_blocks": len(self._disk), "disk_capacity": self.disk_blocks}


def _ewma(old: float | None, new: float, w: float = 0.2) -> float:
    return new if old is None else (1 - w) * old + w * new

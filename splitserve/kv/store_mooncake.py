"""The shared KV tier on Mooncake Store (PyPI `mooncake-transfer-engine-non-cuda`, Debian
`libibverbs1`): the same four calls as the built-in store's client (kv/store_client.py) —
put in the background, get, match, refuse — over Mooncake's distributed store.

    serve --kv-shared 'mooncake://HOST:PORT?segment_gb=1'      (HOST:PORT: a mooncake_master)

Each worker's client mounts `segment_gb` of its own memory into the store (Mooncake keeps a
value in the memory of a client that mounted a segment, placed by the master), over TCP,
with peers found by handshake (no metadata server). Values are `digest | payload`, so a
damaged block is refused here as with the built-in store. Differences that matter:
- Mooncake evicts in the background (above 90 % full) and refuses puts meanwhile (counted as
  dropped); a value a get or a match touched is leased for 10 s and not evicted before.
- A worker that exits takes the blocks in its segment with it (they are recomputed).
- There is no event feed: the router's index does not know what the store holds, so routing
  counts only what each worker holds itself (a worker still finds the store's blocks).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from urllib.parse import parse_qs, urlsplit

from splitserve.errors import SplitServeError

log = logging.getLogger(__name__)

SCHEME = "mooncake://"


def parse_mooncake(addr: str) -> tuple[str, float]:
    """'mooncake://HOST:PORT?segment_gb=N' -> ('HOST:PORT', N)."""
    u = urlsplit(addr)
    if u.scheme != "mooncake" or not u.hostname or not u.port:
        raise ValueError(f"a Mooncake store address is mooncake://HOST:PORT[?segment_gb=N], got {addr!r}")
    q = parse_qs(u.query)
    unknown = set(q) - {"segment_gb"}
    if unknown:
        raise ValueError(f"unknown Mooncake store option(s) {sorted(unknown)} in {addr!r}")
    try:
        segment_gb = float(q.get("segment_gb", ["1"])[0])
    except ValueError:
        raise ValueError(f"segment_gb must be a number of GiB in {addr!r}") from None
    if not segment_gb > 0:
        raise ValueError(f"segment_gb must be > 0 in {addr!r}")
    return f"{u.hostname}:{u.port}", segment_gb


class MooncakeStoreClient:
    KEY_PREFIX = "splitserve/kv/"

    def __init__(self, addr: str, local_hostname: str = "127.0.0.1", max_queued: int = 1024):
        master, segment_gb = parse_mooncake(addr)
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as e:
            raise SplitServeError(
                f"--kv-shared {addr}: Mooncake Store is not installed ({e}); pip install "
                "mooncake-transfer-engine-non-cuda (it needs the Debian package libibverbs1), or "
                "use the built-in store (serve --kv-shared-gb N)") from None
        self._store = MooncakeDistributedStore()
        rc = self._store.setup(local_hostname, "P2PHANDSHAKE", int(segment_gb * 2**30),
                               64 * 2**20, "tcp", "", master)
        if rc != 0:
            raise SplitServeError(f"--kv-shared {addr}: Mooncake Store setup failed (code {rc}); "
                                  f"is a mooncake_master listening on {master}?")
        self._lock = threading.Lock()  # one call at a time (the put thread and the engine's)
        self._queue: queue.Queue = queue.Queue(max_queued)
        self.put_bytes = 0
        self.dropped = 0
        self.corrupt = 0
        threading.Thread(target=self._putter, name="kv-store-put", daemon=True).start()

    def _key(self, key: bytes) -> str:
        return self.KEY_PREFIX + key.hex()

    def put(self, key: bytes, payload: bytes) -> None:
        try:
            self._queue.put_nowait((key, payload))
        except queue.Full:
            self.dropped += 1

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            data = self._store.get(self._key(key))
        if not data:
            return None
        digest, payload = data[:16], data[16:]
        if len(data) < 16 or hashlib.blake2b(payload, digest_size=16).digest() != digest:
            self.refuse(key, "failed its checksum")
            return None
        return memoryview(bytearray(payload))

    def match(self, keys: list[bytes]) -> int:
        if not keys:
            return 0
        with self._lock:
            found = self._store.batch_is_exist([self._key(k) for k in keys])
        n = 0
        for f in found:
            if f != 1:
                break
            n += 1
        return n

    def refuse(self, key: bytes, why: str) -> None:
        self.corrupt += 1
        log.warning("KV store (Mooncake): block %s %s; removed, recomputing it", key.hex()[:12], why)
        with self._lock:
            self._store.remove(self._key(key), True)

    def flush(self, timeout_s: float = 5.0) -> bool:
        from splitserve.kv.store_client import drained

        return drained(self._queue, timeout_s)

    def close(self) -> None:
        with self._lock:
            self._store.close()

    def _putter(self) -> None:
        while True:
            key, payload = self._queue.get()
            try:
                value = hashlib.blake2b(payload, digest_size=16).digest() + bytes(payload)
                with self._lock:
                    rc = self._store.put(self._key(key), value)
                if rc == 0:
                    self.put_bytes += memoryview(payload).nbytes
                else:  # -200: no room until the master's eviction runs
                    self.dropped += 1
            except Exception:  # noqa: BLE001
                log.exception("KV store (Mooncake): a put failed")
                self.dropped += 1
            finally:
                self._queue.task_done()

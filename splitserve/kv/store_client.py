"""A worker's connection to the shared KV store (kv/store.py): puts in the background, gets
and matches in line, and every failure a miss.

A put takes a copy of the block made at once (the pool may reuse the block right after: the
caller copies it out, any buffer will do) and queues it; a thread hashes and sends it, with
no further copy, so the engine's step never waits on the store.
The queue is bounded: when the store is slower than the blocks come, the newest puts are
dropped (counted) — a block not in the store is only recomputed elsewhere.

A get or a match that fails (the store is down, slow or answers nonsense) is a miss, and the
client leaves the store alone for `retry_s` before it tries again, so a dead store costs one
timeout, not one per block. A block whose digest does not match its payload is refused
(counted in `corrupt`) and removed from the store, so the next lookup misses and the block is
recomputed (and put again, sound).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import socket
import threading
import time

from splitserve.kv import store as S

log = logging.getLogger(__name__)


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"a KV store address is host:port (the built-in store) or "
                         f"mooncake://host:port[?segment_gb=N] (Mooncake Store), got {addr!r}")
    return host, int(port)


def drained(q: queue.Queue, timeout_s: float) -> bool:
    """Wait until every item put on `q` is done (task_done); False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while q.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.005)
    return not q.unfinished_tasks


def is_mooncake(addr: str) -> bool:
    return addr.startswith("mooncake://")


def check_addr(addr: str) -> None:
    """Raise ValueError naming what is wrong with a shared-tier address."""
    if is_mooncake(addr):
        from splitserve.kv.store_mooncake import parse_mooncake

        parse_mooncake(addr)
    else:
        parse_addr(addr)


def connect(addr: str):
    """The shared tier's client for `addr`: the built-in store's (host:port) or Mooncake
    Store's (mooncake://...; kv/store_mooncake.py)."""
    if is_mooncake(addr):
        from splitserve.kv.store_mooncake import MooncakeStoreClient

        return MooncakeStoreClient(addr)
    return KVStoreClient(addr)


class _Conn:
    """One blocking socket, opened on demand, shut for `retry_s` after a failure."""

    def __init__(self, addr: tuple[str, int], timeout_s: float, retry_s: float):
        self.addr, self.timeout_s, self.retry_s = addr, timeout_s, retry_s
        self.sock: socket.socket | None = None
        self.down_until = 0.0
        self.failures = 0

    def call(self, op: bytes, *parts) -> tuple[bytes, memoryview] | None:
        # a connection that was open may have gone stale (the store restarted since it was
        # last used): one more try on a fresh one before the store counts as down
        for fresh in (self.sock is None, True):
            if self.sock is None:
                if time.monotonic() < self.down_until:
                    return None
                try:
                    self.sock = socket.create_connection(self.addr, timeout=self.timeout_s)
                    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError as e:
                    return self._failed(e)
            try:
                S.send_frame(self.sock, op, *parts)
                return S.recv_frame(self.sock)
            except (OSError, ConnectionError) as e:
                if fresh:
                    return self._failed(e)
                self.close()
        return None

    def _failed(self, e: Exception) -> None:
        if self.failures == 0 or self.failures % 100 == 0:
            log.warning("KV store %s:%s: %s; treated as a miss for %.0f s",
                        *self.addr, e, self.retry_s)
        self.failures += 1
        self.close()
        self.down_until = time.monotonic() + self.retry_s
        return None

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


class KVStoreClient:
    def __init__(self, addr: str, timeout_s: float = 2.0, retry_s: float = 1.0,
                 max_queued: int = 1024):
        self.addr = parse_addr(addr)
        self._get = _Conn(self.addr, timeout_s, retry_s)
        self._put = _Conn(self.addr, timeout_s, retry_s)
        self._queue: queue.Queue = queue.Queue(max_queued)
        self.put_bytes = 0  # payload bytes the store took
        self.dropped = 0  # puts not made (the queue was full, or the store failed)
        self.corrupt = 0  # blocks refused on get (digest mismatch, or a malformed answer)
        self._thread = threading.Thread(target=self._putter, name="kv-store-put", daemon=True)
        self._thread.start()

    # -- what KVTiers calls --------------------------------------------------------------------
    def put(self, key: bytes, payload) -> None:
        """Queue `payload` (bytes-like, not changed after this) for the store."""
        try:
            self._queue.put_nowait((key, payload))
        except queue.Full:
            self.dropped += 1

    def get(self, key: bytes) -> memoryview | None:
        """The block's payload (a writable buffer of its own), or None."""
        got = self._get.call(b"G", key)
        if got is None or got[0] != b"+":
            return None
        body = got[1]
        digest, payload = body[:S.DIGEST], body[S.DIGEST:]
        if len(body) < S.DIGEST or hashlib.blake2b(payload, digest_size=16).digest() != digest:
            self.refuse(key, "failed its checksum")
            return None
        return payload

    def refuse(self, key: bytes, why: str) -> None:
        """A block got from the store is bad: counted, and removed there."""
        self.corrupt += 1
        log.warning("KV store: block %s %s; removed, recomputing it", key.hex()[:12], why)
        self._get.call(b"R", key)

    def match(self, keys: list[bytes]) -> int:
        """How many of the leading keys the store holds (0 when it cannot say)."""
        if not keys:
            return 0
        got = self._get.call(b"M", *keys)
        if got is None or got[0] != b"+" or len(got[1]) != S.COUNT.size:
            return 0
        return min(S.COUNT.unpack(got[1])[0], len(keys))

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until the queued puts are sent (tests, shutdown). False on timeout."""
        return drained(self._queue, timeout_s)

    def close(self) -> None:
        self._get.close()
        self._put.close()

    # -- the put thread ------------------------------------------------------------------------
    def _putter(self) -> None:
        while True:
            key, payload = self._queue.get()
            try:
                digest = hashlib.blake2b(payload, digest_size=16).digest()
                got = self._put.call(b"P", key, digest, payload)
                if got is None or got[0] not in (b"+", b"="):
                    self.dropped += 1
                elif got[0] == b"+":
                    self.put_bytes += memoryview(payload).nbytes
            except Exception:  # noqa: BLE001 - the thread must outlive a bad block
                log.exception("KV store: a put failed")
                self.dropped += 1
            finally:
                self._queue.task_done()

"""The shared KV tier: one store process holding KV blocks in DRAM, keyed by block hash, that
every worker puts the blocks it computes into and gets blocks from, so a prefix computed on
one worker is loaded, not recomputed, on another (Mooncake Store's put/get, built in).

    worker A ──put(hash, block)──►  store (bytes bound, LRU)  ◄──get(hash)── worker B
                                        │ events: (stored | evicted, hash), in order
                                        ▼
                                    router (prefix index: held by every worker that can load)

Block hashes are chained from a root naming the model, the block size and the salt
(kv/hashing.py), so workers of different models sharing one store never collide.

Wire format (TCP; integers little-endian). A request is `op (1 B) | length (4 B) | body`, its
reply `status (1 B) | length (4 B) | body`:

    P  put       key (16) | digest (16) | payload  ->  + stored | = had it | ! too large
    G  get       key (16)                          ->  + digest | payload   | - missing
    M  match     key (16) x n                      ->  + count (4): the leading keys held
    R  remove    key (16)                          ->  + removed | - missing
    I  info                                        ->  + JSON (blocks, bytes, capacity, counts)
    S  subscribe                                   ->  a stream of  E seq (8) | (flag (1) | key (16)) x n
                                                       seq 0 is a snapshot (every key held),
                                                       then each batch of changes, in order

The digest is the putter's blake2b-128 of the payload; the store keeps it beside the payload
and the getter checks it, so a block damaged anywhere on the way is refused (and recomputed),
never served; the getter then removes it, so the next lookup misses. The store itself never
reads a payload.

`BlockStore` is the state (plain: no sockets); `serve_store` is its TCP shell, one thread per
connection. A subscriber that falls too far behind is disconnected (it reconnects and gets a
snapshot), so the store's memory stays bounded by its capacity.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import socketserver
import struct
import threading
from collections import OrderedDict, deque

log = logging.getLogger(__name__)

KEY = 16
DIGEST = 16
HEAD = struct.Struct("<cI")
SEQ = struct.Struct("<Q")
COUNT = struct.Struct("<I")
MAX_FRAME = 1 << 30
# a subscriber this many events behind is cut off (it resubscribes: a snapshot)
MAX_BACKLOG = 200_000


class BlockStore:
    """Blocks by key, within `capacity` payload bytes, least recently used evicted first.
    Thread-safe. Every change is recorded for each subscriber, in order."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"the store's capacity must be > 0 bytes, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self.nbytes = 0
        self._blocks: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()  # key -> (digest, payload)
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        self.counts = {"puts": 0, "stored": 0, "gets": 0, "hits": 0, "evictions": 0}

    def put(self, key: bytes, digest: bytes, payload: bytes) -> bytes:
        with self._lock:
            self.counts["puts"] += 1
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return b"="
            if len(payload) > self.capacity:
                return b"!"
            changes = []
            while self.nbytes + len(payload) > self.capacity:
                victim, (_, old) = self._blocks.popitem(last=False)
                self.nbytes -= len(old)
                self.counts["evictions"] += 1
                changes.append((False, victim))
            self._blocks[key] = (digest, payload)
            self.nbytes += len(payload)
            self.counts["stored"] += 1
            changes.append((True, key))
            self._publish(changes)
            return b"+"

    def get(self, key: bytes) -> tuple[bytes, bytes] | None:
        with self._lock:
            self.counts["gets"] += 1
            got = self._blocks.get(key)
            if got is not None:
                self._blocks.move_to_end(key)
                self.counts["hits"] += 1
            return got

    def remove(self, key: bytes) -> bool:
        with self._lock:
            got = self._blocks.pop(key, None)
            if got is None:
                return False
            self.nbytes -= len(got[1])
            self._publish([(False, key)])
            return True

    def match(self, keys: list[bytes]) -> int:
        """How many of the leading keys are held (not marked used: a get does that)."""
        with self._lock:
            n = 0
            for k in keys:
                if k not in self._blocks:
                    break
                n += 1
            return n

    def info(self) -> dict:
        with self._lock:
            return {"blocks": len(self._blocks), "bytes": self.nbytes,
                    "capacity": self.capacity, **self.counts}

    # -- subscribers -------------------------------------------------------------------------
    def subscribe(self) -> Subscription:
        """A new subscriber, its first batch the snapshot."""
        with self._lock:
            sub = Subscription([(True, k) for k in self._blocks])
            self._subs.append(sub)
            return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def _publish(self, changes) -> None:
        for sub in list(self._subs):
            if not sub.add(changes):
                self._subs.remove(sub)


class Subscription:
    """One subscriber's queue of changes (the snapshot first)."""

    def __init__(self, snapshot):
        self._cond = threading.Condition()
        self._snapshot = snapshot
        self._queue: deque = deque()
        self.cut = False

    def add(self, changes) -> bool:
        with self._cond:
            if len(self._queue) + len(changes) > MAX_BACKLOG:
                self.cut = True
                self._cond.notify()
                return False
            self._queue.extend(changes)
            self._cond.notify()
            return True

    def next_batch(self, timeout: float) -> list | None:
        """The snapshot, then what changed since the last batch ([] after `timeout` with
        nothing new); None once cut off."""
        with self._cond:
            if self._snapshot is not None:
                snap, self._snapshot = self._snapshot, None
                return snap
            if not self._queue and not self.cut:
                self._cond.wait(timeout)
            if self.cut:
                return None
            batch = list(self._queue)
            self._queue.clear()
            return batch


def encode_events(seq: int, changes) -> bytes:
    body = SEQ.pack(seq) + b"".join((b"\x01" if stored else b"\x00") + k for stored, k in changes)
    return HEAD.pack(b"E", len(body)) + body


def decode_events(body: bytes) -> tuple[int, list[tuple[bool, bytes]]]:
    (seq,) = SEQ.unpack_from(body)
    step = 1 + KEY
    if (len(body) - SEQ.size) % step:
        raise ValueError("a KV store event batch of the wrong length")
    return seq, [(body[i] == 1, body[i + 1:i + step]) for i in range(SEQ.size, len(body), step)]


def recv_exact(sock: socket.socket, n: int) -> memoryview:
    """n bytes, in a buffer of their own (writable: torch.frombuffer takes it as it is)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the KV store connection closed")
        got += k
    return view


def recv_frame(sock: socket.socket) -> tuple[bytes, memoryview]:
    op, n = HEAD.unpack(recv_exact(sock, HEAD.size))
    if n > MAX_FRAME:
        raise ConnectionError(f"a KV store frame of {n} bytes")
    return op, recv_exact(sock, n) if n else memoryview(b"")


def frame(op: bytes, body: bytes = b"") -> bytes:
    return HEAD.pack(op, len(body)) + body


def send_frame(sock: socket.socket, op: bytes, *parts) -> None:
    """A frame whose body is `parts` (bytes-like), sent without joining them: a block's
    payload is not copied on its way to the socket."""
    n = sum(memoryview(p).nbytes for p in parts)
    small = HEAD.pack(op, n)
    for p in parts:
        if memoryview(p).nbytes < 4096:
            small += bytes(p)
            continue
        sock.sendall(small)
        small = b""
        sock.sendall(p)
    if small:
        sock.sendall(small)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        store: BlockStore = self.server.store
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.conns.add(sock)
        try:
            while True:
                op, body = recv_frame(sock)
                if op == b"S":
                    self._stream(store, sock)
                    return
                send_frame(sock, *self._answer(store, op, body))
        except (ConnectionError, OSError):
            return
        finally:
            self.server.conns.discard(sock)

    @staticmethod
    def _answer(store: BlockStore, op: bytes, body: memoryview) -> tuple:
        """(status, *body parts). A put keeps a view of the frame's own buffer: no copy."""
        match op:
            case b"P" if len(body) >= KEY + DIGEST:
                return (store.put(bytes(body[:KEY]), bytes(body[KEY:KEY + DIGEST]),
                                  body[KEY + DIGEST:]),)
            case b"G" if len(body) == KEY:
                got = store.get(bytes(body))
                return (b"-",) if got is None else (b"+", got[0], got[1])
            case b"M" if len(body) % KEY == 0:
                keys = [bytes(body[i:i + KEY]) for i in range(0, len(body), KEY)]
                return b"+", COUNT.pack(store.match(keys))
            case b"R" if len(body) == KEY:
                return (b"+" if store.remove(bytes(body)) else b"-",)
            case b"I":
                return b"+", json.dumps(store.info()).encode()
        return b"?", f"bad request {op!r} of {len(body)} bytes".encode()

    @staticmethod
    def _stream(store: BlockStore, sock: socket.socket) -> None:
        sub = store.subscribe()
        seq = 0
        try:
            while True:
                batch = sub.next_batch(1.0)
                if batch is None:
                    log.warning("KV store: a subscriber fell behind; cut off (it resubscribes)")
                    return
                if batch or seq == 0:
                    sock.sendall(encode_events(seq, batch))
                    seq += 1
        finally:
            store.unsubscribe(sub)


class StoreServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, capacity_bytes: int):
        self.store = BlockStore(capacity_bytes)
        self.conns: set[socket.socket] = set()
        super().__init__(addr, _Handler)

    @property
    def addr(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    def stop(self) -> None:
        """Stop listening and drop every connection (as the process exiting would)."""
        self.shutdown()
        self.server_close()
        for sock in list(self.conns):
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass


def serve_store(host: str, port: int, capacity_bytes: int) -> StoreServer:
    """A running store server (its own threads); `.addr` is where it listens, `.stop()`
    stops it."""
    server = StoreServer((host, port), capacity_bytes)
    threading.Thread(target=server.serve_forever, name="kv-store", daemon=True).start()
    return server


def add_args(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (a routable one for workers on other hosts)")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--capacity-gb", type=float, required=True,
                   help="KV bytes the store holds before it evicts (least recently used)")


def main(a) -> int:
    if not a.capacity_gb > 0:
        raise SystemExit("--capacity-gb must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kv-store %(levelname)s %(message)s")
    server = serve_store(a.host, a.port, int(a.capacity_gb * 2**30))
    print(f"kv-store listening on {server.addr}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="python -m splitserve.kv.store",
                                 description="The shared KV tier's store process.")
    add_args(_p)
    raise SystemExit(main(_p.parse_args()))

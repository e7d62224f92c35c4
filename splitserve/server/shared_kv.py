"""The shared KV tier from serve's side: starting the built-in store process (kv/store.py) and
keeping the router's prefix index told what the store holds.

    serve ──starts──► store process (python -m splitserve.kv.store; restarted if it exits)
    router ◄──subscribe: snapshot, then (stored | evicted, hash) batches── store
    workers ──put / get──► store    (kv/store_client.py; told its address: --kv-shared)

The index keeps the store as one more holder (STORE_ID) whose blocks every worker can load
(PrefixIndex.add_shared). While the feed is down the index forgets the store's blocks: the
router then routes by what the workers hold themselves (a worker still asks the store).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys

from splitserve.kv import store as S
from splitserve.kv.store_client import parse_addr
from splitserve.router.prefix_index import STORE_ID

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class StoreProcess:
    """The built-in store, on a fixed port (so a restart keeps the address workers know)."""

    def __init__(self, capacity_gb: float, host: str = "127.0.0.1", port: int | None = None):
        self.capacity_gb = capacity_gb
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve.kv.store", "--host", self.host,
             "--port", str(self.port), "--capacity-gb", repr(self.capacity_gb)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    async def watch(self, every_s: float = 1.0) -> None:
        """Start it again whenever it exits (its blocks are lost: they are recomputed)."""
        while True:
            await asyncio.sleep(every_s)
            if self.proc is not None and self.proc.poll() is not None:
                self.restarts += 1
                log.error("the KV store process exited (code %s); starting it again",
                          self.proc.returncode)
                self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def feed_index(addr: str, index, retry_s: float = 0.5) -> None:
    """Keep `index` (router/prefix_index.PrefixIndex) told what the store at `addr` holds,
    for ever: subscribe, apply the snapshot and each batch in order; on a lost connection
    forget the store's blocks and subscribe again."""
    host, port = parse_addr(addr)
    index.add_shared(STORE_ID)
    warned = False
    while True:
        writer = None
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(S.frame(b"S"))
            await writer.drain()
            warned = False
            while True:
                op, n = S.HEAD.unpack(await reader.readexactly(S.HEAD.size))
                if op != b"E" or n > S.MAX_FRAME:
                    raise ConnectionError(f"the KV store sent {op!r} ({n} bytes) on its feed")
                seq, changes = S.decode_events(await reader.readexactly(n))
                tier = [("shared", stored, h) for stored, h in changes]
                if seq == 0:
                    index.snapshot(STORE_ID, [], tier)
                elif not index.apply(STORE_ID, seq, [], tier):
                    raise ConnectionError("the KV store's feed skipped a batch")
        except asyncio.CancelledError:
            raise
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as e:
            if not warned:
                log.warning("KV store feed %s: %s; routing without the store's blocks until "
                            "it is back", addr, e)
                warned = True
        finally:
            if writer is not None:
                writer.close()
        index.drop(STORE_ID)
        await asyncio.sleep(retry_s)

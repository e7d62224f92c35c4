"""local: both engines in one process; write_layer is a tensor copy between the two pools.
The plain twin of shm and tcp (tests compare the KV each of them delivers)."""

from __future__ import annotations

import time
from collections.abc import Callable

from splitserve.disagg import messages as M
from splitserve.disagg.transfer.base import KVSender
from splitserve.kv.cache import KVCache


class LocalSender(KVSender):
    transport = "local"

    def __init__(self, src: KVCache, dst: KVCache, deliver: Callable[[M.KVDone | M.KVFence | M.KVProgress], None]):
        super().__init__()
        self.src, self.dst, self.deliver = src, dst, deliver

    def write_layer(self, request_id, layer, src_block_ids, dst_block_ids) -> int:
        t0 = time.perf_counter()
        for s, d in zip(src_block_ids, dst_block_ids):
            self.dst.kv[layer, :, d].copy_(self.src.kv[layer, :, s])
        n = len(src_block_ids) * self.src.kv[layer, :, 0].numel() * self.src.kv.element_size()
        self.bytes_sent += n
        self.seconds += time.perf_counter() - t0
        return n

    def done(self, msg: M.KVDone) -> None:
        self.transfers += 1
        self.deliver(msg)

    def progress(self, request_id: str) -> None:
        self.deliver(M.KVProgress(request_id))

    def fence(self, request_id: str) -> None:
        self.deliver(M.KVFence(request_id))



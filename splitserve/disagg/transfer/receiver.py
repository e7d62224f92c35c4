"""The decode worker's end of the data plane: answers handshakes, copies tcp layers into the
pool, and hands KVDone / KVFence notices to the worker loop.

A KVLayer is written only into blocks the named request still holds while it waits for its
KV: a late layer of a request that was aborted (and whose blocks may belong to someone else
now) is dropped, never written.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
import zmq

from splitserve.disagg import messages as M
from splitserve.kv.cache import KVCache


class KVReceiver:
    def __init__(self, ctx: zmq.Context, cache: KVCache, spec: M.KVSpec, host: str,
                 reserved_blocks: Callable[[str, str], list[int] | None]):
        """reserved_blocks(request_id, sender id): the blocks that sender may write for the
        request now, else None."""
        self.cache, self.spec = cache, spec
        self.reserved_blocks = reserved_blocks
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.addr = f"tcp://{host}:{port}"
        self.bytes_received = 0
        self.senders: dict[bytes, str] = {}  # socket identity -> prefill worker id
        self.dropped_layers = 0
        self.bad: set[str] = set()  # requests one of whose layers arrived malformed

    def poll(self) -> list[tuple[str, M.KVDone | M.KVFence | M.KVProgress]]:
        """Handle everything that has arrived; returns (sender worker id, notice) in order."""
        notices = []
        while True:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return notices
            ident, head = frames[0].bytes, frames[1].bytes
            try:
                msg = M.decode_data(head)
            except Exception:
                continue  # not one of ours: ignore it rather than die
            if isinstance(msg, M.Hello):
                self._hello(ident, msg)
                continue
            sender = self.senders.get(ident)
            if sender is None:
                continue  # no handshake, no say
            if isinstance(msg, M.KVLayer) and len(frames) == 3:
                self._layer(sender, msg, frames[2])
            elif isinstance(msg, M.KVDone | M.KVFence | M.KVProgress):
                notices.append((sender, msg))

    def _hello(self, ident: bytes, msg: M.Hello) -> None:
        mismatch = self.spec.mismatch(msg.kv)
        if mismatch:
            ack = M.HelloAck(False, f"KV cache mismatch ({mismatch})")
        else:
            self.senders[ident] = msg.sender_id
            ack = M.HelloAck(True)
        self.sock.send_multipart([ident, M.encode(ack)])

    def _layer(self, sender: str, msg: M.KVLayer, frame) -> None:
        held = self.reserved_blocks(msg.request_id, sender)
        if held is None:
            self.dropped_layers += 1  # late (aborted, fenced) or not this sender's to write
            return
        if not set(msg.block_ids) <= set(held) or not 0 <= msg.layer < self.spec.num_layers:
            self.dropped_layers += 1
            self.bad.add(msg.request_id)
            return
        kv = self.cache.kv
        n = len(msg.block_ids)
        shape = (2, n, *kv.shape[3:])
        expect = 2 * n * kv[0, 0, 0].numel() * kv.element_size()
        buf = frame.buffer
        if len(buf) != expect:
            self.dropped_layers += 1
            self.bad.add(msg.request_id)
            return
        with warnings.catch_warnings():  # the frame is read-only; it is only read here
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8)).view(kv.dtype).view(shape)
        idx = torch.tensor(msg.block_ids, dtype=torch.long)
        kv[msg.layer].index_copy_(1, idx, data.to(kv.device))
        self.bytes_received += expect

    def forget(self, sender_id: str) -> None:
        """The prefill worker sender_id died: whatever still arrives on its connections
        (written before it died) has no say; its next incarnation connects anew."""
        for ident in [i for i, s in self.senders.items() if s == sender_id]:
            del self.senders[ident]

    def close(self) -> None:
        self.sock.close(linger=0)

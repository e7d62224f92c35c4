"""tcp: each layer's K/V of the request's blocks are gathered into one buffer and sent over the
data-plane socket; the decode worker's receiver copies them into its pool."""

from __future__ import annotations

import time

import torch
import zmq

from splitserve.disagg import messages as M
from splitserve.disagg.transfer.channel import ChannelSender, SenderChannel
from splitserve.kv.cache import KVCache


class TcpSender(ChannelSender):
    transport = "tcp"

    def __init__(self, ctx: zmq.Context, sender_id: str, peer: M.DecodePeer, spec: M.KVSpec,
                 cache: KVCache):
        super().__init__()
        self.cache = cache
        self.channel = SenderChannel(ctx, sender_id, peer, spec, self.transport)

    def write_layer(self, request_id, layer, src_block_ids, dst_block_ids) -> int:
        t0 = time.perf_counter()
        idx = torch.tensor(src_block_ids, dtype=torch.long, device=self.cache.kv.device)
        # [2, n, block, heads, dim]: a fresh contiguous tensor, so the local blocks can be freed
        # while ZeroMQ still sends it
        data = self.cache.kv[layer].index_select(1, idx).cpu()
        payload = data.view(torch.uint8).numpy()
        self.channel.send(M.KVLayer(request_id, layer, list(dst_block_ids)), payload)
        self.bytes_sent += payload.nbytes
        self.seconds += time.perf_counter() - t0
        return payload.nbytes


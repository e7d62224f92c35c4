"""The data-plane socket pair: a DEALER at the prefill worker, a ROUTER at the decode worker.

Both transports use it for the handshake and the ordered Done/Fence notices; tcp also sends
each layer's bytes on it (ZeroMQ sends from its own I/O thread, so the next layer computes
while this one is on the wire).
"""

from __future__ import annotations

import zmq

from splitserve.disagg import messages as M
from splitserve.disagg.transfer.base import KVSender, TransferError

HANDSHAKE_TIMEOUT_S = 10.0
# Messages queued for a peer that stopped reading; past this many frames a send fails at once
# instead of piling up (a dead peer is dropped by the router's PeerGone anyway).
SEND_HWM = 4096


class SenderChannel:
    def __init__(self, ctx: zmq.Context, sender_id: str, peer: M.DecodePeer, spec: M.KVSpec,
                 transport: str, timeout_s: float = HANDSHAKE_TIMEOUT_S):
        mismatch = spec.mismatch(peer.kv)
        if mismatch:
            raise TransferError(f"decode worker {peer.worker_id} holds a different KV cache ({mismatch})")
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.sock.connect(peer.data_addr)
        self.peer = peer
        self.send(M.Hello(sender_id, spec, transport))
        if not self.sock.poll(int(timeout_s * 1000)):
            self.close()
            raise TransferError(f"decode worker {peer.worker_id} at {peer.data_addr} did not answer "
                                f"the KV handshake within {timeout_s:.0f} s")
        ack = M.decode_data(self.sock.recv())
        if not isinstance(ack, M.HelloAck) or not ack.ok:
            self.close()
            raise TransferError(f"decode worker {peer.worker_id} refused the KV connection: "
                                f"{getattr(ack, 'reason', ack)}")

    def send(self, msg, payload=None) -> None:
        frames = [M.encode(msg)] if payload is None else [M.encode(msg), payload]
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=payload is None)
        except zmq.Again as e:
            raise TransferError(f"decode worker {self.peer.worker_id} is not taking KV data "
                                f"({SEND_HWM} messages queued)") from e

    def close(self) -> None:
        self.sock.close(linger=0)


class ChannelSender(KVSender):
    """A sender whose notices (KVDone, KVFence) go over a SenderChannel: shm and tcp."""

    channel: SenderChannel

    def done(self, msg: M.KVDone) -> None:
        self.channel.send(msg)
        self.transfers += 1

    def progress(self, request_id: str) -> None:
        self.channel.send(M.KVProgress(request_id))

    def fence(self, request_id: str) -> None:
        self.channel.send(M.KVFence(request_id))

    def close(self) -> None:
        self.channel.close()

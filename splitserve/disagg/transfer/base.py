"""The KV hand-over interface: a prefill worker writes a request's KV, layer by layer, into
blocks that a decode worker reserved for it, then says it is done.

    prefill worker (KVSender)                         decode worker (KVReceiver)
      connect: Hello(KV spec) ──────────────────────►  check spec ─► HelloAck(ok | reason)
      per computed layer:  write_layer(layer, src blocks, dst blocks)
                              shm: copy into the decode worker's pool (shared memory)
                              tcp: KVLayer + bytes ─────►  copy into the pool
      done(KVDone) ─────────────────────────────────►  admit(first token)

Invariants every backend keeps:
  - `done` is delivered after every write_layer of the request has landed (same ordered
    channel, or the writes are synchronous);
  - the sender never reads the decode worker's blocks and never frees them: the decode worker
    owns them and frees them itself on abort or timeout;
  - a sender whose peer is gone or refuses fails with TransferError naming why, never hangs.
An RDMA engine (Mooncake Transfer Engine, NIXL) fits as one more backend: write_layer is a
one-sided WRITE into the registered pool, done a notification after a fence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from splitserve.disagg.messages import KVDone
from splitserve.errors import SplitServeError


class TransferError(SplitServeError):
    """The KV could not be handed over (peer refused, gone, or too slow)."""


class KVSender(ABC):
    """One connection from a prefill worker to one decode worker."""

    transport: str = ""

    def __init__(self):
        self.bytes_sent = 0
        self.seconds = 0.0  # time spent inside write_layer / done
        self.transfers = 0

    @abstractmethod
    def write_layer(self, request_id: str, layer: int, src_block_ids: list[int],
                    dst_block_ids: list[int]) -> int:
        """Write K and V of `layer` for src_block_ids (local pool) into dst_block_ids (the
        peer's pool). Returns the bytes written."""

    @abstractmethod
    def done(self, msg: KVDone) -> None:
        """Tell the peer that every layer of msg.request_id has been written."""

    @abstractmethod
    def progress(self, request_id: str) -> None:
        """Tell the peer the request's next chunk is being written (its deadline restarts)."""

    @abstractmethod
    def fence(self, request_id: str) -> None:
        """Tell the peer that no more writes for request_id will come (it was aborted here)."""

    def close(self) -> None:  # noqa: B027 - optional: in-process senders hold nothing
        """Drop the connection (pending sends are discarded)."""

"""The KV hand-over's bookkeeping on both sides, as plain state machines: no sockets, no
torch, no clock (`now` is passed in). The worker (worker.py) turns messages into calls and
the returned decisions into sends; the simulator drives the same classes.

Prefill side — `PrefillSide`: where each request's KV goes and which blocks each chunk writes.

    blocks written for a chunk of tokens [start, end):
        [max(skip, min(next_block, start // B)), ceil(end / B))
    from block 0 on a request's first chunk (its prefix-cache hits were never computed here but
    must be sent); a partial last block is written again by the next chunk; never below `skip`,
    the leading blocks the decode worker holds already (its own prefix cache: a conversation's
    earlier turns), so only the rest of the prompt moves.

Decode side — `DecodeSide`: reservations, their deadlines and fences.

    Reserve ─► pending (FIFO, no blocks yet) ─► reserved (blocks held; deadline: the queue
      timeout, then kv_timeout from each KVProgress) ─► KVDone: admitted
      ─► deadline passed / Abort while the writer may be writing: fenced (blocks held, the
         request failed) ─► KVFence, the writer's death (PeerGone) or fence_max_s: freed

A decode worker's reserved blocks are written by someone else (one-sided, like RDMA): once a
prefill worker may be writing them they are freed only when it says it has stopped, when the
router declares it dead, or after fence_max_s — freeing them earlier could let late writes land
in blocks another request owns by then.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from splitserve.errors import SplitServeError

FENCE_MAX_S = 60.0  # a stalled prefill worker keeps fenced blocks at most this long


# -- prefill side ------------------------------------------------------------------------------
@dataclass
class Target:
    """Where one request's KV goes."""

    request_id: str
    peer_id: str  # the decode worker that reserved the blocks
    dst_blocks: list[int]
    next_block: int = 0  # blocks below this one were written in full
    bytes: int = 0
    write_seconds: float = 0.0
    error: str | None = None
    skip_blocks: int = 0  # the decode worker holds blocks [0, skip) already: never written

    def chunk_blocks(self, start: int, num_new_tokens: int, block_size: int) -> tuple[int, int]:
        """The block range [b0, b1) a chunk of tokens [start, start + num_new_tokens) writes
        (empty when the chunk lies in the blocks the decode worker holds)."""
        end = start + num_new_tokens
        b0 = max(self.skip_blocks, min(self.next_block, start // block_size))
        return b0, max(b0, -(-end // block_size))

    def chunk_written(self, start: int, num_new_tokens: int, block_size: int) -> None:
        """Every layer of the chunk is written: its full blocks need not be sent again."""
        self.next_block = (start + num_new_tokens) // block_size


class PrefillSide:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.targets: dict[str, Target] = {}

    def add(self, request_id: str, peer_id: str, dst_blocks: list[int], prompt_len: int,
            skip_blocks: int = 0) -> Target:
        if request_id in self.targets:
            raise SplitServeError(f"request id {request_id!r} is already being prefilled here")
        if len(dst_blocks) * self.block_size < prompt_len:
            raise SplitServeError(f"{len(dst_blocks)} reserved blocks cannot hold {prompt_len} "
                                  "prompt tokens")
        if not 0 <= skip_blocks <= min(len(dst_blocks), prompt_len // self.block_size):
            raise SplitServeError(f"{skip_blocks} blocks said to be held already, of a "
                                  f"{prompt_len}-token prompt in {len(dst_blocks)} blocks")
        t = self.targets[request_id] = Target(request_id, peer_id, list(dst_blocks),
                                              skip_blocks=skip_blocks)
        return t

    def get(self, request_id: str) -> Target | None:
        return self.targets.get(request_id)

    def pop(self, request_id: str) -> Target | None:
        return self.targets.pop(request_id, None)

    def drop_peer(self, peer_id: str) -> list[str]:
        """The decode worker is gone: forget (and return) the requests written to it."""
        gone = [rid for rid, t in self.targets.items() if t.peer_id == peer_id]
        for rid in gone:
            del self.targets[rid]
        return gone

    def on_output(self, request_id: str, finished: bool, got_token: bool) -> str | None:
        """What a step's output for a hand-over request means, or None when it is not one:
        "failed" (a write failed: abort it; the target is dropped), "wait" (more chunks to
        come), "no-token" (finished without a token, e.g. it outgrew the pool), "done" (send
        KVDone with the first token). The target is dropped except for "wait"."""
        t = self.targets.get(request_id)
        if t is None:
            return None
        if t.error:
            del self.targets[request_id]
            return "failed"
        if not finished:
            return "wait"
        del self.targets[request_id]
        return "done" if got_token else "no-token"


# -- decode side -------------------------------------------------------------------------------
@dataclass
class Pending:
    request_id: str
    prefill_worker_id: str
    payload: Any  # what the worker needs to reserve (its Reserve message)


@dataclass
class Reservation:
    """A request whose KV is expected from `prefill_worker_id` into blocks held here."""

    request_id: str
    prefill_worker_id: str
    payload: Any
    deadline: float
    fenced_at: float | None = None
    started: bool = False  # a KVProgress arrived: the prefill worker is writing it
    cached_blocks: int = 0  # leading blocks held here already: shared, never to be written


@dataclass(frozen=True)
class Reserved:
    request_id: str
    block_ids: list[int]
    cached_blocks: int = 0  # leading blocks that hold the prompt's KV already (not written)


@dataclass(frozen=True)
class Fail:
    request_id: str
    message: str


@dataclass(frozen=True)
class Free:
    """Abort the request in the engine: its blocks are safe to reuse (the fence from `writer`
    never came)."""

    request_id: str
    writer: str


Action = Reserved | Fail | Free


class DecodeSide:
    def __init__(self, kv_timeout_s: float = 30.0, kv_queue_timeout_s: float = 600.0,
                 fence_max_s: float = FENCE_MAX_S):
        self.kv_timeout_s = kv_timeout_s
        self.kv_queue_timeout_s = kv_queue_timeout_s
        self.fence_max_s = fence_max_s
        self.pending: deque[Pending] = deque()
        self.reservations: dict[str, Reservation] = {}

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.reservations)

    def queue(self, request_id: str, prefill_worker_id: str, payload: Any) -> None:
        self.pending.append(Pending(request_id, prefill_worker_id, payload))

    def tick(self, now: float, try_reserve: Callable[[Any], tuple[list[int], int] | None]
             ) -> list[Action]:
        """Reserve for the pending requests in order while blocks are free (`try_reserve` returns
        the block ids and how many leading ones hold the prompt's KV already, or None, or
        raises SplitServeError for a request that can never fit), then apply the deadlines."""
        actions: list[Action] = []
        while self.pending:
            p = self.pending[0]
            try:
                got = try_reserve(p.payload)
            except SplitServeError as e:
                self.pending.popleft()
                actions.append(Fail(p.request_id, str(e)))
                continue
            if got is None:
                break  # FIFO: later reservations wait behind this one
            self.pending.popleft()
            self.reservations[p.request_id] = Reservation(
                p.request_id, p.prefill_worker_id, p.payload, now + self.kv_queue_timeout_s,
                cached_blocks=got[1])
            actions.append(Reserved(p.request_id, *got))
        for rid, r in list(self.reservations.items()):
            if r.fenced_at is None and now > r.deadline:
                r.fenced_at = now
                what = (f"made no progress for {self.kv_timeout_s:g} s" if r.started else
                        f"did not start within {self.kv_queue_timeout_s:g} s")
                actions.append(Fail(rid, f"KV transfer from {r.prefill_worker_id} {what}"))
            elif r.fenced_at is not None and now - r.fenced_at > self.fence_max_s:
                del self.reservations[rid]
                actions.append(Free(rid, r.prefill_worker_id))
        return actions

    def next_deadline(self) -> float | None:
        """When tick() would next act on a reservation (a deadline, or a fence given up)."""
        times = [r.deadline if r.fenced_at is None else r.fenced_at + self.fence_max_s
                 for r in self.reservations.values()]
        return min(times) if times else None

    def writer_of(self, request_id: str) -> str | None:
        """The prefill worker allowed to write request_id's blocks now, or None."""
        r = self.reservations.get(request_id)
        return r.prefill_worker_id if r is not None and r.fenced_at is None else None

    def cached_blocks(self, request_id: str) -> int:
        """How many of request_id's leading blocks were held here already (not writable)."""
        r = self.reservations.get(request_id)
        return r.cached_blocks if r is not None else 0

    def on_progress(self, request_id: str, sender: str, now: float) -> None:
        r = self.reservations.get(request_id)
        if r is not None and r.prefill_worker_id == sender and r.fenced_at is None:
            r.started = True
            r.deadline = now + self.kv_timeout_s

    def on_done(self, request_id: str, sender: str) -> str | None:
        """KVDone from `sender`: "admit" (the reservation is over: admit it), "free" (it was
        fenced: the writer has stopped, free the blocks), or None (not ours to act on)."""
        r = self.reservations.get(request_id)
        if r is None or r.prefill_worker_id != sender:
            return None
        del self.reservations[request_id]
        return "free" if r.fenced_at is not None else "admit"

    def on_fence(self, request_id: str, sender: str) -> bool:
        """KVFence from `sender`: True when the blocks are now free to go."""
        r = self.reservations.get(request_id)
        if r is None or r.prefill_worker_id != sender:
            return False
        del self.reservations[request_id]
        return True

    def on_abort(self, request_id: str, fenced: bool, now: float) -> str:
        """The router aborts the request: "dropped" (it was only queued), "fenced" (the writer
        may still be writing: hold the blocks until it says it stopped), "free" (free the
        blocks now), or "engine" (no reservation: abort it in the engine, it may be decoding)."""
        for i, p in enumerate(self.pending):
            if p.request_id == request_id:
                del self.pending[i]
                return "dropped"
        r = self.reservations.get(request_id)
        if r is None:
            return "engine"
        if fenced:
            r.fenced_at = r.fenced_at if r.fenced_at is not None else now
            return "fenced"
        del self.reservations[request_id]
        return "free"

    def on_peer_gone(self, worker_id: str) -> list[str]:
        """A prefill worker died: its queued requests are dropped, and the blocks it was
        writing are free to go (returned: abort them in the engine)."""
        self.pending = deque(p for p in self.pending if p.prefill_worker_id != worker_id)
        gone = [rid for rid, r in self.reservations.items() if r.prefill_worker_id == worker_id]
        for rid in gone:
            del self.reservations[rid]
        return gone

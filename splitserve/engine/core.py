"""EngineCore: the part of an engine that decides — scheduler, KV manager and the role
operations — with the forward step injected. No model, no torch, no clock.

    LLMEngine  = EngineCore + ModelRunner (the real forward) + sampler + detokenizer
    simulator  = EngineCore + a latency model (sim/), forward returns placeholder tokens

Both call the same `step(forward)`: the scheduler picks the step's chunks, `forward(out)`
returns one sampled token per chunk that samples ({request_id: token}), and the scheduler
advances every request. Role operations (see scheduler.py for what each role does):

    add_request   a prompt to run here (colocated, prefill, or a decode worker's own prefill)
    reserve       decode role: hold blocks for a prompt someone else computes
    admit         decode role: that prompt's KV is in the blocks; its first token joins
    release       prefill role: the hand-over is done, free the blocks
    abort         stop a request wherever it is and free what it holds

`trace`, when set to a list, receives one StepRecord per step that scheduled anything (and
the role operations as tuples; the shells add their timings, see disagg/decision_log.py): the decision log that tests compare between the server's engine and the simulator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from splitserve.config import SchedulerConfig
from splitserve.engine.scheduler import Scheduler, SchedulerOutput
from splitserve.errors import StepFailed
from splitserve.kv.manager import KVCacheManager
from splitserve.request import Request, RequestStatus

Forward = Callable[[SchedulerOutput], dict[str, int]]


@dataclass(frozen=True)
class StepRecord:
    """One step's decisions: (request id, start, new tokens) per chunk, in batch order."""

    chunks: tuple[tuple[str, int, int], ...]
    preempted: tuple[str, ...] = ()
    finished: tuple[str, ...] = ()  # finished while scheduling (outgrew the pool)

    @classmethod
    def of(cls, out: SchedulerOutput) -> StepRecord:
        return cls(tuple((c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks),
                   tuple(out.preempted), tuple(r.request_id for r in out.finished))


class EngineCore:
    def __init__(self, config: SchedulerConfig, num_blocks: int, block_size: int, root_hash: bytes,
                 max_model_len: int, eos_token_ids: Iterable[int] = (),
                 enable_prefix_caching: bool = True, prefill_policy=None):
        self.kv = KVCacheManager(num_blocks, block_size, root_hash, enable_caching=enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv, max_model_len, eos_token_ids, prefill_policy)
        self.trace: list | None = None

    @property
    def config(self) -> SchedulerConfig:
        return self.scheduler.config

    def _log(self, entry) -> None:
        if self.trace is not None:
            self.trace.append(entry)

    # -- role operations -------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.scheduler.add_request(req)
        self._log(("add", req.request_id))

    def reserve(self, req: Request) -> tuple[list[int], int] | None:
        """Decode role: the reserved block ids and how many leading ones hold the prompt's KV
        already (reused from this worker's cache: Scheduler.reserve), or None when they are
        not free now."""
        blocks = self.scheduler.reserve(req)
        if blocks is None:
            return None
        self._log(("reserve", req.request_id, len(blocks)))
        return blocks, req.num_cached_tokens // self.kv.block_size

    def admit(self, request_id: str, first_token: int) -> Request:
        req = self.scheduler.admit(request_id, first_token)
        self._log(("admit", request_id))
        return req

    def release(self, request_id: str) -> None:
        self.scheduler.release(request_id)

    def set_role(self, config: SchedulerConfig, prefix_caching: bool) -> None:
        """Run as config.role from the next step (the caller has finished what that role
        cannot carry on: router/reroling.py); prefix caching on or off (off forgets the
        cached blocks no request holds)."""
        self.scheduler.config = config
        self.kv.set_caching(prefix_caching)
        self._log(("role", config.role))

    def abort(self, request_id: str) -> Request | None:
        """Finish the request as aborted wherever it is (a prefilled hand-off is released);
        returns it, or None when it is not here."""
        req = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        if req is not None and req.status is RequestStatus.FINISHED_PREFILLED:
            self.scheduler.release(request_id)
        if req is not None:
            self._log(("abort", request_id))
        return req

    # -- the step --------------------------------------------------------------------------
    def step(self, forward: Forward, now: float | None = None
             ) -> tuple[SchedulerOutput, list[Request]]:
        """Schedule (at `now`, for a prefill policy), run `forward` (not called for an empty
        step), advance. Returns the
        schedule (its `finished` ended while scheduling, with no token) and the requests that
        got a token. When `forward` raises, the step's requests are aborted and StepFailed
        names them."""
        out = self.scheduler.schedule(now)
        if self.trace is not None and (out.chunks or out.preempted or out.finished):
            self.trace.append(StepRecord.of(out))
        if out.is_empty:
            return out, []
        try:
            sampled = forward(out)
        except Exception as e:  # fail this step's requests, not the engine
            reqs = list({c.request.request_id: c.request for c in out.chunks}.values())
            for r in reqs:
                self.abort(r.request_id)
            self._log(("failed", *(r.request_id for r in reqs)))
            raise StepFailed(reqs, list(out.finished), e) from e
        return out, self.scheduler.update_from_output(out, sampled)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

"""Continuous batching under a per-step token budget; one scheduler for three roles.

Plain Python over plain data (no torch, no clock): the simulator drives this same code.

Each step spends at most `max_num_batched_tokens` tokens:

  chunked_prefill=True  (Sarathi-style)   running requests first, in arrival order (a decode
                                          costs 1 token, an unfinished prompt its next chunk),
                                          then waiting prompts, chunked to fill the budget
  chunked_prefill=False (prefill priority) whole waiting prompts first; decodes run only in
                                          steps where no prompt was admitted (vLLM v0 style)

When blocks run out, the most recently admitted running request is preempted by recompute
(blocks freed, put back at the head of the queue; its prefix-cache blocks often survive).

Roles differ only in where a request enters and leaves:
  colocated  add_request -> ... -> finished (stop / length)
  prefill    add_request -> first token -> FINISHED_PREFILLED, blocks held until release()
  decode     reserve() blocks -> KV written by a prefill worker -> admit(first token) -> ...
             or add_request, like colocated: a prefill the router gave the decode worker
             itself while it had nothing to decode (conditional disaggregation)

`prefill_chunk_while_decoding` caps the prompt tokens of a step that also decodes (chunked
mode): a decode worker's own prefill then advances in small chunks beside the decodes instead
of stalling them for a whole prompt. A table caps by the number of decodes, from none up
(SchedulerConfig.prefill_cap).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from splitserve.config import SchedulerConfig
from splitserve.errors import IntegrityError, InvalidRequestError
from splitserve.kv.manager import KVCacheManager
from splitserve.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    """Tokens [start, start + num_new_tokens) of `request` run through the model this step."""

    request: Request
    start: int
    num_new_tokens: int
    # The chunk reaches the last known token, so a new token is sampled from it. Fixed when
    # scheduled (the request grows once the step's token is appended).
    sample: bool = field(init=False)

    def __post_init__(self):
        self.sample = self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    # finished while scheduling (outgrew the whole pool): no chunk, but the caller reports them
    finished: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
        prefill_policy=None,
    ):
        self.config = config
        # A decode worker's own prefill chunks sized each step by a policy (router.policies.
        # SlackChunks: `cap(now, decoding, reserved, prompt, budget)`) instead of the
        # config's fixed cap; used by the steps that are given `now`.
        self.prefill_policy = prefill_policy
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished or held request

    # -- entering --------------------------------------------------------------------------
    def _check_new(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        if req.num_prompt_tokens >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {req.num_prompt_tokens} tokens; this model's context is "
                f"{self.max_model_len} tokens (prompt + output), so the prompt must be shorter"
            )
        need = -(-(req.num_prompt_tokens + 1) // self.kv.block_size)
        if need > self.kv.pool.num_blocks:
            raise InvalidRequestError(
                f"prompt needs {need} KV blocks; the cache has {self.kv.pool.num_blocks}"
            )

    def add_request(self, req: Request) -> None:
        self._check_new(req)
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    # decode role -----------------------------------------------------------------------------
    def reserve(self, req: Request) -> list[int] | None:
        """Decode role: hold blocks for req's prompt, to be written by a prefill worker.
        Returns their ids, or None when the blocks or sequence slots are not available now.

        The prompt's leading full blocks this worker already caches (an earlier turn of the
        conversation, decoded here) are reused, from the pool or its tiers: the prefill worker
        writes only the blocks after them. `req.num_cached_tokens` says how many tokens:

            blocks [0, num_cached_tokens / B)     held here already (shared, never written)
            blocks [num_cached_tokens / B, ...)   written by the prefill worker
        """
        self._check_new(req)
        busy = sum(1 for r in self.requests.values() if not r.is_finished)
        if busy >= self.config.max_num_seqs:
            return None
        computed, loads, num_hit = self.kv.prefix_hit(req, whole=True)
        if not self.kv.allocate_slots(req, req.num_prompt_tokens - num_hit, computed, loads):
            return None
        req.num_cached_tokens = num_hit
        if self.kv.enable_caching:
            self.kv.count_lookup(req.num_prompt_tokens, num_hit, loads)
        req.status = RequestStatus.WAITING_FOR_KV
        self.requests[req.request_id] = req
        return self.kv.block_ids(req.request_id)

    def admit(self, request_id: str, first_token: int) -> Request:
        """Decode role: the prompt's KV is in the reserved blocks and `first_token` was sampled
        by the prefill worker; the request joins the running batch (or finishes at once)."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.WAITING_FOR_KV:
            raise InvalidRequestError(f"request {request_id!r} has no reserved blocks to admit")
        req.num_computed_tokens = req.num_prompt_tokens
        self.kv.cache_blocks(req, req.num_computed_tokens)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self._append_token(req, first_token)
        return req

    # prefill role ----------------------------------------------------------------------------
    def release(self, request_id: str) -> None:
        """Prefill role: the hand-off is done (or abandoned); free the request's blocks."""
        req = self.requests.get(request_id)
        if req is None:
            return
        if req.status is not RequestStatus.FINISHED_PREFILLED:
            # abandoned before its first token: abort it wherever it is
            self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
            return
        del self.requests[request_id]
        self.kv.free(req)

    # -- scheduling ------------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """The next step's chunks. `now` (seconds, any fixed origin): for the prefill policy."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if self.config.chunked_prefill:
            cfg = self.config
            cap = None
            one = self.prefill_policy is not None and now is not None
            if one:  # the policy prices one prompt chunk: no second one in the step
                cap = self._policy_cap(now, budget)
            elif cfg.prefill_chunk_while_decoding is not None:
                cap = cfg.prefill_cap(sum(1 for r in self.running if _decoding(r)))
            prefill_budget = budget if cap is None else cap
            # (one: a prompt chunk among the running leaves no prefill budget for the waiting)
            budget, prefill_budget = self._schedule_running(out, budget, prefill_budget, one)
            if not out.preempted:
                self._schedule_waiting(out, min(budget, prefill_budget), chunked=True,
                                       most=1 if one else None)
        else:
            self._schedule_waiting(out, budget, chunked=False)
            if out.is_empty:
                self._schedule_running(out, budget, budget)
        return out

    def _policy_cap(self, now: float, budget: int) -> int:
        decoding, prompt = [], None
        for r in self.running:
            if _decoding(r):
                decoding.append(r)
            elif prompt is None:  # a prompt under way, or a preempted request recomputing
                prompt = r
        if prompt is None and self.waiting:
            prompt = self.waiting[0]
        reserved = [r for r in self.requests.values() if r.status is RequestStatus.WAITING_FOR_KV]
        return self.prefill_policy.cap(now, decoding, reserved, prompt,
                                       budget - len(decoding))

    def _schedule_running(self, out: SchedulerOutput, budget: int,
                          prefill_budget: int, one: bool = False) -> tuple[int, int]:
        """Running requests in order, each its next token or prompt chunk, within `budget`,
        prompt chunks also within `prefill_budget` (`one`: one prompt chunk at most); returns
        both budgets left."""
        pb = prefill_budget
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            left = req.num_tokens - req.num_computed_tokens
            num_new = min(left, budget) if left == 1 else min(left, budget, pb)
            if num_new == 0:
                i += 1  # a prompt chunk with no prefill budget left this step
                continue
            if self._outgrows_pool(req, req.num_computed_tokens + num_new, out):
                continue  # finished with "length"; running[i] is now the next request
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    return budget, pb
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, num_new))
            budget -= num_new
            if left > 1:
                pb = 0 if one else pb - num_new
            i += 1
        return budget, pb

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, chunked: bool,
                          most: int | None = None) -> int:
        # a decode worker's reservations hold sequence slots too (reserve() counts them)
        held = (sum(1 for r in self.requests.values() if r.status is RequestStatus.WAITING_FOR_KV)
                if self.config.role == "decode" else 0)
        taken = 0
        while (self.waiting and budget > 0 and len(self.running) + held < self.config.max_num_seqs
               and (most is None or taken < most)):
            req = self.waiting[0]
            if self._outgrows_pool(req, req.num_tokens, out):
                continue
            computed, loads, num_hit = self.kv.prefix_hit(req)  # (the pool, then the tiers)
            num_new = req.num_tokens - num_hit
            if chunked:
                num_new = min(num_new, budget)
            elif num_new > budget and not out.is_empty:
                break  # whole prompts only; one longer than the budget goes alone
            if not self.kv.allocate_slots(req, num_new, computed, loads):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_hit
            if req.num_preemptions == 0:  # (a readmission also hits its own output's blocks)
                req.num_cached_tokens = min(num_hit, req.num_prompt_tokens)
                if self.kv.enable_caching:
                    self.kv.count_lookup(req.num_prompt_tokens, req.num_cached_tokens, loads)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, num_hit, num_new))
            budget -= num_new
            taken += 1
        return budget

    def _outgrows_pool(self, req: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """A request whose KV for num_tokens would not fit even in an empty pool can never run
        again: preempting it would loop forever. Finish it with "length" instead."""
        if -(-num_tokens // self.kv.block_size) <= self.kv.pool.num_blocks:
            return False
        self.finish_request(req.request_id, RequestStatus.FINISHED_LENGTH)
        out.finished.append(req)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- after the model ran ---------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance every scheduled request; returns those that got a new token this step."""
        got_token = []
        for ch in out.chunks:
            req = ch.request
            if req.is_finished or req.num_computed_tokens != ch.start:
                continue  # aborted (or otherwise finished) while the step ran
            req.num_computed_tokens += ch.num_new_tokens
            self.kv.cache_blocks(req, req.num_computed_tokens)
            if ch.sample:
                self._append_token(req, sampled[req.request_id])
                got_token.append(req)
        return got_token

    def _append_token(self, req: Request, token: int) -> None:
        req.output_token_ids.append(token)
        p = req.params
        if not p.ignore_eos and token in self.eos_token_ids:
            self.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=token)
        elif token in p.stop_token_ids:
            self.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=token)
        elif len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            self.finish_request(req.request_id, RequestStatus.FINISHED_LENGTH)
        elif self.config.role == "prefill":
            self.finish_request(req.request_id, RequestStatus.FINISHED_PREFILLED)

    def finish_request(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> Request | None:
        """Finish (stop, length, abort, prefilled) a request wherever it is; frees its blocks
        unless it is a prefill-role hand-off, whose blocks wait for release()."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return req
        assert status.finished
        if req in self.running:
            self.running.remove(req)
        elif req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(req)
        req.status = status
        req.stop_reason = stop_reason
        if status is RequestStatus.FINISHED_PREFILLED:
            return req
        self.kv.free(req)
        del self.requests[request_id]
        return req

    # -- state -----------------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        held = set(self.kv.req_blocks)
        for req in self.waiting:
            if req.request_id in held:
                raise IntegrityError(f"waiting {req.request_id} holds blocks")
        for req in self.running:
            if req.status is not RequestStatus.RUNNING:
                raise IntegrityError(f"{req.request_id} in the running queue is {req.status}")
            if req.request_id not in held:
                raise IntegrityError(f"running {req.request_id} holds no blocks")
            need = -(-req.num_computed_tokens // self.kv.block_size)
            if len(self.kv.req_blocks[req.request_id]) < need:
                raise IntegrityError(f"{req.request_id} computed {req.num_computed_tokens} "
                                     f"tokens into fewer than {need} blocks")


def _decoding(req: Request) -> bool:
    """Past its prompt with only its last sampled token to run: a decode this step."""
    return req.num_tokens - req.num_computed_tokens == 1 and not req.in_prefill

"""SamplingParams (validated where they enter) and the Request the scheduler tracks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from splitserve.errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # None: no logprobs; k >= 0: the sampled token's logprob plus the top k.
    logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        def bad(msg):
            raise InvalidRequestError(msg)

        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float) or not (
            0.0 <= self.temperature <= 100.0
        ):
            bad(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be an integer >= 1, or 0 / -1 to disable, got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float) or not (
            0.0 < self.top_p <= 1.0
        ):
            bad(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad(f"seed must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad(f"stop must be non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # decode role: blocks reserved, a prefill worker writes them
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    # prefill role: first token sampled, blocks held until the hand-off releases them
    FINISHED_PREFILLED = "prefilled"

    @property
    def finished(self) -> bool:
        return self._finished  # set below for every member (a hot path of the scheduler)


for _s in RequestStatus:
    _s._finished = _s.value in ("stop", "length", "abort", "prefilled")


@dataclass
class Request:
    """One sequence. Token index ranges (n = num_tokens):

        [0, num_cached_tokens)         prefix-cache hit: KV reused, never computed here
        [0, num_computed_tokens)       KV present in this engine's blocks
        [num_computed_tokens, n)       still to run through the model (a prompt chunk, or the
                                       last sampled token during decode)
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    # Chained hashes of the full blocks of all_token_ids, filled lazily by the KV manager.
    block_hashes: list[bytes] = field(default_factory=list)
    stop_reason: int | str | None = None

    def __post_init__(self):
        if not self.prompt_token_ids:
            raise InvalidRequestError(f"request {self.request_id!r}: the prompt is empty")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

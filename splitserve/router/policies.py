"""Which worker gets a request. Plain Python over plain data (no sockets, no clock): the
simulator will call these same functions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    outstanding: int  # requests the router has sent it that are not finished
    kv_free_blocks: int  # from its last heartbeat


class LeastLoaded:
    """Fewest outstanding requests; ties go round-robin so equal workers share the load."""

    def __init__(self):
        self._turn = 0

    def pick(self, workers: list[WorkerLoad]) -> str | None:
        if not workers:
            return None
        least = min(w.outstanding for w in workers)
        tied = sorted(w.worker_id for w in workers if w.outstanding == least)
        self._turn += 1
        return tied[self._turn % len(tied)]


@dataclass(frozen=True)
class DecodeLoad:
    worker_id: str
    busy: int  # requests decoding there, or prefilling there (local prefills)


class LocalPrefill:
    """Conditional disaggregation. A request whose prefill would wait behind queued prompts at
    its prefill worker, while a decode worker has nothing to decode, is prefilled on that
    decode worker: its core would idle, and the request starts at once. Hand-overs that land
    meanwhile decode beside it, the local prefill advancing in small chunks (the decode
    worker's `prefill_chunk_while_decoding`), so their TPOT rises by a bounded step.
    (Dynamo decides by prompt length and prefill queue; DistServe never prefills on decode.)"""

    def __init__(self, min_queued_tokens: int = 1):
        self.min_queued_tokens = min_queued_tokens

    def pick(self, prefill_queued_tokens: int, decodes: list[DecodeLoad]) -> str | None:
        """The decode worker to prefill on, or None to prefill on the prefill worker."""
        if prefill_queued_tokens < self.min_queued_tokens:
            return None
        idle = sorted(d.worker_id for d in decodes if d.busy == 0)
        return idle[0] if idle else None

"""Which worker gets a request. Plain Python over plain data (no sockets, no clock): the
simulator calls these same functions. They read a worker's load by attribute: WorkerLoad and
DecodeLoad are its shape (the router passes its own views of the workers, which have these
attributes, so a route costs no object per worker)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class WorkerLoad(NamedTuple):  # the shape; the router passes its own views
    worker_id: str
    outstanding: int  # requests the router has sent it that are not finished
    kv_free_blocks: int  # from its last heartbeat


class LeastLoaded:
    """Fewest outstanding requests; ties go round-robin so equal workers share the load."""

    def __init__(self):
        self._turn = 0

    def pick(self, workers: Sequence[WorkerLoad]) -> str | None:
        if not workers:
            return None
        least = min(w.outstanding for w in workers)
        tied = sorted(w.worker_id for w in workers if w.outstanding == least)
        self._turn += 1
        return tied[self._turn % len(tied)]


class DecodeLoad(NamedTuple):
    worker_id: str
    decoding: int  # requests past their first token there (handed over, or its own)
    prefill_tokens: int  # prompt tokens of its own prefills not done yet


class LocalPrefill:
    """Conditional disaggregation: which worker prefills a request, by the work ahead of it.

    On its prefill worker the request waits for the prompts queued there: `queued + prompt`
    tokens. On a decode worker it waits for that worker's own unfinished prefills:
    `(own + prompt)` tokens, times `busy_slowdown` when requests decode there too (its prompt
    then advances in small chunks beside them). The request goes to the decode worker where that is strictly less, and never to
    one with more than `max_decoding` requests decoding. That is 0 by default: measured on
    the prefill-heavy benchmark, prefilling beside 1-2 decodes (16-token chunks) made their
    steps ~50 ms, over a 40 ms TPOT SLO, and cost more requests than the shorter TTFTs saved;
    an idle decode worker only slows the hand-overs that land while it prefills. With an
    empty prefill queue nothing changes: pure P/D. Token counts stand in for time because
    prefill and decode workers run the same engine on the same kind of cores.
    (Dynamo's conditional disaggregation looks at prompt length and prefill queue size;
    DistServe never prefills on a decode instance.)"""

    def __init__(self, busy_slowdown: float = 2.0, max_decoding: int = 0):
        self.busy_slowdown = busy_slowdown
        self.max_decoding = max_decoding

    def pick(self, prompt_tokens: int, prefill_queued_tokens: int,
             decodes: Sequence[DecodeLoad]) -> str | None:
        """The decode worker to prefill on, or None to prefill on the prefill worker."""
        def cost(d: DecodeLoad) -> float:
            return (d.prefill_tokens + prompt_tokens) * (self.busy_slowdown if d.decoding else 1.0)

        # the cheapest; among equals the least busy, then by name
        candidates = [d for d in decodes if d.decoding <= self.max_decoding]
        if not candidates:
            return None
        best = min(candidates, key=lambda d: (cost(d), d.decoding, d.prefill_tokens, d.worker_id))
        return best.worker_id if cost(best) < prefill_queued_tokens + prompt_tokens else None

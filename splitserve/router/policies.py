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
        self.turn = 0

    def pick(self, workers: Sequence[WorkerLoad]) -> str | None:
        if not workers:
            return None
        least = min(w.outstanding for w in workers)
        tied = sorted(w.worker_id for w in workers if w.outstanding == least)
        self.turn += 1
        return tied[self.turn % len(tied)]


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


# the decodes' KV length (prompt + output so far) SloLocalPrefill prices busy steps at
SLO_CHUNK_CONTEXT = 512


class SloLocalPrefill:
    """Conditional disaggregation by the TPOT SLO (serve --local-prefill slo): a decode worker
    prefills a request itself when, by the cost model (admission.CostModel), its first token
    comes sooner there than behind the prefill worker's queue, and only in chunks its decodes
    can take within the SLO: `chunks[b]` prompt tokens beside b decodes (CostModel.chunk_table;
    the decode workers' schedulers cap their steps with worker_chunks(), the same table with
    at least 1 token, so that a prefill under way still ends when hand-overs keep arriving).
    A worker whose decodes leave fewer than MIN_CHUNK tokens of room takes no new prefill.
    Idle, it prefills in the chunks one decode would allow: a hand-over that lands there waits
    for the step under way."""

    MIN_CHUNK = 4

    @classmethod
    def for_slo(cls, cost, tpot_s: float, max_decodes: int,
                context: int = SLO_CHUNK_CONTEXT) -> SloLocalPrefill:
        """The policy whose chunk table holds steps to `tpot_s` (CostModel.chunk_table)."""
        return cls(cost, cost.chunk_table(tpot_s, max_decodes, context), context)

    def __init__(self, cost, chunks: Sequence[int], context: int = SLO_CHUNK_CONTEXT):
        if not chunks:
            raise ValueError("the chunk table needs an entry per number of decodes")
        self.cost = cost
        self.chunks = tuple(chunks)
        self.context = context  # the decodes' KV length the step times are priced at

    def worker_chunks(self) -> tuple[int, ...]:
        """The table for SchedulerConfig.prefill_chunk_while_decoding (no 0: see above)."""
        return tuple(max(1, c) for c in self.chunks)

    def chunk(self, decoding: int) -> int:
        return self.chunks[min(decoding, len(self.chunks) - 1)]

    def local_s(self, d: DecodeLoad, prompt_tokens: int) -> float | None:
        """Seconds to the request's first token on decode worker `d`, or None: no room."""
        c = self.chunk(d.decoding)
        if c < self.MIN_CHUNK:
            return None
        tokens = d.prefill_tokens + prompt_tokens
        return -(-tokens // c) * self.cost.busy_step_s(d.decoding, c, self.context)

    def pick(self, prompt_tokens: int, prefill_queued_tokens: int,
             decodes: Sequence[DecodeLoad]) -> str | None:
        remote = self.cost.prefill_s(prefill_queued_tokens, prompt_tokens)
        best, best_s = None, remote
        for d in sorted(decodes, key=lambda d: (d.decoding, d.worker_id)):
            t = self.local_s(d, prompt_tokens)
            if t is not None and t < best_s:
                best, best_s = d.worker_id, t
        return best

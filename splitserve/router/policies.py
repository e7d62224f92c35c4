"""Which worker gets a request. Plain Python over plain data (no sockets, no clock): the
simulator calls these same functions. They read a worker's load by attribute: WorkerLoad and
DecodeLoad are its shape (the router passes its own views of the workers, which have these
attributes, so a route costs no object per worker)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from splitserve.router.admission import largest


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


class RoundRobin:
    """Each worker in turn, whatever its load (the blind baseline `serve --routing
    round-robin`)."""

    def __init__(self):
        self.turn = 0

    def pick(self, workers: Sequence[WorkerLoad]) -> str | None:
        if not workers:
            return None
        ids = sorted(w.worker_id for w in workers)
        self.turn += 1
        return ids[self.turn % len(ids)]


class CacheAware:
    """The worker that computes a prompt, by the work before its first token (Mooncake's
    conductor, Dynamo's KV router): the prompt tokens already queued there (a prefill
    worker's P/D prompts, a co-located worker's own unfinished ones) plus the prompt's tokens
    it does not hold in its prefix cache (router/prefix_index.py). Ties: fewer outstanding,
    then round-robin. The router asks it only when one of the candidates caches part of the
    prompt: with nothing cached, least-loaded decides. A balance guard (as SGLang's router):
    only workers within `max_imbalance` outstanding requests of the least loaded compete, so
    a hot prefix cannot draw every request (and every decode) to the one worker that holds
    it; past that, another worker computes the prefix and comes to hold it too."""

    def __init__(self, max_imbalance: int = 4):
        self.max_imbalance = max_imbalance
        self.turn = 0

    def pick(self, workers: Sequence, prompt_tokens: int,
             cached_tokens: dict[str, int], everyone: int = 0) -> str | None:
        """`cached_tokens`: worker id -> prompt tokens it holds; `everyone`: what a worker
        left out of it holds (every worker loads that much from a shared tier: loading is
        priced as free, the worker's rule (kv/manager.worth_loading) loads only what is
        cheaper than recomputing)."""
        if not workers:
            return None
        floor = min(w.outstanding for w in workers) + self.max_imbalance
        costs = {w.worker_id: (self.cost(w, prompt_tokens,
                                         cached_tokens.get(w.worker_id, everyone)),
                               w.outstanding)
                 for w in workers if w.outstanding <= floor}
        least = min(costs.values())
        tied = sorted(wid for wid, c in costs.items() if c == least)
        self.turn += 1
        return tied[self.turn % len(tied)]

    @staticmethod
    def cost(w, prompt_tokens: int, cached: int) -> int:
        """Prompt tokens the worker computes before this prompt's first token."""
        return w.queued_prompt_tokens + w.prefill_tokens + prompt_tokens - cached


class CachedDecode(CacheAware):
    """The decode worker of a hand-over, when one of them holds a prefix of the prompt (its
    prefix cache: a conversation's earlier turns decoded there): the one that holds the most,
    so the fewest blocks move (the prefill worker writes only the rest). The same balance
    guard as CacheAware: only workers within `max_imbalance` outstanding requests of the least
    loaded compete. Ties: fewer outstanding, then round-robin."""

    @staticmethod
    def cost(w, prompt_tokens: int, cached: int) -> int:
        return -cached  # the most held: the fewest blocks to move


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
    comes sooner there than behind the prefill worker's queue. The decode workers size their
    chunks by their decodes' slack (worker_policy(): SlackChunks); the router predicts them
    with `chunks[b]`, the prompt tokens a step beside b decodes may add within the SLO
    (CostModel.chunk_table: the rate slack accrues at once a request's own is spent; with
    nothing decoding, the whole step budget). A worker whose decodes leave fewer than
    MIN_CHUNK tokens a step takes no new prefill. worker_chunks() is the same table with at
    least 1 token, for a decode worker run without the policy (--local-prefill-chunk)."""

    MIN_CHUNK = 4

    @classmethod
    def for_slo(cls, cost, tpot_s: float, max_decodes: int, context: int = SLO_CHUNK_CONTEXT,
                ttft_s: float | None = None) -> SloLocalPrefill:
        """The policy whose chunk table holds steps to `tpot_s` (CostModel.chunk_table)."""
        return cls(cost, cost.chunk_table(tpot_s, max_decodes, context), context, tpot_s, ttft_s)

    def __init__(self, cost, chunks: Sequence[int], context: int = SLO_CHUNK_CONTEXT,
                 tpot_s: float | None = None, ttft_s: float | None = None):
        if not chunks:
            raise ValueError("the chunk table needs an entry per number of decodes")
        self.cost = cost
        self.chunks = tuple(chunks)
        self.context = context  # the decodes' KV length the step times are priced at
        self.tpot_s = tpot_s
        self.ttft_s = ttft_s  # given: a request the prefill worker serves within it goes there

    def worker_policy(self):
        """() -> a fresh SlackChunks for a decode worker's scheduler (needs the TPOT SLO)."""
        if self.tpot_s is None:
            raise ValueError("the decode workers' chunk policy needs the TPOT SLO")
        return lambda: SlackChunks(self.cost, self.tpot_s)

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
        if self.ttft_s is not None and remote <= self.ttft_s:
            return None  # the prefill worker meets the TTFT SLO: no decode is slowed for it
        # a local prefill that would miss the TTFT SLO anyway only slows the decodes there
        best, best_s = None, remote if self.ttft_s is None else min(remote, self.ttft_s)
        for d in sorted(decodes, key=lambda d: (d.decoding, d.worker_id)):
            t = self.local_s(d, prompt_tokens)
            if t is not None and t < best_s:
                best, best_s = d.worker_id, t
        return best


class SlackChunks:
    """A decode worker's own prefill, sized each step by the TPOT slack of the requests it
    decodes (serve --local-prefill slo; the decode workers' schedulers call `cap`).

    A request's TPOT is an average, (last token's time - first's) / (tokens - 1), so what one
    step may spend on a prompt chunk is not "SLO - a decode step" but what the requests
    decoding there can still lose and end within the SLO. A hand-over's first token reaches
    the client when the decode worker admits it, between steps, so its TPOT clock starts
    there. With `o` of its `max_tokens` out and `e` seconds since then (`o0` out then),

        slack = SLO x (max_tokens - o0) - e - (the time its remaining max_tokens - o steps take)

    what it banked on steps faster than the SLO plus what its remaining steps will bank. The
    remaining steps are priced at the batch still decoding at each of them: every request
    decoding, and every one reserved here (its KV on the way: taken to land now, the most it
    can cost), each until its own max_tokens. A step's chunk may cost, over the decode step
    alone, the smallest slack of the batch, and, while a hand-over is on its way, the slack
    that request will have (it waits for the step under way before its first token: its
    TTFT, whose own count is not known here; measured on the simulator, holding the step to
    it keeps more requests within both SLOs). `e` is measured (time passed in), so a step
    slower than predicted is paid for by the chunks after it; `headroom` (< 1) plans to that
    share of the SLO, room for the latency model's error. A request with no slack lends none;
    one that cannot meet the SLO (at its full value) even with only the requests decoding now
    has its steps held to the SLO. Nothing decoding or on its way: the whole step budget.
    Requests that stop early at EOS have fewer steps to absorb what was spent (the slack
    counts all of max_tokens).

    `cost`: an admission.CostModel (its step_s). Requests are read by attribute
    (request.Request: request_id, params.max_tokens, output_token_ids, num_tokens,
    num_computed_tokens); the state is one entry per request decoding now."""

    def __init__(self, cost, tpot_s: float, headroom: float = 0.95, calibration: int = 8):
        if not (tpot_s > 0 and math.isfinite(tpot_s)):
            raise ValueError(f"the TPOT SLO must be a positive number of seconds, got {tpot_s!r}")
        if not 0 < headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {headroom!r}")
        self.cost = cost
        self.tpot_s = tpot_s
        self.target_s = tpot_s * headroom
        self._start: dict[str, tuple[float, int]] = {}  # request id -> (start, tokens then)
        # measured / predicted time from one step's scheduling to the next (the step, and
        # what the worker does between steps), averaged over ~`calibration` steps (0: off):
        # every prediction is scaled by it
        self.calibration = calibration
        self.scale = 1.0
        self._sized: tuple[float, float] | None = None  # (now, predicted) of the last step

    def _calibrate(self, now: float) -> None:
        if self._sized is not None and self.calibration:
            then, predicted = self._sized
            took = now - then
            if predicted > 0 and 0 < took < 4 * predicted * self.scale:  # not across an idle gap
                w = 1.0 / self.calibration
                self.scale = min(3.0, max(0.5, (1 - w) * self.scale + w * took / predicted))
        self._sized = None

    def cap(self, now: float, decoding: Sequence, reserved: Sequence, prompt, budget: int) -> int:
        """Prompt tokens this step may add (0..budget) beside `decoding` (requests past their
        first token here) with `reserved` on the way; `prompt`: the request whose chunk would
        run (None: no prompt to run; the starts are still tracked)."""
        self._calibrate(now)
        k = self.scale
        starts, target = self._start, self.target_s

        def step_s(decodes, ctx, chunk=0, at=0):
            return k * self.cost.step_s(decodes, ctx, chunk, at)

        seen = {}
        lives = []  # (steps left, the SLO's time for its steps, e, tokens since its start)
        tokens = 0
        for r in decoding:
            out = len(r.output_token_ids)
            st = starts.get(r.request_id)
            if st is None:
                st = (now, out)
            seen[r.request_id] = st
            tokens += r.num_tokens
            m = r.params.max_tokens
            if m > st[1]:
                lives.append((m - out, m - st[1], now - st[0], out - st[1]))
        self._start = seen
        b = len(decoding)
        joining = []  # the steps each reserved request will decode here
        for r in reserved:
            tokens += r.num_tokens
            joining.append(r.params.max_tokens - 1)
        n = b + len(joining)
        ctx = tokens // n if n else 0
        s = step_s(b, ctx) if b else 0.0
        # the steps to come, each priced at the batch still decoding then: t_at[k], the time
        # until the requests with k steps left are done, with those reserved (as if landing
        # now: the most they can cost) and without them
        mine = [life[0] for life in lives]
        t_all, t_mine = _timeline(step_s, mine + joining, ctx), _timeline(step_s, mine, ctx)
        floor = max(0.0, target - s)  # a request past saving: its steps held to the SLO
        slack = math.inf
        for left, steps, e, _ in lives:
            own = target * steps - e - t_all[left]
            if own < 0:  # none to lend; lost even alone with those decoding now: the floor
                own = floor if self.tpot_s * steps - e - t_mine[left] < 0 else 0.0
            slack = min(slack, own)
        # a hand-over on its way waits for the step under way before its first token (TTFT,
        # not known here): the step is held to the slack it will have, when it has some
        s_all = step_s(n, ctx) if joining else 0.0
        for steps in joining:
            own = steps * (target - s_all)
            if steps > 0 and 0 <= own < slack:
                slack = own
        c = 0
        if prompt is not None and budget > 0:
            at = prompt.num_computed_tokens
            c = budget if not math.isfinite(slack) else largest(
                budget, lambda c: step_s(b, ctx, c, at) - s <= slack)
            c = min(c, prompt.num_tokens - at)
        if b or c:
            self._sized = (now, self.cost.step_s(b, ctx, c, prompt.num_computed_tokens if c else 0))
        return c


def _timeline(step_s, ends: list[int], ctx: int) -> dict[int, float]:
    """{k: seconds until the requests with k steps left are done}, for a batch of one request
    per entry of `ends` (the steps each has left), each step priced at the batch still
    decoding then."""
    t_at, t, done, active = {}, 0.0, 0, len(ends)
    for end in sorted(ends):
        if end > done:
            t += (end - done) * step_s(active, ctx)
            done = end
        t_at[end] = t
        active -= 1
    return t_at

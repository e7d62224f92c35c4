"""Admission control: whether the router takes a request, decided before any worker spends
anything on it. Plain Python over the router's own views (no sockets, no clock: `now` is passed
in), so the simulator runs this same code.

Modes (serve --admission):
    off         accept every request (the queue bounds below still hold)
    reactive    refuse on the load *now*: the prefill backlog at the chosen worker would take
                longer than the TTFT SLO, or one more request in the chosen decode worker's
                batch as it is would make a step longer than the TPOT SLO
    predictive  refuse on the load *predicted* for this request (Mooncake's early rejection):
                TTFT = the backlog ahead of it plus its own prefill at the chosen worker; TPOT
                = a decode step of the batch at the decode worker when its first token gets
                there — the requests decoding there that will not have finished by then, plus
                every request already admitted and still in prefill for that worker, plus it

Both predictions price steps with a latency model (sim/latency: `fitted:` a profile measured
here, or any other), through CostModel. Token counts come from the router's views (prompts
queued at a prefill worker, a worker's own prefills, requests decoding), lengths from each
request's prompt and max_tokens (a request that stops early at EOS frees its slot sooner than
predicted: the prediction errs toward refusing).

Queue bounds (every mode): a worker with `max_queue` requests of the router's in flight takes
no more; the request is refused (reason "queue") instead of waiting without bound.

Priority (vLLM's `priority` field: lower is more important, 0 the default): a request of
priority p > 0 is judged against its SLOs times LOW_PRIORITY_SHARE**p and may fill a worker's
queue only to LOW_PRIORITY_QUEUE of `max_queue`, so under load the less important requests are
refused first and the rest of the headroom stays with the others. (They are not preempted
once running: the schedulers do not know priorities.)

A refusal carries Retry-After: for TTFT, how much longer the predicted wait is than the SLO;
for TPOT, when enough of the decoding requests will have finished for the batch to meet it;
for a full queue, 1 s. At least 1 s, rounded up to whole seconds (the header's unit)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from splitserve.errors import ServiceUnavailable
from splitserve.sim.latency.base import Batch, LatencyModel

MODES = ("off", "reactive", "predictive")
REASONS = ("ttft", "tpot", "queue")
CTX_BUCKET = 64  # decode step times are memoised per batch size and context / this
LOW_PRIORITY_SHARE = 0.8  # the share of its SLOs one priority level above 0 may use
LOW_PRIORITY_QUEUE = 0.75  # the share of max_queue requests of priority > 0 may fill
UNBOUNDED_S = 1e9  # an SLO a request does not set


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    @classmethod
    def given(cls, ttft_s: float | None, tpot_s: float | None) -> SLO | None:
        """A request's own SLOs (None: it gave none); one it leaves out is unbounded, so the
        deployment's applies there (Admission.decide takes the tighter of the two)."""
        if ttft_s is None and tpot_s is None:
            return None
        return cls(UNBOUNDED_S if ttft_s is None else ttft_s, UNBOUNDED_S if tpot_s is None else tpot_s)

    def __post_init__(self):
        for name, v in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"SLO {name} must be a positive number of seconds, got {v!r}")


@dataclass(frozen=True)
class Verdict:
    admit: bool
    reason: str = ""  # one of REASONS when refused
    message: str = ""
    retry_after_s: int = 0
    ttft_s: float | None = None  # the predicted (or, reactive: current) figures it weighed
    tpot_s: float | None = None


ADMIT = Verdict(True)


class Overloaded(ServiceUnavailable):
    """The router refused the request to keep the admitted ones within their SLOs, or a
    queue is full (an HTTP 429 with Retry-After). Nothing was sent to any worker."""

    def __init__(self, verdict: Verdict):
        super().__init__(verdict.message)
        self.verdict = verdict

    @property
    def reason(self) -> str:
        return self.verdict.reason

    @property
    def retry_after_s(self) -> int:
        return self.verdict.retry_after_s


class CostModel:
    """Step times of the shapes admission asks about, from a latency model. `chunk_tokens`:
    a worker's prompt tokens per step (max_num_batched_tokens); `busy_chunk_tokens`: a decode
    worker's per step of its own prefill while it also decodes (--local-prefill-chunk: a
    number, or a table by number of decodes, as SchedulerConfig.prefill_chunk_while_decoding);
    a co-located worker has no such cap. `overhead_s`: what a request spends outside engine
    steps before its first token (API, router hops, the KV hand-over), added to every
    predicted TTFT."""

    def __init__(self, latency: LatencyModel, chunk_tokens: int = 512,
                 busy_chunk_tokens: int | tuple[int, ...] = 8, overhead_s: float = 0.0):
        table = busy_chunk_tokens if isinstance(busy_chunk_tokens, tuple) else (busy_chunk_tokens,)
        if chunk_tokens < 1 or not table or min(table) < 1:
            raise ValueError("chunk sizes must be at least one token")
        self.latency = latency
        self.chunk_tokens = chunk_tokens
        self.busy_chunk_tokens = busy_chunk_tokens
        self.overhead_s = overhead_s
        self._decode: dict[tuple[int, int], float] = {}
        self._chunk: dict[tuple[int, int, int, int], float] = {}

    def decode_step_s(self, batch: int, context: int) -> float:
        """One step of `batch` decodes, each with about `context` tokens of KV."""
        if batch <= 0:
            return 0.0
        bucket = max(0, context) // CTX_BUCKET
        key = (batch, bucket)
        t = self._decode.get(key)
        if t is None:
            ctx = bucket * CTX_BUCKET + CTX_BUCKET // 2
            t = self.latency.step_time(Batch(decode_context=(ctx,) * batch))
            _keep(self._decode, key, t)
        return t

    def _chunk_s(self, tokens: int, context: int, decodes: int, decode_ctx: int) -> float:
        """A step of `tokens` prompt tokens (none: decodes alone) after `context` cached ones,
        beside `decodes` decodes; contexts priced at their bucket's floor."""
        key = (tokens, context // CTX_BUCKET, decodes, decode_ctx // CTX_BUCKET)
        t = self._chunk.get(key)
        if t is None:
            chunk = ((tokens,), ((context // CTX_BUCKET) * CTX_BUCKET,)) if tokens > 0 else ((), ())
            t = self.latency.step_time(Batch(
                *chunk, ((decode_ctx // CTX_BUCKET) * CTX_BUCKET,) * decodes))
            _keep(self._chunk, key, t)
        return t

    def busy_chunk(self, decodes: int) -> int:
        """A decode worker's prompt tokens per step beside `decodes` decodes (as
        SchedulerConfig.prefill_cap: a table is indexed from 0 decodes)."""
        c = self.busy_chunk_tokens
        if isinstance(c, tuple):
            return min(c[min(decodes, len(c) - 1)], self.chunk_tokens)
        return c if decodes else self.chunk_tokens

    def prefill_s(self, backlog_tokens: int, prompt_tokens: int, decodes: int = 0,
                  decode_ctx: int = 0, capped: bool = True) -> float:
        """Seconds until a prompt of `prompt_tokens` has its first token, behind
        `backlog_tokens` of other prompts, on a worker that also decodes `decodes` requests
        (of about `decode_ctx` tokens) in the same steps: every chunk a step, of busy_chunk()
        tokens on a decode worker (`capped`), of the whole budget on a co-located one. The
        backlog's chunks are priced at one chunk's worth of context each (its prompts'
        lengths are not known here, only their sum)."""
        chunk = self.busy_chunk(decodes) if capped else self.chunk_tokens
        total = 0.0
        if backlog_tokens > 0:
            full, rest = divmod(backlog_tokens, chunk)
            if full:
                total += full * self._chunk_s(chunk, chunk, decodes, decode_ctx)
            if rest:
                total += self._chunk_s(rest, chunk, decodes, decode_ctx)
        done = 0
        while done < prompt_tokens:
            n = min(chunk, prompt_tokens - done)
            total += self._chunk_s(n, done, decodes, decode_ctx)
            done += n
        return total + (self.overhead_s if prompt_tokens else 0.0)

    def busy_step_s(self, decodes: int, chunk: int, context: int) -> float:
        """One step of `decodes` decodes (about `context` tokens each) plus a prompt chunk."""
        return self._chunk_s(chunk, 0, decodes, context)

    def step_s(self, decodes: int, decode_ctx: int, chunk: int = 0, chunk_start: int = 0) -> float:
        """One step of `decodes` decodes (about `decode_ctx` tokens of KV each) plus, when
        `chunk` > 0, `chunk` prompt tokens from position `chunk_start`: with and without the
        chunk priced alike (context buckets), so their difference is the chunk's own cost."""
        chunk = max(0, chunk)
        return self._chunk_s(chunk, chunk_start if chunk else 0, decodes, decode_ctx)

    def chunk_table(self, tpot_s: float, max_decodes: int, context: int,
                    max_chunk: int | None = None) -> tuple[int, ...]:
        """For 0, 1, 2, ... decodes: the most prompt tokens a step may add and still take at
        most `tpot_s` (0: not one), as SchedulerConfig.prefill_chunk_while_decoding takes it;
        with nothing decoding, the whole budget (`max_chunk`, else chunk_tokens). The
        trailing repeats of the last entry are dropped."""
        top = max_chunk or self.chunk_tokens
        out = []
        for b in range(1, max_decodes + 1):
            out.append(largest(top, lambda c, b=b: self.busy_step_s(b, c, context) <= tpot_s))
            if out[-1] == 0:
                break
        out.insert(0, top)
        while len(out) > 1 and out[-1] == out[-2]:
            out.pop()
        return tuple(out)

    def max_batch(self, tpot_s: float, context: int, limit: int = 4096) -> int:
        """The largest decode batch whose step meets `tpot_s` (0: not even one request)."""
        return largest(limit, lambda b: self.decode_step_s(b, context) <= tpot_s)


MEMO_MAX = 1 << 16  # step times memoised per CostModel table; past it the table starts over


def _keep(memo: dict, key, value: float) -> None:
    """Memoise a step time, the table bounded: a long-lived router or decode worker asks about
    ever new shapes (chunk sizes by position, batches by context)."""
    if len(memo) >= MEMO_MAX:
        memo.clear()
    memo[key] = value


def largest(hi: int, fits) -> int:
    """The largest n in [0, hi] with fits(n), by bisection: fits must hold up to some n and
    not above it (step times never fall as a batch or a chunk grows: latency models are
    monotone). fits(0) is taken as true."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _retry(seconds: float) -> int:
    return max(1, math.ceil(seconds)) if math.isfinite(seconds) else 60


class Admission:
    """Decides for one request once the router has chosen its workers (RouterState.route
    calls `decide` with the track before charging any load). `slo`: the deployment's; a
    request may bring its own (`decide(..., slo=)`)."""

    def __init__(self, mode: str = "off", cost: CostModel | None = None, slo: SLO | None = None,
                 max_queue: int = 0):
        if mode not in MODES:
            raise ValueError(f"admission mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode != "off" and (cost is None or slo is None):
            raise ValueError(f"admission {mode!r} needs a cost model (a latency model) and SLOs")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 (0: unbounded), got {max_queue}")
        self.mode = mode
        self.cost = cost
        self.slo = slo
        self.max_queue = max_queue
        self.counts = {"admitted": 0, **{r: 0 for r in REASONS}}

    def decide(self, state, track, now: float, slo: SLO | None = None,
               priority: int = 0) -> Verdict:
        """A request's own `slo` may tighten the deployment's, never loosen it: the TPOT of a
        batch is everyone's, and one request must not push the others past theirs."""
        if slo is None or self.slo is None:
            slo = slo or self.slo
        else:
            slo = SLO(min(slo.ttft_s, self.slo.ttft_s), min(slo.tpot_s, self.slo.tpot_s))
        if priority > 0 and slo is not None:
            share = LOW_PRIORITY_SHARE ** min(priority, 64)
            slo = SLO(slo.ttft_s * share, slo.tpot_s * share)
        v = self._decide(state, track, now, slo, priority)
        self.counts["admitted" if v.admit else v.reason] += 1
        return v

    def _decide(self, state, t, now: float, slo: SLO | None, priority: int = 0) -> Verdict:
        legs = [w for w in (t.worker, t.prefill, t.decode) if w is not None]
        if self.max_queue:
            bound = self.max_queue if priority <= 0 else max(1, int(self.max_queue * LOW_PRIORITY_QUEUE))
            for wid in legs:
                if state.workers[wid].outstanding >= bound:
                    return Verdict(False, "queue", f"worker {wid} has {bound} requests in flight "
                                   f"(its queue is full{' for priority > 0' if priority > 0 else ''});"
                                   " retry later", 1)
        if self.mode == "off" or slo is None:
            return ADMIT
        first = state.workers[t.worker or t.prefill]  # where its prompt is prefilled
        dec = state.workers[t.worker or t.decode]  # where it decodes
        ctx = t.prompt_len + t.max_tokens // 2
        # the prefill leg: prompts ahead of it there, and (a worker that prefills its own
        # requests) the decodes its steps carry
        backlog = first.prefill_tokens if t.worker else first.queued_prompt_tokens
        decodes = first.decoding if t.worker else 0
        capped = first.role == "decode"  # a decode worker's own prefill: small chunks
        cost = self.cost
        decoding = self._decoding(state, dec)  # (remaining tokens, context) each
        dctx = (sum(c for _, c in decoding) // len(decoding)) if decoding else ctx
        tpot_now = cost.decode_step_s(max(1, len(decoding)), dctx)
        # when each request of the batch the newcomer would join leaves it, from now
        if self.mode == "reactive":
            ttft = cost.prefill_s(backlog, 0, decodes, dctx, capped)
            leaves = [left * tpot_now for left, _ in decoding]
        else:
            ttft = cost.prefill_s(backlog, t.prompt_len, decodes, dctx, capped)
            leaves = [left * tpot_now for left, _ in decoding if left * tpot_now > ttft]
            # admitted, still before their first token: they will be decoding there by then
            # and stay their whole max_tokens (from about when the newcomer arrives)
            leaves += [ttft + o.max_tokens * tpot_now for rid in dec.requests
                       if (o := state.tracks.get(rid)) is not None and not o.first_token]
        tpot = cost.decode_step_s(len(leaves) + 1, max(dctx, ctx))
        if ttft > slo.ttft_s:
            return Verdict(False, "ttft", f"predicted time to first token {ttft:.2f} s exceeds "
                           f"the SLO of {slo.ttft_s:g} s ({self.mode} admission); retry later",
                           _retry(ttft - slo.ttft_s), ttft, tpot)
        if tpot > slo.tpot_s:
            # when enough of that batch will have left for the newcomer to fit in it
            fits = cost.max_batch(slo.tpot_s, max(dctx, ctx))
            shed = len(leaves) + 1 - fits
            wait = sorted(leaves)[shed - 1] if 0 < shed <= len(leaves) else math.inf
            return Verdict(False, "tpot", f"predicted time per output token {tpot * 1000:.0f} ms "
                           f"exceeds the SLO of {slo.tpot_s * 1000:g} ms ({self.mode} admission); "
                           "retry later", _retry(wait), ttft, tpot)
        return Verdict(True, ttft_s=ttft, tpot_s=tpot)

    @staticmethod
    def _decoding(state, w) -> list[tuple[int, int]]:
        """(tokens left, context) of each request past its first token on worker view `w`."""
        out = []
        for rid in w.requests:
            o = state.tracks.get(rid)
            if o is not None and o.first_token and (o.worker or o.decode) == w.worker_id:
                out.append((max(0, o.max_tokens - o.tokens_out), o.prompt_len + o.tokens_out))
        return out

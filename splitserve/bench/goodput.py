"""SLO attainment and goodput: pure arithmetic on recorded timings (no I/O, no clock).

A request's timeline, every time in seconds on the client's monotonic clock:
    t_due      when the workload wanted it sent (its arrival time)
    t_sent     when it was sent (later than t_due only if the client fell behind or a
               concurrency cap held it)
    token_times[0] = t_first ... token_times[-1] = t_last    one entry per chunk that carried text
    t_done     the end of the stream
    TTFT = t_first - t_sent      TPOT = (t_last - t_first) / (n_out - 1)      E2E = t_done - t_sent
TPOT is None when n_out <= 1: a request with one token has no decode phase, so it meets any
TPOT SLO and is left out of TPOT percentiles (vLLM's benchmark does the same).

SLO attainment = the fraction of *all* requests that finished and met both SLOs (a failed
request is a miss). Goodput (DistServe) = the highest rate whose attainment >= 90 %, found by
bisection on the rate, each probe running the real load at that rate (`measure`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    ok: bool
    t_due: float
    t_sent: float
    t_done: float
    token_times: list[float]
    n_out: int  # tokens generated: the server's usage count if it sent one, else text chunks
    input_len: int
    output_len: int  # tokens asked for
    error: str | None = None
    meta: dict = field(default_factory=dict)
    rejected: bool = False  # refused by admission control (HTTP 429): not a failure to serve

    @property
    def t_first(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def t_last(self) -> float | None:
        return self.token_times[-1] if self.token_times else None

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_sent

    @property
    def tpot(self) -> float | None:
        if self.n_out <= 1 or not self.token_times:
            return None
        return (self.t_last - self.t_first) / (self.n_out - 1)

    @property
    def e2e(self) -> float:
        return self.t_done - self.t_sent

    @property
    def send_lag(self) -> float:
        return self.t_sent - self.t_due

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive text chunks (one token each on a one-token-per-chunk server)."""
        return np.diff(self.token_times).tolist()

    def meets(self, ttft_slo: float, tpot_slo: float) -> bool:
        if not self.ok or self.ttft is None:
            return False
        return self.ttft <= ttft_slo and (self.tpot is None or self.tpot <= tpot_slo)


def attainment(records: Sequence[RequestRecord], ttft_slo: float, tpot_slo: float) -> float:
    if not records:
        raise ValueError("no requests were recorded: attainment is undefined")
    return sum(r.meets(ttft_slo, tpot_slo) for r in records) / len(records)


def met_slo(records: Sequence[RequestRecord], ttft_slo: float, tpot_slo: float) -> int:
    """Requests that finished within both SLOs (attainment's numerator)."""
    return sum(r.meets(ttft_slo, tpot_slo) for r in records)


def percentiles(values: Iterable[float], ps: Sequence[int] = PERCENTILES) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"n": 0, "mean": None} | {f"p{p}": None for p in ps}
    return {"n": int(v.size), "mean": float(v.mean())} | {
        f"p{p}": float(np.percentile(v, p)) for p in ps}


def summarize(records: Sequence[RequestRecord]) -> dict:
    """Latency percentiles over the finished requests, and throughput over the whole run."""
    done = [r for r in records if r.ok]
    span = (max(r.t_done for r in records) - min(r.t_sent for r in records)) if records else 0.0
    out_tokens = sum(r.n_out for r in done)
    return {
        "requests": len(records),
        "rejected": sum(r.rejected for r in records),  # 429: refused before any work
        "failed": sum(not r.ok and not r.rejected for r in records),
        "short": sum(r.n_out < r.output_len for r in done),  # the server stopped early
        "duration_s": span,
        "request_throughput": len(done) / span if span > 0 else None,
        "output_token_throughput": out_tokens / span if span > 0 else None,
        "ttft_s": percentiles(r.ttft for r in done),
        "tpot_s": percentiles(r.tpot for r in done),
        "itl_s": percentiles(g for r in done for g in r.itl),
        "e2e_s": percentiles(r.e2e for r in done),
        "send_lag_s": percentiles(r.send_lag for r in records),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


@dataclass
class GoodputResult:
    rate: float  # the highest rate probed that met the target; 0.0 if even `lo` missed it
    probes: list[tuple[float, float]]  # (rate, attainment) in the order they were run
    capped: bool  # `hi` itself met the target: the goodput may be higher, raise hi

    def to_dict(self) -> dict:
        return {"rate": self.rate, "capped": self.capped,
                "probes": [{"rate": r, "attainment": a} for r, a in self.probes]}


def goodput_bisect(measure: Callable[[float], float], lo: float, hi: float, target: float = 0.9,
                   tol: float = 0.05) -> GoodputResult:
    """The highest rate in [lo, hi] with measure(rate) >= target, to within `tol` (req/s).

    Assumes attainment falls as the rate rises; a noisy, non-monotone curve still ends with a
    rate that was measured to meet the target. Probes lo first (a miss there ends it before any
    overloaded run), then hi, then ~log2((hi - lo) / tol) midpoints: a load run each."""
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    probes: list[tuple[float, float]] = []

    def probe(rate: float) -> bool:
        a = measure(rate)
        probes.append((rate, a))
        return a >= target

    if not probe(lo):
        return GoodputResult(0.0, probes, capped=False)
    if probe(hi):
        return GoodputResult(hi, probes, capped=True)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return GoodputResult(lo, probes, capped=False)


def slo_scale_sweep(records: Sequence[RequestRecord], ttft_slo: float, tpot_slo: float,
                    scales: Sequence[float]) -> list[dict]:
    """Attainment at one rate as both SLOs are multiplied by each scale (< 1 tightens), as in
    DistServe Fig. 8's lower row. Re-scoring the same records needs no new run."""
    return [{"slo_scale": s, "ttft_slo_s": ttft_slo * s, "tpot_slo_s": tpot_slo * s,
             "attainment": attainment(records, ttft_slo * s, tpot_slo * s)} for s in scales]


def per_core(rate: float, cores: int) -> float:
    """Goodput per CPU core serving it: DistServe normalises per GPU so that deployments of
    different sizes compare; here the unit of hardware is a core."""
    if cores <= 0:
        raise ValueError(f"cores must be positive, got {cores}")
    return rate / cores


def to_markdown(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table of `rows` (dicts); columns default to the first row's keys. Floats get
    4 significant digits; None prints as a dash."""
    if not rows:
        return ""
    cols = list(columns or rows[0].keys())

    def cell(v) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)

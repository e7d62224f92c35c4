"""The `fitted` latency model: a step time linear in a few batch features, fitted by
non-negative least squares to engine steps measured by `splitserve profile` (sim/profile.py).

DistServe fits prefill as `a + b·Σl + c·Σl²` and decode as `a + b·Σ(ctx+1) + c·B`; one step
here may hold both (chunked prefill, a decode worker's own prefill), and a chunk may start
after s cached tokens, so the features are those of any batch:

    step              1                         scheduler, input building, launch overheads
    prefill_tokens    Σ l                       the chunks' rows through every linear
    prefill_attention Σ (l·s + l(l+1)/2)        (query, key) pairs of causal attention over
                                                the chunk: l queries on s cached keys plus the
                                                triangle of the chunk itself
    chunks            number of chunks          per-chunk attention call, one sampled row each
    decodes           B                         a row through every linear, the LM head and
                                                the sampler, the detokenizer, per request
    decode_context    Σ (ctx+1)                 KV read by the decode attention
    row_tiles         ceil(T / 8), T the step's  the CPU kernel's passes over the weights: it
                      rows (prompt + decode)     multiplies up to 8 rows per pass (MT in
                                                 kernels/gemv.c), so a 9th row costs a pass

On one core of the dev VM (Zen 3, no AVX-512 BF16; SmolLM2-135M bf16) a step costs ~18 ms
plus ~6.3 ms per prompt row and ~7.4 ms per decode row (every decode row also runs the LM head
and the sampler): compute dominates from a few rows on. Without `row_tiles` decode time bends
upwards in B where a linear fit cannot follow (+12 % at B=8, -8 % at B=1; in a served run a
step of 9 decodes took 21 ms more than one of 8). Non-negative coefficients keep extrapolation
monotone: a bigger batch never takes less time. The fit weights each point by 1 / its time, so it minimises relative error: a
10 ms decode step counts as much as a 3 s prefill.

Plain Python and numpy: the simulator imports this, never torch.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from splitserve.sim.latency.base import Batch, LatencyModel

FEATURES = ("step", "prefill_tokens", "prefill_attention", "chunks", "decodes", "decode_context",
            "row_tiles")
ROW_TILE = 8  # rows per pass of the CPU GEMV kernel (MT in kernels/gemv.c)
PROFILE_FORMAT = "splitserve-profile"
KINDS = ("prefill", "decode", "mixed")


def features(batch: Batch) -> tuple[float, ...]:
    pairs = sum(n * s + n * (n + 1) / 2 for n, s in zip(batch.prefill_tokens, batch.prefill_context))
    rows = batch.num_prefill_tokens + batch.num_decodes
    return (1.0, float(batch.num_prefill_tokens), float(pairs), float(len(batch.prefill_tokens)),
            float(batch.num_decodes), float(sum(batch.decode_context) + batch.num_decodes),
            float(-(-rows // ROW_TILE)))


def kind_of(batch: Batch) -> str:
    if not batch.decode_context:
        return "prefill"
    return "mixed" if batch.prefill_tokens else "decode"


CONTENDED = 0.9  # a step that had its core for less of its wall time than this lost it


@dataclass(frozen=True)
class Sample:
    """One timed engine step. Samples with the same `point` are repeats of one grid point.
    `cpu_seconds`: the CPU time of a one-thread CPU step (None elsewhere)."""

    batch: Batch
    seconds: float
    point: str = ""
    cpu_seconds: float | None = None

    @property
    def contended(self) -> bool:
        return self.cpu_seconds is not None and self.cpu_seconds < CONTENDED * self.seconds

    @property
    def own_core_seconds(self) -> float:
        """The step's time on a core of its own: its wall time, unless other processes took
        the core for part of it (a shared machine), then the CPU time it actually ran."""
        return self.cpu_seconds if self.contended else self.seconds

    def to_json(self) -> dict:
        b = self.batch
        d = {"point": self.point, "prefill_tokens": list(b.prefill_tokens),
             "prefill_context": list(b.prefill_context), "decode_context": list(b.decode_context),
             "seconds": self.seconds}
        if self.cpu_seconds is not None:
            d["cpu_seconds"] = self.cpu_seconds
        return d

    @classmethod
    def from_json(cls, d: dict) -> Sample:
        b = Batch(tuple(int(x) for x in d.get("prefill_tokens", ())),
                  tuple(int(x) for x in d.get("prefill_context", ())),
                  tuple(int(x) for x in d.get("decode_context", ())))
        cpu = d.get("cpu_seconds")
        return cls(b, float(d["seconds"]), str(d.get("point", "")), None if cpu is None else float(cpu))


@dataclass(frozen=True)
class Point:
    """A grid point: its repeats' median `own_core_seconds` (robust to the odd slow step: a
    GC pause, a page fault storm) against the mean of their features (repeats of a decode
    point differ by one token of context per step)."""

    label: str
    kind: str
    x: tuple[float, ...]
    seconds: float
    repeats: int


def points(samples: Iterable[Sample]) -> list[Point]:
    groups: dict[tuple, list[Sample]] = {}
    for i, s in enumerate(samples):
        if s.batch.is_empty:
            continue
        key = (s.point, kind_of(s.batch)) if s.point else (f"#{i}", kind_of(s.batch))
        groups.setdefault(key, []).append(s)
    out = []
    for (label, kind), group in groups.items():
        xs = np.array([features(s.batch) for s in group])
        out.append(Point(label, kind, tuple(xs.mean(axis=0)),
                         statistics.median(s.own_core_seconds for s in group), len(group)))
    return out


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| over x >= 0, exactly: the optimum is the unconstrained least-squares
    solution on some subset of the columns (the rest at 0), so try every subset. 2^7 small
    solves; columns are scaled to unit size first (the attention pairs run to millions)."""
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    k = a.shape[1]
    best, best_x = float(b @ b), np.zeros(k)
    for r in range(1, k + 1):
        for cols in itertools.combinations(range(k), r):
            sub = a[:, cols]
            x, *_ = np.linalg.lstsq(sub, b, rcond=None)
            if (x < 0).any():
                continue
            res = sub @ x - b
            cost = float(res @ res)
            if cost < best - 1e-15:
                best, best_x = cost, np.zeros(k)
                best_x[list(cols)] = x
    return best_x / scale


class FittedLatency(LatencyModel):
    name = "fitted"

    def __init__(self, coefficients: Mapping[str, float], source: str = "", info: str = ""):
        """`coefficients`: seconds per unit of each feature (FEATURES; missing ones are 0);
        `source`: where they came from (a profile path), `info`: what was profiled."""
        unknown = set(coefficients) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown latency features {sorted(unknown)}; known: {list(FEATURES)}")
        coef = []
        for f in FEATURES:
            v = coefficients.get(f, 0.0)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"coefficient {f!r} must be a finite number >= 0, got {v!r}")
            coef.append(float(v))
        if sum(coef) == 0:
            raise ValueError("every coefficient is 0: that model says every step takes no time")
        self.coef = tuple(coef)
        self.source = source
        self.info = info

    @property
    def coefficients(self) -> dict[str, float]:
        return dict(zip(FEATURES, self.coef))

    def step_time(self, batch: Batch) -> float:
        return sum(c * x for c, x in zip(self.coef, features(batch)))

    def describe(self) -> str:
        c = self.coefficients
        what = f"{self.info}; " if self.info else ""
        return (f"fitted ({self.source or 'no profile file'}: {what}{c['step'] * 1e3:.2f} ms/step "
                f"+ {c['prefill_tokens'] * 1e3:.3f} ms/prompt token + {c['decodes'] * 1e3:.3f} ms/decode)")

    def to_json(self) -> dict:
        return {"model": self.name, "features": list(FEATURES), "coefficients": self.coefficients,
                "source": self.source, "info": self.info}

    @classmethod
    def from_json(cls, d: Mapping, source: str = "") -> FittedLatency:
        """From `to_json`'s dict, or from a whole profile (its "fit" section)."""
        if isinstance(d, Mapping) and isinstance(d.get("fit"), Mapping):
            d = d["fit"]
        if not isinstance(d, Mapping) or not isinstance(d.get("coefficients"), Mapping):
            raise ValueError("not a fitted latency model: no 'coefficients' object (expected a "
                             "`splitserve profile` JSON or FittedLatency.to_json())")
        return cls(d["coefficients"], source or d.get("source", ""), d.get("info", ""))


def fit(samples: Iterable[Sample], source: str = "", info: str = "") -> FittedLatency:
    pts = points(samples)
    if not pts:
        raise ValueError("no samples to fit")
    x = np.array([p.x for p in pts])
    y = np.array([p.seconds for p in pts])
    if (y <= 0).any():
        raise ValueError("every sample must take a positive time")
    # rows scaled by 1/y: the residuals are relative errors
    c = nnls(x / y[:, None], np.ones(len(y)))
    return FittedLatency(dict(zip(FEATURES, c.tolist())), source, info)


def fit_report(model: FittedLatency, samples: Iterable[Sample]) -> dict:
    """Per kind (prefill / decode / mixed): the fit's relative error on the grid points'
    median times. `bias` is the mean signed error (> 0: the model is slow)."""
    by_kind: dict[str, list[tuple[float, Point]]] = {}
    for p in points(samples):
        pred = sum(c * v for c, v in zip(model.coef, p.x))
        by_kind.setdefault(p.kind, []).append(((pred - p.seconds) / p.seconds, p))
    out = {}
    for kind in KINDS:
        errs = by_kind.get(kind)
        if not errs:
            continue
        worst_err, worst = max(errs, key=lambda e: abs(e[0]))
        out[kind] = {"points": len(errs), "mean_abs_rel_err": statistics.fmean(abs(e) for e, _ in errs),
                     "max_abs_rel_err": abs(worst_err), "bias": statistics.fmean(e for e, _ in errs),
                     "worst_point": worst.label, "worst_point_seconds": worst.seconds,
                     "worst_point_predicted": worst.seconds * (1 + worst_err)}
    return out


def format_report(model: FittedLatency, report: dict) -> str:
    c = model.coefficients
    lines = ["fitted step time (ms) = " + " + ".join(
        f"{c[f] * 1e3:.4g}·{f}" for f in FEATURES if c[f] > 0),
        f"{'kind':8s} {'points':>6s} {'mean |err|':>10s} {'max |err|':>9s} {'bias':>7s}  worst point "
        "(measured -> fitted)"]
    for kind, r in report.items():
        lines.append(f"{kind:8s} {r['points']:6d} {r['mean_abs_rel_err']:10.1%} {r['max_abs_rel_err']:9.1%} "
                     f"{r['bias']:+7.1%}  {r['worst_point']} ({r['worst_point_seconds'] * 1e3:.1f} -> "
                     f"{r['worst_point_predicted'] * 1e3:.1f} ms)")
    unused = [f for f in FEATURES if c[f] == 0]
    if unused:
        lines.append(f"at 0 (no samples need them, or they would go negative): {', '.join(unused)}")
    return "\n".join(lines)


def read_profile(path: str) -> dict:
    """The JSON of a `splitserve profile` file; ValueError naming the path and the problem."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such profile file (make one with `splitserve profile --out "
                         f"{path}`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the profile: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); expected a `splitserve profile` output") from None
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{path}: JSON but not a splitserve profile (no \"format\": "
                         f"\"{PROFILE_FORMAT}\" at the top level)")
    return doc


def load_samples(path: str) -> tuple[dict, list[Sample]]:
    doc = read_profile(path)
    try:
        return doc, [Sample.from_json(s) for s in doc["samples"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: a profile whose samples cannot be read ({type(e).__name__}: {e})") from None


def load_fitted(path: str) -> FittedLatency:
    doc = read_profile(path)
    try:
        return FittedLatency.from_json(doc, source=path)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None

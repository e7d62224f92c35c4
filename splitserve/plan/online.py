"""The online planner (`serve --planner auto`): which prefill:decode split the next interval's
traffic wants, decided while serving. Plain Python (time is passed in): the server's loop
(server/planner_loop.py) feeds it arrivals and finished requests and applies its decisions by
re-roling workers (router/reroling.py).

Every `interval_s`:
    window()   the requests that arrived in the last `window_s` (prompt and output lengths,
               arrival times), and the `warmup_s` before them: the forecast for the next
               interval is that it looks like this one (persistence; phases last minutes, an
               interval is seconds)
    predict()  each candidate deployment's SLO attainment on the window, by `evaluate`
               (SimEvaluator: the simulator replays the arrivals through the server's own
               scheduling code, so queueing is in the prediction: a TTFT is counted from
               arrival, not from the start of service). The warm-up's requests are replayed
               but not scored: a window replayed from an empty server would miss the
               requests it inherits (decode-heavy ones live ~20 s here), and predict a
               batch, and so a TPOT, far below the one the server runs. Step times are
               scaled by `scale`: the measured median TPOT of the window's finished requests
               over the one predicted for the current deployment (damped, 0.5-3), since this
               machine's speed drifts by tens of percent within an hour
    choose()   switch to the best candidate only if it beats the current deployment by
               `margin` for `patience` decisions in a row and the last switch is `min_dwell_s`
               old (hysteresis: a switch drains workers, it must pay for itself)

Each decision is kept (`decisions`) with its reason, the predictions and what was measured in
the window (arrival rate, mean lengths, the measured attainment and TTFT, queue included).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Arrival:
    t: float
    prompt_len: int
    max_tokens: int


@dataclass(frozen=True)
class Finished:
    t: float
    ttft_s: float | None  # from arrival at the router: the queue included
    met: bool  # within both SLOs
    tpot_s: float | None = None
    n_out: int | None = None  # tokens it generated


@dataclass
class Decision:
    t: float
    current: str | None  # None: the live roles match no candidate (a change under way)
    target: str | None  # the deployment to switch to; None: stay
    reason: str
    predicted: dict[str, float] = field(default_factory=dict)
    observed: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"t": self.t, "current": self.current, "target": self.target,
                "reason": self.reason, "predicted": self.predicted, "observed": self.observed}


class OnlinePlanner:
    def __init__(self, candidates: dict[str, list[str]],
                 evaluate: Callable[[list[Arrival], str, float], tuple[float, float | None]],
                 *, window_s: float = 60.0, warmup_s: float | None = None,
                 interval_s: float = 10.0, margin: float = 0.05, patience: int = 2,
                 min_dwell_s: float = 30.0, min_requests: int = 5, keep: int = 1000):
        """`candidates`: deployment name -> its workers' roles; `evaluate(arrivals, name,
        scale, score_from)`: (the predicted fraction of the requests that arrived from
        `score_from` on within both SLOs on that deployment, their median TPOT or None), with
        step times x scale. `warmup_s`: replayed before the window (default: window_s)."""
        if len(candidates) < 2:
            raise ValueError("the planner needs two candidate deployments or more")
        sizes = {len(r) for r in candidates.values()}
        if len(sizes) != 1:
            raise ValueError(f"candidates must use the same number of workers, got {sorted(sizes)}")
        for name, v in (("window_s", window_s), ("interval_s", interval_s)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be > 0 seconds, got {v}")
        if not 0 <= margin < 1 or patience < 1 or min_dwell_s < 0 or min_requests < 1:
            raise ValueError("need 0 <= margin < 1, patience >= 1, min_dwell_s >= 0, "
                             "min_requests >= 1")
        self.candidates = {k: sorted(v) for k, v in candidates.items()}
        self.evaluate = evaluate
        self.window_s, self.interval_s = window_s, interval_s
        self.warmup_s = window_s if warmup_s is None else warmup_s
        if not self.warmup_s >= 0:
            raise ValueError(f"warmup_s must be >= 0 seconds, got {warmup_s}")
        self.margin, self.patience, self.min_dwell_s = margin, patience, min_dwell_s
        self.min_requests = min_requests
        self._arrivals: deque[Arrival] = deque()
        self._finished: deque[Finished] = deque()
        self._leader: tuple[str | None, int] = (None, 0)  # (best other candidate, times in a row)
        self.last_switch: float = -math.inf
        self.decisions: deque[Decision] = deque(maxlen=keep)
        self.switches = 0
        self.decided = 0  # decisions made (decisions keeps the last `keep`)
        self.scale = 1.0  # step times' calibration to what the server measures
        self._tpot_pred: dict[str, float | None] = {}

    # -- what the server tells it ----------------------------------------------------------
    def on_arrival(self, now: float, prompt_len: int, max_tokens: int) -> None:
        self._arrivals.append(Arrival(now, prompt_len, max_tokens))
        self._forget(now)

    def on_finish(self, now: float, ttft_s: float | None, met: bool,
                  tpot_s: float | None = None, n_out: int | None = None) -> None:
        self._finished.append(Finished(now, ttft_s, met, tpot_s, n_out))

    def _forget(self, now: float) -> None:
        for q, keep in ((self._arrivals, self.window_s + self.warmup_s),
                        (self._finished, self.window_s)):
            while q and q[0].t < now - keep:
                q.popleft()

    def current(self, roles: list[str]) -> str | None:
        """The candidate these live roles make, or None."""
        r = sorted(roles)
        return next((k for k, v in self.candidates.items() if v == r), None)

    # -- the decision, in three steps (predict() may run off the server's loop) ------------
    def window(self, now: float) -> list[Arrival]:
        """The arrivals of the warm-up and the window (predict and choose take them)."""
        self._forget(now)
        return list(self._arrivals)

    def _scored(self, now: float, arrivals: list[Arrival]) -> list[Arrival]:
        return [a for a in arrivals if a.t >= now - self.window_s]

    def predict(self, arrivals: list[Arrival], now: float) -> dict[str, float]:
        """Every candidate's predicted attainment on the window (empty: too few arrivals).
        An arrival's output is its max_tokens, capped at the longest output a finished
        request of the window generated (a chat request without max_tokens may ask for the
        whole context and stop at a few hundred)."""
        self._tpot_pred = {}
        if len(self._scored(now, arrivals)) < self.min_requests:
            return {}
        outs = [f.n_out for f in self._finished if f.n_out]
        if len(outs) >= self.min_requests:
            cap = max(outs)
            arrivals = [a if a.max_tokens <= cap else Arrival(a.t, a.prompt_len, cap)
                        for a in arrivals]
        out = {}
        for name in self.candidates:
            out[name], self._tpot_pred[name] = self.evaluate(arrivals, name, self.scale,
                                                             now - self.window_s)
        return out

    def _calibrate(self, now: float, current: str | None, observed: dict) -> None:
        """Move `scale` halfway (in log) toward measured / predicted median TPOT — once per
        prediction (predict() made it at this scale), and only when the window's finished
        requests were served by the current deployment (a window after the last switch)."""
        pred, meas = self._tpot_pred.pop(current, None), observed.get("tpot_p50")
        if now - self.last_switch < self.window_s:
            return
        if pred and meas and observed["finished"] >= self.min_requests:
            self.scale = min(3.0, max(0.5, self.scale * math.sqrt(meas / pred)))

    def choose(self, now: float, current: str | None, arrivals: list[Arrival],
               predicted: dict[str, float]) -> Decision:
        """`now`: the one window() and predict() were given."""
        window = self._scored(now, arrivals)
        d = Decision(now, current, None, "", predicted, self._observed(now, window))
        d.observed["scale"] = round(self.scale, 3)  # (the one the predictions used)
        self._calibrate(now, current, d.observed)
        if current is None:
            d.reason = "the live roles match no candidate (a change under way, or a worker down)"
        elif not predicted:
            d.reason = f"{len(window)} arrivals in the last {self.window_s:g} s: too few to judge"
        else:
            best = max(predicted, key=lambda k: (predicted[k], k == current))
            gain = predicted[best] - predicted[current]
            if best == current or gain < self.margin:
                self._leader = (None, 0)
                d.reason = (f"{current} is best" if best == current else
                            f"{best} would gain {gain:+.3f}, under the margin {self.margin:g}")
            else:
                n = self._leader[1] + 1 if self._leader[0] == best else 1
                self._leader = (best, n)
                if n < self.patience:
                    d.reason = f"{best} leads by {gain:+.3f} ({n} of {self.patience} in a row)"
                elif now - self.last_switch < self.min_dwell_s:
                    d.reason = (f"{best} leads by {gain:+.3f}, but the last switch was "
                                f"{now - self.last_switch:.0f} s ago (< {self.min_dwell_s:g} s)")
                else:
                    d.target = best
                    d.reason = (f"{best} predicted {predicted[best]:.3f} vs {current} "
                                f"{predicted[current]:.3f} ({n} decisions in a row)")
                    self._leader = (None, 0)
                    self.last_switch = now
                    self.switches += 1
        self.decisions.append(d)
        self.decided += 1
        return d

    def _observed(self, now: float, window: list[Arrival]) -> dict:
        span = min(self.window_s, now - window[0].t) if window else self.window_s
        fin = list(self._finished)
        ttfts = sorted(f.ttft_s for f in fin if f.ttft_s is not None)
        tpots = sorted(f.tpot_s for f in fin if f.tpot_s is not None)
        return {
            "arrivals": len(window), "rate": round(len(window) / max(span, 1e-9), 4),
            "prompt_mean": round(sum(a.prompt_len for a in window) / len(window), 1) if window else None,
            "output_mean": round(sum(a.max_tokens for a in window) / len(window), 1) if window else None,
            "finished": len(fin),
            "attainment": round(sum(f.met for f in fin) / len(fin), 4) if fin else None,
            "ttft_p50": round(ttfts[len(ttfts) // 2], 4) if ttfts else None,
            "tpot_p50": round(tpots[len(tpots) // 2], 5) if tpots else None,
        }


def plan_flips(current: dict[str, str], target: list[str]) -> list[tuple[str, str]]:
    """(worker id, new role) for the live workers `current` (id -> role) to take the roles of
    `target`: a worker keeps its role where the target has a place for it; of the rest, one
    that carries everything on goes first (co-located -> decode), then those that drain."""
    from splitserve.router.reroling import NOTHING, must_finish

    if len(current) != len(target):
        raise ValueError(f"{len(current)} workers for {len(target)} roles")
    left = list(target)
    movers = []
    for wid, role in sorted(current.items()):
        if role in left:
            left.remove(role)
        else:
            movers.append(wid)
    flips = []
    for wid in movers:  # give each the role it reaches most cheaply
        role = min(left, key=lambda r: (must_finish(current[wid], r) != NOTHING, r))
        left.remove(role)
        flips.append((wid, role))
    return sorted(flips, key=lambda f: must_finish(current[f[0]], f[1]) != NOTHING)


class SimEvaluator:
    """`evaluate` by simulation: the window's requests at their own arrival times through each
    candidate deployment, the fraction that meets both SLOs (bench serve's definition)."""

    def __init__(self, deployments: dict, latency, ttft_s: float, tpot_s: float, settings=None,
                 local_prefill=None):
        from splitserve.sim.run import SimSettings

        self.deployments, self.latency = deployments, latency
        self.ttft_s, self.tpot_s = ttft_s, tpot_s
        self.settings = settings or SimSettings()
        self.local_prefill = local_prefill
        self.runs = 0

    def __call__(self, window: list[Arrival], name: str, scale: float = 1.0,
                 score_from: float = -math.inf) -> tuple[float, float | None]:
        from splitserve.bench.goodput import met_slo
        from splitserve.bench.workloads import RequestSpec
        from splitserve.plan.search import Scaled
        from splitserve.sim.run import Simulator

        t0 = window[0].t
        # (a text prompt: the simulator draws fresh ids of its length, so no window request
        # hits another's prefix; the server's prompts are not kept)
        specs = [RequestSpec(a.t - t0, "", a.prompt_len, max(1, a.max_tokens)) for a in window]
        dep = self.deployments[name]
        lp = self.local_prefill if dep.prefill and dep.local_prefill else None
        # (the router's local-prefill policy keeps the unscaled cost model, as the server's
        # does; the decode workers' SlackChunks calibrate to the step times they see)
        lat = self.latency if scale == 1.0 else Scaled(self.latency, scale)
        # (the window's prompts are drawn fresh: none shares a prefix, cache-aware routing
        # would only hash them)
        sim = Simulator(dep, lat, self.settings, quiet=True, local_prefill=lp,
                        routing="least-loaded")
        recs = [r for r, a in zip(sim(specs).records, window) if a.t >= score_from]
        self.runs += 1
        tpots = sorted(r.tpot for r in recs if r.tpot is not None)
        return (met_slo(recs, self.ttft_s, self.tpot_s) / len(recs),
                tpots[len(tpots) // 2] if tpots else None)

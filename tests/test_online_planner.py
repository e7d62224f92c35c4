"""The online planner (plan/online.py): its hysteresis with a stub evaluator, the order of
its flips, its decisions through the server loop's shell (a fake conductor), and its
simulated predictions on the two workload shapes."""

from __future__ import annotations

import asyncio
import time

import pytest
from latency_models import CpuLike

from splitserve.plan.online import Arrival, OnlinePlanner, SimEvaluator, plan_flips

CANDS = {"colocated:2": ["colocated", "colocated"], "1:1": ["prefill", "decode"]}


def _planner(scores: dict, **kw) -> OnlinePlanner:
    kw = {"window_s": 60, "interval_s": 10, "margin": 0.05, "patience": 2, "min_dwell_s": 30,
          "min_requests": 3} | kw
    return OnlinePlanner(CANDS, lambda window, name, scale, score_from: (scores[name], None), **kw)


def _step(p: OnlinePlanner, now: float, current: str):
    w = p.window(now)
    return p.choose(now, current, w, p.predict(w, now))


def test_switches_only_after_patience_margin_and_dwell():
    scores = {"colocated:2": 0.9, "1:1": 0.5}
    p = _planner(scores)
    for t in range(5):
        p.on_arrival(t, 100, 200)
    d = _step(p, 10, "1:1")
    assert d.target is None and "1 of 2" in d.reason  # leads once: not yet
    d = _step(p, 20, "1:1")
    assert d.target == "colocated:2" and d.predicted == scores
    assert d.observed["arrivals"] == 5 and d.observed["prompt_mean"] == 100
    # the traffic turns at once: the other leads, but the last switch is too recent
    scores.update({"colocated:2": 0.2, "1:1": 0.8})
    for t in (30, 40):
        d = _step(p, t, "colocated:2")
        assert d.target is None
    assert "ago" in d.reason
    d = _step(p, 55, "colocated:2")
    assert d.target == "1:1" and p.switches == 2
    # under the margin: stays, and the lead count restarts
    scores.update({"colocated:2": 0.83, "1:1": 0.8})
    p.last_switch = -1e9
    assert _step(p, 60, "1:1").target is None
    assert "under the margin" in p.decisions[-1].reason
    assert len(p.decisions) == 6


def test_too_little_traffic_or_an_unknown_deployment_decides_nothing():
    p = _planner({"colocated:2": 1.0, "1:1": 0.0}, patience=1, min_dwell_s=0)
    p.on_arrival(0.0, 10, 10)
    assert _step(p, 1.0, "1:1").target is None and "too few" in p.decisions[-1].reason
    for t in range(5):
        p.on_arrival(100.0 + t, 10, 10)
    assert len(p.window(125.0)) == 5  # the old arrival left the warm-up and the window
    assert _step(p, 106.0, None).target is None
    assert p.current(["decode", "prefill"]) == "1:1" and p.current(["decode", "decode"]) is None
    with pytest.raises(ValueError, match="same number of workers"):
        OnlinePlanner({"a": ["colocated"], "b": ["prefill", "decode"]}, lambda w, n, s, f: (0, None))
    with pytest.raises(ValueError, match="two candidate"):
        OnlinePlanner({"a": ["colocated"]}, lambda w, n, s, f: (0, None))


def test_flips_keep_roles_that_fit_and_put_the_drain_free_ones_first():
    assert sorted(plan_flips({"p": "prefill", "d": "decode"}, ["colocated", "colocated"])) == [
        ("d", "colocated"), ("p", "colocated")]
    flips = plan_flips({"a": "colocated", "b": "colocated"}, ["prefill", "decode"])
    assert flips[0][1] == "decode" and {f[1] for f in flips} == {"prefill", "decode"}
    assert plan_flips({"a": "prefill", "b": "decode"}, ["decode", "prefill"]) == []
    assert plan_flips({"a": "prefill", "b": "colocated"}, ["prefill", "decode"]) == [("b", "decode")]


class FakeConductor:
    """The router's own state (RouterState: which drains it allows) behind set_role; the
    worker's answer is immediate."""

    def __init__(self, roles: dict[str, str]):
        from splitserve.router.state import RouterState

        self.state = RouterState()  # local prefill off, as strict as it gets
        for wid, role in roles.items():
            self.state.add_worker(wid, role, 100, 0.0)
        self.calls: list[tuple[str, str]] = []
        self.observer = None

    @property
    def roles(self) -> dict[str, str]:
        return {w.worker_id: w.role for w in self.state.live()}

    def is_ready(self):
        return self.state.is_ready()

    async def set_role(self, wid, role, reason=""):
        self.calls.append((wid, role))
        epoch = self.state.begin_rerole(wid, role)  # raises as the router would
        assert self.state.drained(wid)
        self.state.rerole_done(wid, role, epoch)
        return {}


def test_the_server_loop_applies_a_switch_in_an_order_that_keeps_serving():
    from splitserve.server.planner_loop import PlannerLoop

    c = FakeConductor({"prefill-0": "prefill", "decode-1": "decode"})
    p = _planner({"colocated:2": 1.0, "1:1": 0.0}, patience=1, min_dwell_s=0)
    loop = PlannerLoop(c, p, ttft_s=1.0, tpot_s=0.1)
    now = time.monotonic()  # (the loop reads the clock)
    for t in range(5):
        c.observer.on_arrival(now - 5 + t, 50, 50)
    c.observer.on_finish(now, True, 0.5, 0.05)
    c.observer.on_finish(now, True, 2.0, 0.05)  # TTFT over its SLO
    d = asyncio.run(loop.tick())
    assert d.target == "colocated:2" and d.observed["attainment"] == 0.5
    # decode-1 cannot drain first (prefill-0 alone could not serve): the loop flips the one
    # that can, then the other
    assert c.calls == [("decode-1", "colocated"), ("prefill-0", "colocated"),
                       ("decode-1", "colocated")]
    assert c.roles == {"prefill-0": "colocated", "decode-1": "colocated"}
    # back: the drain-free flip (co-located -> decode) first
    c.calls.clear()
    assert asyncio.run(loop.apply(["prefill", "decode"], "test"))
    assert c.calls == [("decode-1", "decode"), ("prefill-0", "prefill")]
    assert loop.decisions[0]["target"] == "colocated:2"
    # exported: the decisions and the last predictions
    from splitserve.server.metrics import WorkerCollector

    c.role_changes, c.worker_stats = [], lambda: []
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for fam in WorkerCollector(c).collect() for x in fam.samples}
    assert samples[("splitserve_planner_decisions_total", (("action", "switch"),))] == 1
    assert samples[("splitserve_planner_decisions_total", (("action", "stay"),))] == 0
    assert samples[("splitserve_planner_predicted_attainment",
                    (("deployment", "colocated:2"),))] == 1.0


def test_simulated_predictions_favour_each_split_on_its_own_traffic():
    """On this machine's shape, under tight SLOs: prefill-heavy traffic meets them on 1:1 with
    SLO-aware local prefill more than on two co-located engines, decode-heavy traffic the
    other way round (the ranking bench compare and plan found)."""
    from splitserve.bench import workloads as W
    from splitserve.bench.deployments import parse_deployment
    from splitserve.router.admission import CostModel
    from splitserve.router.policies import SloLocalPrefill

    lat = CpuLike()
    ttft, tpot = 18.0, 0.063
    deps = {n: parse_deployment(n) for n in CANDS}
    ev = SimEvaluator(deps, lat, ttft, tpot,
                      local_prefill=SloLocalPrefill.for_slo(CostModel(lat, 512), tpot, 64, ttft_s=ttft))

    def window(workload: str, rate: float) -> list[Arrival]:
        specs = W.phased([W.Phase(workload, rate, 120.0)], seed=1)
        return [Arrival(s.arrival_s, s.input_len, s.output_len) for s in specs]

    pre, dec = window("prefill-heavy", 0.2), window("decode-heavy", 0.15)
    p, d = {n: ev(pre, n)[0] for n in deps}, {n: ev(dec, n)[0] for n in deps}
    assert p["1:1"] > p["colocated:2"] + 0.3, p
    assert d["colocated:2"] > d["1:1"] + 0.3, d  # (when written: 0.93 vs 0.33; 0.76 vs 0.16)
    assert ev.runs == 4
    # the window's last minute scored after the minute before it (what the server inherits)
    # vs replayed alone from an empty server: a bigger batch, a longer TPOT
    late = [a for a in dec if a.t >= 60.0]
    assert ev(dec, "colocated:2", 1.0, 60.0)[1] > ev(late, "colocated:2")[1]
    # twice as slow a machine: fewer requests within the same SLOs, never more
    slow = {n: ev(dec, n, scale=2.0) for n in deps}
    assert all(slow[n][0] <= d[n] for n in deps) and slow["colocated:2"][0] < d["colocated:2"]
    assert slow["colocated:2"][1] > ev(dec, "colocated:2")[1]  # its median TPOT grew


def test_the_step_times_are_calibrated_to_the_measured_tpot():
    """Predictions for the current deployment at TPOT 50 ms while the server measures 200 ms:
    the scale moves toward 4x (halfway in log per decision, at most 3x)."""
    seen = []

    def evaluate(window, name, scale, score_from):
        seen.append(scale)
        return 0.5, 0.05

    p = OnlinePlanner(CANDS, evaluate, min_requests=3, patience=5)
    for t in range(5):
        p.on_arrival(float(t), 100, 100)
        p.on_finish(float(t), True, met=False, tpot_s=0.2)
    for t in (10.0, 20.0, 30.0):
        w = p.window(t)
        p.choose(t, "1:1", w, p.predict(w, t))
    assert seen[0::2] == [1.0, 2.0, 3.0]  # sqrt(4) = 2, then capped at 3
    assert p.decisions[1].observed["scale"] == 2.0 and p.decisions[0].observed["tpot_p50"] == 0.2

"""`splitserve bench admission`: what admission control costs the router per request.

A RouterState with 1 prefill and `--decode` decode workers holds `--in-flight` requests
(half decoding, half queued for prefill, spread over the workers), as under overload; then
`--requests` routes are timed, each admitted request finished again so the load stays put:
with admission off (the baseline), and reactive and predictive with SLOs so tight that every
request is refused, and so loose that every one is admitted. Printed: p50 / p99 per route in
microseconds and each mode's ratio to the baseline, with the latency model `--latency-model`
(fitted: a profile, as serve uses; default a constant model, whose cost is the arithmetic
alone). The router's time only: the HTTP answer's is in the overload run's reject_ms_p99.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from splitserve.errors import ServiceUnavailable
from splitserve.router.admission import SLO, Admission, CostModel
from splitserve.router.state import RouterState
from splitserve.sim.latency.registry import build_latency_model


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latency-model", default="constant:0.02")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--in-flight", type=int, default=256, help="requests held while timing")
    p.add_argument("--requests", type=int, default=5000, help="timed routes per mode")
    p.add_argument("--json", default=None)


def _state(a, admission) -> RouterState:
    s = RouterState(admission=admission)
    s.add_worker("prefill-0", "prefill", 100_000, 0.0)
    for i in range(a.decode):
        s.add_worker(f"decode-{i}", "decode", 100_000, 0.0)
    mode, admission.mode = admission.mode, "off"
    for i in range(a.in_flight):
        rid = f"held-{i}"
        t = s.route(rid, 700, 0.0, max_tokens=200)
        if i % 2:  # handed over and decoding
            s.on_reserved(rid, t.decode, 0.0)
            s.prefill_sent(rid, True)
            s.on_output(rid, t.decode, True, tokens=1 + i % 150)
    admission.mode = mode
    return s


def _time(a, admission) -> dict:
    s = _state(a, admission)
    times, refused = [], 0
    for i in range(a.requests):
        rid = f"r-{i}"
        t0 = time.perf_counter()
        try:
            s.route(rid, 700, 1.0, max_tokens=200)
        except ServiceUnavailable:
            refused += 1
        times.append(time.perf_counter() - t0)
        s.finish(rid)
    times.sort()
    return {"p50_us": statistics.median(times) * 1e6,
            "p99_us": times[int(0.99 * (len(times) - 1))] * 1e6, "refused": refused}


def main(a) -> int:
    cost = CostModel(build_latency_model(a.latency_model), 512, 8, overhead_s=0.005)
    rows = {"off (baseline)": _time(a, Admission("off"))}
    for mode in ("reactive", "predictive"):
        rows[f"{mode}, all refused"] = _time(a, Admission(mode, cost, SLO(1e-6, 1e-6)))
        rows[f"{mode}, all admitted"] = _time(a, Admission(mode, cost, SLO(1e9, 1e9)))
    base = rows["off (baseline)"]["p99_us"]
    print(f"route() with {a.in_flight} requests in flight over 1 prefill + {a.decode} decode "
          f"workers, {a.requests} routes per mode, latency model {a.latency_model}")
    print("| admission | p50 us | p99 us | p99 / off | refused |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['p99_us'] / base:.2f}x "
              f"| {r['refused']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a) | {"func": None}, "rows": rows}, f, indent=1)
    return 0

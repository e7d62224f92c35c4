"""`splitserve pareto`: throughput per device against interactivity, for one input/output
length, across deployments of a device budget — the study NVIDIA and Dynamo's AIConfigurator
publish (throughput/GPU vs tokens/s/user), by simulation.

Every deployment that fills the budget is swept over arrival rates (per device): co-located
instances of each tensor-parallel degree, and disaggregated ones, P prefill instances of tp_p
and D decode instances of tp_d for every pair of degrees and every split with P·tp_p + D·tp_d =
budget (on one-device workers: co-located N and every P:D, with and without local prefill).
Each (deployment, rate) is a point:

    throughput / device   output tokens per second of the run, over the budget
    tokens / s / user     1 / the median TPOT (a user's streaming speed)

A point counts for the fronts only when its TTFT p90 is within --ttft-slo (when given); the
co-located and the disaggregated fronts are the points no other of their family beats on both
axes. Written as a markdown table (the fronts) and a PNG (every point, both fronts).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

from splitserve.bench import workloads as W
from splitserve.bench.deployments import DeploymentSpec
from splitserve.plan.search import GPU_KINDS, latency_for, layouts


@dataclass
class Point:
    deployment: str
    family: str  # colocated | disaggregated
    rate: float  # req/s, the whole deployment
    throughput_per_device: float  # output tokens/s per device
    tokens_per_s_user: float | None  # 1 / median TPOT
    ttft_p90: float | None
    ok: bool  # within --ttft-slo (or no SLO given)


def deployments(spec: str, budget: int, devices_per_node: int) -> list[tuple]:
    """(name, family, DeploymentSpec, latency, role_latency) for every deployment of `budget`
    devices (see the module docstring)."""
    outs = [lay for lay in layouts(spec, devices_per_node) if lay.pp == 1]
    lat = {lay.tp: latency_for(spec, lay) for lay in outs}
    out = []
    for tp in lat:
        if budget % tp == 0:
            n = budget // tp
            out.append((f"colocated:{n}" + (f" tp{tp}" if tp > 1 else ""), "colocated",
                        DeploymentSpec(f"colocated:{n}", colocated=n), lat[tp], None))
    for tpp in lat:
        for tpd in lat:
            for p in range(1, budget // tpp + 1):
                rest = budget - p * tpp
                if rest < tpd or rest % tpd:
                    continue
                d = rest // tpd
                tag = f" tp{tpp}/tp{tpd}" if (tpp, tpd) != (1, 1) else ""
                role = {"decode": lat[tpd]} if tpd != tpp else None
                out.append((f"{p}:{d}:pure{tag}", "disaggregated",
                            DeploymentSpec(f"{p}:{d}:pure", prefill=p, decode=d,
                                           local_prefill=False), lat[tpp], role))
                if spec.partition(":")[0].lower() not in GPU_KINDS:  # (CPU: local prefill too)
                    out.append((f"{p}:{d}", "disaggregated",
                                DeploymentSpec(f"{p}:{d}", prefill=p, decode=d), lat[tpp], role))
    return out


def sweep(spec: str, budget: int, isl: int, osl: int, rates_per_device: list[float],
          num_requests: int, seed: int = 0, devices_per_node: int = 8,
          ttft_slo: float | None = None, settings=None) -> tuple[list[Point], int]:
    """Every deployment at every rate; (points, simulations run)."""
    from splitserve.sim.run import SimSettings, Simulator

    settings = settings or SimSettings()
    base = [W.RequestSpec(0.0, "", isl, osl, {}) for _ in range(num_requests)]
    points, runs = [], 0
    for name, family, dep, lat, role in deployments(spec, budget, devices_per_node):
        for r in rates_per_device:
            rate = r * budget
            sim = Simulator(dep, lat, settings, quiet=True, role_latency=role,
                            routing="least-loaded")  # (no prompt shares a prefix here)
            recs = [x for x in sim(W.at_rate(base, rate, 1.0, seed)).records if x.ok]
            runs += 1
            if not recs:
                continue
            span = max(x.t_done for x in recs) - min(x.t_sent for x in recs)
            tokens = sum(x.n_out for x in recs)
            tpots = [x.tpot for x in recs if x.tpot is not None]
            ttfts = sorted(x.ttft for x in recs if x.ttft is not None)
            p90 = ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))] if ttfts else None
            tps_user = 1 / statistics.median(tpots) if tpots else None
            points.append(Point(name, family, rate, tokens / span / budget, tps_user, p90,
                                ttft_slo is None or (p90 is not None and p90 <= ttft_slo)))
    return points, runs


def front(points: list[Point]) -> list[Point]:
    """The points no other beats on both axes (more throughput per device at no less
    interactivity), by interactivity, fastest first."""
    pts = sorted((p for p in points if p.ok and p.tokens_per_s_user is not None),
                 key=lambda p: (-p.tokens_per_s_user, -p.throughput_per_device))
    out, best = [], -1.0
    for p in pts:
        if p.throughput_per_device > best:
            out.append(p)
            best = p.throughput_per_device
    return out


def table(fronts: dict[str, list[Point]]) -> str:
    lines = ["| front | deployment | rate (req/s) | tokens/s/user | throughput/device (tok/s) "
             "| TTFT p90 (s) |", "|---|---|---:|---:|---:|---:|"]
    for fam, pts in fronts.items():
        for p in pts:
            lines.append(f"| {fam} | {p.deployment} | {p.rate:.3g} | {p.tokens_per_s_user:.1f} | "
                         f"{p.throughput_per_device:.1f} | {p.ttft_p90:.3g} |")
    return "\n".join(lines)


def plot(points: list[Point], fronts: dict, path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"colocated": "tab:blue", "disaggregated": "tab:orange"}
    for fam, c in colors.items():
        pts = [p for p in points if p.family == fam and p.tokens_per_s_user is not None]
        ax.scatter([p.tokens_per_s_user for p in pts], [p.throughput_per_device for p in pts],
                   s=12, alpha=0.3, color=c)
        f = fronts.get(fam, [])
        ax.plot([p.tokens_per_s_user for p in f], [p.throughput_per_device for p in f],
                marker="o", color=c, label=f"{fam} front")
    ax.set(xlabel="tokens/s/user (1 / median TPOT)", ylabel="output tokens/s per device",
           title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(a) -> int:
    try:
        rates = [float(x) for x in a.rates_per_device.split(",")]
        if not rates or any(r <= 0 for r in rates):
            raise ValueError
    except ValueError:
        print("splitserve pareto: --rates-per-device takes positive numbers, e.g. 0.5,1,2",
              file=sys.stderr)
        return 2
    if min(a.devices, a.isl, a.osl, a.num_requests) < 1:
        print("splitserve pareto: --devices, --isl, --osl and --num-requests must be >= 1",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        points, runs = sweep(a.latency_model, a.devices, a.isl, a.osl, rates, a.num_requests,
                             a.seed, a.devices_per_node, a.ttft_slo)
    except ValueError as e:
        print(f"splitserve pareto: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    fronts = {fam: front([p for p in points if p.family == fam])
              for fam in ("colocated", "disaggregated")}
    title = (f"{a.latency_model}, {a.devices} devices, ISL {a.isl} / OSL {a.osl}"
             + (f", TTFT p90 <= {a.ttft_slo:g} s" if a.ttft_slo else ""))
    md = f"{title}\n\n{table(fronts)}"
    print(md)
    print(f"\n{runs} simulations in {wall:.1f} s", file=sys.stderr)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "pareto.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(a.out, "pareto.json"), "w") as f:
        json.dump({"title": title, "wall_s": wall, "simulations": runs,
                   "points": [vars(p) for p in points],
                   "fronts": {k: [vars(p) for p in v] for k, v in fronts.items()}}, f, indent=1)
    if plot(points, fronts, os.path.join(a.out, "pareto.png"), title):
        print(f"plot: {os.path.join(a.out, 'pareto.png')}", file=sys.stderr)
    return 0


def add_args(p) -> None:
    p.add_argument("--latency-model", required=True,
                   help="fitted:PROFILE.json (one worker per core), or a GPU family without tp "
                        "(roofline:H100:llama-3.1-8b, distserve:OPT-13B): each degree is tried")
    p.add_argument("--devices", type=int, default=8, help="the budget: cores, or GPUs")
    p.add_argument("--devices-per-node", type=int, default=8, help="the largest tp tried")
    p.add_argument("--isl", type=int, default=1024, help="input (prompt) tokens per request")
    p.add_argument("--osl", type=int, default=256, help="output tokens per request")
    p.add_argument("--rates-per-device", default="0.25,0.5,1,2,4,8",
                   help="arrival rates swept, req/s per device")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-slo", type=float, default=None,
                   help="points whose TTFT p90 exceeds it stay off the fronts")
    p.add_argument("--out", default="bench-results/pareto")

"""`splitserve bench phases`: traffic whose shape changes (workloads.phased: prefill-heavy for a
few minutes, then decode-heavy, then back) against several deployments in one run, each started
and stopped here on the same cores: fixed P/D (1 prefill + 1 decode, SLO-aware local prefill),
fixed co-located x2, and the adaptive one (P/D to start, `serve --planner auto` re-roling its
workers). Reports SLO attainment over the whole run and per phase, for the planner's SLOs and
any others given (--also-slos, judged on the same records), and plots attainment over time with
each deployment's role changes. Writes phases.{md,json,png} to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import httpx

from splitserve.bench import workloads as W
from splitserve.bench.compare import free_port, start_server, stop_server
from splitserve.bench.deployments import KV_CACHE_GB
from splitserve.bench.goodput import met_slo
from splitserve.bench.load import load_runner

DEPLOYMENTS = ("pd", "colocated:2", "adaptive")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phases", default="prefill-heavy:0.2:150,decode-heavy:0.45:150,"
                   "prefill-heavy:0.2:150", help="WORKLOAD:RATE:SECONDS,... one after the other")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-slo", type=float, required=True, help="the planner's TTFT SLO (s)")
    p.add_argument("--tpot-slo", type=float, required=True, help="the planner's TPOT SLO (s)")
    p.add_argument("--also-slos", default="", metavar="TTFT:TPOT,...",
                   help="other SLO pairs to judge the same records by (e.g. the loose ones)")
    p.add_argument("--latency-model", required=True,
                   help="fitted:PROFILE.json: P/D's SLO-aware local prefill and the planner")
    p.add_argument("--deployments", default=",".join(DEPLOYMENTS))
    p.add_argument("--planner-args", default="--planner-interval 10 --planner-window 60",
                   help="extra serve flags of the adaptive deployment")
    p.add_argument("--bin", type=float, default=30.0, help="seconds per attainment-over-time bin")
    p.add_argument("--out", default="bench-results/phases")
    p.add_argument("--quiet", action="store_true")


def parse_slos(text: str) -> list[tuple[float, float]]:
    out = []
    for part in filter(None, (x.strip() for x in text.split(","))):
        try:
            ttft, tpot = (float(v) for v in part.split(":"))
        except ValueError:
            raise SystemExit(f"--also-slos: TTFT:TPOT pairs in seconds, got {part!r}") from None
        out.append((ttft, tpot))
    return out


def command(name: str, port: int, a) -> list[str]:
    slo = ["--local-prefill", "slo", "--ttft-slo", repr(a.ttft_slo), "--tpot-slo",
           repr(a.tpot_slo), "--latency-model", a.latency_model]
    flags = {"pd": ["--prefill", "1", "--decode", "1", *slo],
             "colocated:2": ["--colocated", "2"],
             "adaptive": ["--prefill", "1", "--decode", "1", *slo, "--planner", "auto",
                          *a.planner_args.split()]}
    if name not in flags:
        raise SystemExit(f"unknown deployment {name!r}: choose from {', '.join(DEPLOYMENTS)}")
    return [sys.executable, "-m", "splitserve.cli", "serve", "--port", str(port),
            "--kv-cache-gb", str(KV_CACHE_GB), "--worker-cores", "0-0;1-1", "--threads", "1",
            *flags[name]]


def summarize(records: list[dict], phases: list[W.Phase], slos: list[tuple[float, float]],
              bin_s: float) -> dict:
    """Attainment per SLO pair: over the run, per phase, and per arrival-time bin."""
    from splitserve.bench.goodput import RequestRecord

    def att(rs: list[RequestRecord], ttft: float, tpot: float) -> float | None:
        return round(met_slo(rs, ttft, tpot) / len(rs), 4) if rs else None

    end = sum(p.seconds for p in phases)
    out = {}
    for ttft, tpot in slos:
        key = f"{ttft:g}:{tpot:g}"
        recs = [r["_rec"] for r in records]
        by_phase = [[r["_rec"] for r in records if r["phase"] == k] for k in range(len(phases))]
        bins = []
        t = 0.0
        while t < end:
            rs = [r["_rec"] for r in records if t <= r["t_due"] < t + bin_s]
            bins.append((t, att(rs, ttft, tpot), len(rs)))
            t += bin_s
        out[key] = {"all": att(recs, ttft, tpot), "phases": [att(rs, ttft, tpot) for rs in by_phase],
                    "met": met_slo(recs, ttft, tpot), "n": len(recs), "bins": bins}
    return out


def main(a) -> int:
    try:
        phases = [W.Phase.parse(x) for x in a.phases.split(",")]
    except ValueError as e:
        raise SystemExit(f"--phases: {e}") from None
    slos = [(a.ttft_slo, a.tpot_slo), *parse_slos(a.also_slos)]
    specs = W.phased(phases, a.seed)
    os.makedirs(a.out, exist_ok=True)
    results = {}
    for run_id, name in enumerate(d.strip() for d in a.deployments.split(",")):
        port = free_port()
        cmd = command(name, port, a)
        print(f"{name}: {' '.join(cmd)}", file=sys.stderr)
        proc = start_server(cmd, port, quiet=a.quiet)
        try:
            from splitserve.bench.experiment import fresh_prompts

            run = load_runner(f"http://127.0.0.1:{port}", progress=not a.quiet)
            wall0 = time.time()
            res = run(fresh_prompts(specs, run_id))
            roles = httpx.get(f"http://127.0.0.1:{port}/admin/roles", timeout=10).json()
        finally:
            stop_server(proc)
        records = [{"phase": s.meta["phase"], "t_due": r.t_due, "input_len": r.input_len,
                    "output_len": r.output_len, "ok": r.ok, "ttft": r.ttft, "tpot": r.tpot,
                    "error": r.error, "_rec": r} for s, r in zip(specs, res.records)]
        changes = [{**c, "t_run": round(c["t"] - wall0, 2)} for c in roles["changes"]]
        results[name] = {"summary": summarize(records, phases, slos, a.bin),
                         "changes": changes, "decisions": roles.get("planner"),
                         "client_cpu_s": res.client_cpu_s, "wall_s": res.wall_s,
                         "records": [{k: v for k, v in r.items() if k != "_rec"} for r in records]}
        print(f"{name}: " + "; ".join(f"{k}: {v['all']}" for k, v in
                                      results[name]["summary"].items()), file=sys.stderr)
    md = report(results, phases, slos, len(specs), a)
    print(md)
    with open(os.path.join(a.out, "phases.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(a.out, "phases.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(a).items() if k != "func"},
                   "phases": [vars(p) for p in phases], "results": results}, f, indent=1)
    plot(results, phases, slos, a)
    return 0


def report(results: dict, phases: list[W.Phase], slos, n: int, a) -> str:
    head = (f"{n} requests, seed {a.seed}: " + ", then ".join(
        f"{p.workload} at {p.rate:g} req/s for {p.seconds:g} s" for p in phases))
    lines = [head, ""]
    for ttft, tpot in slos:
        key = f"{ttft:g}:{tpot:g}"
        lines += [f"SLOs TTFT {ttft:g} s, TPOT {tpot * 1e3:g} ms" +
                  (" (the planner's)" if (ttft, tpot) == slos[0] else ""), "",
                  "| deployment | all | " + " | ".join(f"phase {k} ({p.workload})"
                                                      for k, p in enumerate(phases)) + " | role changes |",
                  "|---|---:|" + "---:|" * len(phases) + "---:|"]
        for name, r in results.items():
            s = r["summary"][key]
            cells = " | ".join("-" if v is None else f"{v:.3f}" for v in s["phases"])
            lines.append(f"| {name} | {s['all']:.3f} ({s['met']}/{s['n']}) | {cells} | "
                         f"{len(r['changes'])} |")
        lines.append("")
    for name, r in results.items():
        for c in r["changes"]:
            lines.append(f"- {name} at {c['t_run']:.0f} s: {c['worker_id']} {c['from']} -> "
                         f"{c['to']} (drained {c['drain_s']:.1f} s): {c['reason']}")
    return "\n".join(lines)


def plot(results: dict, phases: list[W.Phase], slos, a) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(len(slos), 1, figsize=(11, 3.6 * len(slos)), squeeze=False)
    for ax, (ttft, tpot) in zip(axes[:, 0], slos):
        key = f"{ttft:g}:{tpot:g}"
        for name, r in results.items():
            bins = [(t + a.bin / 2, v) for t, v, _ in r["summary"][key]["bins"] if v is not None]
            line, = ax.plot([b[0] for b in bins], [b[1] for b in bins], marker="o", label=name)
            for c in r["changes"]:
                ax.axvline(c["t_run"], color=line.get_color(), ls=":", alpha=0.7)
        t = 0.0
        for p in phases:
            ax.axvspan(t, t + p.seconds, alpha=0.06 if p.workload == "decode-heavy" else 0.0,
                       color="grey")
            ax.text(t + 3, 1.02, p.workload, fontsize=8)
            t += p.seconds
        ax.set(xlabel="arrival time (s)", ylabel="SLO attainment", ylim=(-0.05, 1.1),
               title=f"TTFT {ttft:g} s, TPOT {tpot * 1e3:g} ms (per {a.bin:g} s of arrivals; "
                     "dotted: role changes)")
        ax.legend(loc="lower left")
    fig.tight_layout()
    path = os.path.join(a.out, "phases.png")
    fig.savefig(path, dpi=100)
    print(f"plot: {path}", file=sys.stderr)

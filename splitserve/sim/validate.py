"""`splitserve bench validate`: the simulator against real runs of the same workload, seed and
rates on this machine.

For each deployment (as bench compare starts it) one fresh server runs every rate --repeats
times (each run with prompts no earlier run sent, the same arrivals), and the simulator runs
the same specs with a fitted profile of this machine. Per rate it prints

    attainment: each real run, their spread (max - min), the simulator's, the error in
                percentage points against the real runs' mean
    TTFT and TPOT p50 / p90: the real mean, the simulator's, the relative error, and the real
                runs' own spread relative to their mean (an error inside that spread is as
                good as it can be shown here)

and writes every record to --out (JSON) for a closer look.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from splitserve.bench import experiment as E
from splitserve.bench.compare import _command, free_port, start_server, stop_server
from splitserve.bench.deployments import parse_deployment
from splitserve.bench.goodput import attainment, summarize, to_markdown
from splitserve.bench.load import load_runner
from splitserve.disagg import decision_log
from splitserve.sim.explain import mean_phases, phases
from splitserve.sim.latency.registry import build_latency_model
from splitserve.sim.run import SimError, SimSettings, Simulator, add_sim_args

METRICS = (("ttft", "p50"), ("ttft", "p90"), ("tpot", "p50"), ("tpot", "p90"))


def add_args(p: argparse.ArgumentParser) -> None:
    E.add_workload_args(p)
    p.add_argument("--deployments", default="pd,chunked",
                   help="of bench compare's: pd, pd-pure, chunked, prefill-first")
    p.add_argument("--rates", type=E.floats, required=True, help="req/s, e.g. 0.5,1,1.5")
    p.add_argument("--repeats", type=E.positive(int), default=2, help="real runs per rate")
    p.add_argument("--slo-scales", type=E.floats, default="1",
                   help="also score every run with both SLOs times each scale (no new runs): "
                        "0.4 of a 100 ms TPOT SLO is ~1.5x a lone decode step on one core")
    p.add_argument("--latency-model", required=True, metavar="SPEC",
                   help="the simulator's, e.g. fitted:bench-results/profile-cpu1.json "
                        "(splitserve profile measures one)")
    p.add_argument("--cores", type=E.positive(int), default=2,
                   help="total cores of every real deployment")
    p.add_argument("--llama-server", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench-results/validate", help="directory for the JSON")
    p.add_argument("--decision-logs", default=None, metavar="DIR",
                   help="the real servers write their decision logs (with step times) under "
                        "DIR/<deployment>/ (see disagg/decision_log.py)")
    p.add_argument("--explain", action="store_true",
                   help="split each run's TTFT into phases, real (from --decision-logs) and "
                        "simulated, to see where they part")
    p.add_argument("--sim-only", action="store_true",
                   help="skip the real runs (check the set-up, or re-read --out's real runs)")
    p.add_argument("--quiet", action="store_true")
    add_sim_args(p)


def _metric(records, name: str, q: str) -> float | None:
    return summarize(records)[f"{name}_s"][q]


def _rel(x: float | None, ref: float | None) -> float | None:
    return None if x is None or not ref else (x - ref) / ref


def compare_rows(dep: str, rate: float, real: list, sim, ttft_slo: float, tpot_slo: float) -> dict:
    """One table row: the real runs (lists of records) against the simulated records."""
    att = [attainment(r, ttft_slo, tpot_slo) for r in real]
    mean_att = sum(att) / len(att)
    sim_att = attainment(sim, ttft_slo, tpot_slo)
    row = {"deployment": dep, "rate": rate,
           "real_attainment": " / ".join(f"{a:.2f}" for a in att),
           "real_spread_pp": 100 * (max(att) - min(att)), "sim_attainment": sim_att,
           "error_pp": 100 * (sim_att - mean_att)}
    for name, q in METRICS:
        vals = [_metric(r, name, q) for r in real]
        vals = [v for v in vals if v is not None]
        mean = sum(vals) / len(vals) if vals else None
        s = _metric(sim, name, q)
        row[f"{name}_{q}_real"] = mean
        row[f"{name}_{q}_sim"] = s
        row[f"{name}_{q}_err"] = _rel(s, mean)
        row[f"{name}_{q}_spread"] = (max(vals) - min(vals)) / mean if vals and mean else None
    return row


def _records(rs) -> list[dict]:
    return [{"ok": r.ok, "t_due": r.t_due, "t_sent": r.t_sent, "t_done": r.t_done,
             "token_times": r.token_times, "n_out": r.n_out, "input_len": r.input_len,
             "output_len": r.output_len, "error": r.error} for r in rs]


def _from_dicts(ds) -> list:
    from splitserve.bench.goodput import RequestRecord

    return [RequestRecord(**d) for d in ds]


def main(a) -> int:
    specs = E.build_workload(a)
    ttft_slo, tpot_slo = E.slos(a)
    try:
        latency = build_latency_model(a.latency_model)
        deps = [parse_deployment(d.strip(), a.chunk, a.max_input) for d in a.deployments.split(",")]
    except ValueError as e:
        raise SimError(str(e)) from None
    settings = SimSettings.of(a)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"{a.workload}.json")
    saved = {}
    if a.sim_only:
        if not os.path.exists(path):
            raise SimError(f"--sim-only compares with the real runs saved in {path}, and there is "
                           "none: run once without --sim-only (or give the --out that has it)")
        with open(path) as f:
            saved = json.load(f)
    if a.explain and not a.decision_logs:
        raise SimError("--explain reads the real servers' decision logs: give --decision-logs DIR "
                       "(the one the real runs wrote)")
    print(f"workload {a.workload}: {len(specs)} requests, length scale {E.length_scale(a)}, seed "
          f"{a.seed}; SLOs TTFT {ttft_slo:g} s, TPOT {tpot_slo * 1e3:g} ms; rates "
          f"{', '.join(f'{r:g}' for r in a.rates)}; {a.repeats} real runs per rate; simulator: "
          f"{latency.describe()}", file=sys.stderr)
    rows, real_out, sim_out, explained = [], {}, {}, []
    starts = saved.get("real_t0", {})
    for dep in deps:
        real = {}
        if not a.sim_only:
            port = free_port()
            # the simulated workers' engine settings, given to the real ones too
            cmd = _command(dep.name, port, a) + [
                "--kv-cache-gb", str(a.kv_cache_gb), "--max-num-seqs", str(a.max_num_seqs),
                "--local-prefill-chunk", str(a.local_prefill_chunk)]
            print(f"{dep.name}: {' '.join(cmd)}", file=sys.stderr)
            if a.decision_logs:
                os.environ[decision_log.ENV] = os.path.join(a.decision_logs, dep.name)
            try:
                proc = start_server(cmd, port)
            finally:
                os.environ.pop(decision_log.ENV, None)
            try:
                run = load_runner(f"http://127.0.0.1:{port}", progress=not a.quiet)
                for i, rate in enumerate(a.rates):
                    results = [E.run_at(a, run, specs, rate, run=1 + i * a.repeats + k)
                               for k in range(a.repeats)]
                    real[rate] = [r.records for r in results]
                    # each run's zero on the monotonic clock, to line up with decision logs
                    starts.setdefault(dep.name, {})[rate] = [r.t0 for r in results]
            finally:
                stop_server(proc)
        else:
            real = {float(r): [_from_dicts(x) for x in runs]
                    for r, runs in saved.get("real", {}).get(dep.name, {}).items()}
        sim = Simulator(dep, latency, settings, quiet=True, record=a.explain, routing=a.routing)
        for rate in a.rates:
            simulated = E.run_at(a, sim, specs, rate, run=0).records
            sim_out.setdefault(dep.name, {})[rate] = _records(simulated)
            if rate in real:
                real_out.setdefault(dep.name, {})[rate] = [_records(r) for r in real[rate]]
                for scale in a.slo_scales:
                    row = compare_rows(dep.name, rate, real[rate], simulated, ttft_slo * scale,
                                       tpot_slo * scale)
                    rows.append({"slo_scale": scale, **row} if len(a.slo_scales) > 1 else row)
            if a.explain and rate in real:
                explained += _explain(a, dep.name, rate, real[rate],
                                      starts.get(dep.name, {}).get(str(rate)) or
                                      starts.get(dep.name, {}).get(rate), sim, simulated)
        print(f"{dep.name}: simulated {len(a.rates)} rates in {sim.wall_s:.1f} s", file=sys.stderr)
    header = (f"workload {a.workload} (length scale {E.length_scale(a)}), {len(specs)} requests, "
              f"seed {a.seed}; SLOs TTFT {ttft_slo:g} s, TPOT {tpot_slo * 1e3:g} ms; "
              f"simulator: {latency.describe()}")
    short = (["slo_scale"] if len(a.slo_scales) > 1 else []) + [
        "deployment", "rate", "real_attainment", "real_spread_pp", "sim_attainment", "error_pp"]
    lat_cols = ["deployment", "rate"] + [f"{n}_{q}_{k}" for n, q in METRICS
                                        for k in ("err", "spread")]
    latency_rows = [r for r in rows if r.get("slo_scale", 1.0) == a.slo_scales[0]]
    print(header + "\n\n" + to_markdown(rows, short) + "\n\n" + to_markdown(latency_rows, lat_cols))
    if explained:
        print("\nmean time to first token by phase, ms (sim/explain.py):\n\n"
              + to_markdown(explained))
    with open(path, "w") as f:
        json.dump({"header": header, "rows": rows, "real": real_out, "sim": sim_out,
                   "real_t0": starts, "phases": explained,
                   "workload": a.workload, "length_scale": E.length_scale(a),
                   "rates": list(a.rates), "latency_model": a.latency_model}, f)
    return 0


def _explain(a, dep: str, rate: float, real_runs: list, t0s: list | None, sim: Simulator,
             simulated: list) -> list[dict]:
    """Rows of mean phase durations (ms): each real run (its slice of the decision logs) and
    the simulated run (its own logs)."""
    out = []
    sim_logs = {wid: [decision_log.as_json(e) for e in w.core.trace]
                for wid, w in sim.simulation.workers.items()}
    sim_routes = [decision_log.as_json(r) for r in sim.simulation.state.routes]
    runs = [("sim", sim_routes, sim_logs, simulated, 0.0)]
    d = os.path.join(a.decision_logs or "", dep)
    if t0s and os.path.isdir(d):
        logs = decision_log.read_dir(d)
        routes = logs.pop("router", [])
        for k, (records, t0) in enumerate(zip(real_runs, t0s)):
            end = t0 + max(r.t_done for r in records)
            mine = [r for r in routes if t0 <= r[3] <= end]
            runs.insert(k, (f"real {k + 1}", mine, logs, records, t0))
    for label, routes, logs, records, t0 in runs:
        rows = phases(routes, logs, records, t0)
        m = mean_phases(rows)
        if m:
            out.append({"deployment": dep, "rate": rate, "run": label, "requests": len(rows),
                        **{k: v * 1e3 for k, v in m.items()}})
    return out

"""A serving experiment, whatever produces its records: the workload and experiment flags, the
workload and its SLOs, one run or goodput by bisection on the rate, the SLO-scale sweep, the
report and the JSON. `bench serve` (bench/load.py) passes a run function that sends the load to
a server; a simulator passes one that simulates it. The arithmetic is bench/goodput.py's.

    specs = build_workload(a)                  seeded; trace times, or every arrival at 0
    --rate R        run_fn(at_rate(fresh_prompts(specs, run_id), R))               one row
    --goodput L,H   run_fn(at_rate(fresh_prompts(specs, k + 1000 * run_id), r))    a row per
                    probe k = 0, 1, ... at the rates r that goodput_bisect picks
    neither         run_fn(fresh_prompts(specs, run_id))                           one row
    then the rows, the goodput, the SLO-scale sweep (of the run, or of the highest passing
    probe) as markdown on stdout, and everything as JSON (--json)

Every run of one invocation sends the same requests (same seed): only the arrival rate changes,
and each run's prompts are new to the server (see fresh_prompts). Separate invocations against
one server take --run-id to keep that true.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable

from splitserve.bench import workloads as W
from splitserve.bench.client import LoadResult
from splitserve.bench.goodput import (
    attainment,
    goodput_bisect,
    met_slo,
    per_core,
    percentiles,
    slo_scale_sweep,
    summarize,
    to_markdown,
)

# specs (fresh prompts, arrival times set) -> one record per spec, in their order
RunFn = Callable[[list[W.RequestSpec]], LoadResult]

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")
# the workloads read from a file, and the file of each in --data-dir
TRACE_FILES = {"humaneval": "HumanEval.jsonl.gz", "mooncake": "conversation_trace.jsonl",
               "azure": "AzureLLMInferenceTrace_conv.csv",
               "summarization": "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"}
WORKLOAD_NAMES = [*W.WORKLOADS, "humaneval", "mooncake", "azure"]

# (TTFT, TPOT) SLOs in seconds for the workloads sized to this machine: TTFT ~3x a prefill of the
# median prompt on one core, TPOT ~3x a lightly batched decode step (see BENCHMARKS.md).
DEFAULT_SLOS = {"prefill-heavy": (4.0, 0.04), "decode-heavy": (1.5, 0.04)}


# -- flags ----------------------------------------------------------------------------------------
def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` > 0."""
    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            x = 0
        if not x > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return x
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def non_negative(text: str) -> float:
    """An argparse type: a number >= 0."""
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return x


def lo_hi(text: str) -> tuple[float, float]:
    """An argparse type: 'LO,HI' with 0 < LO < HI."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        lo = hi = 0.0
    if not 0 < lo < hi:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO,HI with 0 < LO < HI")
    return lo, hi


def floats(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated positive numbers."""
    try:
        xs = tuple(float(x) for x in text.split(","))
    except ValueError:
        xs = ()
    if not xs or min(xs) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of positive numbers, a,b,...")
    return xs


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """What to send: the workload, its size, seed and burstiness, the SLOs, the trace file."""
    p.add_argument("--workload", default="prefill-heavy", choices=WORKLOAD_NAMES)
    p.add_argument("--num-requests", type=positive(int), default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cv", type=positive(float), default=1.0,
                   help="arrival burstiness (1 = Poisson)")
    p.add_argument("--ttft-slo", type=positive(float), default=None,
                   help="seconds (default per workload)")
    p.add_argument("--tpot-slo", type=positive(float), default=None,
                   help="seconds (default per workload)")
    p.add_argument("--data-dir", default=os.path.normpath(DATA),
                   help="where the traces and prompts are (../shared/data)")
    p.add_argument("--trace", default=None, metavar="PATH",
                   help=f"the file of {', '.join(TRACE_FILES)}, in that workload's format "
                        "(default: its file in --data-dir)")
    p.add_argument("--length-scale", type=positive(float), default=None,
                   help="token lengths x (default: 0.1 for the mooncake and azure traces, 1 for "
                        "the synthetic workloads)")
    p.add_argument("--time-scale", type=positive(float), default=1.0,
                   help="trace replay: arrival gaps x")
    p.add_argument("--max-input", type=positive(int), default=4096)
    p.add_argument("--max-output", type=positive(int), default=512)
    p.add_argument("--max-model-len", type=positive(int), default=8192)


def add_bisection_args(p: argparse.ArgumentParser) -> None:
    """How a goodput counts and is found, and the SLO scales it is swept over."""
    p.add_argument("--target", type=positive(float), default=0.9,
                   help="attainment that counts as goodput")
    p.add_argument("--tol", type=positive(float), default=0.1, help="bisection tolerance, req/s")
    p.add_argument("--slo-scales", type=floats, default="0.5,0.75,1,1.5,2")


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    """One run (at --rate, or at the workload's own times) or --goodput; the report."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rate", type=positive(float), default=None,
                   help="Poisson (or gamma) arrivals, req/s")
    g.add_argument("--goodput", type=lo_hi, default=None, metavar="LO,HI",
                   help="bisect the rate in [LO, HI] for the highest with >= --target attainment")
    add_bisection_args(p)
    p.add_argument("--cores", type=positive(int), default=None,
                   help="cores the deployment uses, for per-core goodput (default: this "
                        "machine's for a real server, the deployment's for a simulated one)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--run-id", type=int, default=0,
                   help="send the prompts of run N (same lengths and arrivals): repeated "
                        "invocations against one server with the same seed would otherwise hit "
                        "the prefix cache the earlier ones filled; give each a different N")
    p.add_argument("--quiet", action="store_true", help="no progress line")


# -- the workload ---------------------------------------------------------------------------------
def trace_path(a) -> str | None:
    """The file the workload is read from: --trace, else its file in --data-dir; None for a
    synthetic workload (and for summarization without its file: it falls back to the fit)."""
    if a.trace is not None:
        if a.workload not in TRACE_FILES:
            raise W.WorkloadError(f"--trace is for {', '.join(TRACE_FILES)}: {a.workload!r} is "
                                  "synthetic (lengths drawn from a fit)")
        return a.trace
    if a.workload not in TRACE_FILES:
        return None
    path = os.path.join(a.data_dir, TRACE_FILES[a.workload])
    if os.path.exists(path):
        return path
    if a.workload == "summarization":
        return None
    raise W.WorkloadError(f"{path}: no such file; give --trace PATH, or a --data-dir that has "
                          f"{TRACE_FILES[a.workload]} (../shared/data/README.md says where to "
                          "get it)")


def build_workload(a) -> list[W.RequestSpec]:
    caps = W.Caps(a.max_input, a.max_output, a.max_model_len)
    n, path = a.num_requests, trace_path(a)
    if a.workload == "humaneval":
        specs = W.humaneval(path, limit=n, caps=caps)
    elif a.workload == "mooncake":
        specs = W.mooncake(path, length_scale(a), a.time_scale, caps=caps, limit=n, seed=a.seed)
    elif a.workload == "azure":
        specs = W.azure(path, length_scale(a), a.time_scale, caps=caps, limit=n, seed=a.seed)
    elif a.workload == "summarization":
        specs = W.summarization(n, a.seed, path, caps=caps)
    else:
        specs = W.synthetic(a.workload, n, a.seed, caps=caps, length_scale=length_scale(a))
    if not specs:
        raise W.WorkloadError(f"{path}: no requests in it")
    return specs


def length_scale(a) -> float:
    """--length-scale, or its default: the production traces come from large models on GPU
    clusters (scaled to a tenth here); the synthetic workloads are sized for this project's
    machines already. HumanEval and summarization are not scaled."""
    if a.length_scale is not None:
        return a.length_scale
    return 0.1 if a.workload in ("mooncake", "azure") else 1.0


def slos(a) -> tuple[float, float]:
    ttft, tpot = DEFAULT_SLOS.get(a.workload, (5.0, 0.1))
    return (a.ttft_slo or ttft, a.tpot_slo or tpot)


def fresh_prompts(specs: list[W.RequestSpec], run: int) -> list[W.RequestSpec]:
    """The same requests with prompts no earlier run has sent: every run of an invocation
    would otherwise find the previous run's prompts in the servers' prefix caches. Token ids
    go through a bijection of the vocabulary range that depends on `run` (equal blocks stay
    equal within a run, so a trace's own prefix sharing is kept); a text prompt gets a
    run-specific first line."""
    if run == 0:
        return specs
    lo, hi = W.DEFAULT_VOCAB
    span = hi - lo
    mult = 7919  # a prime that does not divide the span: x -> x * mult + shift is a bijection
    assert span % mult

    def remap(p):
        if isinstance(p, str):
            return f"[run {run}]\n{p}"
        return [lo + ((t - lo) * mult + run * 104729) % span if lo <= t < hi else t for t in p]

    return [dataclasses.replace(s, prompt=remap(s.prompt)) for s in specs]


# -- the experiment -------------------------------------------------------------------------------
def run_at(a, run_fn: RunFn, specs: list[W.RequestSpec], rate: float | None,
           run: int) -> LoadResult:
    """One run: `specs` with run `run`'s prompts, at `rate` (arrival times replaced) or at
    their own times (trace replay, or all at 0)."""
    specs = fresh_prompts(specs, run)
    if rate is not None:
        specs = W.at_rate(specs, rate, a.cv, a.seed)
    return run_fn(specs)


def row(label: str, rate: float | None, res: LoadResult, ttft_slo: float, tpot_slo: float) -> dict:
    s = summarize(res.records)
    met = met_slo(res.records, ttft_slo, tpot_slo)
    span = s["duration_s"]
    return {"run": label, "rate": rate, "attainment": attainment(res.records, ttft_slo, tpot_slo),
            "requests": s["requests"], "rejected": s["rejected"], "failed": s["failed"],
            "met_slo": met, "goodput_req_s": met / span if span > 0 else None,
            # prefill work the server spent on requests it took and that then missed an SLO
            "missed_prefill_tok": sum(r.input_len for r in res.records
                                      if not r.rejected and not r.meets(ttft_slo, tpot_slo)),
            # how long a 429 took, as the client saw it (sent to answered)
            "reject_ms_p99": _ms(percentiles([r.e2e for r in res.records if r.rejected], (99,))["p99"]),
            "ttft_p50": s["ttft_s"].get("p50"), "ttft_p90": s["ttft_s"].get("p90"),
            "tpot_p50": s["tpot_s"].get("p50"), "tpot_p90": s["tpot_s"].get("p90"),
            "e2e_p50": s["e2e_s"].get("p50"), "out_tok_s": s["output_token_throughput"],
            "client_cpu_s": res.client_cpu_s, "wall_s": res.wall_s}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def measure_goodput(a, specs: list[W.RequestSpec], run_fn: RunFn, cores: int) -> dict:
    """Bisection on the rate in a.goodput, every probe a full run of `specs`; returns rows,
    goodput and the SLO-scale sweep at the highest passing rate."""
    ttft_slo, tpot_slo = slos(a)
    lo, hi = a.goodput
    rows, results = [], {}

    def measure(rate: float) -> float:
        res = run_at(a, run_fn, specs, rate, run=len(rows) + 1000 * getattr(a, "run_id", 0))
        results[rate] = res
        rows.append(row("probe", rate, res, ttft_slo, tpot_slo))
        print(f"  rate {rate:.3f} req/s: attainment {rows[-1]['attainment']:.2f}", file=sys.stderr)
        return rows[-1]["attainment"]

    g = goodput_bisect(measure, lo, hi, a.target, a.tol)
    best = results.get(g.rate) or results[min(results)]
    return {"goodput_req_s": g.rate, "goodput_per_core": per_core(g.rate, cores), "capped": g.capped,
            "probes": rows, "slo_sweep": slo_scale_sweep(best.records, ttft_slo, tpot_slo,
                                                         a.slo_scales),
            "records_at_goodput": [_record_dict(r) for r in best.records],
            # every deployment's first probe is at `lo`: CDFs at one common rate
            "lo": lo, "records_at_lo": [_record_dict(r) for r in results[lo].records]}


def _record_dict(r) -> dict:
    return {"ok": r.ok, "ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e, "n_out": r.n_out,
            "input_len": r.input_len, "error": r.error, "rejected": r.rejected}


def run_experiment(a, run_fn: RunFn, cores: int, extra: dict) -> dict:
    """The whole experiment a's flags describe (see the module docstring), every run through
    `run_fn`; prints the report, writes a.json, and returns what it wrote. `extra` (where the
    records came from: {"source": "measured" | "simulated", ...}) goes into the JSON."""
    specs = build_workload(a)
    ttft_slo, tpot_slo = slos(a)
    mean_in = sum(s.input_len for s in specs) / len(specs)
    mean_out = sum(s.output_len for s in specs) / len(specs)
    print(f"workload {a.workload}: {len(specs)} requests, mean input {mean_in:.0f}, output "
          f"{mean_out:.0f} tokens; SLOs TTFT {ttft_slo:g} s, TPOT {tpot_slo * 1e3:g} ms; "
          f"seed {a.seed}, cv {a.cv}", file=sys.stderr)
    out = {"workload": a.workload, "num_requests": len(specs), "ttft_slo_s": ttft_slo,
           "tpot_slo_s": tpot_slo, "cores": cores, "seed": a.seed, "cv": a.cv,
           "length_scale": length_scale(a), "time_scale": a.time_scale}
    if clash := out.keys() & extra.keys():
        raise ValueError(f"extra keys {sorted(clash)} would overwrite the experiment's own")
    out |= extra
    if a.goodput:
        out.update(measure_goodput(a, specs, run_fn, cores))
        rows = out["probes"]
    else:
        res = run_at(a, run_fn, specs, a.rate, run=a.run_id)
        rows = [row("run", a.rate, res, ttft_slo, tpot_slo)]
        out["runs"] = rows
        out["slo_sweep"] = slo_scale_sweep(res.records, ttft_slo, tpot_slo, a.slo_scales)
        out["records"] = [_record_dict(r) for r in res.records]  # per request, in spec order
    print(to_markdown(rows))
    if a.goodput:
        print(f"\ngoodput {out['goodput_req_s']:.3f} req/s = {out['goodput_per_core']:.3f} req/s "
              f"per core ({cores} cores){' (capped: raise HI)' if out['capped'] else ''}")
    print("\n" + to_markdown(out["slo_sweep"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out

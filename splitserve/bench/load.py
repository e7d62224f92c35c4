"""`splitserve bench serve`: load any OpenAI-compatible endpoint with a workload and report
latency percentiles, SLO attainment, and (with --goodput) the goodput found by bisection on
the request rate, plus an SLO-scale sweep at the last passing rate.

Every run of one invocation sends the same requests (same seed): only the arrival rate changes,
and each run's prompts are new to the server (see fresh_prompts). Separate invocations against
one server take --run-id to keep that true.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys

from splitserve.bench import workloads as W
from splitserve.bench.client import LoadResult, run_load
from splitserve.bench.goodput import (
    attainment,
    goodput_bisect,
    per_core,
    slo_scale_sweep,
    summarize,
    to_markdown,
)

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")
WORKLOAD_NAMES = [*W.WORKLOADS, "humaneval", "mooncake", "azure"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (…/v1 or not)")
    p.add_argument("--model", default="default", help="model name sent in each request")
    p.add_argument("--api-key", default=None)
    add_workload_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rate", type=float, default=None, help="Poisson (or gamma) arrivals, req/s")
    g.add_argument("--goodput", default=None, metavar="LO,HI",
                   help="bisect the rate in [LO, HI] for the highest with >= --target attainment")
    p.add_argument("--concurrency", type=int, default=None,
                   help="at most this many in flight (alone: a closed loop at this concurrency)")
    p.add_argument("--target", type=float, default=0.9, help="attainment that counts as goodput")
    p.add_argument("--tol", type=float, default=0.1, help="bisection tolerance, req/s")
    p.add_argument("--cores", type=int, default=None,
                   help="cores the deployment uses, for per-core goodput (default: this machine's)")
    p.add_argument("--slo-scales", default="0.5,0.75,1,1.5,2")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--run-id", type=int, default=0,
                   help="send the prompts of run N (same lengths and arrivals): repeated "
                        "invocations against one server with the same seed would otherwise hit "
                        "the prefix cache the earlier ones filled; give each a different N")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="prefill-heavy", choices=WORKLOAD_NAMES)
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cv", type=float, default=1.0, help="arrival burstiness (1 = Poisson)")
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds (default per workload)")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds (default per workload)")
    p.add_argument("--data-dir", default=os.path.normpath(DATA),
                   help="where the traces and prompts are (../shared/data)")
    p.add_argument("--length-scale", type=float, default=0.1, help="trace replay: token lengths x")
    p.add_argument("--time-scale", type=float, default=1.0, help="trace replay: arrival gaps x")
    p.add_argument("--max-input", type=int, default=4096)
    p.add_argument("--max-output", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=8192)


# (TTFT, TPOT) SLOs in seconds for the workloads sized to this machine: TTFT ~3x a prefill of the
# median prompt on one core, TPOT ~3x a lightly batched decode step (see BENCHMARKS.md).
DEFAULT_SLOS = {"prefill-heavy": (4.0, 0.04), "decode-heavy": (1.5, 0.04)}


def build_workload(a) -> list[W.RequestSpec]:
    caps = W.Caps(a.max_input, a.max_output, a.max_model_len)
    n, d = a.num_requests, a.data_dir
    if a.workload == "humaneval":
        return W.humaneval(os.path.join(d, "HumanEval.jsonl.gz"), limit=n, caps=caps)
    if a.workload == "mooncake":
        return W.mooncake(os.path.join(d, "conversation_trace.jsonl"), a.length_scale,
                          a.time_scale, caps=caps, limit=n, seed=a.seed)
    if a.workload == "azure":
        return W.azure(os.path.join(d, "AzureLLMInferenceTrace_conv.csv"), a.length_scale,
                       a.time_scale, caps=caps, limit=n, seed=a.seed)
    if a.workload == "summarization":
        csv = os.path.join(d, "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv")
        return W.summarization(n, a.seed, csv if os.path.exists(csv) else None, caps=caps)
    return W.synthetic(a.workload, n, a.seed, caps=caps)


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


def run_at(a, specs: list[W.RequestSpec], rate: float | None, run: int = 0) -> LoadResult:
    """One load run: at `rate` (arrival times replaced), or the specs' own times (trace replay
    / closed loop); `run` > 0 sends prompts no earlier run sent."""
    specs = fresh_prompts(specs, run)
    if rate is not None:
        specs = W.at_rate(specs, rate, a.cv, a.seed)
    return asyncio.run(run_load(a.base_url, specs, a.model, a.api_key, a.concurrency,
                                progress=not a.quiet, extra_body=getattr(a, "extra_body", None)))


def row(label: str, rate: float | None, res: LoadResult, ttft_slo: float, tpot_slo: float) -> dict:
    s = summarize(res.records)
    return {"run": label, "rate": rate, "attainment": attainment(res.records, ttft_slo, tpot_slo),
            "requests": s["requests"], "failed": s["failed"],
            "ttft_p50": s["ttft_s"].get("p50"), "ttft_p90": s["ttft_s"].get("p90"),
            "tpot_p50": s["tpot_s"].get("p50"), "tpot_p90": s["tpot_s"].get("p90"),
            "e2e_p50": s["e2e_s"].get("p50"), "out_tok_s": s["output_token_throughput"],
            "client_cpu_s": res.client_cpu_s, "wall_s": res.wall_s}


def measure_goodput(a, specs, cores: int) -> dict:
    """Bisection on the rate, every probe a full run of `specs`; returns rows, goodput and the
    SLO-scale sweep at the highest passing rate."""
    ttft_slo, tpot_slo = slos(a)
    lo, hi = (float(x) for x in a.goodput.split(","))
    rows, results = [], {}

    def measure(rate: float) -> float:
        res = run_at(a, specs, rate, run=len(rows) + 1000 * getattr(a, "run_id", 0))
        results[rate] = res
        rows.append(row("probe", rate, res, ttft_slo, tpot_slo))
        print(f"  rate {rate:.3f} req/s: attainment {rows[-1]['attainment']:.2f}", file=sys.stderr)
        return rows[-1]["attainment"]

    g = goodput_bisect(measure, lo, hi, a.target, a.tol)
    best = results.get(g.rate) or results[min(results)]
    scales = [float(x) for x in a.slo_scales.split(",")]
    return {"goodput_req_s": g.rate, "goodput_per_core": per_core(g.rate, cores), "capped": g.capped,
            "probes": rows, "slo_sweep": slo_scale_sweep(best.records, ttft_slo, tpot_slo, scales),
            "records_at_goodput": [_record_dict(r) for r in best.records],
            # every deployment's first probe is at `lo`: CDFs at one common rate
            "lo": lo, "records_at_lo": [_record_dict(r) for r in results[lo].records]}


def _record_dict(r) -> dict:
    return {"ok": r.ok, "ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e, "n_out": r.n_out,
            "input_len": r.input_len, "error": r.error}


def main(a) -> int:
    specs = build_workload(a)
    ttft_slo, tpot_slo = slos(a)
    cores = a.cores or len(os.sched_getaffinity(0))
    mean_in = sum(s.input_len for s in specs) / len(specs)
    mean_out = sum(s.output_len for s in specs) / len(specs)
    print(f"workload {a.workload}: {len(specs)} requests, mean input {mean_in:.0f}, output "
          f"{mean_out:.0f} tokens; SLOs TTFT {ttft_slo:g} s, TPOT {tpot_slo * 1e3:g} ms; "
          f"seed {a.seed}, cv {a.cv}", file=sys.stderr)
    out = {"workload": a.workload, "num_requests": len(specs), "ttft_slo_s": ttft_slo,
           "tpot_slo_s": tpot_slo, "cores": cores, "seed": a.seed, "cv": a.cv,
           "length_scale": a.length_scale, "time_scale": a.time_scale}
    if a.goodput:
        out.update(measure_goodput(a, specs, cores))
        rows = out["probes"]
    else:
        res = run_at(a, specs, a.rate, run=a.run_id)
        rows = [row("run", a.rate, res, ttft_slo, tpot_slo)]
        out["runs"] = rows
        out["slo_sweep"] = slo_scale_sweep(res.records, ttft_slo, tpot_slo,
                                           [float(x) for x in a.slo_scales.split(",")])
    print(to_markdown(rows))
    if a.goodput:
        print(f"\ngoodput {out['goodput_req_s']:.3f} req/s = {out['goodput_per_core']:.3f} req/s "
              f"per core ({cores} cores){' (capped: raise HI)' if out['capped'] else ''}")
    print("\n" + to_markdown(out["slo_sweep"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0

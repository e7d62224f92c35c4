"""`splitserve bench serve`: load any OpenAI-compatible endpoint with a workload and report
latency percentiles, SLO attainment, and (with --goodput) the goodput found by bisection on
the request rate, plus an SLO-scale sweep at the last passing rate.

This file only sends the load (through bench/client.py): the workload, the rates, the bisection
and the report are bench/experiment.py's, shared with the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from splitserve.bench import experiment as E
from splitserve.bench.client import run_load
from splitserve.bench.workloads import RequestSpec


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (…/v1 or not)")
    p.add_argument("--model", default="default", help="model name sent in each request")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", type=E.positive(int), default=None,
                   help="at most this many in flight (alone: a closed loop at this concurrency)")
    E.add_workload_args(p)
    E.add_experiment_args(p)


def load_runner(base_url: str, model: str = "default", api_key: str | None = None,
                concurrency: int | None = None, progress: bool = True,
                extra_body: dict | None = None) -> E.RunFn:
    """The run function that sends each spec to the server at its arrival time."""
    def run(specs: list[RequestSpec]):
        return asyncio.run(run_load(base_url, specs, model, api_key, concurrency,
                                    progress=progress, extra_body=extra_body))
    return run


def prefix_counters(base_url: str) -> tuple[float, float] | None:
    """(hit, queried) prompt tokens summed over the server's computing workers (co-located
    and prefill: a decode worker's reservations reuse blocks to move fewer, not to compute
    fewer), from its /metrics (splitserve's prefix-cache counters), or None when it has none
    (another server)."""
    import httpx

    url = base_url.rstrip("/").removesuffix("/v1") + "/metrics"
    try:
        text = httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return None
    sums = {"hits": 0.0, "queries": 0.0}
    found = False
    for line in text.splitlines():
        for key in sums:
            if (line.startswith(f"splitserve_prefix_cache_{key}_total{{")
                    and 'role="decode"' not in line):
                sums[key] += float(line.rsplit(" ", 1)[1])
                found = True
    return (sums["hits"], sums["queries"]) if found else None


def main(a) -> int:
    run = load_runner(a.base_url, a.model, a.api_key, a.concurrency, progress=not a.quiet)
    cores = a.cores or len(os.sched_getaffinity(0))
    seen = {"hits": 0.0, "queries": 0.0, "known": True}

    def counted(specs):  # the server's prefix-cache counters around every run
        before = prefix_counters(a.base_url)
        res = run(specs)
        after = prefix_counters(a.base_url)
        if before is None or after is None:
            seen["known"] = False
        else:
            seen["hits"] += after[0] - before[0]
            seen["queries"] += after[1] - before[1]
        return res

    out = E.run_experiment(a, counted, cores, {"source": "measured", "base_url": a.base_url,
                                               "model": a.model, "concurrency": a.concurrency})
    from splitserve.bench.workloads import ideal_hit_rate

    server = seen["hits"] / seen["queries"] if seen["known"] and seen["queries"] else None
    ideal = ideal_hit_rate(E.build_workload(a))
    print("\n| prefix cache | hit rate |\n|---|---:|\n"
          f"| the server (its /metrics, this run) | {_pct(server)} |\n"
          f"| ideal (an infinite cache, same requests) | {_pct(ideal)} |")
    out |= {"prefix_hit_rate": server, "prefix_hit_rate_ideal": ideal,
            "prefix_tokens": {"hits": seen["hits"], "queries": seen["queries"]}}
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"

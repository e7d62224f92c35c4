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


def main(a) -> int:
    run = load_runner(a.base_url, a.model, a.api_key, a.concurrency, progress=not a.quiet)
    cores = a.cores or len(os.sched_getaffinity(0))
    E.run_experiment(a, run, cores, {"source": "measured", "base_url": a.base_url,
                                     "model": a.model, "concurrency": a.concurrency})
    return 0

"""`splitserve sim`: a deployment simulated on any workload `bench serve` takes, reported
through the same code (bench/experiment.py): the same flags, per-request records, tables and
JSON — only the records come from the simulator instead of a load run.

    splitserve sim --deployment pd --latency-model fitted:profile.json --workload prefill-heavy \
        --rate 0.5 --num-requests 200
    splitserve sim --deployment 4:4 --latency-model roofline:h100:llama-3.1-8b:tp1 \
        --workload mooncake --length-scale 1 --goodput 1,64

A worker's engine settings are serve's (the deployment table in bench/deployments.py adds what
differs between the compared deployments); its KV pool is --kv-cache-gb of the model's KV
(the CPU default, as bench compare runs) or, for a GPU latency model, what the GPU's memory
holds beside the weights. Every probe reports the simulator's own speed on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

from splitserve.bench import experiment as E
from splitserve.bench.client import LoadResult
from splitserve.bench.deployments import KV_CACHE_GB, DeploymentSpec, parse_deployment
from splitserve.bench.workloads import DEFAULT_VOCAB, RequestSpec
from splitserve.config import SchedulerConfig
from splitserve.errors import SplitServeError
from splitserve.sim.kvlink import MODES, KVLink
from splitserve.sim.latency.base import LatencyModel
from splitserve.sim.latency.registry import SPEC_SYNTAX, build_latency_model
from splitserve.sim.models import get_model
from splitserve.sim.simulation import SimConfig, SimResult, Simulation
from splitserve.sim.worker import WorkerSpec


class SimError(SplitServeError):
    """A simulated deployment that cannot be built (bad flags, does not fit)."""


# Measured on this project's 2-core CPU machine (see BENCHMARKS.md, "Simulator"): the shm
# hand-over writes ~3.8 GB/s from inside the prefill worker's forward.
CPU_SHM_GB_S = 3.8
# ... and the API server + router (0.31-0.38 ms) and the load generator (0.29-0.36 ms) spend
# ~0.75 ms of CPU per streamed token on the workers' cores (decode-heavy at 1.5 req/s, pd and
# chunked, /proc CPU times): what the simulator takes from busy workers.
CPU_HOST_MS_PER_TOKEN = 0.75
# The KV tiers' loads, per byte (SmolLM2's bf16 block of 16 tokens is 0.37 MB), measured on
# the AMX machine of BENCHMARKS.md's tier sections: a copy from the host DRAM tier into the
# pool, and a get from the shared store process (local TCP, the digest checked)
CPU_TIER_GB_S = {"dram": 7.0, "shared": 0.46}


@dataclass(frozen=True)
class SimSettings:
    block_size: int = 16
    max_num_seqs: int = 64
    local_prefill_chunk: int | tuple[int, ...] = 8
    kv_cache_gb: float = KV_CACHE_GB
    model_shape: str = "SmolLM2-135M"  # whose KV a latency model without a shape moves
    max_model_len: int = 8192
    kv_link: str | None = None  # None: inline on CPU, overlapped on a GPU model
    kv_bandwidth_gb_s: float | None = None
    api_ms: float = 3.0
    hop_ms: float = 0.2
    data_hop_ms: float = 0.3
    host_cpu_ms_per_token: float | None = None  # None: 0.75 for a CPU model, 0 for a GPU one
    host_cache_gb: float = 0.0  # each worker's DRAM tier (serve --kv-host-gb)
    shared_cache_gb: float = 0.0  # the shared store (serve --kv-shared-gb)

    @classmethod
    def of(cls, a) -> SimSettings:
        return cls(a.block_size, a.max_num_seqs, a.local_prefill_chunk, a.kv_cache_gb,
                   a.model_shape, a.max_model_len, a.kv_link, a.kv_bandwidth, a.api_latency_ms,
                   a.hop_latency_ms, a.data_hop_latency_ms, a.host_cpu_ms_per_token,
                   getattr(a, "kv_host_gb", 0.0), getattr(a, "kv_shared_gb", 0.0))


def build_workers(dep: DeploymentSpec, latency: LatencyModel, s: SimSettings,
                  prefill_policy=None, role_latency: dict | None = None) -> list[WorkerSpec]:
    """One WorkerSpec per worker of `dep`, with the engine settings serve gives it;
    `prefill_policy` (a factory) sizes the decode workers' own prefill chunks; `role_latency`
    (role -> LatencyModel) prices a role's steps differently (a prefill instance of tp2 beside
    decode instances of tp1), its KV pool sized by that model too."""
    if s.block_size & (s.block_size - 1):
        raise SimError(f"--block-size must be a power of two (as the engine's), got {s.block_size}")
    workers, pools = [], {}  # (a pool per latency model, not per worker)
    for role in dep.roles:
        lat = (role_latency or {}).get(role, latency)
        if id(lat) not in pools:
            pools[id(lat)] = _pool(dep, lat, s)
        num_blocks, max_len = pools[id(lat)]
        cfg = SchedulerConfig(
            max_num_batched_tokens=dep.max_num_batched_tokens, max_num_seqs=s.max_num_seqs,
            chunked_prefill=dep.chunked_prefill, role=role,
            prefill_chunk_while_decoding=s.local_prefill_chunk if role == "decode" else None)
        workers.append(WorkerSpec(role, cfg, num_blocks, s.block_size, max_model_len=max_len,
                                  prefill_policy=prefill_policy if role == "decode" else None,
                                  latency=None if lat is latency else lat,
                                  host_blocks=int(s.host_cache_gb * 2**30 // block_bytes(lat, s))))
    return workers


def block_bytes(latency: LatencyModel, s: SimSettings) -> int:
    """A KV block's bytes (bf16) of the model the deployment pools."""
    return s.block_size * _shape(latency, s).kv_bytes_per_token(2)


def _pool(dep: DeploymentSpec, latency: LatencyModel, s: SimSettings) -> tuple[int, int]:
    """A worker's KV blocks and longest sequence: what the GPU holds beside the weights, or
    --kv-cache-gb of the model's KV."""
    if latency.gpu is not None and hasattr(latency, "kv_capacity_tokens"):
        try:
            tokens = latency.kv_capacity_tokens()
        except ValueError as e:
            raise SimError(f"deployment {dep.name!r}: {e}") from None
        num_blocks = tokens // s.block_size
        max_len = min(s.max_model_len, latency.model.max_context)
    else:
        model = _shape(latency, s)
        per_block = s.block_size * model.kv_bytes_per_token(2)
        num_blocks = int(s.kv_cache_gb * 2**30 // per_block)
        max_len = min(s.max_model_len, model.max_context)
    if num_blocks < 1:
        raise SimError(f"deployment {dep.name!r}: a worker's KV pool holds no block of "
                       f"{s.block_size} tokens")
    return num_blocks, max_len


def _shape(latency: LatencyModel, s: SimSettings):
    if latency.model is not None:
        return latency.model
    try:
        return get_model(s.model_shape)
    except ValueError as e:
        raise SimError(str(e)) from None


def build_link(latency: LatencyModel, s: SimSettings) -> KVLink:
    """The KV hand-over's cost: a GPU model's network (each of the tp GPUs its own NIC), or
    the CPU's in-process shared-memory copy."""
    model = _shape(latency, s)
    if latency.gpu is not None:
        mode = s.kv_link or "overlapped"
        bw = (s.kv_bandwidth_gb_s or latency.gpu.network_gb_s * latency.tp) * 1e9
    else:
        mode = s.kv_link or "inline"
        bw = (s.kv_bandwidth_gb_s or CPU_SHM_GB_S) * 1e9
    return KVLink(model.kv_bytes_per_token(2), bw, mode, model.num_layers)


def prompt_tokens(specs: list[RequestSpec], seed: int = 0) -> list[list[int]]:
    """Token ids per spec: its own, or (a text prompt, e.g. HumanEval) random ids of its
    length: the simulator only needs lengths and which blocks repeat."""
    rng = np.random.default_rng([seed, 7])
    return [s.prompt if not isinstance(s.prompt, str) else
            rng.integers(DEFAULT_VOCAB[0], DEFAULT_VOCAB[1], s.input_len).tolist() for s in specs]


class Simulator:
    """The run function bench/experiment.py calls: every call simulates one run afresh."""

    def __init__(self, dep: DeploymentSpec, latency: LatencyModel, s: SimSettings,
                 record: bool = False, quiet: bool = False, admission=None, local_prefill=None,
                 role_latency: dict | None = None, routing: str = "cache-aware"):
        """`admission`: () -> a fresh router.admission.Admission for each run (the server's
        own policy), or None: accept every request. `local_prefill`: a policies.SloLocalPrefill
        (its chunk table then caps the decode workers' steps), or None: the default.
        `role_latency`: role -> the latency model of that role's workers (build_workers);
        `latency` prices the rest and the KV hand-over's link (the prefill side's network)."""
        self.dep, self.latency, self.settings = dep, latency, s
        self.routing = routing  # RouterState's (serve --routing)
        self.admission = admission
        self.local_prefill = local_prefill
        if local_prefill is not None:
            s = replace(s, local_prefill_chunk=local_prefill.worker_chunks())
            if not dep.local_prefill:
                raise SimError(f"deployment {dep.name!r} has local prefill off")
        self.workers = build_workers(dep, latency, s, local_prefill.worker_policy()
                                     if local_prefill is not None and local_prefill.tpot_s else None,
                                     role_latency)
        host_cpu = s.host_cpu_ms_per_token
        if host_cpu is None:
            host_cpu = 0.0 if latency.gpu is not None else CPU_HOST_MS_PER_TOKEN
        per_block = block_bytes(latency, s)
        self.config = SimConfig(build_link(latency, s), api_s=s.api_ms / 1e3, hop_s=s.hop_ms / 1e3,
                                data_hop_s=s.data_hop_ms / 1e3, local_prefill=dep.local_prefill,
                                record=record, host_cpu_per_token_s=host_cpu / 1e3,
                                shared_blocks=int(s.shared_cache_gb * 2**30 // per_block),
                                tier_load_s={t: per_block / (gb_s * 1e9)
                                             for t, gb_s in CPU_TIER_GB_S.items()})
        self.quiet = quiet
        self.last: SimResult | None = None
        self.simulation: Simulation | None = None  # the last run's (its workers, their traces)
        self.wall_s = 0.0  # the simulator's own time, every run so far
        self.events = 0

    def __call__(self, specs: list[RequestSpec]) -> LoadResult:
        sim = self.simulation = Simulation(self.workers, self.latency, self.config,
                                           self.admission() if self.admission else None,
                                           self.local_prefill, self.routing)
        t0 = time.perf_counter()
        res = sim.run(specs, prompt_tokens(specs))
        wall = time.perf_counter() - t0
        self.last, self.wall_s, self.events = res, self.wall_s + wall, self.events + res.events
        if not self.quiet:
            print(f"[sim] {len(specs)} requests, {res.events} events in {wall:.2f} s "
                  f"({res.events / max(wall, 1e-9):,.0f} events/s); {res.makespan_s:.1f} s "
                  "simulated", file=sys.stderr)
        return LoadResult(res.records, wall_s=res.makespan_s, client_cpu_s=0.0)

    @property
    def cores(self) -> int:
        """The hardware the deployment uses: a worker per core on CPU, tp·pp GPUs each."""
        return len(self.workers) * (self.latency.tp * self.latency.pp)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deployment", default="pd",
                   help="pd, pd-pure, chunked, prefill-first (as bench compare runs them), "
                        "colocated:N, P:D or P:D:pure")
    p.add_argument("--latency-model", required=True, metavar="SPEC", help=SPEC_SYNTAX)
    E.add_workload_args(p)
    E.add_experiment_args(p)
    add_sim_args(p)


def add_sim_args(p: argparse.ArgumentParser) -> None:
    """The simulated deployment's engine settings and costs beside the step times."""
    g = p.add_argument_group("the simulated deployment")
    g.add_argument("--chunk", type=E.positive(int), default=256,
                   help="the co-located engines' token budget (as bench compare)")
    g.add_argument("--max-num-seqs", type=E.positive(int), default=64)
    g.add_argument("--block-size", type=E.positive(int), default=16)
    g.add_argument("--local-prefill-chunk", type=E.positive(int), default=8)
    g.add_argument("--local-prefill", default="auto", choices=["auto", "slo"],
                   help="a P/D deployment's conditional disaggregation: the default policy, or "
                        "serve --local-prefill slo's (by the latency model, chunks sized to the "
                        "experiment's --tpot-slo)")
    g.add_argument("--kv-cache-gb", type=E.positive(float), default=KV_CACHE_GB,
                   help="each worker's KV pool when the latency model knows no GPU")
    g.add_argument("--kv-host-gb", type=E.non_negative, default=0.0,
                   help="each worker's host DRAM tier below its pool (serve --kv-host-gb)")
    g.add_argument("--kv-shared-gb", type=E.non_negative, default=0.0,
                   help="a KV store every worker shares (serve --kv-shared-gb)")
    g.add_argument("--model-shape", default="SmolLM2-135M",
                   help="the model whose KV is pooled and handed over, for latency models "
                        "without one (fitted, constant)")
    g.add_argument("--kv-link", choices=MODES, default=None,
                   help="how the hand-over's bytes cost time (default: inline on CPU, "
                        "overlapped for a GPU model); see sim/kvlink.py")
    g.add_argument("--kv-bandwidth", type=E.positive(float), default=None, metavar="GB/S",
                   help=f"default: {CPU_SHM_GB_S} (CPU shm), the GPU's network x tp")
    g.add_argument("--api-latency-ms", type=E.non_negative, default=SimSettings.api_ms,
                   help="client <-> router, one way (HTTP, the API server; ~3 ms on this "
                        "project's CPU machine: bench validate --explain)")
    g.add_argument("--hop-latency-ms", type=E.non_negative, default=SimSettings.hop_ms,
                   help="router <-> worker, one way")
    g.add_argument("--data-hop-latency-ms", type=E.non_negative, default=SimSettings.data_hop_ms,
                   help="prefill -> decode notices")
    g.add_argument("--admission", default="off", choices=["off", "reactive", "predictive"],
                   help="the router's admission control, as serve --admission, judged by the "
                        "experiment's --ttft-slo / --tpot-slo and priced by the latency model")
    g.add_argument("--routing", default="cache-aware",
                   choices=["cache-aware", "least-loaded", "round-robin"],
                   help="how the router picks the worker that computes a prompt (serve "
                        "--routing; cache-aware: the workers' KV events feed its prefix index)")
    g.add_argument("--max-queue", type=int, default=256,
                   help="requests in flight per worker beyond which new ones are refused (0: "
                        "unbounded), as serve --max-queue")
    g.add_argument("--host-cpu-ms-per-token", type=E.non_negative, default=None,
                   help="CPU the API server, router and client take from the workers' cores per "
                        f"streamed token when none is idle (default {CPU_HOST_MS_PER_TOKEN} on "
                        "CPU, 0 for a GPU model)")


def admission_factory(a, dep: DeploymentSpec, latency: LatencyModel, busy_chunks=None):
    """() -> the Admission serve would run with these flags, or None (off, unbounded).
    `busy_chunks`: the decode workers' prompt tokens per step beside decodes (default
    --local-prefill-chunk)."""
    from splitserve.router.admission import SLO, Admission, CostModel

    mode, max_queue = a.admission, a.max_queue
    if max_queue < 0:
        raise SimError(f"--max-queue must be >= 0 (0: unbounded), got {max_queue}")
    if mode == "off" and not max_queue:
        return None
    slo = SLO(*E.slos(a)) if mode != "off" else None
    cost = (CostModel(latency, dep.max_num_batched_tokens, busy_chunks or a.local_prefill_chunk,
                      overhead_s=(2 * a.api_latency_ms + 4 * a.hop_latency_ms) / 1e3)
            if mode != "off" else None)
    return lambda: Admission(mode, cost, slo, max_queue=max_queue)


def main(a) -> int:
    try:
        dep = parse_deployment(a.deployment, a.chunk, a.max_input)
        latency = build_latency_model(a.latency_model)
    except ValueError as e:
        raise SimError(str(e)) from None
    local = None
    if a.local_prefill == "slo":
        from splitserve.router.admission import CostModel
        from splitserve.router.policies import SloLocalPrefill

        cost = CostModel(latency, dep.max_num_batched_tokens, a.local_prefill_chunk)
        ttft, tpot = E.slos(a)
        local = SloLocalPrefill.for_slo(cost, tpot, a.max_num_seqs, ttft_s=ttft)
    sim = Simulator(dep, latency, SimSettings.of(a), quiet=a.quiet,
                    admission=admission_factory(a, dep, latency,
                                                local.worker_chunks() if local else None),
                    local_prefill=local, routing=a.routing)
    print(f"simulating {dep.name} ({', '.join(dep.roles)}) with {latency.describe()}",
          file=sys.stderr)
    out = E.run_experiment(a, sim, a.cores or sim.cores,
                           {"source": "simulated", "deployment": dep.name,
                            "latency_model": a.latency_model})
    from splitserve.bench.workloads import ideal_hit_rate

    ws = sim.simulation.workers.values() if sim.simulation else []
    queried = sum(w.core.kv.num_queried_tokens for w in ws)
    hit_rate = sum(w.core.kv.num_hit_tokens for w in ws) / queried if queried else None
    ideal = ideal_hit_rate(E.build_workload(a))
    out |= {"prefix_hit_rate": hit_rate, "prefix_hit_rate_ideal": ideal}
    print(f"\nprefix cache hit rate (the last run): {hit_rate if hit_rate is None else f'{hit_rate:.1%}'}; "
          f"ideal (an infinite cache): {ideal if ideal is None else f'{ideal:.1%}'}")
    print(f"\nsimulator: {sim.events:,} events in {sim.wall_s:.2f} s "
          f"({sim.events / max(sim.wall_s, 1e-9):,.0f} events/s)", file=sys.stderr)
    if a.json:  # the simulator's own cost beside the results
        out |= {"sim_events": sim.events, "sim_wall_s": sim.wall_s}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0

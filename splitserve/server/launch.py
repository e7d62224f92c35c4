"""`splitserve serve`: the API server + router in this process, workers as child processes.

    this process (asyncio)           children (one per worker, pinned to their own cores)
      uvicorn ── FastAPI app           splitserve worker --role prefill --cores 0 ...
      Conductor ◄── ZeroMQ ──────────► splitserve worker --role decode  --cores 1 ...

Workers started elsewhere (`splitserve worker --router HOST:PORT`) register with the same
router socket (bind it beyond loopback with --router-bind). SIGTERM drains (drain.py). A worker
serve started whose process exits is started again, with backoff (supervisor.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import subprocess
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from splitserve.config import EngineConfig

log = logging.getLogger("splitserve.serve")


def split_cores(n_workers: int, cores: list[int] | None = None) -> list[list[int]]:
    """Cores for each worker: contiguous, even shares; when there are fewer cores than workers,
    workers share single cores round-robin."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if n_workers == 0:
        return []
    if n_workers <= len(cores):
        per, extra = divmod(len(cores), n_workers)
        out, i = [], 0
        for w in range(n_workers):
            k = per + (w < extra)
            out.append(cores[i:i + k])
            i += k
        return out
    return [[cores[w % len(cores)]] for w in range(n_workers)]


def parse_core_lists(spec: str) -> list[list[int]]:
    """'0-3;4,5' -> [[0, 1, 2, 3], [4, 5]] (one group per worker)."""
    groups = []
    for group in spec.split(";"):
        cores = []
        for part in group.split(","):
            a, _, b = part.partition("-")
            cores.extend(range(int(a), int(b or a) + 1))
        groups.append(cores)
    return groups


def visible_gpus(device: str) -> list[str]:
    """The GPUs workers may use: none unless the device is auto/cuda and CUDA sees some."""
    if device not in ("auto", "cuda") and not device.startswith("cuda"):
        return []
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g.strip() for g in listed.split(",") if g.strip()] if listed else []
    return ids[:n] if ids else [str(i) for i in range(n)]


def worker_command(role: str, router_addr: str, worker_id: str, cores: list[int], a) -> list[str]:
    cmd = [sys.executable, "-m", "splitserve.cli", "worker", "--role", role, "--router", router_addr,
           "--worker-id", worker_id, "--cores", ",".join(map(str, cores)),
           "--parent-pid", str(os.getpid()), "--kv-transport", a.kv_transport,
           "--kv-timeout", str(a.kv_timeout), "--kv-queue-timeout", str(a.kv_queue_timeout),
           "--model", a.model, "--dtype", a.dtype,
           "--device", a.device, "--threads", str(a.threads or len(cores)),
           "--max-num-batched-tokens", str(a.max_num_batched_tokens),
           "--max-num-seqs", str(a.max_num_seqs), "--kv-cache-gb", str(a.kv_cache_gb),
           "--local-prefill-chunk", chunk_flag(a.local_prefill_chunk)]
    if a.quantization:
        cmd += ["--quantization", a.quantization]
    if a.no_fast_linear:
        cmd.append("--no-fast-linear")
    if a.no_chunked_prefill:
        cmd.append("--no-chunked-prefill")
    if a.max_model_len:
        cmd += ["--max-model-len", str(a.max_model_len)]
    if a.num_blocks:
        cmd += ["--num-blocks", str(a.num_blocks)]
    if a.kv_host_gb:
        cmd += ["--kv-host-gb", str(a.kv_host_gb)]
    if a.kv_disk_dir and a.kv_disk_gb:
        cmd += ["--kv-disk-dir", os.path.join(a.kv_disk_dir, worker_id),
                "--kv-disk-gb", str(a.kv_disk_gb)]
    if a.kv_shared:
        cmd += ["--kv-shared", a.kv_shared]
    reroleable = getattr(a, "reroleable", False) or getattr(a, "planner", "off") != "off"
    if reroleable:
        cmd.append("--reroleable")
    if (role == "decode" or reroleable) and a.local_prefill == "slo":
        cmd += ["--tpot-slo", repr(a.tpot_slo), "--latency-model", a.latency_model]
    return cmd


def spawn_workers(conductor, roles: list[str], core_groups: list[list[int]], a,
                  supervisor=None) -> list[subprocess.Popen]:
    """Start worker i (id "<role>-<i>") on core_groups[i] and tell the conductor its process;
    `a` carries the worker flags (see worker_command). With a `supervisor`
    (supervisor.Supervisor), it starts them, and again whenever one exits."""
    gpus = visible_gpus(a.device)
    procs = []
    for i, (role, cores) in enumerate(zip(roles, core_groups)):
        wid = f"{role}-{i}"
        env = dict(os.environ)
        if gpus:  # one GPU per worker (shared round-robin when there are fewer GPUs)
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        cmd = worker_command(role, conductor.addr, wid, cores, a)

        def start(wid=wid, cmd=cmd, env=env, cores=cores) -> subprocess.Popen:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env)
            log.info("started %s on cores %s (pid %d)", wid, cores, proc.pid)
            return proc

        if supervisor is not None:
            procs.append(supervisor.add(wid, start))
        else:
            procs.append(start())
            conductor.attach_process(wid, procs[-1])
    return procs


def build_admission(a):
    """serve's admission policy from its flags (run_serve checked them)."""
    from splitserve.router.admission import SLO, Admission

    if a.admission == "off":
        return Admission("off", max_queue=a.max_queue) if a.max_queue else None
    return Admission(a.admission, cost_model(a), SLO(a.ttft_slo, a.tpot_slo), max_queue=a.max_queue)


def cost_model(a):
    """The router's step-time arithmetic (admission.CostModel) from --latency-model."""
    from splitserve.router.admission import CostModel
    from splitserve.sim.latency.registry import build_latency_model

    try:
        latency = build_latency_model(a.latency_model)
    except (ValueError, OSError) as e:
        raise SystemExit(f"--latency-model {a.latency_model}: {e}") from None
    return CostModel(latency, a.max_num_batched_tokens, a.local_prefill_chunk, overhead_s=0.005)


def local_prefill_policy(a):
    """The router's conditional-disaggregation policy for serve's flags (None: off); with
    --local-prefill slo, also sets a.local_prefill_chunk to the chunk table the decode
    workers cap their steps with."""
    from splitserve.router.policies import LocalPrefill, SloLocalPrefill

    if a.colocated or a.local_prefill == "off":
        return None
    if a.no_chunked_prefill:
        log.warning("--no-chunked-prefill: a decode worker could not prefill beside its decodes "
                    "in small chunks, so local prefill is off")
        return None
    if a.local_prefill == "auto":
        return LocalPrefill()
    policy = SloLocalPrefill.for_slo(cost_model(a), a.tpot_slo, a.max_num_seqs, ttft_s=a.ttft_slo)
    a.local_prefill_chunk = policy.worker_chunks()
    log.info("--local-prefill slo: the router prices a local prefill at %s prompt tokens per step "
             "beside 0, 1, 2, ... decodes; the decode workers size theirs by their decodes' "
             "slack (--tpot-slo %g)", policy.chunks, a.tpot_slo)
    return policy


def planner_candidates(a, n_workers: int) -> dict:
    """The deployments the online planner chooses between, on serve's engine settings:
    n co-located workers, and every P prefill + D decode split of them (serve's local-prefill
    setting)."""
    from dataclasses import replace

    from splitserve.bench.deployments import parse_deployment

    names = [f"colocated:{n_workers}"] + [
        f"{p}:{n_workers - p}" + (":pure" if a.local_prefill == "off" else "")
        for p in range(1, n_workers)]
    return {n: replace(parse_deployment(n), max_num_batched_tokens=a.max_num_batched_tokens,
                       chunked_prefill=not a.no_chunked_prefill) for n in names}


def build_planner(a, conductor, roles: list[str], local_prefill):
    """serve --planner auto: a PlannerLoop (server/planner_loop.py), or None."""
    if a.planner == "off":
        return None
    from splitserve.plan.online import OnlinePlanner, SimEvaluator
    from splitserve.server.planner_loop import PlannerLoop
    from splitserve.sim.run import SimSettings

    deps = planner_candidates(a, len(roles))
    settings = SimSettings(max_num_seqs=a.max_num_seqs, local_prefill_chunk=a.local_prefill_chunk,
                           kv_cache_gb=a.kv_cache_gb)
    from splitserve.router.policies import SloLocalPrefill

    lp = local_prefill if isinstance(local_prefill, SloLocalPrefill) else None
    evaluate = SimEvaluator(deps, cost_model(a).latency, a.ttft_slo, a.tpot_slo, settings, lp)
    planner = OnlinePlanner({n: d.roles for n, d in deps.items()}, evaluate,
                            window_s=a.planner_window, interval_s=a.planner_interval,
                            margin=a.planner_margin, patience=a.planner_patience,
                            min_dwell_s=a.planner_min_dwell)
    log.warning("planner auto: choosing between %s every %g s on the last %g s of traffic",
                ", ".join(deps), a.planner_interval, a.planner_window)
    return PlannerLoop(conductor, planner, a.ttft_slo, a.tpot_slo)


def chunk_flag(chunk: int | tuple[int, ...]) -> str:
    return str(chunk) if isinstance(chunk, int) else ",".join(map(str, chunk))


def parse_chunks(text: str) -> int | tuple[int, ...]:
    """--local-prefill-chunk: N, or N0,N1,N2,... (beside 0, 1, 2, ... decodes)."""
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N0,N1,... token counts, got {text!r}") from None
    if any(p < 1 for p in parts):  # (a 0 would stall a prompt under way beside decodes)
        raise argparse.ArgumentTypeError(f"chunks must be >= 1 token, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


async def run_deployment(a) -> int:
    import uvicorn

    from splitserve.router.conductor import Conductor
    from splitserve.server.drain import DrainingServer
    from splitserve.server.openai_api import build_app
    from splitserve.server.supervisor import Supervisor

    if a.colocated:
        roles = ["colocated"] * a.colocated
    else:
        roles = ["prefill"] * a.prefill + ["decode"] * a.decode
    core_groups = parse_core_lists(a.worker_cores) if a.worker_cores else split_cores(len(roles))
    if len(core_groups) != len(roles):
        raise SystemExit(f"--worker-cores names {len(core_groups)} groups for {len(roles)} workers")
    served = a.served_model_name or (a.model if a.model == "default" else os.path.basename(a.model.rstrip("/")))
    local_prefill = local_prefill_policy(a)  # first: it may set the decode workers' chunks
    conductor = Conductor(a.model, served, a.router_bind, a.heartbeat_timeout,
                          local_prefill=local_prefill, admission=build_admission(a),
                          routing=a.routing, cache_imbalance=a.cache_imbalance)
    await conductor.start()
    store = None
    if a.kv_shared_gb:
        from splitserve.server.shared_kv import StoreProcess

        store = StoreProcess(a.kv_shared_gb)
        store.start()
        a.kv_shared = store.addr  # (the workers' --kv-shared)
    supervisor = Supervisor(conductor, a.max_restarts)
    spawn_workers(conductor, roles, core_groups, a, supervisor)
    app = build_app(conductor, served, api_key=a.api_key)
    planner = build_planner(a, conductor, roles, local_prefill)
    app.state.planner = planner
    server = DrainingServer(uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level,
                                           timeout_graceful_shutdown=2), conductor, a.drain_timeout)

    async def announce():
        while (status := conductor.status()) == "starting":
            await asyncio.sleep(0.2)
        if status == "unavailable":
            log.error("workers %s exited and the rest cannot serve; see their errors above",
                      ", ".join(conductor.dead))
            server.should_exit = True
            return
        if status == "degraded":
            log.error("workers %s exited at start; serving with the rest", ", ".join(conductor.dead))
        print(f"splitserve: serving {served!r} on http://{a.host}:{a.port}/v1 with "
              f"{', '.join(roles)} workers (router {conductor.addr})", file=sys.stderr, flush=True)

    if not a.colocated and (a.prefill == 0 or a.decode == 0):
        log.warning("serve starts %s; requests get 503 until prefill and decode workers join "
                    "(splitserve worker --router %s)", ", ".join(roles) or "no worker", conductor.addr)
    tasks = [asyncio.create_task(announce()), asyncio.create_task(supervisor.run())]
    if planner is not None:
        tasks.append(asyncio.create_task(planner.run()))
    if store is not None:
        tasks.append(asyncio.create_task(store.watch()))
    from splitserve.kv.store_client import is_mooncake

    if a.kv_shared and conductor.state.prefix_index is not None and not is_mooncake(a.kv_shared):
        from splitserve.server.shared_kv import feed_index  # (Mooncake Store has no feed)

        tasks.append(asyncio.create_task(feed_index(a.kv_shared, conductor.state.prefix_index)))
    try:
        await server.serve()
    finally:
        for task in tasks:
            task.cancel()
        await conductor.stop()
        for p in supervisor.procs():  # (one started again that had not registered yet)
            if p.poll() is None:
                p.kill()
        if store is not None:
            store.stop()
    return 0


def add_serve_args(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="API address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (P/D mode; 0 and --decode 0: the router "
                   "alone, for workers started with `splitserve worker --router`)")
    p.add_argument("--decode", type=int, default=1, help="decode workers (P/D mode)")
    p.add_argument("--colocated", type=int, default=0,
                   help="run N co-located workers instead of P/D (for comparison)")
    p.add_argument("--worker-cores", default=None,
                   help="cores per worker, e.g. '0;1' or '0-3;4-7' (default: split evenly)")
    p.add_argument("--router-bind", default="tcp://127.0.0.1:0",
                   help="the router's control socket (bind beyond loopback for remote workers)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--local-prefill", default="auto", choices=["auto", "off", "slo"],
                   help="P/D: a request whose prefill would queue behind another while a decode "
                        "worker has nothing to decode is prefilled on that decode worker (auto), "
                        "or always on a prefill worker (off), or on a decode worker wherever the "
                        "cost model says its first token comes sooner, in chunks sized to keep "
                        "that worker's decodes within --tpot-slo (slo; needs --latency-model)")
    p.add_argument("--kv-shared-gb", type=float, default=0.0,
                   help="start a shared KV tier of this many GiB (a store process, kv/store.py): "
                        "every worker puts the blocks it computes there and loads the prefixes "
                        "other workers computed instead of recomputing them; the router counts "
                        "its blocks as held by every worker (0: none; --kv-shared HOST:PORT: "
                        "use a store already running)")
    p.add_argument("--cache-imbalance", type=int, default=4,
                   help="cache-aware routing's balance guard: a worker with more than this many "
                        "requests in flight beyond the least loaded one does not compete, however "
                        "much of the prompt it caches")
    p.add_argument("--routing", default="cache-aware",
                   choices=["cache-aware", "least-loaded", "round-robin"],
                   help="the worker that computes a prompt (prefill or co-located): the one with "
                        "the least work before its first token, the tokens queued there plus "
                        "those of the prompt it does not cache, from the workers' KV events "
                        "(cache-aware); fewest requests in flight (least-loaded); in turn "
                        "(round-robin). Decode workers: least-loaded")
    p.add_argument("--heartbeat-timeout", type=float, default=10.0,
                   help="seconds of silence after which a worker counts as dead")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="a worker serve started whose process exits (crash, kill, OOM) is "
                        "started again after 0.5 s, doubling while it keeps exiting up to "
                        "30 s; at most this many times per worker (default: no limit; 0: "
                        "never)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, refuse new requests (503) and give those in flight this many "
                        "seconds to finish; those still running then fail with an error. SIGINT "
                        "(Ctrl-C), or a second signal while draining, stops without draining")
    g = p.add_argument_group("admission control (router/admission.py)")
    g.add_argument("--admission", default="off", choices=["off", "reactive", "predictive"],
                   help="refuse (429 + Retry-After) requests that would miss the SLOs: on the "
                        "load now (reactive) or on the load predicted for when each request gets "
                        "its first token and decodes (predictive); off: accept all")
    g.add_argument("--ttft-slo", type=float, default=None,
                   help="seconds to the first token admission keeps requests within (a request "
                        "may give its own: the body's ttft_slo)")
    g.add_argument("--tpot-slo", type=float, default=None,
                   help="seconds per output token admission keeps requests within (body: tpot_slo)")
    g.add_argument("--latency-model", default=None,
                   help="what admission prices engine steps with: fitted:PROFILE.json (splitserve "
                        "profile on this machine) or any `splitserve sim` latency model")
    g.add_argument("--max-queue", type=int, default=256,
                   help="requests in flight per worker beyond which new ones get 429 (every mode; "
                        "0: unbounded)")
    g = p.add_argument_group("online planner (plan/online.py)")
    g.add_argument("--planner", default="off", choices=["off", "auto"],
                   help="auto: every --planner-interval, simulate the last --planner-window of "
                        "traffic on every split of the workers (co-located, P:D) and re-role "
                        "workers to the one that meets the SLOs best (needs --ttft-slo, "
                        "--tpot-slo, --latency-model; workers start --reroleable); off: the "
                        "deployment stays as started")
    g.add_argument("--planner-interval", type=float, default=10.0, help="seconds between decisions")
    g.add_argument("--planner-window", type=float, default=60.0,
                   help="seconds of past arrivals each decision simulates")
    g.add_argument("--planner-margin", type=float, default=0.05,
                   help="predicted attainment a split must gain over the current one to switch")
    g.add_argument("--planner-patience", type=int, default=2,
                   help="decisions in a row a split must lead by the margin before a switch")
    g.add_argument("--planner-min-dwell", type=float, default=30.0,
                   help="seconds after a switch before the next one")
    p.add_argument("--log-level", default="warning")


def check_tier_flags(a) -> None:
    if a.kv_host_gb < 0 or a.kv_disk_gb < 0:
        raise SystemExit("--kv-host-gb and --kv-disk-gb must be >= 0")
    if a.kv_disk_gb and not (a.kv_disk_dir and a.kv_host_gb):
        raise SystemExit("--kv-disk-gb needs --kv-disk-dir and a DRAM tier above it (--kv-host-gb)")
    if a.kv_shared:
        from splitserve.kv.store_client import check_addr

        try:
            check_addr(a.kv_shared)
        except ValueError as e:
            raise SystemExit(f"--kv-shared: {e}") from None
    shared_gb = getattr(a, "kv_shared_gb", 0.0)
    if shared_gb < 0 or (shared_gb and a.kv_shared):
        raise SystemExit("--kv-shared-gb (a store serve starts) must be >= 0, and not given "
                         "with --kv-shared (a store already running)")


def add_worker_args(p) -> None:
    """Flags every worker takes (serve passes them on)."""
    p.add_argument("--kv-transport", default="auto", choices=["auto", "shm", "tcp"],
                   help="KV hand-over: shm (same host), tcp (any host), auto (shm when possible)")
    p.add_argument("--kv-timeout", type=float, default=30.0,
                   help="a KV hand-over that writes nothing (no new chunk) for this many seconds "
                        "fails its request")
    p.add_argument("--kv-queue-timeout", type=float, default=600.0,
                   help="how long a reserved request may wait for its prefill to start")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--local-prefill-chunk", type=parse_chunks, default=8,
                   help="decode workers: prompt tokens per step of a prefill the router gave the "
                        "decode worker itself (see serve --local-prefill) while it also decodes; "
                        "a decode step plus this chunk should stay under the TPOT SLO (one CPU "
                        "core: ~2 ms per token; 16 measured worse than 8 at a 40 ms SLO)")
    p.add_argument("--no-chunked-prefill", action="store_true",
                   help="prefill priority (vLLM v0 style) instead of Sarathi-style chunking")
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--kv-host-gb", type=float, default=0.0,
                   help="a host DRAM tier below the KV pool (kv/tiers.py): blocks the pool evicts "
                        "are kept there and loaded back instead of recomputed (0: none)")
    p.add_argument("--kv-disk-dir", default=None,
                   help="a disk tier below the DRAM tier: one checksummed file per block in this "
                        "directory (serve gives each worker a subdirectory named by its id)")
    p.add_argument("--kv-disk-gb", type=float, default=0.0,
                   help="the disk tier's size (needs --kv-disk-dir and --kv-host-gb)")
    p.add_argument("--kv-shared", default=None, metavar="HOST:PORT",
                   help="the shared KV tier: a KV store (splitserve kv-store at HOST:PORT, or "
                        "Mooncake Store: mooncake://MASTER_HOST:PORT[?segment_gb=N], each "
                        "worker mounting N GiB) the worker puts the blocks it computes into "
                        "and loads prefixes from, so a prefix computed on one worker is "
                        "loaded, not recomputed, on another")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--reroleable", action="store_true",
                   help="the worker can change role while it runs (POST /admin/role, serve "
                        "--planner): it keeps a decode data socket and KV pool in shared memory "
                        "whatever its role")


def run_serve(a) -> int:
    logging.basicConfig(level=logging.INFO if a.log_level in ("info", "debug") else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if a.colocated and (a.prefill != 1 or a.decode != 1):
        raise SystemExit("--colocated replaces --prefill/--decode; give one or the other")
    if not a.colocated and (a.prefill < 0 or a.decode < 0):
        raise SystemExit("--prefill and --decode count workers: >= 0 (0 and 0: the router alone, "
                         "workers join with `splitserve worker --router`)")
    check_tier_flags(a)
    if a.cache_imbalance < 0:
        raise SystemExit(f"--cache-imbalance must be >= 0, got {a.cache_imbalance}")
    if a.drain_timeout < 0:
        raise SystemExit(f"--drain-timeout must be >= 0 seconds, got {a.drain_timeout:g}")
    if a.max_queue < 0:
        raise SystemExit(f"--max-queue must be >= 0 (0: unbounded), got {a.max_queue}")
    if a.admission != "off":
        missing = [f for f, v in (("--ttft-slo", a.ttft_slo), ("--tpot-slo", a.tpot_slo),
                                  ("--latency-model", a.latency_model)) if v is None]
        if missing:
            raise SystemExit(f"--admission {a.admission} needs {', '.join(missing)}")
    if a.local_prefill == "slo":
        missing = [f for f, v in (("--tpot-slo", a.tpot_slo), ("--latency-model", a.latency_model))
                   if v is None]
        if missing:
            raise SystemExit(f"--local-prefill slo needs {', '.join(missing)}")
    for flag, v in (("--ttft-slo", a.ttft_slo), ("--tpot-slo", a.tpot_slo)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise SystemExit(f"{flag} must be a positive number of seconds, got {v:g}")
    if a.admission == "off" and a.local_prefill != "slo" and a.planner == "off" and (
            a.ttft_slo is not None or a.tpot_slo is not None or a.latency_model is not None):
        log.warning("--ttft-slo, --tpot-slo and --latency-model do nothing without --admission "
                    "reactive|predictive or --local-prefill slo")
    if a.planner != "off":
        missing = [f for f, v in (("--ttft-slo", a.ttft_slo), ("--tpot-slo", a.tpot_slo),
                                  ("--latency-model", a.latency_model)) if v is None]
        if missing:
            raise SystemExit(f"--planner {a.planner} needs {', '.join(missing)}")
        n = a.colocated or a.prefill + a.decode
        if n < 2:
            raise SystemExit(f"--planner {a.planner} needs 2 workers or more to split, got {n}")
        for flag, v in (("--planner-interval", a.planner_interval),
                        ("--planner-window", a.planner_window)):
            if not (math.isfinite(v) and v > 0):
                raise SystemExit(f"{flag} must be > 0 seconds, got {v:g}")
        if not 0 <= a.planner_margin < 1 or a.planner_patience < 1 or a.planner_min_dwell < 0:
            raise SystemExit("need 0 <= --planner-margin < 1, --planner-patience >= 1 and "
                             "--planner-min-dwell >= 0")
    if a.max_restarts is not None and a.max_restarts < 0:
        raise SystemExit(f"--max-restarts must be >= 0 (0: never restart), got {a.max_restarts}")
    try:
        return asyncio.run(run_deployment(a))
    except KeyboardInterrupt:
        return 0


def run_worker_cli(a, engine: EngineConfig) -> int:
    """`splitserve worker`: `engine` holds the engine flags every subcommand shares; the
    worker's own flags (cache, scheduler, role) are applied here."""
    from splitserve.disagg import faults

    faults.exit_at_start(a.role)  # (a fault for the restart tests; nothing unless asked for)
    check_tier_flags(a)
    from splitserve.config import CacheConfig, SchedulerConfig
    from splitserve.disagg.worker import WorkerConfig, run_worker

    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s worker {a.worker_id or a.role} "
                        "%(levelname)s %(message)s")
    router = a.router if a.router.startswith("tcp://") else f"tcp://{a.router}"
    cores = tuple(parse_core_lists(a.cores)[0]) if a.cores else None
    ec = replace(
        engine, num_threads=engine.num_threads or (len(cores) if cores else None),
        max_model_len=a.max_model_len,
        cache=CacheConfig(num_blocks=a.num_blocks, kv_cache_memory_gb=a.kv_cache_gb,
                          host_cache_gb=a.kv_host_gb, disk_cache_dir=a.kv_disk_dir,
                          disk_cache_gb=a.kv_disk_gb, shared_cache=a.kv_shared),
        scheduler=SchedulerConfig(max_num_batched_tokens=a.max_num_batched_tokens,
                                  max_num_seqs=a.max_num_seqs,
                                  chunked_prefill=not a.no_chunked_prefill, role=a.role,
                                  prefill_chunk_while_decoding=(a.local_prefill_chunk
                                                                if a.role == "decode" else None)))
    policy = None
    if (a.role == "decode" or a.reroleable) and (a.tpot_slo is not None or a.latency_model is not None):
        if a.tpot_slo is None or a.latency_model is None:
            raise SystemExit("a decode worker sizes its own prefills by the TPOT slack with both "
                             "--tpot-slo and --latency-model (serve --local-prefill slo passes them)")
        from splitserve.router.policies import SlackChunks

        try:
            policy = SlackChunks(cost_model(a), a.tpot_slo)
        except ValueError as e:
            raise SystemExit(f"--tpot-slo: {e}") from None
    cfg = WorkerConfig(a.role, router, ec, a.worker_id or "", a.kv_transport, a.kv_timeout,
                       a.kv_queue_timeout, a.data_host, cores, a.parent_pid, prefill_policy=policy,
                       reroleable=a.reroleable, decode_prefill_chunk=a.local_prefill_chunk)
    return run_worker(cfg)

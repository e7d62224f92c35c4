"""The deciding code stays plain Python: in a fresh interpreter, importing the policy core and
running a simulated deployment through it pulls in no torch, no ZeroMQ and no asyncio, and
never reads the clock (every clock function raises while it runs). The simulator runs exactly
this code, so a clock read or a socket here would make its runs depend on the machine."""

from __future__ import annotations

import subprocess
import sys
import textwrap

POLICY_MODULES = [
    "splitserve.engine.core", "splitserve.engine.scheduler", "splitserve.kv.manager",
    "splitserve.kv.block_pool", "splitserve.disagg.handover", "splitserve.router.state",
    "splitserve.router.policies", "splitserve.router.admission", "splitserve.router.reroling",
    "splitserve.plan.online",
    "splitserve.sim.simulation", "splitserve.sim.worker",
    "splitserve.sim.events", "splitserve.sim.kvlink", "splitserve.sim.latency.registry",
    "splitserve.sim.latency.distserve", "splitserve.sim.latency.roofline",
    "splitserve.sim.latency.fitted",
]

SCRIPT = textwrap.dedent("""
    import importlib, sys, time
    for m in MODULES:
        importlib.import_module(m)
    banned = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "zmq", "asyncio"})
    assert not banned, f"the policy core imported {banned}"

    def no_clock(*a, **k):
        raise AssertionError("the policy core read the clock")

    for name in ("time", "monotonic", "perf_counter", "process_time", "time_ns",
                 "monotonic_ns", "perf_counter_ns", "process_time_ns", "thread_time"):
        setattr(time, name, no_clock)

    from splitserve.bench import workloads as W
    from splitserve.config import SchedulerConfig
    from splitserve.sim.kvlink import KVLink
    from splitserve.sim.latency.registry import build_latency_model
    from splitserve.sim.simulation import SimConfig, Simulation
    from splitserve.sim.worker import WorkerSpec

    specs = W.at_rate(W.synthetic("prefill-heavy", 30, seed=3), 8.0, seed=3)
    prompts = [s.prompt for s in specs]
    lat = build_latency_model("distserve:opt-13b:tp1")
    pd = [WorkerSpec("prefill", SchedulerConfig(role="prefill"), 400),
          WorkerSpec("decode", SchedulerConfig(role="decode", prefill_chunk_while_decoding=8), 400),
          WorkerSpec("decode", SchedulerConfig(role="decode", prefill_chunk_while_decoding=8), 400)]
    colo = [WorkerSpec("colocated", SchedulerConfig(max_num_batched_tokens=256), 300)]
    for workers in (pd, colo):
        res = Simulation(workers, lat, SimConfig(KVLink(819200, 25e9, "overlapped", 40),
                                                 hop_s=1e-4, api_s=1e-3)).run(specs, prompts)
        assert all(r.ok for r in res.records), [r.error for r in res.records if not r.ok][:3]
    kinds = {r[1] for r in res.routes}
    # SLO-aware local prefill: the router's SloLocalPrefill, the decode workers' SlackChunks
    from splitserve.router.admission import CostModel
    from splitserve.router.policies import SloLocalPrefill
    local = SloLocalPrefill.for_slo(CostModel(lat, 400), 0.05, 64, ttft_s=0.3)
    slo_pd = [WorkerSpec("prefill", SchedulerConfig(role="prefill"), 400)] + [
        WorkerSpec("decode", SchedulerConfig(role="decode", prefill_chunk_while_decoding=8), 400,
                   prefill_policy=local.worker_policy()) for _ in range(2)]
    res = Simulation(slo_pd, lat, SimConfig(KVLink(819200, 25e9, "overlapped", 40)),
                     local_prefill=local).run(W.at_rate(specs, 40.0, seed=3), prompts)
    assert all(r.ok for r in res.records) and any(r[1] == "local" for r in res.routes)
    # admission control decides inside the router's route, in the simulator too
    from splitserve.router.admission import SLO, Admission, CostModel
    adm = Admission("predictive", CostModel(lat, 400), SLO(0.5, 0.05), max_queue=8)
    res = Simulation(pd, lat, SimConfig(KVLink(819200, 25e9, "overlapped", 40)), adm).run(
        W.at_rate(specs, 80.0, seed=3), prompts)
    assert any(r.rejected for r in res.records) and any(r.ok for r in res.records)
    assert sum(adm.counts.values()) == len(specs)
    print("ok", res.events, sorted(kinds))
""")


def test_the_policy_core_imports_no_torch_zmq_asyncio_and_never_reads_the_clock():
    script = f"MODULES = {POLICY_MODULES!r}\n" + SCRIPT
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok"), r.stdout


def test_the_check_itself_catches_a_clock_read_and_a_torch_import():
    """The script above must be able to fail: a module that reads the clock, or imports torch,
    is caught."""
    clock = SCRIPT.replace('print("ok"', 'time.monotonic(); print("ok"')
    r = subprocess.run([sys.executable, "-c", "MODULES = []\n" + clock], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "read the clock" in r.stderr
    r = subprocess.run([sys.executable, "-c", "MODULES = ['torch']\n" + SCRIPT],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "imported [" in r.stderr and "'torch'" in r.stderr

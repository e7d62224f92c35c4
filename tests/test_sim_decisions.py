"""The simulator makes the server's decisions: the same workload through the real engine (a
tiny random-weight model, its real forward) and through the simulator gives the same
step-by-step schedule — every chunk (request, start, length), preemption, reservation,
admission and routing choice.

Two comparisons:
- one engine, in process, with concurrency: chunked prefill, prefix-cache hits and
  preemptions. Both sides run on a step clock: each step takes 1 unit (the simulator's
  `constant:1` model, no hop latencies), arrivals fall between steps; the real side
  is a plain loop written here that adds what has arrived, then steps.
- a real `splitserve serve` P/D deployment (router + 1 prefill + 2 decode worker processes)
  writing its decision logs (SPLITSERVE_DECISION_LOG), against the simulated one: routes,
  reservations, chunks after prefix-cache hits, admissions. Its requests go one at a time, so
  the real schedule does not depend on how fast this machine is.
A simulator that re-implemented a decision, skipped an event or reordered messages diverges.
"""

from __future__ import annotations

import random

import pytest

from splitserve.bench.workloads import RequestSpec
from splitserve.config import CacheConfig, EngineConfig, SchedulerConfig
from splitserve.disagg import decision_log
from splitserve.engine.core import StepRecord
from splitserve.engine.engine import LLMEngine
from splitserve.request import SamplingParams
from splitserve.sim.kvlink import KVLink
from splitserve.sim.latency.registry import ConstantLatency
from splitserve.sim.simulation import SimConfig, Simulation
from splitserve.sim.worker import WorkerSpec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, make_tiny):
    d = str(tmp_path_factory.mktemp("tiny_decisions"))
    make_tiny(d, "llama")
    return d


def _workload(n: int, seed: int, shared_prefix: int = 0) -> list[RequestSpec]:
    """n requests; prompts of random words (ids 3..319), odd ones sharing a prefix. Gaps of
    k + 0.37 units: no arrival ever lands on a step boundary (a busy period's steps start at
    the arrival that began it, and no sum of fewer than 100 gaps is a whole number)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 320) for _ in range(shared_prefix)]
    specs, t = [], 0.5
    for i in range(n):
        body = [rng.randrange(3, 320) for _ in range(rng.randrange(5, 70))]
        prompt = (prefix + body) if i % 2 else body
        specs.append(RequestSpec(t, prompt, len(prompt), rng.randrange(2, 30), {"index": i}))
        t += rng.choice([0.37, 1.37, 2.37, 5.37])
    return specs


def _engine(tiny, role: str, num_blocks: int, budget: int, **sched) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=tiny, dtype="float32", max_model_len=256,
        cache=CacheConfig(num_blocks=num_blocks, enable_prefix_caching=role != "decode"),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, role=role, **sched)))


def _params(spec: RequestSpec) -> SamplingParams:
    return SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=True)


def _sim(specs, workers, local_prefill=False):
    sim = Simulation(workers, ConstantLatency(1.0),
                     SimConfig(KVLink(1.0, 1e18, "inline"), local_prefill=local_prefill, record=True))
    res = sim.run(specs, [s.prompt for s in specs])
    assert all(r.ok for r in res.records), [r.error for r in res.records if not r.ok]
    return sim, res


def _steps(trace) -> list[StepRecord]:
    return [e for e in trace if isinstance(e, StepRecord)]


def test_a_colocated_engine_schedules_like_the_simulator(tiny):
    """Chunked prefill, prefix-cache hits and preemptions (a 14-block pool) in one run."""
    specs = _workload(14, seed=1, shared_prefix=40)
    eng = _engine(tiny, "colocated", num_blocks=14, budget=48)
    eng.core.trace = []
    ids = {f"sim-{i}": s for i, s in enumerate(specs)}
    pending = sorted(ids.items(), key=lambda kv: kv[1].arrival_s)
    clock = 0.0
    while pending or eng.has_unfinished():
        if not eng.has_unfinished():
            clock = max(clock, pending[0][1].arrival_s)  # idle until the next arrival
        while pending and pending[0][1].arrival_s <= clock:
            rid, s = pending.pop(0)
            eng.add_request(s.prompt, _params(s), rid)
        eng.step()
        clock += 1.0
    eng.check_integrity()
    real = _steps(eng.core.trace)

    sim, _ = _sim(specs, [WorkerSpec("colocated", eng.config.scheduler, 14, max_model_len=256)])
    simulated = _steps(sim.workers["colocated-0"].core.trace)
    assert any(r.preempted for r in real), "the pool must be small enough to preempt"
    assert any(len(r.chunks) > 1 and any(n > 1 for _, _, n in r.chunks) for r in real)
    assert eng.kv_manager.num_hit_tokens > 0, "the shared prefix must hit the cache"
    assert simulated == real


def _normalise(entries: list, ids: dict[str, str]) -> list:
    """A decision log with request ids renamed (real API ids -> the simulator's)."""
    def rename(x):
        if isinstance(x, str):
            return ids.get(x, x)
        if isinstance(x, list | tuple):
            return [rename(y) for y in x]
        return x
    return [rename(decision_log.as_json(e)) for e in decision_log.decisions(entries)]


@pytest.mark.real_model
def test_a_served_pd_deployment_decides_like_the_simulator(tmp_path, monkeypatch):
    import json

    import httpx
    from serving_harness import Server

    rng = random.Random(7)
    body = lambda n: [rng.randrange(100, 49000) for _ in range(n)]  # noqa: E731
    shared = body(80)
    prompts = [body(20), body(150), shared + body(30), shared + body(70), body(64), body(9)]
    outs = [4, 7, 3, 9, 5, 6]
    monkeypatch.setenv(decision_log.ENV, str(tmp_path))
    srv = Server("--prefill", "1", "--decode", "2")  # 64-token budget, 0.05 GB pools, 1 thread
    try:
        blocks = srv.workers("decode")[0]["kv_blocks_total"]
        for p, n in zip(prompts, outs):
            r = httpx.post(srv.base_url + "/completions", timeout=60, json={
                "model": "default", "prompt": p, "max_tokens": n, "temperature": 0,
                "ignore_eos": True})
            assert r.status_code == 200, r.text
    finally:
        srv.close()
    logs = {f.stem: [json.loads(line) for line in f.read_text().splitlines()]
            for f in tmp_path.glob("*.jsonl")}
    assert sorted(logs) == ["decode-1", "decode-2", "prefill-0", "router"], \
        "every worker's log is created when it starts (see the server's stderr above)"
    ids = {route[0]: f"sim-{i}" for i, route in enumerate(logs["router"])}

    specs = [RequestSpec(1000.0 * i, p, len(p), n) for i, (p, n) in enumerate(zip(prompts, outs))]
    sched = SchedulerConfig(max_num_batched_tokens=64)
    workers = [WorkerSpec("prefill", SchedulerConfig(max_num_batched_tokens=64, role="prefill"),
                          blocks)]
    workers += [WorkerSpec("decode", SchedulerConfig(max_num_batched_tokens=64, role="decode",
                                                     prefill_chunk_while_decoding=8), blocks)] * 2
    assert sched.max_num_seqs == workers[0].scheduler.max_num_seqs
    sim, res = _sim(specs, workers, local_prefill=True)
    assert _normalise(logs["router"], ids) == _normalise(res.routes, {})
    assert {r[1] for r in res.routes} == {"pd"} and {r[2][1] for r in res.routes} == {
        "decode-1", "decode-2"}, "both decode workers take requests"
    for wid, w in sim.workers.items():
        assert _normalise(logs[wid], ids) == _normalise(w.core.trace, {}), wid
    prefill_steps = [e for e in logs["prefill-0"] if e[0] == "step"]
    assert any(c[1] > 0 and c[1] % 16 == 0 for e in prefill_steps for c in e[1]), \
        "a prompt must start after a prefix-cache hit"


def test_a_worker_log_is_on_disk_before_the_worker_stops(tmp_path, monkeypatch):
    """What a killed worker leaves: the file exists from the start and holds every flushed
    entry; the in-memory trace is emptied by each flush (a long run does not grow it)."""
    import json

    monkeypatch.setenv(decision_log.ENV, str(tmp_path))
    log = decision_log.Appender("decode-7")
    assert (tmp_path / "decode-7.jsonl").read_text() == ""
    trace = [("reserve", "a", (1, 2)), ("time", 1.0, 0.5)]
    log.flush(trace)
    assert trace == []
    trace.append(("admit", "a"))
    log.flush(trace)
    lines = [json.loads(x) for x in (tmp_path / "decode-7.jsonl").read_text().splitlines()]
    assert lines == [["reserve", "a", [1, 2]], ["time", 1.0, 0.5], ["admit", "a"]]
    decision_log.Appender("decode-7")  # the worker restarted: its earlier life is kept
    assert (tmp_path / "decode-7.jsonl").read_text() == ""
    assert len((tmp_path / "decode-7.1.jsonl").read_text().splitlines()) == 3
    log.flush([("admit", "b")])  # into the new file: read_dir gives the earlier life first
    assert decision_log.read_dir(str(tmp_path))["decode-7"] == lines + [["admit", "b"]]

"""The simulator against oracles that are not the simulator: queueing theory (M/D/1), latencies
worked out by hand for one request through every hop and every way of moving its KV, and the
command line's answers to bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from splitserve.bench import workloads as W
from splitserve.cli import main as cli_main
from splitserve.config import SchedulerConfig
from splitserve.sim.kvlink import KVLink
from splitserve.sim.latency.base import Batch, LatencyModel
from splitserve.sim.latency.registry import ConstantLatency, build_latency_model
from splitserve.sim.simulation import SimConfig, Simulation
from splitserve.sim.worker import WorkerSpec

PD = [WorkerSpec("prefill", SchedulerConfig(role="prefill"), 10_000),
      WorkerSpec("decode", SchedulerConfig(role="decode"), 10_000)]


def _run(workers, latency, specs, **config):
    kv = config.pop("kv", KVLink(1.0, 1e18, "inline"))
    sim = Simulation(workers, latency, SimConfig(kv, local_prefill=False, **config))
    res = sim.run(specs, [s.prompt for s in specs])
    assert all(r.ok for r in res.records), [r.error for r in res.records if not r.ok][:3]
    return res


def test_a_prefill_server_under_poisson_arrivals_is_md1():
    """One prefill worker, every prompt 512 tokens (one per step: the budget is 512), DistServe's
    OPT-13B fit for the service time (D = 72.1 ms), Poisson arrivals at R = 10/s: mean TTFT =
    D + R·D² / (2(1 - R·D)) = 0.1656 s (Pollaczek-Khinchine for deterministic service)."""
    lat = build_latency_model("distserve:opt-13b:tp1")
    d = lat.step_time(Batch((512,), (0,)))
    assert round(d * 1e3, 1) == 72.1
    n, rate = 100_000, 10.0
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40_000, 512).tolist()  # one list: the simulator only reads it
    specs = [W.RequestSpec(t, prompt, 512, 1) for t in W.poisson(rate, n, seed=1)]
    big = dict(num_blocks=10_000, block_size=128, enable_prefix_caching=False, max_model_len=2048)
    workers = [WorkerSpec("prefill", SchedulerConfig(role="prefill", max_num_batched_tokens=512), **big),
               WorkerSpec("decode", SchedulerConfig(role="decode"), **big)]
    res = _run(workers, lat, specs)
    mean_ttft = float(np.mean([r.ttft for r in res.records]))
    theory = d + rate * d * d / (2 * (1 - rate * d))
    assert abs(mean_ttft - theory) / theory < 0.02, (mean_ttft, theory)
    assert round(theory, 4) == 0.1656


def _one(prompt_len: int, output_len: int) -> list[W.RequestSpec]:
    return [W.RequestSpec(0.0, list(range(100, 100 + prompt_len)), prompt_len, output_len)]


HOPS = dict(api_s=0.003, hop_s=0.001, data_hop_s=0.002)


def test_one_request_through_a_pd_deployment_pays_every_hop_once():
    """TTFT = api (client -> router) + hop (Reserve) + hop (Reserved) + hop (Prefill) + the
    prefill step + data hop (KVDone) + hop (first output) + api (-> client); each later token
    one decode step apart."""
    step = 0.05
    res = _run(PD, ConstantLatency(step), _one(100, 5), **HOPS)
    (r,) = res.records
    assert r.ttft == pytest.approx(2 * 0.003 + 4 * 0.001 + step + 0.002)
    assert r.tpot == pytest.approx(step)
    assert r.n_out == 5


def test_ttft_splits_into_the_phases_each_hop_and_step_adds():
    """sim/explain.py reads a request's phases off the decision logs with their timings (the
    real server writes the same entries): here they must come out as the hops and the step."""
    from splitserve.disagg.decision_log import as_json
    from splitserve.sim.explain import phases

    step = 0.05
    sim = Simulation(PD, ConstantLatency(step), SimConfig(KVLink(1.0, 1e18, "inline"),
                                                          local_prefill=False, record=True, **HOPS))
    res = sim.run(_one(100, 5), [list(range(100, 200))])
    logs = {wid: [as_json(e) for e in w.core.trace] for wid, w in sim.workers.items()}
    (ph,) = phases([as_json(r) for r in res.routes], logs, res.records, 0.0)
    expected = {"api_in": 0.003, "queue": 3 * 0.001, "prefill": step, "handover": 0.002,
                "out": 0.001 + 0.003}
    assert {k: ph[k] for k in expected} == pytest.approx(expected)
    assert ph["ttft"] == pytest.approx(sum(expected.values())) == pytest.approx(res.records[0].ttft)


@pytest.mark.parametrize("mode", ["inline", "after", "overlapped"])
def test_the_kv_hand_over_costs_what_its_link_says(mode):
    """160 prompt tokens = 10 blocks of 16 x 1000 bytes per token = 160 kB at 1 MB/s = 0.16 s:
    inline it lengthens the prefill step, after the step it is all waited for, overlapped (10
    layers) only the last layer's share (16 ms) comes after the step (the link is fast enough to
    keep up with the computing layers: 0.16 s of bytes over the 0.9 s left after layer 0)."""
    step, secs = 1.0, 0.16
    link = KVLink(1000.0, 1e6, mode, num_layers=10)
    (r,) = _run(PD, ConstantLatency(step), _one(160, 1), kv=link).records
    extra = {"inline": secs, "after": secs, "overlapped": secs / 10}[mode]
    assert r.ttft == pytest.approx(step + extra)


def test_a_slow_link_is_the_bottleneck_even_overlapped():
    """The link needs 1.6 s for 160 kB: overlapped, the transfer starts after the first of 10
    layers (0.1 s) and runs at the link's speed: TTFT = 0.1 + 1.6 s, not the step's 1 s."""
    link = KVLink(1000.0, 1e5, "overlapped", num_layers=10)
    (r,) = _run(PD, ConstantLatency(1.0), _one(160, 1), kv=link).records
    assert r.ttft == pytest.approx(0.1 + 1.6)


class PhaseLatency(LatencyModel):
    """Prompt steps take one time, decode steps another (never equal: no two events tie)."""

    def __init__(self, prefill_s: float, decode_s: float):
        self.prefill_s, self.decode_s = prefill_s, decode_s

    def step_time(self, batch: Batch) -> float:
        return self.prefill_s if batch.prefill_tokens else self.decode_s


def test_a_decode_worker_takes_hand_overs_only_between_its_steps():
    """Messages that land while a worker is in a step wait for its end, as in the real
    single-threaded loop: r1's Reserve waits for r0's decode step to end, and so does its KVDone.

        r0: prefill [0, 0.3), admitted at 0.3, decode steps [0.3, 0.5) [0.5, 0.7) [0.7, 0.9) ...
        r1: arrives 0.35; reserved at 0.5; prefill [0.5, 0.8); KVDone lands inside [0.7, 0.9),
            admitted at 0.9: TTFT 0.55 (0.3 if every message were handled on arrival)"""
    specs = [W.RequestSpec(0.0, list(range(100, 132)), 32, 50),
             W.RequestSpec(0.35, list(range(200, 232)), 32, 2)]
    r0, r1 = _run(PD, PhaseLatency(0.3, 0.2), specs).records
    assert r0.ttft == pytest.approx(0.3)
    assert r1.ttft == pytest.approx(0.9 - 0.35)


def test_chunked_colocated_prefill_interleaves_with_decodes_as_the_scheduler_says():
    """A 64-token budget: a 200-token prompt arriving mid-step joins at the next step and takes
    4 steps (63, 63, 63, 11: the running decode takes one token of each step's budget), so its
    first token comes 4 steps after it joined, and the running request's tokens stay one step
    apart throughout."""
    specs = [W.RequestSpec(0.0, list(range(100, 110)), 10, 20),
             W.RequestSpec(0.55, list(range(200, 400)), 200, 2)]
    worker = [WorkerSpec("colocated", SchedulerConfig(max_num_batched_tokens=64), 1000)]
    r0, r1 = _run(worker, ConstantLatency(0.1), specs).records
    assert r0.tpot == pytest.approx(0.1)
    assert r1.ttft == pytest.approx(0.6 + 4 * 0.1 - 0.55)


# -- the command line -----------------------------------------------------------------------
def _sim_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli_main(["sim", "--quiet", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_splitserve_sim_reports_and_writes_what_bench_serve_does(capsys, tmp_path):
    path = tmp_path / "sim.json"
    code, out, _ = _sim_cli(capsys, "--deployment", "pd", "--latency-model", "constant:0.02",
                            "--workload", "decode-heavy", "--length-scale", "0.1",
                            "--num-requests", "30", "--goodput", "1,40", "--tol", "2",
                            "--json", str(path))
    assert code == 0
    d = json.loads(path.read_text())
    for key in ("goodput_req_s", "goodput_per_core", "capped", "probes", "slo_sweep",
                "records_at_goodput", "records_at_lo", "workload", "ttft_slo_s", "cores"):
        assert key in d, key
    assert d["source"] == "simulated" and d["deployment"] == "pd" and d["cores"] == 2
    assert d["goodput_req_s"] > 1 and len(d["records_at_goodput"]) == 30
    assert d["sim_events"] > 0
    assert "| probe |" in out and "goodput" in out


@pytest.mark.parametrize("argv, says", [
    (["--latency-model", "roofline:b200:llama-3.1-8b"], "unknown GPU 'b200'"),
    (["--latency-model", "roofline:h100:llama-9"], "unknown model 'llama-9'"),
    (["--latency-model", "fitted:/no/such/profile.json"], "/no/such/profile.json"),
    (["--latency-model", "roofline:l40s:llama-3.1-70b"], "does not fit on L40S"),
    (["--latency-model", "distserve:opt-13b:tp3"], "no DistServe fit for OPT-13B tp3"),
    (["--latency-model", "constant:0.01", "--deployment", "3:x"], "unknown deployment '3:x'"),
])
def test_bad_input_gets_one_line_naming_it(capsys, argv, says):
    code, _, err = _sim_cli(capsys, "--rate", "1", *argv)
    assert code == 2
    assert says in err and err.startswith("splitserve: error:") and err.count("\n") == 1


def test_a_trace_that_does_not_parse_is_named_with_its_line(capsys, tmp_path):
    bad = tmp_path / "trace.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [1]}\n'
                   "not json\n")
    code, _, err = _sim_cli(capsys, "--latency-model", "constant:0.01", "--workload", "mooncake",
                            "--trace", str(bad))
    assert code == 2 and str(bad) in err and "line 2" in err


def test_a_reservation_that_waits_too_long_fails_on_time_in_an_idle_decode_worker():
    """The queue timeout fires when due, as the real worker's 10 ms housekeeping makes it, not
    when the next message happens to wake the decode worker: r1 waits behind r0's 5 s prefill
    and fails at 1 s (left alone, its prefill would start at 5 s and reset the deadline)."""
    specs = [W.RequestSpec(0.0, list(range(100, 164)), 64, 2),
             W.RequestSpec(0.1, list(range(200, 264)), 64, 2)]
    sim = Simulation(PD, PhaseLatency(5.0, 0.1),
                     SimConfig(KVLink(1.0, 1e18, "inline"), local_prefill=False,
                               kv_queue_timeout_s=1.0))
    r0, r1 = sim.run(specs, [s.prompt for s in specs]).records
    assert r0.ok
    assert not r1.ok and "did not start within 1 s" in r1.error
    assert r1.t_done == pytest.approx(1.1, abs=1e-6)
    for w in sim.workers.values():  # the fence came back and every block is free
        w.core.check_integrity()
        assert w.core.kv.pool.usage()["in_use"] == 0

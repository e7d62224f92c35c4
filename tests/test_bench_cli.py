"""The serving benchmarks' wiring (no servers started): workloads sized for this machine, the
trace files, the deployments `bench compare` starts with equal cores, and the experiment driver
(bench/experiment.py) run through a fake run function."""

from __future__ import annotations

import json

import pytest

from splitserve.bench import compare as C
from splitserve.bench import experiment as E
from splitserve.bench import workloads as W
from splitserve.bench.client import LoadResult
from splitserve.bench.goodput import RequestRecord, attainment, slo_scale_sweep
from splitserve.cli import build_parser, main


def _args(*argv):
    return build_parser().parse_args(["bench", "compare", *argv])


def _serve_args(*argv):
    return build_parser().parse_args(["bench", "serve", *argv])


def test_prefill_and_decode_heavy_workloads_are_what_they_say():
    a = _args("--workload", "prefill-heavy", "--num-requests", "200")
    specs = E.build_workload(a)
    assert len(specs) == 200 and all(384 <= s.input_len <= 1536 and 24 <= s.output_len <= 96
                                     for s in specs)
    assert all(len(s.prompt) == s.input_len for s in specs)
    d = E.build_workload(_args("--workload", "decode-heavy", "--num-requests", "200"))
    assert sum(s.output_len for s in d) > sum(s.input_len for s in d)
    assert E.slos(a) == E.DEFAULT_SLOS["prefill-heavy"]
    assert E.slos(_args("--ttft-slo", "2", "--tpot-slo", "0.05")) == (2.0, 0.05)


def test_compare_starts_each_deployment_on_the_same_cores():
    a = _args("--cores", "2", "--chunk", "128")
    pd = C._command("pd", 9, a)
    assert pd[pd.index("--worker-cores") + 1] == "0-0;1-1"
    assert pd[pd.index("--prefill") + 1] == "1" and pd[pd.index("--decode") + 1] == "1"
    chunked = C._command("chunked", 9, a)
    assert chunked[chunked.index("--colocated") + 1] == "2"
    assert chunked[chunked.index("--max-num-batched-tokens") + 1] == "128"
    assert "--no-chunked-prefill" not in chunked
    first = C._command("prefill-first", 9, a)
    assert "--no-chunked-prefill" in first
    # prefill priority runs whole prompts: its budget holds the longest one
    assert int(first[first.index("--max-num-batched-tokens") + 1]) >= a.max_input
    assert C._command("llama-server", 9, _args("--llama-server", "/x/llama-server"))[0] == "/x/llama-server"


def test_each_probe_sends_prompts_no_earlier_probe_sent():
    specs = W.synthetic("prefill-heavy", 5, seed=1)
    again = E.fresh_prompts(specs, 0)
    assert again == specs
    r1, r2 = E.fresh_prompts(specs, 1), E.fresh_prompts(specs, 2)
    for a, b, c in zip(specs, r1, r2):
        assert len(a.prompt) == len(b.prompt) == len(c.prompt) and a.input_len == b.input_len
        # no shared first block (so no prefix-cache hit at all), every id still in range
        assert a.prompt[:16] != b.prompt[:16] != c.prompt[:16]
        assert all(W.DEFAULT_VOCAB[0] <= t < W.DEFAULT_VOCAB[1] for t in b.prompt)
    # equal blocks stay equal within a run (a trace's own prefix sharing survives)
    twin = [W.RequestSpec(0.0, list(specs[0].prompt), 1, 1, {}), specs[0]]
    m = E.fresh_prompts(twin, 3)
    assert m[0].prompt == m[1].prompt
    assert E.fresh_prompts([W.RequestSpec(0.0, "text", 1, 1, {})], 2)[0].prompt.endswith("text")


def test_bench_serve_run_id_sends_that_runs_prompts():
    seen = []

    def run_fn(specs):
        seen.append(specs)
        return LoadResult([RequestRecord(True, 0, 0, 1, [0.5, 0.52], 2, 10, 2)] * len(specs),
                          1.0, 0.0)

    a = _serve_args("--rate", "0.5", "--num-requests", "3", "--run-id", "7", "--quiet")
    E.run_experiment(a, run_fn, 1, {})
    want = W.at_rate(E.fresh_prompts(E.build_workload(a), 7), 0.5, a.cv, a.seed)
    assert seen == [want]


# -- --trace: any file of the workload's format, in both commands --------------------------------
TRACES = {  # workload: (file name, contents, (input_len, output_len) of its requests)
    "mooncake": ("m.jsonl", '{"timestamp": 0, "input_length": 300, "output_length": 7, '
                 '"hash_ids": [0]}\n{"timestamp": 2500, "input_length": 100, "output_length": 9, '
                 '"hash_ids": [1]}\n', [(30, 1), (10, 1)]),
    "azure": ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,300,70\n"
              "2023-11-16 18:15:49,120,90\n", [(30, 7), (12, 9)]),
    "humaneval": ("h.jsonl", '{"task_id": "x/0", "prompt": "' + "p" * 344 + '", '
                  '"canonical_solution": "' + "s" * 172 + '"}\n', [(100, 50)]),
    "summarization": ("s.csv", "num_prefill_tokens,num_decode_tokens\n321,45\n", [(321, 45)]),
}


@pytest.mark.parametrize("command", ["serve", "compare"])
@pytest.mark.parametrize("workload", sorted(TRACES))
def test_trace_reads_the_given_file(tmp_path, command, workload):
    name, text, lengths = TRACES[workload]
    (tmp_path / name).write_text(text)
    a = build_parser().parse_args(["bench", command, "--workload", workload, "--num-requests", "5",
                                   "--trace", str(tmp_path / name), "--data-dir", "/nonexistent"])
    specs = E.build_workload(a)
    if workload == "summarization":  # sampled with replacement from the file's pairs
        assert len(specs) == 5 and {(s.input_len, s.output_len) for s in specs} == set(lengths)
    else:
        assert [(s.input_len, s.output_len) for s in specs] == lengths
    if workload in ("mooncake", "azure"):  # the trace's own gaps, times --time-scale
        assert [s.arrival_s for s in specs] == [0.0, 2.5]


def test_without_trace_the_workloads_file_in_data_dir_is_read(tmp_path):
    name, text, lengths = TRACES["azure"]
    (tmp_path / E.TRACE_FILES["azure"]).write_text(text)
    a = _serve_args("--workload", "azure", "--data-dir", str(tmp_path))
    assert E.trace_path(a) == str(tmp_path / E.TRACE_FILES["azure"])
    assert [(s.input_len, s.output_len) for s in E.build_workload(a)] == lengths
    # summarization without its file falls back to the lognormal fit, as before --trace
    assert E.trace_path(_serve_args("--workload", "summarization", "--data-dir", "/x")) is None
    assert len(E.build_workload(_serve_args("--workload", "summarization", "--data-dir", "/x",
                                            "--num-requests", "3"))) == 3


@pytest.mark.parametrize("argv,message", [
    (["--workload", "mooncake", "--trace", "{tmp}/bad.jsonl"],
     "{tmp}/bad.jsonl, line 2: not JSON"),
    (["--workload", "azure", "--trace", "{tmp}/bad.csv"],
     "{tmp}/bad.csv, line 3: GeneratedTokens is 'lots', not a whole number"),
    (["--workload", "azure", "--trace", "{tmp}/nope.csv"], "{tmp}/nope.csv: cannot be opened"),
    (["--workload", "mooncake", "--data-dir", "{tmp}"],
     "{tmp}/conversation_trace.jsonl: no such file; give --trace PATH"),
    (["--workload", "prefill-heavy", "--trace", "{tmp}/bad.csv"], "--trace is for humaneval"),
])
@pytest.mark.parametrize("command", ["serve", "compare"])
def test_a_bad_workload_file_is_a_one_line_error(tmp_path, capsys, command, argv, message):
    (tmp_path / "bad.jsonl").write_text('{"timestamp": 0, "input_length": 1, "output_length": 1, '
                                        '"hash_ids": [0]}\nnot json\n')
    (tmp_path / "bad.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                      "2023-11-16 18:15:46,3,4\n2023-11-16 18:15:47,3,lots\n")
    out = tmp_path / "out"
    argv = [x.format(tmp=tmp_path) for x in argv]
    # found before any server is started (compare) or any request sent (serve: nothing listens)
    extra = (["--out", str(out)] if command == "compare"
             else ["--rate", "1", "--quiet", "--base-url", "http://127.0.0.1:9"])
    assert main(["bench", command, *argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"splitserve: error: {message.format(tmp=tmp_path)}")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_bad_numbers_in_flags_are_usage_errors(capsys):
    for argv in (["--goodput", "2,1"], ["--goodput", "1"], ["--rate", "0"], ["--cv", "-1"],
                 ["--num-requests", "0"], ["--slo-scales", "1,x"], ["--concurrency", "0"]):
        with pytest.raises(SystemExit) as e:
            _serve_args(*argv)
        assert e.value.code == 2
    assert _serve_args("--goodput", "0.5,3").goodput == (0.5, 3.0)
    assert _args().goodput == (0.1, 2.0) and _args().slo_scales == (0.5, 0.75, 1, 1.5, 2)


# -- the experiment driver through a fake run function -------------------------------------------
def fifo(service_s: float, tpot_s: float, calls: list):
    """A run function standing in for a server that prefills one request at a time in
    `service_s` (first token at the end of its prefill) and then decodes at `tpot_s` a token
    without holding the queue: a request waits only when the one before is still prefilling,
    so with near-even gaps the TTFT jumps at rate = 1 / service_s."""
    def run(specs):
        calls.append(specs)
        free, recs = 0.0, {}
        for i in sorted(range(len(specs)), key=lambda i: specs[i].arrival_s):
            s = specs[i]
            free = max(s.arrival_s, free) + service_s
            times = [free + k * tpot_s for k in range(s.output_len)]
            recs[i] = RequestRecord(True, s.arrival_s, s.arrival_s, times[-1], times,
                                    s.output_len, s.input_len, s.output_len)
        return LoadResult([recs[i] for i in range(len(specs))], free, 0.0)
    return run


PROBE_KEYS = ["run", "rate", "attainment", "requests", "rejected", "failed", "met_slo",
              "goodput_req_s", "missed_prefill_tok", "reject_ms_p99", "ttft_p50", "ttft_p90",
              "tpot_p50", "tpot_p90", "e2e_p50", "out_tok_s", "client_cpu_s", "wall_s"]
JSON_KEYS = ["workload", "num_requests", "ttft_slo_s", "tpot_slo_s", "cores", "seed", "cv",
             "length_scale", "time_scale"]  # then `extra`, then the results
GOODPUT_KEYS = ["goodput_req_s", "goodput_per_core", "capped", "probes", "slo_sweep",
                "records_at_goodput", "lo", "records_at_lo"]


def test_run_experiment_finds_the_fake_servers_knee(tmp_path, capsys):
    calls: list = []
    path = tmp_path / "g.json"
    a = _serve_args("--workload", "decode-heavy", "--num-requests", "40", "--seed", "3",
                    "--cv", "0.02", "--ttft-slo", "0.75", "--tpot-slo", "0.02",
                    "--goodput", "0.5,8", "--tol", "0.05", "--json", str(path), "--quiet")
    out = E.run_experiment(a, fifo(0.5, 0.01, calls), 4, {"source": "simulated", "x": 1})
    assert json.loads(path.read_text()) == json.loads(json.dumps(out))
    assert list(out) == JSON_KEYS + ["source", "x"] + GOODPUT_KEYS
    assert all(list(p) == PROBE_KEYS for p in out["probes"])
    # TTFT 0.5 s with no wait, > 0.75 s once a prefill waits half of one: the knee is 2 req/s
    assert 1.9 <= out["goodput_req_s"] <= 2.05 and not out["capped"]
    assert out["goodput_per_core"] == out["goodput_req_s"] / 4
    rates = [p["rate"] for p in out["probes"]]
    assert rates[:2] == [0.5, 8.0] and out["lo"] == 0.5
    assert len(rates) == 2 + 8  # ceil(log2(7.5 / 0.05)) midpoints
    # every probe ran the same requests, with probe k's prompts at that probe's rate
    base = E.build_workload(a)
    for k, (rate, specs) in enumerate(zip(rates, calls, strict=True)):
        assert specs == W.at_rate(E.fresh_prompts(base, k), rate, 0.02, 3)
    # the rows, the sweep and the records are those of the fake's records, re-scored
    best = fifo(0.5, 0.01, [])(calls[rates.index(out["goodput_req_s"])])
    for p, specs in zip(out["probes"], calls):
        assert p["attainment"] == attainment(fifo(0.5, 0.01, [])(specs).records, 0.75, 0.02)
        assert p["client_cpu_s"] == 0.0 and p["failed"] == 0 and p["requests"] == 40
    assert all(p["attainment"] >= 0.9 for p in out["probes"] if p["rate"] <= 2.0)
    assert all(p["attainment"] < 0.9 for p in out["probes"] if p["rate"] > 2.05)
    assert out["slo_sweep"] == slo_scale_sweep(best.records, 0.75, 0.02, a.slo_scales)
    assert [r["ttft"] for r in out["records_at_goodput"]] == [r.ttft for r in best.records]
    assert out["records_at_lo"][0]["ttft"] == pytest.approx(0.5)
    report = capsys.readouterr().out
    assert f"goodput {out['goodput_req_s']:.3f} req/s = {out['goodput_req_s'] / 4:.3f}" in report
    assert report.startswith("| run | rate | attainment |")


def test_run_experiment_one_run_at_the_traces_own_times(tmp_path):
    name, text, _ = TRACES["azure"]
    (tmp_path / name).write_text(text)
    calls: list = []
    a = _serve_args("--workload", "azure", "--trace", str(tmp_path / name), "--time-scale", "2",
                    "--ttft-slo", "0.4", "--tpot-slo", "0.02", "--quiet")
    out = E.run_experiment(a, fifo(0.5, 0.01, calls), 2, {"source": "simulated"})
    assert [s.arrival_s for s in calls[0]] == [0.0, 5.0]  # no --rate: the trace's times
    assert list(out) == JSON_KEYS + ["source", "runs", "slo_sweep", "records"]
    assert out["runs"][0]["rate"] is None and out["runs"][0]["attainment"] == 0.0  # TTFT 0.5
    assert [r["attainment"] for r in out["slo_sweep"]] == [0, 0, 0, 1, 1]  # 0.5 s meets x1.5
    with pytest.raises(ValueError, match="overwrite"):
        E.run_experiment(a, fifo(0.5, 0.01, []), 2, {"cores": 3})


# -- bench soak -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--minutes", "-1"], "argument --minutes: '-1' is not a positive float"),
    (["--minutes", "0"], "argument --minutes: '0' is not a positive float"),
    (["--kill-every", "-5"], "argument --kill-every: '-5' is not a number >= 0"),
    (["--stream-share", "1.5"], "argument --stream-share: '1.5' is not a share in [0, 1]"),
    (["--rate", "x"], "argument --rate: 'x' is not a positive float"),
])
def test_soak_refuses_bad_numbers_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", "soak", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"splitserve bench soak: error: {message}"
    assert not any("Traceback" in line for line in err)


def test_soak_prompts_share_no_block_and_mix_lengths_and_modes():
    from splitserve.bench.soak_load import HEADER, make_plan

    a = build_parser().parse_args(["bench", "soak", "--max-prompt", "200", "--seed", "3"])
    plans = make_plan(a, 300, pool=list(range(1000, 5000)))
    heads = {tuple(p.prompt[:HEADER]) for p in plans}
    assert len(heads) == 300  # every prompt's first block its own: no prefix-cache hit at all
    assert all(HEADER < len(p.prompt) <= 200 and 4 <= p.max_tokens <= a.max_output for p in plans)
    assert min(len(p.prompt) for p in plans) < 48 < max(len(p.prompt) for p in plans) > 160
    for attr, want in (("stream", 0.4), ("greedy", 0.8)):
        assert abs(sum(getattr(p, attr) for p in plans) / 300 - want) < 0.1
    assert 10 < sum(p.hang_up_s is not None for p in plans) < 60
    assert make_plan(a, 300, pool=list(range(1000, 5000))) == plans  # seeded


"""The serving benchmarks' wiring (no servers started): workloads sized for this machine and
the deployments `bench compare` starts, with equal cores."""

from __future__ import annotations

from splitserve.bench import compare as C
from splitserve.bench import load as S
from splitserve.cli import build_parser


def _args(*argv):
    return build_parser().parse_args(["bench", "compare", *argv])


def test_prefill_and_decode_heavy_workloads_are_what_they_say():
    a = _args("--workload", "prefill-heavy", "--num-requests", "200")
    specs = S.build_workload(a)
    assert len(specs) == 200 and all(384 <= s.input_len <= 1536 and 24 <= s.output_len <= 96
                                     for s in specs)
    assert all(len(s.prompt) == s.input_len for s in specs)
    d = S.build_workload(_args("--workload", "decode-heavy", "--num-requests", "200"))
    assert sum(s.output_len for s in d) > sum(s.input_len for s in d)
    assert S.slos(a) == S.DEFAULT_SLOS["prefill-heavy"]
    assert S.slos(_args("--ttft-slo", "2", "--tpot-slo", "0.05")) == (2.0, 0.05)


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
    from splitserve.bench import workloads as W

    specs = W.synthetic("prefill-heavy", 5, seed=1)
    again = S.fresh_prompts(specs, 0)
    assert again == specs
    r1, r2 = S.fresh_prompts(specs, 1), S.fresh_prompts(specs, 2)
    for a, b, c in zip(specs, r1, r2):
        assert len(a.prompt) == len(b.prompt) == len(c.prompt) and a.input_len == b.input_len
        # no shared first block (so no prefix-cache hit at all), every id still in range
        assert a.prompt[:16] != b.prompt[:16] != c.prompt[:16]
        assert all(W.DEFAULT_VOCAB[0] <= t < W.DEFAULT_VOCAB[1] for t in b.prompt)
    # equal blocks stay equal within a run (a trace's own prefix sharing survives)
    twin = [W.RequestSpec(0.0, list(specs[0].prompt), 1, 1, {}), specs[0]]
    m = S.fresh_prompts(twin, 3)
    assert m[0].prompt == m[1].prompt
    assert S.fresh_prompts([W.RequestSpec(0.0, "text", 1, 1, {})], 2)[0].prompt.endswith("text")


def test_bench_serve_run_id_sends_that_runs_prompts(monkeypatch):
    from splitserve.bench.client import LoadResult
    from splitserve.bench.goodput import RequestRecord

    seen = []

    def fake_run_at(a, specs, rate, run=0):
        seen.append((rate, run))
        return LoadResult([RequestRecord(True, 0, 0, 1, [0.5, 0.52], 2, 10, 2)], 1.0, 0.0)

    monkeypatch.setattr(S, "run_at", fake_run_at)
    a = build_parser().parse_args(["bench", "serve", "--rate", "0.5", "--num-requests", "3",
                                   "--run-id", "7", "--quiet"])
    S.main(a)
    assert seen == [(0.5, 7)]

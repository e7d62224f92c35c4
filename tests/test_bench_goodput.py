"""The goodput benchmark without a model: timing arithmetic, SLO attainment and the rate
bisection, workloads (synthetic, HumanEval, Mooncake and Azure trace replay), and the load
generator against a fake OpenAI SSE server with known delays."""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import math
import os
from datetime import datetime

import msgspec
import numpy as np
import pytest
from serving_harness import app_in_thread

from splitserve.bench import workloads as W
from splitserve.bench.client import run_load
from splitserve.bench.goodput import (
    RequestRecord,
    attainment,
    goodput_bisect,
    met_slo,
    per_core,
    slo_scale_sweep,
    summarize,
    to_markdown,
)

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
MOONCAKE = os.path.join(DATA, "conversation_trace.jsonl")
AZURE = os.path.join(DATA, "AzureLLMInferenceTrace_conv.csv")
HUMANEVAL = os.path.join(DATA, "HumanEval.jsonl.gz")
ARXIV = os.path.join(DATA, "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv")


def need(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"{os.path.basename(path)} is not at {DATA}: see ../shared/data/README.md "
                    "for where to download it")
    return path


def record(ttft=0.1, tpot=0.02, n_out=5, ok=True, t_sent=1.0) -> RequestRecord:
    first = t_sent + ttft
    times = [first + k * tpot for k in range(n_out)]
    return RequestRecord(ok=ok, t_due=t_sent, t_sent=t_sent, t_done=times[-1] + 0.001,
                         token_times=times if ok else [], n_out=n_out if ok else 0,
                         input_len=10, output_len=n_out, error=None if ok else "boom")


# -- timing arithmetic and SLO attainment --------------------------------------------------------
def test_ttft_tpot_e2e_itl():
    r = RequestRecord(ok=True, t_due=0.9, t_sent=1.0, t_done=2.05, token_times=[1.25, 1.5, 2.0],
                      n_out=3, input_len=4, output_len=3)
    assert r.ttft == pytest.approx(0.25)
    assert r.tpot == pytest.approx((2.0 - 1.25) / 2)
    assert r.e2e == pytest.approx(1.05)
    assert r.itl == pytest.approx([0.25, 0.5])
    assert r.send_lag == pytest.approx(0.1)
    # n_out comes from the server's usage: 5 tokens in 3 chunks still spread over 4 gaps
    r.n_out = 5
    assert r.tpot == pytest.approx(0.75 / 4)


def test_one_token_has_no_tpot_and_meets_any_tpot_slo():
    r = record(ttft=0.1, n_out=1)
    assert r.tpot is None
    assert r.meets(ttft_slo=0.2, tpot_slo=0.0)
    assert not r.meets(ttft_slo=0.05, tpot_slo=1.0)


def test_attainment_counts_failures_as_misses():
    recs = [record(0.1, 0.02), record(0.3, 0.02), record(0.1, 0.05), record(0.1, 0.01),
            record(ok=False)]
    # met both: #0 and #3; #1 misses TTFT, #2 misses TPOT, #4 failed
    assert attainment(recs, ttft_slo=0.2, tpot_slo=0.03) == pytest.approx(2 / 5)
    assert attainment(recs, ttft_slo=1.0, tpot_slo=1.0) == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="no requests"):
        attainment([], 1.0, 1.0)


def test_summarize():
    recs = [record(0.1, 0.02, t_sent=0.0), record(0.2, 0.04, t_sent=0.5), record(ok=False)]
    s = summarize(recs)
    assert (s["requests"], s["failed"], s["short"]) == (3, 1, 0)
    assert s["ttft_s"]["n"] == 2 and s["ttft_s"]["p50"] == pytest.approx(0.15)
    assert s["tpot_s"]["mean"] == pytest.approx(0.03)
    assert s["errors"] == ["boom"]
    json.dumps(s)  # plain data


# -- goodput bisection and the SLO-scale sweep ----------------------------------------------------
def knee(rate: float) -> float:
    """All requests meet the SLOs up to 3.3 req/s, then attainment falls."""
    return 1.0 if rate <= 3.3 else max(0.0, 1.0 - (rate - 3.3))


def test_goodput_bisect_finds_the_knee():
    res = goodput_bisect(knee, lo=0.5, hi=10.0, target=0.9, tol=0.01)
    assert 3.4 - 0.01 <= res.rate <= 3.4  # knee(r) >= 0.9 up to 3.4
    assert not res.capped
    assert len(res.probes) <= 2 + math.ceil(math.log2(9.5 / 0.01))
    assert all(a >= 0.9 for r, a in res.probes if r <= res.rate)

    strict = goodput_bisect(knee, lo=0.5, hi=10.0, target=1.0, tol=0.01)
    assert 3.3 - 0.01 <= strict.rate <= 3.3


def test_goodput_bisect_edges():
    assert goodput_bisect(knee, lo=5.0, hi=10.0).rate == 0.0  # even lo misses
    capped = goodput_bisect(knee, lo=0.5, hi=2.0)
    assert capped.rate == 2.0 and capped.capped
    assert capped.to_dict()["probes"][0] == {"rate": 0.5, "attainment": 1.0}
    with pytest.raises(ValueError):
        goodput_bisect(knee, lo=2.0, hi=1.0)


def test_slo_scale_sweep_is_monotone():
    rng = np.random.default_rng(0)
    recs = [record(float(t), float(p)) for t, p in zip(rng.uniform(0.05, 1.0, 200),
                                                       rng.uniform(0.01, 0.1, 200))]
    recs.append(record(ok=False))
    rows = slo_scale_sweep(recs, ttft_slo=0.5, tpot_slo=0.05, scales=[0.2, 0.4, 0.6, 0.8, 1.0, 2.0])
    got = [r["attainment"] for r in rows]
    assert got == sorted(got) and got[0] < got[-1]
    assert got[-1] == pytest.approx(200 / 201)  # the failed one misses at any scale
    assert rows[1]["ttft_slo_s"] == pytest.approx(0.2)


def test_per_core_and_markdown():
    assert per_core(6.0, 4) == 1.5
    table = to_markdown([{"rate": 1.23456, "attainment": 0.9, "note": None}])
    assert table.splitlines() == ["| rate | attainment | note |", "| --- | --- | --- |",
                                  "| 1.235 | 0.9 | - |"]


# -- workloads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["chat", "code", "summarization"])
def test_synthetic_is_deterministic_per_seed(name):
    caps = W.Caps(max_input=2048, max_output=512, max_model_len=2048)
    a = W.synthetic(name, 20, seed=7, caps=caps)
    assert a == W.synthetic(name, 20, seed=7, caps=caps)
    assert a != W.synthetic(name, 20, seed=8, caps=caps)
    for s in a:
        assert len(s.prompt) == s.input_len and s.output_len <= 512
        assert s.input_len + s.output_len <= 2048
        assert min(s.prompt) >= 100 and max(s.prompt) < 49152
        assert s.arrival_s == 0.0


def test_summarization_samples_the_arxiv_pairs():
    with open(need(ARXIV), newline="") as f:
        pairs = {(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"]))
                 for r in csv.DictReader(f)}
    specs = W.summarization(30, seed=1, csv_path=ARXIV, caps=W.Caps(8192, 8192, 16384))
    assert all((s.input_len, s.output_len) in pairs for s in specs)


def test_humaneval_prompts():
    specs = W.humaneval(need(HUMANEVAL))
    assert len(specs) == 164 and all(isinstance(s.prompt, str) for s in specs)
    assert specs[0].prompt.startswith("from typing import List")
    assert 100 < np.mean([s.input_len for s in specs]) < 160  # ~131 tokens (README)
    assert {s.output_len for s in W.humaneval(HUMANEVAL, output_len=64, limit=3)} == {64}
    exact = W.humaneval(HUMANEVAL, limit=2, tokenize=lambda t: t.split())
    assert exact[0].input_len == len(exact[0].prompt.split())
    assert not exact[0].meta["input_len_estimated"]


def test_mooncake_equal_hash_ids_give_equal_blocks(tmp_path):
    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": 1000, "input_length": 1200, "output_length": 10, "hash_ids": [0, 1, 2]},
            {"timestamp": 4000, "input_length": 1300, "output_length": 20, "hash_ids": [0, 1, 3]}]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = W.mooncake(str(trace), length_scale=0.25, time_scale=0.5)  # 128-token blocks
    assert (a.input_len, b.input_len) == (300, 325)
    assert a.prompt[:256] == b.prompt[:256]  # ids 0, 1
    assert a.prompt[256:300] != b.prompt[256:300]  # 2 vs 3
    assert a.prompt[:128] != a.prompt[128:256]  # different ids, different blocks
    assert a.prompt[:128] == W.block_tokens_for(0, 128, 0, W.DEFAULT_VOCAB)
    assert (a.arrival_s, b.arrival_s) == (0.0, 1.5)
    capped = W.mooncake(str(trace), length_scale=0.25, caps=W.Caps(max_input=200))
    assert capped[1].prompt == b.prompt[:200]


def test_mooncake_replay_reproduces_the_trace():
    with open(need(MOONCAKE)) as f:
        rows = [json.loads(next(f)) for _ in range(40)]
    ls, ts = 0.1, 0.5
    caps = W.Caps(max_input=1000, max_output=64, max_model_len=8192)
    specs = W.mooncake(MOONCAKE, length_scale=ls, time_scale=ts, caps=caps, limit=40)
    assert len(specs) == 40
    block = round(512 * ls)
    for r, s in zip(rows, specs):
        scaled_in = min(round(r["input_length"] * ls), len(r["hash_ids"]) * block)
        # a scaled length never drops below one token
        assert s.output_len == max(1, min(round(r["output_length"] * ls), 64))
        assert s.input_len == len(s.prompt) == min(scaled_in, 1000)
        assert s.arrival_s == pytest.approx((r["timestamp"] - rows[0]["timestamp"]) / 1000 * ts)
    # block 0 is the shared system prompt: every request starts with the same tokens
    assert all(s.prompt[:block] == specs[0].prompt[:block] for s in specs)
    assert specs[0].prompt[block:2 * block] != specs[1].prompt[block:2 * block]


def test_azure_replay_reproduces_the_trace():
    with open(need(AZURE), newline="") as f:
        reader = csv.DictReader(f)
        rows = [next(reader) for _ in range(30)]
    ls, ts = 0.5, 2.0
    caps = W.Caps(max_input=300, max_output=100, max_model_len=8192)
    specs = W.azure(AZURE, length_scale=ls, time_scale=ts, caps=caps, limit=30)
    t0 = datetime.fromisoformat(rows[0]["TIMESTAMP"])
    for r, s in zip(rows, specs, strict=True):
        assert s.input_len == len(s.prompt) == min(round(int(r["ContextTokens"]) * ls), 300)
        assert s.output_len == min(round(int(r["GeneratedTokens"]) * ls), 100)
        gap = (datetime.fromisoformat(r["TIMESTAMP"]) - t0).total_seconds()
        assert s.arrival_s == pytest.approx(gap * ts, abs=1e-5)


# -- workload files that do not parse: the error names the file, the line and what is wrong -----
MOONCAKE_ROW = {"timestamp": 0, "input_length": 100, "output_length": 5, "hash_ids": [0]}
HUMANEVAL_ROW = {"task_id": "t/0", "prompt": "def f():\n", "canonical_solution": "  return 1\n"}


def write(path, text: str, gz: bool = False) -> str:
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def mooncake_with(**change) -> dict:
    return {k: v for k, v in (MOONCAKE_ROW | change).items() if v is not None}


BAD_FILES = [  # (reader, file name, contents, what the message must say)
    (W.mooncake, "t.jsonl", jsonl(MOONCAKE_ROW, '{"timestamp": 1,'),
     "t.jsonl, line 2: not JSON"),
    (W.mooncake, "t.jsonl", jsonl(MOONCAKE_ROW, "", mooncake_with(hash_ids=None)),
     "t.jsonl, line 3: no 'hash_ids' field"),  # blank lines count: the line in an editor
    (W.mooncake, "t.jsonl", jsonl(mooncake_with(input_length="100")),
     "t.jsonl, line 1: 'input_length' is '100', not a whole number"),
    (W.mooncake, "t.jsonl", jsonl(MOONCAKE_ROW, mooncake_with(timestamp="2023-11-16")),
     "t.jsonl, line 2: 'timestamp' is '2023-11-16', not a number"),
    (W.mooncake, "t.jsonl", jsonl(mooncake_with(hash_ids=[0, "a"])),
     "t.jsonl, line 1: 'hash_ids' is [0, 'a'], not a list of integers"),
    (W.mooncake, "t.jsonl", jsonl("[1, 2]"), "t.jsonl, line 1: not a JSON object"),
    (W.azure, "a.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,3\n",
     "a.csv, line 1: no column GeneratedTokens"),
    (W.azure, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,3,4\n"
     "2023-11-16 18:15:47,many,4\n", "a.csv, line 3: ContextTokens is 'many', not a whole"),
    (W.azure, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,3\n",
     "a.csv, line 2: GeneratedTokens is None"),  # a short row
    (W.azure, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n16/11/2023 18:15,3,4\n",
     "a.csv, line 2: TIMESTAMP is '16/11/2023 18:15', not an ISO 8601"),
    (W.azure, "a.csv", "", "a.csv: empty"),
    (W.humaneval, "h.jsonl.gz", jsonl(HUMANEVAL_ROW, "{"), "h.jsonl.gz, line 2: not JSON"),
    (W.humaneval, "h.jsonl", jsonl({k: v for k, v in HUMANEVAL_ROW.items() if k != "prompt"}),
     "h.jsonl, line 1: no 'prompt' field"),
    (W.summarization, "s.csv", "num_prefill_tokens,num_decode_tokens\n10,5\n10,-5\n",
     "s.csv, line 3: num_decode_tokens is '-5', not a whole number"),
    (W.summarization, "s.csv", "num_prefill_tokens,num_decode_tokens\n", "s.csv: no rows"),
    (W.summarization, "s.csv", "prompt,output\n10,5\n",
     "s.csv, line 1: no column num_prefill_tokens, num_decode_tokens"),
]


def _read(reader, path: str):
    return reader(5, 0, path) if reader is W.summarization else reader(path)


@pytest.mark.parametrize("reader,name,text,message", BAD_FILES)
def test_a_malformed_workload_file_names_the_file_and_line(tmp_path, reader, name, text, message):
    path = write(tmp_path / name, text, gz=name.endswith(".gz"))
    with pytest.raises(W.WorkloadError) as e:
        _read(reader, path)
    assert str(e.value).startswith(str(tmp_path))  # the whole path, as given
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_an_unreadable_workload_file_names_the_file(tmp_path):
    with pytest.raises(W.WorkloadError, match=r"nope\.jsonl: cannot be opened \(No such file"):
        W.mooncake(str(tmp_path / "nope.jsonl"))
    truncated = gzip.compress(jsonl(HUMANEVAL_ROW, HUMANEVAL_ROW).encode())[:-12]
    (tmp_path / "h.jsonl.gz").write_bytes(truncated)
    with pytest.raises(W.WorkloadError, match=r"h\.jsonl\.gz, line \d+: cannot be read"):
        W.humaneval(str(tmp_path / "h.jsonl.gz"))
    (tmp_path / "latin1.csv").write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\n\xe9,1,1\n")
    with pytest.raises(W.WorkloadError, match=r"latin1\.csv, line 2: not UTF-8 text \(byte 0xe9"):
        W.azure(str(tmp_path / "latin1.csv"))


def test_workload_files_may_be_gzipped_and_a_limit_stops_reading(tmp_path):
    rows = [HUMANEVAL_ROW, HUMANEVAL_ROW | {"task_id": "t/1", "prompt": "x" * 344}]
    plain = W.humaneval(write(tmp_path / "h.jsonl", jsonl(*rows)))
    assert plain == W.humaneval(write(tmp_path / "h.jsonl.gz", jsonl(*rows), gz=True))
    assert [s.meta["task_id"] for s in plain] == ["t/0", "t/1"] and plain[1].input_len == 100
    # lines past the limit are not read, so a broken tail does not stop a short run
    assert len(W.mooncake(write(tmp_path / "t.jsonl", jsonl(MOONCAKE_ROW, "{")), limit=1)) == 1
    # a timestamp with a zone keeps it; one without is UTC
    csv_text = ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,1,1\n"
                "2023-11-16 19:00:02+01:00,1,1\n")
    assert [s.arrival_s for s in W.azure(write(tmp_path / "a.csv", csv_text))] == [0.0, 2.0]


def test_arrival_processes():
    t = np.array(W.poisson(4.0, 20000, seed=3))
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert 1 / np.diff(t).mean() == pytest.approx(4.0, rel=0.03)
    for cv in (0.5, 2.0):
        gaps = np.diff(W.gamma(4.0, cv, 20000, seed=3))
        assert gaps.mean() == pytest.approx(0.25, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    assert W.poisson(2.0, 5, seed=1) == W.poisson(2.0, 5, seed=1)
    specs = W.at_rate(W.synthetic("code", 5, seed=0), rate=2.0, seed=1)
    assert [s.arrival_s for s in specs] == W.poisson(2.0, 5, seed=1)
    assert [s.prompt for s in specs] == [s.prompt for s in W.synthetic("code", 5, seed=0)]


# -- the load generator against a fake OpenAI SSE server ----------------------------------------
TTFT_S, TPOT_S = 0.2, 0.05


def fake_app(bodies: list):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def sse(obj) -> bytes:
        return b"data: " + msgspec.json.encode(obj) + b"\n\n"

    async def completions(request):
        body = await request.json()
        bodies.append(body)
        prompt, n = body["prompt"], body["max_tokens"]
        if prompt == "reject":
            return JSONResponse({"error": {"message": "prompt too long"}}, status_code=400)
        if prompt == "overloaded":  # admission control's answer
            return JSONResponse({"error": {"message": "predicted TTFT exceeds the SLO"}},
                                status_code=429, headers={"Retry-After": "2"})

        async def events():
            await asyncio.sleep(TTFT_S)
            for k in range(n):
                if k:
                    await asyncio.sleep(TPOT_S)
                if prompt == "fail" and k == 2:
                    yield sse({"error": {"message": "worker died", "type": "server_error"}})
                    break
                yield sse({"choices": [{"index": 0, "text": f" t{k}", "finish_reason": None}],
                           "usage": None})
            else:
                yield sse({"choices": [], "usage": {"completion_tokens": n}})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture(scope="module")
def fake_server():
    bodies: list = []
    with app_in_thread(fake_app(bodies)) as url:
        yield url, bodies


def spec(prompt, arrival=0.0, out=6) -> W.RequestSpec:
    n = len(prompt) if isinstance(prompt, list) else 1
    return W.RequestSpec(arrival, prompt, n, out, {})


def test_run_load_records_the_fake_servers_delays(fake_server, capsys):
    url, bodies = fake_server
    specs = [spec([101, 102, 103], 0.0), spec([104], 0.1), spec([105, 106], 0.2),
             spec("fail", 0.05), spec("reject", 0.05), spec("overloaded", 0.05)]
    res = asyncio.run(run_load(url, specs, "fake", progress=True))
    assert "[bench] 6/6 done, 3 failed, 0 in flight" in capsys.readouterr().err
    ok, fail, reject, refused = res.records[:3], res.records[3], res.records[4], res.records[5]
    for r, s in zip(ok, specs):
        assert r.ok and r.n_out == 6 and len(r.token_times) == 6
        assert abs(r.t_sent - s.arrival_s) < 0.1  # sent on time
        assert r.ttft == pytest.approx(TTFT_S, abs=0.1)
        assert r.tpot == pytest.approx(TPOT_S, abs=0.02)
        assert r.e2e >= TTFT_S + 5 * TPOT_S
    assert not fail.ok and "worker died" in fail.error and len(fail.token_times) == 2
    assert not reject.ok and reject.error == "HTTP 400: prompt too long" and not reject.rejected
    assert not refused.ok and refused.rejected and not fail.rejected and "429" in refused.error
    s = summarize(res.records)  # a 429 is a rejection, not a failure
    assert (s["requests"], s["rejected"], s["failed"]) == (6, 1, 2)
    assert attainment(res.records, ttft_slo=0.4, tpot_slo=0.1) == pytest.approx(3 / 6)
    assert met_slo(res.records, ttft_slo=0.4, tpot_slo=0.1) == 3
    assert res.wall_s >= 0.2 + TTFT_S + 5 * TPOT_S and res.client_cpu_s >= 0
    sent = next(b for b in bodies if b["prompt"] == [104])
    assert sent["stream"] and sent["stream_options"] == {"include_usage": True}
    assert sent["ignore_eos"] and sent["max_tokens"] == 6 and sent["temperature"] == 0


def test_run_load_concurrency_and_timeout(fake_server):
    url, _ = fake_server
    res = asyncio.run(run_load(url + "/v1", [spec([101], out=2), spec([102], out=2)], "fake",
                               concurrency=1, progress=False))
    first, second = sorted(res.records, key=lambda r: r.t_sent)
    assert first.ok and second.ok
    assert second.t_sent >= first.t_done - 0.01  # one in flight at a time
    assert second.send_lag >= TTFT_S

    res = asyncio.run(run_load(url, [spec([101])], "fake", timeout_s=0.1, progress=False))
    assert not res.records[0].ok and "timed out" in res.records[0].error


def test_bench_serve_and_a_fake_run_function_give_the_same_report(fake_server, tmp_path):
    """bench serve (real requests to the fake server) and run_experiment with a run function
    that makes up the same server's timings: one schema, the same numbers."""
    from splitserve.bench import experiment as E
    from splitserve.bench import load as L
    from splitserve.bench.client import LoadResult
    from splitserve.cli import build_parser

    def made_up(specs):  # the fake server's timings, exactly
        recs = []
        for s in specs:
            times = [s.arrival_s + TTFT_S + k * TPOT_S for k in range(s.output_len)]
            recs.append(RequestRecord(True, s.arrival_s, s.arrival_s, times[-1], times,
                                      s.output_len, s.input_len, s.output_len))
        return LoadResult(recs, max(r.t_done for r in recs), 0.0)

    url, _ = fake_server
    common = ["--workload", "prefill-heavy", "--num-requests", "3", "--max-output", "3",
              "--ttft-slo", "0.45", "--tpot-slo", "0.1", "--slo-scales", "0.25,1", "--quiet"]
    for mode in (["--rate", "20"], ["--goodput", "10,20"]):
        real_json, fake_json = tmp_path / "real.json", tmp_path / "fake.json"
        a = build_parser().parse_args(["bench", "serve", "--base-url", url, *common, *mode,
                                       "--json", str(real_json)])
        assert L.main(a) == 0
        real = json.loads(real_json.read_text())
        a.json = str(fake_json)
        E.run_experiment(a, made_up, real["cores"], {"source": "simulated"})
        fake = json.loads(fake_json.read_text())
        assert real["source"] == "measured" and real["base_url"] == url
        for k in ("source", "base_url", "model", "concurrency"):
            real.pop(k), fake.pop(k, None)
        # measured only: the server's prefix-cache hit rate (this fake has no counters) and
        # the ideal one (fresh random prompts: nothing to hit)
        assert real.pop("prefix_hit_rate") is None and real.pop("prefix_hit_rate_ideal") == 0.0
        assert real.pop("prefix_tokens") == {"hits": 0.0, "queries": 0.0}
        assert list(real) == list(fake)
        rows = real.get("runs") or real["probes"]
        fake_rows = fake.get("runs") or fake["probes"]
        for r, f in zip(rows, fake_rows, strict=True):
            assert list(r) == list(f) and r["rate"] == f["rate"]
            assert r["attainment"] == f["attainment"] == 1.0  # TTFT 0.2 s <= 0.45
            assert r["ttft_p50"] == pytest.approx(f["ttft_p50"], abs=0.1)
            assert r["tpot_p50"] == pytest.approx(f["tpot_p50"], abs=0.02)
            assert f["client_cpu_s"] == 0.0 <= r["client_cpu_s"]
        # x0.25 (TTFT SLO 0.11 s) misses every 0.2 s TTFT, x1 meets them all
        assert [s["attainment"] for s in real["slo_sweep"]] == [0.0, 1.0] == [
            s["attainment"] for s in fake["slo_sweep"]]
        if "goodput_req_s" in real:
            assert real["goodput_req_s"] == fake["goodput_req_s"] == 20.0 and real["capped"]


def test_a_scaled_synthetic_workload_keeps_its_draws():
    base = W.synthetic("prefill-heavy", 50, seed=4)
    small = W.synthetic("prefill-heavy", 50, seed=4, length_scale=0.25)
    assert [s.input_len for s in small] == [max(1, round(b.input_len * 0.25)) for b in base]
    assert [s.output_len for s in small] == [max(1, round(b.output_len * 0.25)) for b in base]
    assert all(len(s.prompt) == s.input_len for s in small)

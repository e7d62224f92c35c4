"""End to end through real processes: `splitserve serve` (router + workers) on the embedded
model, driven by the official `openai` client.

Greedy (and seeded) output must be identical between the offline engine, --colocated, and P/D
over each KV transport; aborts at each stage and dead or stalled workers must leave no block
held anywhere (the workers' own pool integrity checks report through /health)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest
from serving_harness import Server, wait_for

pytestmark = pytest.mark.real_model

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# ~230 tokens: four 64-token prefill chunks, so the KV goes over layer by layer, chunk by chunk
LONG = ("The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type, oil-based ink and a screw press. ") * 8 + \
       "In summary, the printing press"
MODES = {
    "colocated": ["--colocated", "1"],
    "shm": ["--kv-transport", "shm"],
    "tcp": ["--kv-transport", "tcp"],
}


@pytest.fixture(scope="module")
def offline(real_model_path):
    """What the offline engine says, with the servers' engine settings (bf16, 1 thread,
    64-token chunks)."""
    from splitserve.config import EngineConfig, SchedulerConfig
    from splitserve.engine.engine import LLMEngine
    from splitserve.request import SamplingParams

    eng = LLMEngine(EngineConfig(num_threads=1, scheduler=SchedulerConfig(max_num_batched_tokens=64)))

    def run(prompt_ids, **kw):
        eng.add_request(prompt_ids, SamplingParams(**kw))
        text = ""
        while eng.has_unfinished():
            for o in eng.step():
                text += o.new_text
        return text

    greedy = dict(temperature=0.0, max_tokens=32)
    seeded = dict(temperature=0.8, top_p=0.95, seed=1234, max_tokens=24)
    out = {
        "chat": run(eng.apply_chat_template(CHAT), **greedy),
        "long": run(eng.encode(LONG), **greedy),
        "seeded": run(eng.encode(LONG), **seeded),
    }
    assert out["chat"] and out["long"] and out["seeded"]
    return out


@pytest.fixture(scope="module", params=list(MODES))
def server(request, real_model_path):
    # admission on, with SLOs no request of the other tests comes near: a request that brings
    # tight ones of its own is refused (test_admission_refuses_with_a_429_before_any_work)
    s = Server(*MODES[request.param], "--kv-cache-gb", "0.08", *ADMISSION)
    yield s
    s.close()


ADMISSION = ["--admission", "predictive", "--ttft-slo", "1000", "--tpot-slo", "100",
             "--latency-model", "constant:0.01"]


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_greedy_and_seeded_output_match_the_offline_engine(server, offline):
    c = _client(server)
    chat = c.chat.completions.create(model="default", messages=CHAT, temperature=0, max_tokens=32)
    assert chat.choices[0].message.content == offline["chat"]
    stream = c.chat.completions.create(model="default", messages=CHAT, temperature=0, max_tokens=32,
                                       stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == offline["chat"]

    for _ in range(2):  # the second time the prompt's blocks are prefix-cache hits
        comp = c.completions.create(model="default", prompt=LONG, temperature=0, max_tokens=32)
        assert comp.choices[0].text == offline["long"]
        assert comp.usage.completion_tokens == 32 and comp.choices[0].finish_reason == "length"
    stream = c.completions.create(model="default", prompt=LONG, temperature=0, max_tokens=32,
                                  stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == offline["long"]
    assert chunks[-1].usage.completion_tokens == 32

    seeded = c.completions.create(model="default", prompt=LONG, temperature=0.8, top_p=0.95,
                                  seed=1234, max_tokens=24)
    assert seeded.choices[0].text == offline["seeded"]
    ws = server.wait_idle()
    assert all(w["kv_blocks_used"] == 0 and w["integrity_errors"] == 0 for w in ws), ws


def _wait_for(cond, timeout_s=20.0, what="condition"):
    return wait_for(cond, timeout_s, what, poll_s=0.05)


def test_aborts_mid_prefill_mid_transfer_and_mid_decode_free_every_block(server):
    long_prompt = LONG * 6  # ~1400 tokens: a prefill of seconds at one thread
    body = {"model": "default", "prompt": long_prompt, "max_tokens": 200, "temperature": 0,
            "stream": True, "ignore_eos": True}
    pd = server.workers("decode") != []

    def busy():
        ws = server.workers()
        if pd:  # mid-transfer: decode holds the reservation while prefill is still writing it
            dec, pre = server.workers("decode")[0], server.workers("prefill")[0]
            return dec["kv_blocks_used"] > 0 and pre["running"] > 0
        return ws[0]["running"] > 0 and ws[0]["kv_blocks_used"] > 0

    # mid-prefill (and, in P/D, mid-transfer): drop the connection before the first token
    # (the response headers only come with it: the socket is closed before any answer)
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        _wait_for(busy, what="the prefill to be under way")
    ws = server.wait_idle()
    assert all(w["kv_blocks_used"] == 0 and w["integrity_errors"] == 0 for w in ws), ws

    # mid-decode: read a few tokens, then go away
    body["prompt"] = LONG
    with httpx.Client(timeout=60) as h, h.stream("POST", server.base_url + "/completions", json=body) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += 1
            if got >= 5:
                break
    ws = server.wait_idle()
    assert all(w["kv_blocks_used"] == 0 and w["integrity_errors"] == 0 for w in ws), ws

    # still serving
    c = _client(server)
    assert c.completions.create(model="default", prompt="Hello", max_tokens=4).choices[0].text


def test_prompt_over_the_context_is_a_400(server):
    r = httpx.post(server.base_url + "/completions",
                   json={"model": "default", "prompt": "hi " * 9000, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "context" in r.json()["error"]["message"]


def test_an_idle_decode_worker_prefills_a_queued_request_itself(real_model_path, offline):
    # conditional disaggregation: while the prefill worker is busy with a long prompt and the
    # decode worker has nothing to decode, the next request is prefilled on the decode worker
    s = Server("--kv-cache-gb", "0.08")
    try:
        c = _client(s)
        results = {}

        def long_one(prefix=""):  # a new prefix each time: no prefix-cache hits make it short
            results["a"] = c.completions.create(model="default", prompt=prefix + LONG * 6,
                                                max_tokens=8, temperature=0).choices[0].text

        a = threading.Thread(target=long_one)
        a.start()
        _wait_for(lambda: s.workers("prefill")[0]["outstanding"], what="the long prompt")
        comp = c.completions.create(model="default", prompt=LONG, temperature=0, max_tokens=32)
        assert comp.choices[0].text == offline["long"]
        a.join(60)
        assert results["a"]

        # a local request dropped mid-stream frees its blocks too
        a = threading.Thread(target=long_one, args=("Once more. ",))
        a.start()
        _wait_for(lambda: s.workers("prefill")[0]["outstanding"], what="the long prompt")
        with httpx.Client(timeout=60) as h, h.stream("POST", s.base_url + "/completions", json={
                "model": "default", "prompt": LONG, "max_tokens": 200, "stream": True}) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: {")
                if got >= 3:
                    break
        a.join(60)
        ws = s.wait_idle()
        assert all(w["kv_blocks_used"] == 0 and w["integrity_errors"] == 0 for w in ws), ws
        decode = s.workers("decode")[0]
        assert decode["local_prefills"] == 2 and decode["kv_transfers"] == 2, decode
    finally:
        s.close()


def test_a_stalled_prefill_worker_fails_the_transfer_by_timeout_and_frees_its_blocks(real_model_path):
    s = Server("--kv-timeout", "2")
    try:
        pre = s.workers("prefill")[0]
        result = {}

        def call():
            t = time.monotonic()
            result["r"] = httpx.post(s.base_url + "/completions", timeout=60, json={
                "model": "default", "prompt": LONG * 6, "max_tokens": 4})
            result["t"] = time.monotonic() - t

        th = threading.Thread(target=call)
        th.start()
        # stall it mid-transfer: the decode worker holds the reservation, prefill is writing it
        _wait_for(lambda: s.workers("decode")[0]["kv_blocks_used"] > 0
                  and s.workers("prefill")[0]["running"] > 0, what="the transfer to be under way")
        os.kill(pre["pid"], signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            th.join(30)
            waited = time.monotonic() - t_stop
        finally:
            os.kill(pre["pid"], signal.SIGCONT)
        r = result["r"]
        assert r.status_code == 500, r.text
        assert "made no progress for 2 s" in r.json()["error"]["message"]
        assert waited < 6.0
        # the decode worker held the blocks until the prefill worker's fence said no write of
        # its is left; then everything is free, and the deployment serves again
        ws = s.wait_idle()
        assert all(w["kv_blocks_used"] == 0 and w["integrity_errors"] == 0 for w in ws), ws
        ok = httpx.post(s.base_url + "/completions", timeout=60,
                        json={"model": "default", "prompt": "Hello", "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
    finally:
        s.close()


def test_admission_refuses_with_a_429_before_any_work(server, offline):
    """The serve flags reach the router, the body's ttft_slo reaches admission, the refusal
    is a 429 with Retry-After in every mode (streamed too), counted by reason, and no worker
    ran a step for it or holds anything; a request with a loose SLO of its own is served."""
    before = {w["worker_id"]: w["steps"] for w in server.wait_idle()}
    body = {"model": "default", "prompt": LONG, "max_tokens": 8, "temperature": 0,
            "ttft_slo": 0.001}  # 4 chunks x 10 ms (constant:0.01) + 5 ms predicted
    for stream in (False, True):
        r = httpx.post(server.base_url + "/completions", json=body | {"stream": stream}, timeout=30)
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "overloaded_ttft" and "exceeds the SLO of 0.001 s" in err["message"], err
        assert int(r.headers["retry-after"]) >= 1
    time.sleep(1.2)  # two heartbeats
    ws = server.wait_idle()
    assert {w["worker_id"]: w["steps"] for w in ws} == before, ws
    assert all(w["kv_blocks_used"] == 0 and w["outstanding"] == 0 for w in ws), ws
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'splitserve_rejected_requests_total{reason="ttft"} 2.0' in metrics
    r = httpx.post(server.base_url + "/completions", timeout=120,
                   json=body | {"ttft_slo": 600, "max_tokens": 32})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline["long"], r.text

"""The OpenAI-compatible HTTP layer over a scripted FakeConductor (no model, no workers)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient
from serving_harness import app_in_thread

from splitserve.disagg.messages import Delta
from splitserve.errors import InvalidRequestError, RequestFailed, ServiceUnavailable
from splitserve.server.openai_api import build_app

MODEL = "fake-model"
MAX_LEN = 32
VOCAB = 100
# The fake model always answers this, one token per delta: ids 10..14.
REPLY = ["Hello", ",", " world", "!", " Bye"]
REPLY_IDS = list(range(10, 10 + len(REPLY)))
WORKERS = [
    {"worker_id": "p0", "role": "prefill", "running": 2, "waiting": 1, "kv_blocks_used": 7,
     "kv_blocks_total": 64, "kv_bytes_sent": 4096, "kv_bytes_received": 0,
     "kv_transfer_seconds": 0.25, "kv_transfers": 3},
    {"worker_id": "d0", "role": "decode", "running": 3, "waiting": 0, "kv_blocks_used": 9,
     "kv_blocks_total": 128, "kv_bytes_sent": 0, "kv_bytes_received": 4096,
     "kv_transfer_seconds": 0.5, "kv_transfers": 3, "steps": 40, "aborts": 2, "step_errors": 1,
     "integrity_errors": 4},
]


class FakeConductor:
    """The conductor interface with scripted behaviour. Prompts: one token per word (id 3);
    chat: one token per word of each content plus 2 per message."""

    served_model_name = MODEL

    def __init__(self):
        self.ready = True
        self.calls: list[tuple[str, list[int], object]] = []
        self.aborted: list[str] = []  # generators closed or cancelled before their end
        self.started: list[str] = []
        self.raise_before: Exception | None = None  # raised before the first delta
        self.fail_after: int | None = None  # RequestFailed after this many deltas
        self.hang_after: int | None = None  # wait forever after this many deltas
        self.finish_reason: str | None = None  # overrides the natural one
        self.delay = 0.0
        self.health_status = "ok"
        self.slos: list = []  # each generate()'s (ttft_slo, tpot_slo)

    def is_ready(self) -> bool:
        return self.ready

    def unready_reason(self) -> str:
        return "The server is starting: no workers have registered yet."

    @property
    def max_model_len(self) -> int:
        return MAX_LEN

    def encode_prompt(self, prompt):
        ids = [3] * len(prompt.split()) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < VOCAB]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (size {VOCAB})")
        return ids

    def encode_chat(self, messages):
        return [3] * sum(2 + len(m["content"].split()) for m in messages)

    def token_strings(self, token_ids):
        return [REPLY[t - 10] if t in REPLY_IDS else f"<{t}>" for t in token_ids]

    async def generate(self, request_id, prompt_token_ids, params, slo=(None, None), priority=0):
        self.calls.append((request_id, prompt_token_ids, params))
        self.slos.append((*slo, priority))
        if self.raise_before is not None:
            raise self.raise_before
        self.started.append(request_id)
        n = min(params.max_tokens, len(REPLY))
        try:
            for k in range(n):
                if k == self.fail_after:
                    raise RequestFailed("decode worker d0 died")
                if k == self.hang_after:
                    await asyncio.sleep(3600)
                await asyncio.sleep(self.delay)
                last = k == n - 1
                reason = self.finish_reason or ("length" if params.max_tokens <= len(REPLY) else "stop")
                lps = []
                if params.logprobs is not None:
                    lp = -0.25 * (k + 1)
                    lps = [[lp, [[REPLY_IDS[k], lp]] + [[90 + j, lp - 1 - j] for j in range(params.logprobs - 1)]]]
                    lps[0][1] = lps[0][1][: params.logprobs]
                yield Delta(request_id, [REPLY_IDS[k]], REPLY[k], last, reason if last else None,
                            new_logprobs=lps, num_prompt_tokens=len(prompt_token_ids),
                            num_output_tokens=k + 1)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)  # the real conductor aborts in the workers here
            raise

    def health(self):
        return {"status": self.health_status, "workers": [w["worker_id"] for w in WORKERS]}

    def worker_stats(self):
        return WORKERS


@pytest.fixture
def fake():
    return FakeConductor()


@pytest.fixture
def client(fake):
    with TestClient(build_app(fake, MODEL)) as c:
        yield c


def sse_events(resp) -> list:
    """The `data:` payloads of an SSE response, JSON-decoded except the final [DONE]."""
    out = []
    for line in resp.text.split("\n\n"):
        if line.strip():
            assert line.startswith("data: "), line
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(resp, status, type_="invalid_request_error", param=None, contains=""):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_
    if param is not None:
        assert err["param"] == param
    assert contains.lower() in err["message"].lower(), err["message"]
    assert "Traceback" not in resp.text
    return err


# -- good requests ------------------------------------------------------------------------------
def test_completion(client, fake):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "one two three", "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": "Hello, world", "logprobs": None,
                                "finish_reason": "length", "stop_reason": None}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 0}}
    rid, ids, params = fake.calls[0]
    assert rid == body["id"] + "-0" and ids == [3, 3, 3]
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (3, 1.0, 1.0, None)


def test_completion_defaults_and_params(client, fake):
    r = client.post("/v1/completions", json={"prompt": [5, 6], "temperature": 0, "top_k": 5, "top_p": 0.5,
                                             "stop": "x", "stop_token_ids": [7], "ignore_eos": True,
                                             "seed": 9, "user": "u", "unknown_field": {"a": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    _, ids, p = fake.calls[0]
    assert ids == [5, 6]
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (16, 0, 5, 0.5, 9)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == (("x",), (7,), True, None)


def test_chat(client, fake):
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]
    r = client.post("/v1/chat/completions", json={"messages": msgs})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "".join(REPLY)}
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt_len = 4 + 4  # "be brief" + "hi\nthere", 2 each for the roles
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 5, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 0}}
    # no max_tokens: the rest of the context
    assert fake.calls[0][2].max_tokens == MAX_LEN - prompt_len
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 9, "max_completion_tokens": 2})
    assert fake.calls[1][2].max_tokens == 2
    assert r.json()["choices"][0]["message"]["content"] == "Hello,"


def test_completion_stream_with_usage(client):
    r = client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 4, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = sse_events(r)
    assert ev[-1] == "[DONE]"
    chunks, final = ev[:-2], ev[-2]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello, world!"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert final["choices"] == [] and final["usage"] == {"prompt_tokens": 2, "completion_tokens": 4,
                                                         "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 0}}
    assert len({c["id"] for c in ev[:-1]}) == 1


def test_chat_stream(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 2, "stream": True})
    ev = sse_events(r)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:]] == ["Hello", ","]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]


def test_n2_and_seed(client, fake):
    r = client.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 2, "n": 2, "seed": 5})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["text"] == "Hello," for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 0}}
    assert sorted((rid, p.seed) for rid, _, p in fake.calls) == [(body["id"] + "-0", 5), (body["id"] + "-1", 6)]


def test_n2_stream_interleaves(client, fake):
    fake.delay = 0.01
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 2,
                                                  "max_tokens": 3, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    ev = sse_events(r)
    chunks = [c for c in ev[:-1] if c["choices"]]
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(m["delta"].get("content", "") for m in mine) == "Hello, world"
        assert [m["finish_reason"] for m in mine][-1] == "length"
    indexes = [c["choices"][0]["index"] for c in chunks[2:]]
    assert indexes != sorted(indexes)  # interleaved, not one choice after the other
    assert ev[-2]["usage"]["completion_tokens"] == 6


def test_batch_of_prompts(client, fake):
    r = client.post("/v1/completions", json={"prompt": ["a", "b c"], "max_tokens": 1, "n": 2})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 4
    by_id = {rid: ids for rid, ids, _ in fake.calls}
    assert by_id[body["id"] + "-1"] == [3] and by_id[body["id"] + "-2"] == [3, 3]


def test_completion_logprobs(client):
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 3, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["Hello", ",", " world"]
    assert lp["token_logprobs"] == [-0.25, -0.5, -0.75]
    assert lp["top_logprobs"][1] == {",": -0.5, "<90>": -1.5}
    assert lp["text_offset"] == [0, 5, 6]
    # streamed: the offsets go on across chunks
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 3, "logprobs": 0, "stream": True})
    chunks = sse_events(r)[:-1]
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks] == [[0], [5], [6]]
    assert chunks[2]["choices"][0]["logprobs"]["top_logprobs"] == [{}]


def test_chat_logprobs(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                  "max_tokens": 2, "logprobs": True, "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": "Hello", "logprob": -0.25, "bytes": list(b"Hello"),
                          "top_logprobs": [{"token": "Hello", "logprob": -0.25, "bytes": list(b"Hello")},
                                           {"token": "<90>", "logprob": -1.25, "bytes": list(b"<90>")}]}
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                  "max_tokens": 2, "logprobs": True, "stream": True})
    chunks = sse_events(r)[1:-1]
    assert [c["choices"][0]["logprobs"]["content"][0]["token"] for c in chunks] == ["Hello", ","]
    assert chunks[0]["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.json()["choices"][0]["logprobs"] is None


def test_models_health(client, fake):
    data = client.get("/v1/models").json()["data"]
    assert data[0]["id"] == MODEL and data[0]["object"] == "model" and data[0]["max_model_len"] == MAX_LEN
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "workers": ["p0", "d0"]}
    fake.health_status = "degraded"
    assert client.get("/health").status_code == 200
    fake.health_status = "starting"
    assert client.get("/health").status_code == 503


def test_metrics(fake):
    # two apps in one process: each has its own registry
    other = TestClient(build_app(FakeConductor(), MODEL))
    client = TestClient(build_app(fake, MODEL))
    client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 3})
    text = client.get("/metrics").text
    assert "splitserve_time_to_first_token_seconds_count 1.0" in text
    assert "splitserve_inter_token_latency_seconds_count 2.0" in text
    assert "splitserve_e2e_request_latency_seconds_count 1.0" in text
    assert 'splitserve_requests_total{finish_reason="length"} 1.0' in text
    assert "splitserve_prompt_tokens_total 2.0" in text and "splitserve_generation_tokens_total 3.0" in text
    assert 'splitserve_worker_running_requests{role="prefill",worker_id="p0"} 2.0' in text
    assert 'splitserve_worker_waiting_requests{role="prefill",worker_id="p0"} 1.0' in text
    assert 'splitserve_worker_kv_blocks_used{role="decode",worker_id="d0"} 9.0' in text
    assert 'splitserve_worker_kv_blocks_total{role="decode",worker_id="d0"} 128.0' in text
    assert 'splitserve_kv_transfer_bytes_total{direction="sent",role="prefill",worker_id="p0"} 4096.0' in text
    assert 'splitserve_kv_transfer_bytes_total{direction="received",role="decode",worker_id="d0"} 4096.0' in text
    assert 'splitserve_kv_transfer_seconds_total{role="decode",worker_id="d0"} 0.5' in text
    assert 'splitserve_kv_transfers_total{role="prefill",worker_id="p0"} 3.0' in text
    for name, v in (("steps", 40), ("aborts", 2), ("step_errors", 1), ("integrity_errors", 4)):
        assert f'splitserve_worker_{name}_total{{role="decode",worker_id="d0"}} {v}.0' in text
    assert "splitserve_time_to_first_token_seconds_count 0.0" in other.get("/metrics").text


# -- bad requests -------------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, param, contains", [
    (COMPL, {"prompt": "a", "max_tokens": "ten"}, "max_tokens", "valid integer"),
    (COMPL, {"prompt": "a", "max_tokens": True}, "max_tokens", "valid integer"),
    (COMPL, {"prompt": "a", "temperature": -1}, "temperature", "greater than or equal to 0"),
    (COMPL, {"prompt": "a", "top_p": 0}, "top_p", "greater than 0"),
    (COMPL, {"prompt": "a", "n": 0}, "n", "greater than or equal to 1"),
    (COMPL, {"prompt": "a", "logprobs": 50}, "logprobs", "less than or equal to 20"),
    (COMPL, {"max_tokens": 3}, "prompt", "required"),
    (COMPL, {"prompt": {"text": "a"}}, "prompt", "list of token ids"),
    (COMPL, {"prompt": []}, "prompt", "empty"),
    (COMPL, {"prompt": "a", "echo": True}, "echo", "not supported"),
    (COMPL, {"prompt": "a", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    (COMPL, {"prompt": "a", "stop": ["s"] * 17}, "stop", "at most 16"),
    (COMPL, {"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", "stream=true"),
    # every field's bounds
    (COMPL, {"prompt": "a", "temperature": 2.5}, "temperature", "less than or equal to 2"),
    (COMPL, {"prompt": "a", "top_p": 1.5}, "top_p", "less than or equal to 1"),
    (COMPL, {"prompt": "a", "top_k": -2}, "top_k", "greater than or equal to -1"),
    (COMPL, {"prompt": "a", "top_k": 2**63}, "top_k", "less than or equal to"),
    (COMPL, {"prompt": "a", "n": 129}, "n", "less than or equal to 128"),
    (COMPL, {"prompt": "a", "seed": 2**63}, "seed", "less than or equal to 9223372036854775807"),
    (COMPL, {"prompt": "a", "seed": -(2**63) - 1}, "seed", "greater than or equal to"),
    (COMPL, {"prompt": "a", "seed": 2**70}, "seed", "less than or equal to"),
    (COMPL, {"prompt": "a", "seed": 1.5}, "seed", "valid integer"),
    (COMPL, {"prompt": "a", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    (COMPL, {"prompt": "a", "max_tokens": -5}, "max_tokens", "greater than or equal to 1"),
    (COMPL, {"prompt": "a", "frequency_penalty": -3}, "frequency_penalty", "not supported"),
    (COMPL, {"prompt": "a", "presence_penalty": 2.0}, "presence_penalty", "not supported"),
    (COMPL, {"prompt": "a", "stop": ""}, "stop", "must not be empty"),
    (COMPL, {"prompt": "a", "stop": ["x", ""]}, "stop", "must not be empty"),
    (COMPL, {"prompt": "a", "stop": ["s"] * 5 + [3]}, "stop", "string or a list of strings"),
    (COMPL, {"prompt": "a", "stop": {"s": 1}}, "stop", "string or a list of strings"),
    (COMPL, {"prompt": "a", "stop": "\ud800"}, "stop", "lone surrogate"),
    (COMPL, {"prompt": "a", "stop_token_ids": [-1]}, "stop_token_ids[0]", "greater than or equal to 0"),
    (COMPL, {"prompt": "a", "stop_token_ids": [5, 2**64]}, "stop_token_ids[1]", "less than or equal"),
    (COMPL, {"prompt": "a", "logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    (COMPL, {"prompt": "a", "logit_bias": {str(i): 1 for i in range(5000)}}, "logit_bias", "not supported"),
    (COMPL, {"prompt": "a", "logit_bias": {"99999999": 1}}, "logit_bias", "not supported"),
    (COMPL, {"prompt": "a", "logit_bias": {"5": 500}}, "logit_bias", "not supported"),
    (COMPL, {"prompt": "a", "logit_bias": {"token": -1}}, "logit_bias", "not supported"),
    (COMPL, {"prompt": "a", "logit_bias": [1, 2]}, "logit_bias", "valid dictionary"),
    (COMPL, {"prompt": "a", "logprobs": -1}, "logprobs", "greater than or equal to 0"),
    (COMPL, {"prompt": "a", "logprobs": True}, "logprobs", "valid integer"),
    (COMPL, {"prompt": "a", "best_of": 2}, "best_of", "best_of = n"),
    (COMPL, {"prompt": [[1, 2], []]}, "prompt", "prompt 1 of the batch must not be an empty list"),
    (COMPL, {"prompt": [[1, 2], [3, [4]]]}, "prompt", "list of token ids"),
    (COMPL, {"prompt": [[[1]]]}, "prompt", "list of token ids"),
    (COMPL, {"prompt": ["a", 1]}, "prompt", "list of token ids"),
    (COMPL, {"prompt": [1.5]}, "prompt", "list of token ids"),
    (COMPL, {"prompt": "x\udc00y"}, "prompt", "character 1 is a lone surrogate"),
    (COMPL, {"prompt": ["ok", "\ud83d"]}, "prompt", "prompt 1 of the batch must be valid unicode"),
    (COMPL, {"prompt": ["a"] * 17, "n": 128}, "prompt", "more than 2048 choices"),
    (COMPL, {"prompt": "a", "model": "\ud800"}, "model", "lone surrogate"),
    (CHAT, {"max_tokens": 3}, "messages", "required"),
    (CHAT, {"messages": []}, "messages", "at least 1"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "must be one of"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content", "only text"),
    (CHAT, {"messages": MSGS, "top_logprobs": 50, "logprobs": True}, "top_logprobs", "less than or equal"),
    (CHAT, {"messages": MSGS, "top_logprobs": -1, "logprobs": True}, "top_logprobs", "greater than or equal"),
    (CHAT, {"messages": MSGS, "top_logprobs": 2}, "top_logprobs", "logprobs=true"),
    (CHAT, {"messages": MSGS, "logprobs": 3}, "logprobs", "valid boolean"),
    (CHAT, {"messages": MSGS, "max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
    (CHAT, {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content", "lone surrogate"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
     "messages[0].content", "lone surrogate"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "list of content parts"),
    (CHAT, {"messages": [{"role": "user", "content": "x", "name": "\ud800"}]}, "messages[0].name",
     "lone surrogate"),
    (CHAT, {"messages": MSGS, "seed": 2**64}, "seed", "less than or equal"),
    (CHAT, {"messages": MSGS, "logit_bias": {"1": -100}}, "logit_bias", "not supported"),
    (CHAT, {"messages": MSGS, "tools": [{"type": "function"}]}, "tools", "not supported"),
])
def test_invalid_fields(client, fake, path, body, param, contains):
    # json.dumps escapes non-ASCII: a lone surrogate goes as "\ud800", which JSON allows (and
    # UTF-8 does not: httpx's json= could not send it)
    raw = json.dumps(body).encode()
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, param=param, contains=contains)
    assert fake.calls == []


@pytest.mark.parametrize("body, check", [
    ({"prompt": "a", "seed": -1}, lambda p: p.seed == -1),  # int64, as vLLM
    ({"prompt": "a", "seed": 2**63 - 1, "n": 2}, lambda p: p.seed in (2**63 - 1, 2**63)),
    ({"prompt": "a", "stop": []}, lambda p: p.stop == ()),  # no stop strings
    ({"prompt": "a", "top_k": 2**40}, lambda p: p.top_k == 2**40),  # more than the vocabulary: off
    ({"prompt": "a", "logit_bias": {}, "presence_penalty": 0}, lambda p: True),
    ({"prompt": "a", "temperature": 2, "top_p": 1}, lambda p: (p.temperature, p.top_p) == (2, 1)),
    ({"prompt": ["a"] * 16, "n": 128, "max_tokens": 1}, lambda p: True),  # exactly 2048 choices
    ({"prompt": "😀 你好 \u00e9", "stop": ["你"]}, lambda p: p.stop == ("你",)),
])
def test_fields_at_their_bounds_are_accepted(client, fake, body, check):
    r = client.post(COMPL, json=body)
    assert r.status_code == 200, r.text
    assert fake.calls and all(check(p) for _, _, p in fake.calls)


def test_invalid_json_and_body(client):
    r = client.post(COMPL, content=b'{"prompt": "a",', headers={"content-type": "application/json"})
    assert_error(r, 400, contains="not valid JSON")
    r = client.post(COMPL, content=b"[1, 2]", headers={"content-type": "application/json"})
    assert_error(r, 400, contains="request body")
    # what json.loads itself refuses: not UTF-8, nested too deep, an integer of 5000 digits
    for raw in (b'{"prompt": "\xff\xfe"}', b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}"):
        r = client.post(COMPL, content=raw, headers={"content-type": "application/json"})
        assert_error(r, 400, contains="could not be parsed as JSON: it must be UTF-8")


def _raw_http(url: str, head: bytes, chunks=()) -> bytes:
    """Send a request's head and then `chunks` over a plain socket; the server's answer."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        for c in chunks:
            s.sendall(c)
        out = b""
        while b"\r\n\r\n" not in out or len(out.partition(b"\r\n\r\n")[2]) < 2:
            got = s.recv(65536)
            if not got:
                break
            out += got
        s.settimeout(1)
        try:
            while got := s.recv(65536):
                out += got
        except TimeoutError:
            pass
        return out


def test_oversized_bodies_get_413_before_parsing(fake):
    limit = 1000
    app = build_app(fake, MODEL, max_body_bytes=limit)
    client = TestClient(app)
    ok = {"prompt": "w" * 900, "max_tokens": 1}  # 930-odd bytes (one token to the fake)
    assert client.post(COMPL, json=ok).status_code == 200
    big = {"prompt": "w" * 1000, "max_tokens": 1}
    err = assert_error(client.post(COMPL, json=big), 413, contains="over this server's limit of 1000")
    assert err["code"] == "request_too_large"
    # not parsed: a body that is not even JSON gets the same answer
    assert_error(client.post(CHAT, content=b"x" * 2000), 413, contains="limit of 1000 bytes")
    assert len(fake.calls) == 1

    with app_in_thread(app) as url:
        # Content-Length over the limit: refused on the head alone (no body byte is sent)
        out = _raw_http(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"application/json\r\nContent-Length: 10000000000\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413"), out[:200]
        assert b'"code":"request_too_large"' in out and b"10000000000 bytes" in out
        # chunked, no Content-Length: refused once past the limit; the rest is never read
        # (the last chunk and the terminator are never sent)
        chunk = b"%x\r\n%s\r\n" % (300, b" " * 300)
        out = _raw_http(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n", [chunk] * 4)
        assert out.startswith(b"HTTP/1.1 413"), out[:200]
        assert b"chunked, cut off there" in out
        # a chunked body within the limit is served
        body = json.dumps({"prompt": "a b", "max_tokens": 2}).encode()
        out = _raw_http(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"application/json\r\nTransfer-Encoding: chunked\r\nConnection: close"
                        b"\r\n\r\n", [b"%x\r\n%s\r\n" % (len(body), body), b"0\r\n\r\n"])
        assert out.startswith(b"HTTP/1.1 200"), out[:300]
        assert b"Hello," in out
    assert len(fake.calls) == 2


def test_context_length(client, fake):
    r = client.post(COMPL, json={"prompt": " ".join(["w"] * MAX_LEN)})
    err = assert_error(r, 400, param="prompt", contains=f"maximum context length is {MAX_LEN} tokens")
    assert err["code"] == "context_length_exceeded" and "32 tokens, which leaves no room" in err["message"]
    r = client.post(COMPL, json={"prompt": " ".join(["w"] * 20), "max_tokens": 13})
    assert_error(r, 400, param="max_tokens", contains="you requested 33 tokens (20 in the prompt, 13 in the completion)")
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": " ".join(["w"] * 20)}],
                                "max_completion_tokens": 11})
    assert_error(r, 400, param="max_completion_tokens", contains="(22 in the messages, 11 in the completion)")
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "w"}], "max_tokens": 10**30})
    assert_error(r, 400, param="max_tokens", contains="maximum context length")
    r = client.post(COMPL, json={"prompt": [1, 2], "max_tokens": 2**64})
    assert_error(r, 400, param="max_tokens", contains="maximum context length")
    # exactly the context is fine; the chat default fills it
    assert client.post(COMPL, json={"prompt": " ".join(["w"] * 20), "max_tokens": 12}).status_code == 200
    assert fake.calls[-1][2].max_tokens == 12


def test_engine_refusals(client, fake):
    assert_error(client.post(COMPL, json={"prompt": [5, 500]}), 400, param="prompt",
                 contains="outside the vocabulary")
    assert_error(client.post(COMPL, json={"prompt": [5, -1]}), 400, param="prompt",
                 contains="outside the vocabulary")
    assert_error(client.post(COMPL, json={"prompt": [[5], [100]]}), 400, param="prompt",
                 contains="outside the vocabulary")
    assert_error(client.post(COMPL, json={"prompt": ""}), 400, param="prompt", contains="empty")
    assert_error(client.post(COMPL, json={"prompt": ["a", " "]}), 400, param="prompt", contains="empty")
    assert fake.calls == []
    # refused by the router: the param it names (a chat request's prompt is its messages)
    fake.raise_before = InvalidRequestError("prompt too long for the decode pool", param="prompt")
    for stream in (False, True):
        assert_error(client.post(COMPL, json={"prompt": "a", "stream": stream}), 400, param="prompt",
                     contains="decode pool")
        assert_error(client.post(CHAT, json={"messages": MSGS, "stream": stream}), 400,
                     param="messages", contains="decode pool")
    fake.raise_before = InvalidRequestError("prompt too long for the decode pool")
    for stream in (False, True):
        assert_error(client.post(COMPL, json={"prompt": "a", "stream": stream}), 400, contains="decode pool")
    fake.raise_before = ServiceUnavailable("no decode worker is registered")
    assert_error(client.post(CHAT, json={"messages": MSGS}), 503, "service_unavailable_error",
                 contains="no decode worker")


def test_overload_is_a_429_with_retry_after_counted_by_reason(client, fake):
    """Admission refusing (admission.Overloaded from the router): 429 in OpenAI's rate-limit
    shape, a Retry-After in whole seconds, counted in /metrics by reason, for every kind of
    request (streamed ones too: refused before the stream starts)."""
    from splitserve.router.admission import Overloaded, Verdict

    fake.raise_before = Overloaded(Verdict(False, "tpot", "predicted time per output token "
                                           "90 ms exceeds the SLO of 50 ms", 7))
    for path, body in ((COMPL, {"prompt": "a"}), (COMPL, {"prompt": "a", "stream": True}),
                       (CHAT, {"messages": MSGS}), (CHAT, {"messages": MSGS, "stream": True})):
        r = client.post(path, json=body)
        err = assert_error(r, 429, "rate_limit_error", contains="exceeds the SLO of 50 ms")
        assert err["code"] == "overloaded_tpot" and r.headers["retry-after"] == "7", r.headers
    fake.raise_before = Overloaded(Verdict(False, "queue", "queue is full", 1))
    assert client.post(COMPL, json={"prompt": "a"}).headers["retry-after"] == "1"
    text = client.get("/metrics").text
    assert 'splitserve_rejected_requests_total{reason="tpot"} 4.0' in text
    assert 'splitserve_rejected_requests_total{reason="queue"} 1.0' in text
    assert 'splitserve_requests_total{finish_reason="rejected"}' in text
    # the request's own SLOs reach the router
    fake.raise_before = None
    assert client.post(COMPL, json={"prompt": "a", "ttft_slo": 0.5, "tpot_slo": 0.05}).status_code == 200
    assert client.post(COMPL, json={"prompt": "a", "ttft_slo": 2, "priority": 3}).status_code == 200
    assert fake.slos[-2:] == [(0.5, 0.05, 0), (2, None, 3)]
    for bad in ({"ttft_slo": 0}, {"tpot_slo": -1.0}, {"ttft_slo": "1"}, {"tpot_slo": 1e9},
                {"priority": 1.5}, {"priority": 2**40}):
        assert_error(client.post(COMPL, json={"prompt": "a", **bad}), 400, param=next(iter(bad)))


def test_unknown_model(client, fake):
    err = assert_error(client.post(COMPL, json={"model": "gpt-4", "prompt": "a"}), 404, param="model",
                       contains="gpt-4")
    assert err["code"] == "model_not_found"
    assert_error(client.post(CHAT, json={"model": "gpt-4", "messages": MSGS}), 404, param="model")


def test_api_key(fake):
    client = TestClient(build_app(fake, MODEL, api_key="s3cret"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = client.post(COMPL, json={"prompt": "a"}, headers=headers)
        assert assert_error(r, 401, contains="API key")["code"] == "invalid_api_key"
        assert_error(client.get("/v1/models", headers=headers), 401)
    # the key is checked before the body is even parsed
    assert_error(client.post(COMPL, content=b"{", headers={"content-type": "application/json"}), 401)
    ok = {"Authorization": "Bearer s3cret"}
    assert client.post(COMPL, json={"prompt": "a"}, headers=ok).status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_not_ready(client, fake):
    fake.ready = False
    assert_error(client.post(COMPL, json={"prompt": "a"}), 503, "service_unavailable_error", contains="starting")
    assert_error(client.post(CHAT, json={"messages": MSGS, "stream": True}), 503, "service_unavailable_error")
    assert "max_model_len" not in client.get("/v1/models").json()["data"][0]
    assert fake.calls == []


def test_request_failed(client, fake):
    fake.fail_after = 2
    assert_error(client.post(COMPL, json={"prompt": "a"}), 500, "server_error", contains="d0 died")
    r = client.post(CHAT, json={"messages": MSGS, "stream": True})
    assert r.status_code == 200
    ev = sse_events(r)
    assert [c["choices"][0]["delta"].get("content") for c in ev[1:3]] == ["Hello", ","]
    assert ev[3]["error"]["type"] == "server_error" and "d0 died" in ev[3]["error"]["message"]
    assert ev[4] == "[DONE]" and len(ev) == 5
    # failing before anything was sent: a plain 500 even when streaming
    fake.fail_after = 0
    assert_error(client.post(COMPL, json={"prompt": "a", "stream": True}), 500, "server_error")
    # a worker-side abort never reaches the client as a finish_reason
    fake.fail_after, fake.finish_reason = None, "abort"
    assert_error(client.post(COMPL, json={"prompt": "a", "max_tokens": 2}), 500, "server_error")
    text = client.get("/metrics").text
    assert 'splitserve_requests_total{finish_reason="error"} 4.0' in text


def test_unknown_route(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get(COMPL), 405)


# -- client disconnects ---------------------------------------------------------------------------
async def _call_and_leave(app, path: str, body: dict, leave_when) -> list[dict]:
    """Drive the ASGI app directly: the request body, then an http.disconnect once
    `leave_when(sent messages)` is true."""
    sent: list[dict] = []
    left = asyncio.Event()
    first = True

    async def receive():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)

    async def watch():
        while not leave_when(sent):
            await asyncio.sleep(0.01)
        left.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    watcher.cancel()
    return sent


def test_disconnect_non_streaming(fake):
    fake.hang_after = 1
    app = build_app(fake, MODEL)

    async def main():
        t0 = time.monotonic()
        await _call_and_leave(app, COMPL, {"prompt": "a", "n": 2}, lambda sent: len(fake.started) == 2)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 2.0
    assert sorted(fake.aborted) == sorted(fake.started) and len(fake.aborted) == 2
    assert 'splitserve_requests_total{finish_reason="abort"} 2.0' in TestClient(app).get("/metrics").text


@pytest.mark.parametrize("conductor_state", ["waiting", "producing"])
def test_disconnect_streaming(fake, conductor_state):
    # waiting: the generator is inside an await when the client leaves; producing: it keeps
    # yielding, so it may be suspended at a yield
    if conductor_state == "waiting":
        fake.hang_after = 1
    else:
        fake.delay = 0.02
    app = build_app(fake, MODEL)

    def got_a_token(sent):
        return any(b"Hello" in m.get("body", b"") for m in sent)

    sent = asyncio.run(_call_and_leave(app, CHAT, {"messages": MSGS, "stream": True}, got_a_token))
    assert len(fake.aborted) == 1 and fake.aborted == fake.started
    assert not any(m.get("body", b"").startswith(b"data: [DONE]") for m in sent)


# -- the official client over a real socket ------------------------------------------------------
@pytest.fixture
def served(fake):
    with app_in_thread(build_app(fake, MODEL, api_key="k")) as url:
        yield url + "/v1"


def _wait_for(cond, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_disconnect_over_socket(served, fake):
    import httpx

    fake.hang_after = 1
    auth = {"Authorization": "Bearer k"}
    with httpx.Client(base_url=served, headers=auth) as http:
        body = {"messages": MSGS, "stream": True}
        with http.stream("POST", "/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if "Hello" in line:
                    break
        _wait_for(lambda: len(fake.aborted) == 1)
        with pytest.raises(httpx.ReadTimeout):
            http.post("/completions", json={"prompt": "a"}, timeout=0.5)
        _wait_for(lambda: len(fake.aborted) == 2)
    assert fake.aborted == fake.started


def test_openai_client(served):
    import openai

    client = openai.OpenAI(base_url=served, api_key="k", max_retries=0)
    out = client.completions.create(model=MODEL, prompt="a b", max_tokens=3)
    assert out.choices[0].text == "Hello, world" and out.usage.total_tokens == 5
    out = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    assert out.choices[0].message.content == "Hello," and out.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model=MODEL, messages=MSGS, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(REPLY)
    assert chunks[-1].usage.completion_tokens == 5
    stream = client.completions.create(model=MODEL, prompt="a", max_tokens=2, stream=True)
    assert "".join(c.choices[0].text for c in stream) == "Hello,"
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="a")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="a", temperature=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served, api_key="wrong", max_retries=0).models.list()

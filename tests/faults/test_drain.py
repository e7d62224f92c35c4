"""SIGTERM drains `splitserve serve` (server/drain.py), through real processes: new requests get
503 at once, the requests in flight finish (or, at --drain-timeout, fail with an error, never a
truncated 200), then serve stops its workers and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest
from serving_harness import Server, wait_for

from splitserve.server.drain import Drain

PROMPT = "Write a long story about a lighthouse keeper and the sea."


class Call(threading.Thread):
    """One /v1/completions request in a thread of its own. Streaming: `first` is set at the
    first token; `events` are the decoded SSE events (the last is "[DONE]" when it ended so)."""

    def __init__(self, url: str, max_tokens: int, stream: bool):
        super().__init__(daemon=True)
        self.url = url
        self.body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
                     "ignore_eos": True, "stream": stream}
        if stream:
            self.body["stream_options"] = {"include_usage": True}
        self.first = threading.Event()
        self.events: list = []
        self.status: int | None = None
        self.answer: dict | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with httpx.Client(timeout=300) as c:
                if not self.body["stream"]:
                    r = c.post(self.url + "/v1/completions", json=self.body)
                    self.status, self.answer = r.status_code, r.json()
                    return
                with c.stream("POST", self.url + "/v1/completions", json=self.body) as r:
                    self.status = r.status_code
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[len("data: "):]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        self.first.set()
        except BaseException as e:  # the test reports it
            self.error = e
        finally:
            self.first.set()

    def finished(self, timeout_s: float) -> Call:
        self.join(timeout_s)
        assert not self.is_alive(), f"the request was still running after {timeout_s} s"
        return self

    @property
    def text_chunks(self) -> list[dict]:
        return [e for e in self.events if isinstance(e, dict) and e.get("choices")]

    @property
    def finish_reasons(self) -> list[str]:
        return [c["finish_reason"] for e in self.text_chunks for c in e["choices"]
                if c.get("finish_reason")]


def in_flight(srv: Server) -> int:
    return sum(w["outstanding"] for w in srv.workers())


def sigterm_and_wait_draining(srv: Server, group: bool = False) -> float:
    """SIGTERM to serve, or to its whole process group (systemd's default: the workers get it
    too and must not stop under the drain)."""
    t = time.monotonic()
    if group:
        os.killpg(srv.proc.pid, signal.SIGTERM)
    else:
        srv.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(srv.url + "/health", timeout=5).json()["status"] == "draining",
               10, "draining")
    return t


def exit_code(srv: Server, timeout_s: float) -> int:
    try:
        return srv.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve did not exit within {timeout_s} s of SIGTERM")


# -- the drain's decisions (plain) -------------------------------------------------------------
def test_drain_waits_then_fails_then_exits():
    d = Drain(deadline=10.0, answer_s=2.0)
    assert d.on_tick(busy=3, now=0.0) == "wait"
    assert d.on_tick(busy=3, now=9.9) == "wait"
    assert d.on_tick(busy=3, now=10.0) == "fail"  # once
    assert d.on_tick(busy=3, now=11.0) == "wait"  # the error answers are being sent
    assert d.on_tick(busy=3, now=12.0) == "exit"  # uvicorn's shutdown cuts off what is left
    assert Drain(deadline=10.0).on_tick(busy=0, now=0.0) == "exit"
    d = Drain(deadline=10.0)
    assert d.on_tick(busy=1, now=10.5) == "fail"
    assert d.on_tick(busy=0, now=10.6) == "exit"


def test_draining_app_refuses_v1_and_says_so_in_health():
    from fastapi.testclient import TestClient

    from splitserve.server.openai_api import build_app

    class Idle:  # the conductor calls the API makes here
        def health(self):
            return {"status": "ok", "workers": []}

        def is_ready(self):
            return True

        max_model_len = 128

    app = build_app(Idle(), "m", api_key="k")
    with TestClient(app) as c:
        assert c.get("/health").json()["status"] == "ok"
        app.state.draining = True
        for r in (c.post("/v1/completions", json={"prompt": "hi"}), c.get("/v1/models")):
            assert r.status_code == 503
            assert r.json()["error"]["type"] == "service_unavailable_error"
            assert r.headers["connection"] == "close"
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "draining"


# -- through real processes --------------------------------------------------------------------
@pytest.mark.real_model
# P/D, SIGTERM to the whole process group (the workers serve started must not stop under the
# drain); the co-located drain tests below signal serve alone
@pytest.mark.parametrize("mode", [["--prefill", "1", "--decode", "1"]], ids=["pd"])
def test_sigterm_lets_requests_in_flight_finish(mode):
    srv = Server(*mode, "--drain-timeout", "300")
    try:
        whole = Call(srv.url, 150, stream=False)
        wait_for(lambda: in_flight(srv) >= 1, 30, "the non-streaming request in flight")
        streamed = Call(srv.url, 200, stream=True)
        assert streamed.first.wait(60) and streamed.error is None, streamed.error
        t_term = sigterm_and_wait_draining(srv, group="--decode" in mode)

        r = httpx.post(srv.base_url + "/completions", json={"prompt": "hi", "max_tokens": 4},
                       timeout=10)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "service_unavailable_error"
        assert "shutting down" in r.json()["error"]["message"]
        assert httpx.get(srv.base_url + "/models", timeout=10).status_code == 503
        h = httpx.get(srv.url + "/health", timeout=5)
        assert h.status_code == 503 and h.json()["status"] == "draining"

        streamed.finished(300)
        assert streamed.error is None and streamed.status == 200, streamed.error
        assert not any("error" in e for e in streamed.events if isinstance(e, dict)), streamed.events
        assert streamed.events[-1] == "[DONE]"
        assert streamed.finish_reasons == ["length"]
        assert streamed.events[-2]["usage"]["completion_tokens"] == 200

        whole.finished(60)
        assert whole.error is None and whole.status == 200, (whole.error, whole.answer)
        assert whole.answer["choices"][0]["finish_reason"] == "length"
        assert whole.answer["usage"]["completion_tokens"] == 150

        assert exit_code(srv, 60) == 0
        assert time.monotonic() - t_term < 300
    finally:
        srv.close()


@pytest.mark.real_model
def test_drain_timeout_fails_what_is_left_and_exits():
    srv = Server("--colocated", "1", "--kv-cache-gb", "0.2", "--drain-timeout", "1")
    try:
        whole = Call(srv.url, 3000, stream=False)
        wait_for(lambda: in_flight(srv) >= 1, 30, "the non-streaming request in flight")
        streamed = Call(srv.url, 3000, stream=True)
        assert streamed.first.wait(60) and streamed.error is None, streamed.error
        t_term = sigterm_and_wait_draining(srv)

        streamed.finished(60)
        assert streamed.error is None and streamed.status == 200, streamed.error
        errors = [e["error"] for e in streamed.events if isinstance(e, dict) and "error" in e]
        assert len(errors) == 1, streamed.events[-3:]
        assert errors[0]["type"] == "service_unavailable_error"
        assert "--drain-timeout" in errors[0]["message"]
        assert "length" not in streamed.finish_reasons
        assert streamed.events[-1] == "[DONE]"  # the error event, then the stream's end

        whole.finished(60)
        assert whole.error is None and whole.status == 503, (whole.error, whole.answer)
        assert "--drain-timeout" in whole.answer["error"]["message"]

        assert exit_code(srv, 60) == 0
        assert time.monotonic() - t_term < 45  # 1 s drain + answers + stopping the worker
    finally:
        srv.close()


@pytest.mark.real_model
def test_second_signal_stops_at_once():
    srv = Server("--colocated", "1", "--kv-cache-gb", "0.2", "--drain-timeout", "600")
    try:
        streamed = Call(srv.url, 3000, stream=True)
        assert streamed.first.wait(60) and streamed.error is None, streamed.error
        t_term = sigterm_and_wait_draining(srv)
        srv.proc.send_signal(signal.SIGINT)
        assert exit_code(srv, 60) == 0
        assert time.monotonic() - t_term < 60  # not the 600 s drain
        streamed.finished(30)
        assert "length" not in streamed.finish_reasons
        errors = [e["error"] for e in streamed.events if isinstance(e, dict) and "error" in e]
        assert [e["type"] for e in errors] == ["service_unavailable_error"], streamed.events[-3:]
    finally:
        srv.close()

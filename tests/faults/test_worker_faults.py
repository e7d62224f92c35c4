"""Faults inside and around the workers, through real processes (`splitserve serve` on the
embedded model): a step that raises, aborts of generations long enough that ignoring the
abort would show, and a request aborted while queued at the prefill worker.

Every case ends the same way: every worker alive, idle, with no block held and no integrity
error, and the requests that were not hit answered with the offline engine's text."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from serving_harness import Server, slow_prefill_server
from texts import PRESS, RIVER

pytestmark = pytest.mark.real_model

# marker tokens the injected faults aim at (SPLITSERVE_FAULTS, splitserve/disagg/faults.py)
POISON_PREFILL, POISON_DECODE = 48999, 49001
TEXT = PRESS[:PRESS.index("Gutenberg")]  # the first sentence's start
LONG = PRESS * 3
OTHER = RIVER * 3  # shares no block with the prompts above


def _complete(srv: Server, prompt, max_tokens: int) -> httpx.Response:
    return httpx.post(srv.base_url + "/completions", timeout=120, json={
        "model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})


def _all_idle_and_clean(srv: Server) -> list[dict]:
    ws = srv.wait_idle()
    assert all(w["alive"] and w["kv_blocks_used"] == 0 and w["integrity_errors"] == 0
               and w["running"] == 0 and w["waiting"] == 0 for w in ws), ws
    assert srv.health()["dead"] == []
    return ws


def _by_role(ws: list[dict]) -> dict[str, dict]:
    return {w["role"]: w for w in ws}


def test_a_step_that_raises_fails_its_requests_and_the_worker_serves_on(monkeypatch, offline):
    monkeypatch.setenv("SPLITSERVE_FAULTS", f"step_error:{POISON_PREFILL}@prefill,"
                                            f"step_error:{POISON_DECODE}@decode")
    ids = offline.encode(LONG)
    want = offline(ids, 12)
    srv = Server("--prefill", "1", "--decode", "1", "--local-prefill", "off")
    try:
        # raises in the prefill worker's forward, in the middle of a chunked prefill (the KV
        # already sent for its first chunks must be fenced and freed at the decode worker)
        r = _complete(srv, ids[:100] + [POISON_PREFILL] + ids[100:], 12)
        assert r.status_code == 500, r.text
        assert "a step failed on prefill-0" in r.json()["error"]["message"]
        # raises in the decode worker's first step, after the hand-over
        r = _complete(srv, ids[:40] + [POISON_DECODE], 12)
        assert r.status_code == 500, r.text
        assert "a step failed on decode-1" in r.json()["error"]["message"]
        # the same workers go on serving, to the offline engine's text (ids[:64] were cached
        # by the first request's first chunk: the rest is computed in the same chunks)
        for _ in range(2):
            r = _complete(srv, ids, 12)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want
        ws = _by_role(_all_idle_and_clean(srv))
        # one failed step each: the request left with it, the worker did not fail again
        assert ws["prefill"]["step_errors"] == 1 and ws["decode"]["step_errors"] == 1, ws
    finally:
        srv.close()


class _Stream(threading.Thread):
    """A streaming completion that reads `read` token events, then drops the connection."""

    def __init__(self, srv: Server, prompt, max_tokens: int, read: int):
        super().__init__(daemon=True)
        self.srv, self.prompt, self.max_tokens, self.read = srv, prompt, max_tokens, read
        self.got = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"model": "default", "prompt": self.prompt, "max_tokens": self.max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True}
        try:
            with httpx.Client(timeout=120) as h, \
                    h.stream("POST", self.srv.base_url + "/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        self.got += 1
                    if self.got >= self.read:
                        break
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


@pytest.fixture(scope="module")
def pd():
    """One P/D server for the tests below. Each test's prompts start with words of their own,
    so no test gets a prefix-cache hit from another's (that would move its chunk boundaries,
    and with them the bf16 numerics the offline engine is compared with)."""
    srv = slow_prefill_server("--prefill", "1", "--decode", "1", "--local-prefill", "off")
    yield srv
    srv.close()


def test_long_generations_aborted_mid_decode_stop_at_once(pd, offline):
    """4000 tokens each: a decode worker that ignored the abort would still be generating
    them minutes later (the idle wait, the step counter and the abort count would all say so)."""
    srv = pd
    before = _by_role(_all_idle_and_clean(srv))
    streams = [_Stream(srv, f"Stream {i}: " + TEXT * (1 + i), 4000, 5) for i in range(3)]
    for s in streams:
        s.start()
    for s in streams:
        s.join(120)
        assert s.error is None and s.got == 5, (s.error, s.got)
    ws = _by_role(_all_idle_and_clean(srv))
    steps = ws["decode"]["steps"]
    time.sleep(1.5)  # three more heartbeats
    assert _by_role(srv.workers())["decode"]["steps"] == steps, "the decode worker kept stepping"
    assert ws["decode"]["aborts"] - before["decode"]["aborts"] == 3, ws
    ids = offline.encode("After the aborts: " + OTHER)
    r = _complete(srv, ids, 8)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline(ids, 8)


def test_a_request_aborted_while_queued_at_the_prefill_worker_is_dropped_there(pd, offline):
    """B waits behind A's long prefill at the prefill worker and its client goes away: the
    prefill worker drops it (counted), A finishes to the offline engine's text."""
    srv = pd
    before = _by_role(_all_idle_and_clean(srv))
    a_ids = offline.encode("Queued: " + LONG * 8)  # ~700 tokens: seconds of prefill
    a_out: list = []
    a = threading.Thread(target=lambda: a_out.append(_complete(srv, a_ids, 8)), daemon=True)
    a.start()
    deadline = time.monotonic() + 60
    while _by_role(srv.workers())["prefill"]["running"] == 0:
        assert time.monotonic() < deadline, "A's prefill never started"
        time.sleep(0.05)
    payload = (b'{"model": "default", "prompt": "B: %s", "max_tokens": 4000, "ignore_eos": true}'
               % (TEXT * 2).encode())
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
        while _by_role(srv.workers())["prefill"]["waiting"] == 0:
            assert time.monotonic() < deadline, "B never queued at the prefill worker"
            time.sleep(0.05)
        assert a.is_alive(), "A finished before B was aborted: make A's prompt longer"
    a.join(120)
    assert a_out and a_out[0].status_code == 200, a_out
    assert a_out[0].json()["choices"][0]["text"] == offline(a_ids, 8)
    ws = _by_role(_all_idle_and_clean(srv))
    assert ws["prefill"]["aborts"] - before["prefill"]["aborts"] == 1, ws


def test_a_stop_string_spanning_the_hand_over_cuts_where_the_offline_engine_does(pd, offline):
    """The first token comes from the prefill worker, the next from the decode worker: a stop
    string made of the end of the one and the start of the other must still be found."""
    ids = offline.encode("Stop: " + OTHER)
    full = offline(ids, 6)
    tok = offline.tokens(ids, 2)
    first, second = offline.decode(tok[:1]), offline.decode(tok[:2])[len(offline.decode(tok[:1])):]
    assert first and second and full.startswith(first + second), (first, second)
    stop = first[-1:] + second[:1]
    srv = pd
    for stream in (False, True):
        body = {"model": "default", "prompt": ids, "max_tokens": 6, "temperature": 0,
                "stop": [stop], "stream": stream}
        if stream:
            with httpx.Client(timeout=120) as h, \
                    h.stream("POST", srv.base_url + "/completions", json=body) as r:
                import json
                evs = [json.loads(line[6:]) for line in r.iter_lines()
                       if line.startswith("data: {")]
            text = "".join(c["text"] for e in evs for c in e["choices"])
            reason = [c["finish_reason"] for e in evs for c in e["choices"]][-1]
        else:
            r = httpx.post(srv.base_url + "/completions", timeout=120, json=body)
            text, reason = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert (text, reason) == (first[:-1], "stop"), (text, reason, stop)
    _all_idle_and_clean(srv)

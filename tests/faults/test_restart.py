"""A killed worker is started again by `splitserve serve` and rejoins as a new epoch, through
real processes on the embedded model: a decode worker SIGKILLed while idle and then while a
request streams from it, a prefill worker SIGKILLed in the middle of a long prompt's KV
transfer, and a worker that dies at once on every start (restarted at growing intervals, up
to --max-restarts).

After each kill: the requests it held fail with an error within KILL_BOUND_S (never a hang),
/health says the worker is down (and being restarted) until it registers again with a new
pid and a higher epoch, then "ok"; later requests get the offline engine's greedy text (over
the restarted decode worker's new data socket and KV pool); every worker ends idle with no
block held and no integrity error."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import httpx
import pytest
from serving_harness import Server, slow_prefill_server, wait_for
from texts import GARDEN, PRESS, RIVER, SHIP

from splitserve.bench.compare import free_port, stop_server

pytestmark = pytest.mark.real_model

KILL_BOUND_S = 5.0  # a dead child is noticed at once; the rest is slack for a shared machine
BACK_BOUND_S = 180.0  # backoff 0.5 s + a worker's start (model load: ~40 s on a busy 2-core VM)


@pytest.fixture(scope="module")
def srv(real_model_path):
    s = slow_prefill_server("--prefill", "1", "--decode", "1", "--local-prefill", "off")
    try:
        yield s
    finally:
        s.close()


def _row(srv: Server, role: str) -> dict:
    return next(w for w in srv.health()["workers"] if w["role"] == role)


def _complete(srv: Server, prompt, max_tokens: int) -> httpx.Response:
    return httpx.post(srv.base_url + "/completions", timeout=120, json={
        "model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})


def _kill_and_wait_back(srv: Server, role: str, check_failed=None) -> tuple[dict, dict]:
    """SIGKILL the worker of `role` (then `check_failed(t_kill)`: its requests' errors);
    (its row before, its row once back). While it is down /health is not "ok" and names it
    restarting; once back it has a new pid and a higher epoch, and the status is "ok"."""
    before = _row(srv, role)
    wid = before["worker_id"]
    t_kill = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)
    h = wait_for(lambda: (h := srv.health())["restarting"].get(wid) and h, KILL_BOUND_S,
                  f"{wid} to be seen down")
    assert h["status"] != "ok" and wid in h["dead"], h
    assert h["restarting"][wid]["exit_code"] == -signal.SIGKILL, h
    if check_failed is not None:
        check_failed(t_kill)
    after = wait_for(lambda: (w := _row(srv, role))["alive"] and w["epoch"] > before["epoch"]
                      and w, BACK_BOUND_S, f"{wid} to register again")
    print(f"{wid} back in {time.monotonic() - t_kill:.1f} s (pid {before['pid']} -> "
          f"{after['pid']}, epoch {before['epoch']} -> {after['epoch']}, restarts "
          f"{after['restarts']})")
    assert after["pid"] != before["pid"] and after["restarts"] > before["restarts"], after
    h = wait_for(lambda: (h := srv.health())["status"] == "ok" and h, 10, "status ok")
    assert h["dead"] == [] and h["restarting"] == {}, h
    return before, after


def _all_idle_and_clean(srv: Server) -> dict[str, dict]:
    ws = srv.wait_idle()
    assert all(w["alive"] and w["kv_blocks_used"] == 0 and w["integrity_errors"] == 0
               and w["running"] == 0 and w["waiting"] == 0 for w in ws), ws
    h = srv.health()
    assert h["status"] == "ok" and h["dead"] == [] and len(h["workers"]) == 2, h
    return {w["role"]: w for w in ws}


def test_a_killed_decode_worker_comes_back_as_a_new_epoch_and_serves(srv, offline):
    first = _row(srv, "decode")
    assert first["epoch"] == 1 and first["restarts"] == 0, first

    def refused_while_down(t_kill: float) -> None:
        # the only decode worker is down (local prefill off): a 503 that says so
        r = _complete(srv, "hello", 4)
        assert r.status_code == 503, r.text
        msg = r.json()["error"]["message"]
        assert msg.startswith("No decode worker is up (decode-1 is being started again "
                              "(restart 1))"), msg

    _kill_and_wait_back(srv, "decode", refused_while_down)  # idle
    # P/D again (local prefill off): the prefill worker writes the new incarnation's pool
    ids = offline.encode(RIVER)
    r = _complete(srv, ids, 16)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline(ids, 16), r.text

    # killed while a request streams from it: that request gets an error event, soon
    events, ended = [], []

    def stream():
        body = {"model": "default", "prompt": SHIP, "max_tokens": 2000, "temperature": 0,
                "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=120) as h, \
                h.stream("POST", srv.base_url + "/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
        ended.append(time.monotonic())

    def stream_failed(t_kill: float) -> None:
        t.join(KILL_BOUND_S)
        assert not t.is_alive(), "the stream of the killed worker hangs"
        assert ended[0] - t_kill < KILL_BOUND_S, ended[0] - t_kill
        assert '"error"' in events[-2] and "died" in events[-2], events[-3:]
        assert events[-1] == "data: [DONE]", events[-3:]

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    wait_for(lambda: len(events) >= 5, 120, "the stream to be under way")
    before, after = _kill_and_wait_back(srv, "decode", stream_failed)
    assert after["epoch"] == 3 and after["restarts"] >= 2, after
    # the router unlinked the dead incarnation's shared-memory KV pool
    assert not glob.glob(f"/dev/shm/splitserve-kv-{before['pid']}-*")
    assert glob.glob(f"/dev/shm/splitserve-kv-{after['pid']}-*")

    ids = offline.encode(GARDEN)
    r = _complete(srv, ids, 16)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline(ids, 16), r.text
    _all_idle_and_clean(srv)


def test_a_prefill_worker_killed_mid_transfer_comes_back_and_the_transfer_fails_cleanly(srv, offline):
    ids = offline.encode(PRESS * 24)[:700]  # ~700 tokens: seconds of chunked prefill
    want = offline(ids, 8)
    decode = _row(srv, "decode")
    sent_before = _row(srv, "prefill")["kv_bytes_sent"]
    out: list = []
    a = threading.Thread(target=lambda: out.append((_complete(srv, ids, 8), time.monotonic())),
                         daemon=True)
    a.start()
    # mid-transfer: the decode worker holds the reservation and some chunks have gone over
    wait_for(lambda: (p := _row(srv, "prefill"))["running"] and p["kv_bytes_sent"] > sent_before
              and _row(srv, "decode")["kv_blocks_used"] > 0, 120, "the transfer to be under way")

    def request_failed(t_kill: float) -> None:
        a.join(KILL_BOUND_S)
        assert out, "the request of the killed worker hangs"
        r, t_answer = out[0]
        assert r.status_code == 500 and "died" in r.json()["error"]["message"], r.text
        assert t_answer - t_kill < KILL_BOUND_S

    before, after = _kill_and_wait_back(srv, "prefill", request_failed)
    # the decode worker freed the blocks the dead incarnation was writing (PeerGone), and the
    # new one prefills the same prompt to the offline engine's text
    r = _complete(srv, ids, 8)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text
    ws = _all_idle_and_clean(srv)
    assert ws["prefill"]["epoch"] == before["epoch"] + 1, ws
    assert (ws["decode"]["pid"], ws["decode"]["epoch"]) == (decode["pid"], decode["epoch"]), ws


def _log_time(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_a_worker_that_dies_at_once_is_restarted_at_growing_intervals_up_to_max_restarts(
        real_model_path, tmp_path, offline):
    """SPLITSERVE_FAULTS=exit_at_start@prefill: every process of the prefill worker exits at
    once. serve starts it again after 0.5, 1 and 2 s (as its log says, and the log's times
    show), then, --max-restarts 3 used up, leaves it down and serves with the decode worker
    alone (local prefill)."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, SPLITSERVE_FAULTS="exit_at_start@prefill")
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve.cli", "serve", "--port", str(port), *Server.COMMON,
             "--prefill", "1", "--decode", "1", "--max-restarts", "3", "--log-level", "info"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def given_up():
            # the log first: serve writes "not started again" after it has cleared the
            # worker's `restarting` entry, so a /health read after that line is settled (read
            # the other way round, the worker can exit between the two reads)
            if "not started again" not in log_path.read_text():
                return None
            try:
                h = httpx.get(url + "/health", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return None
            return h if h["status"] == "degraded" else None

        h = wait_for(given_up, 240, "the decode worker up and the prefill worker given up")
        assert h["dead"] == ["prefill-0"] and h["restarting"] == {}, h
        assert [w["worker_id"] for w in h["workers"]] == ["decode-1"], h
        lines = log_path.read_text().splitlines()
        exits = [(_log_time(ln), float(m[1]), int(m[2])) for ln in lines
                 if (m := re.search(r"worker prefill-0 \(pid \d+\) exited with code 3; starting "
                                    r"it again in ([\d.]+) s \(restart (\d+)\)", ln))]
        starts = [(_log_time(ln), int(m[1])) for ln in lines
                  if (m := re.search(r"started worker prefill-0 again \(pid \d+, restart (\d+)\)", ln))]
        assert [(d, n) for _, d, n in exits] == [(0.5, 1), (1.0, 2), (2.0, 3)], exits
        assert [n for _, n in starts] == [1, 2, 3], starts
        for (t_exit, delay, _), (t_start, _) in zip(exits, starts):
            assert delay - 0.05 <= t_start - t_exit < delay + 2.0, (t_exit, t_start, delay)
        print("restart waits", [round(s[0] - e[0], 2) for e, s in zip(exits, starts)])
        assert sum("injected exit at start" in ln for ln in lines) == 4  # the first + 3
        assert any("worker prefill-0 (pid" in ln and "not started again (restarted 3 times, "
                   "--max-restarts 3)" in ln for ln in lines), lines[-20:]
        time.sleep(1.5)
        assert "injected exit at start" not in "\n".join(log_path.read_text().splitlines()[len(lines):])
        ids = offline.encode(RIVER)
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": "default", "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline(ids, 8), r.text
        # prefilled by the decode worker itself: no prefill worker is left (its count comes
        # with its next heartbeat: a fast machine answers before that)
        def counted():
            row = httpx.get(url + "/health", timeout=5).json()["workers"][0]
            return row if row["local_prefills"] else None

        row = wait_for(counted, 10, "the decode worker's local prefill in /health")
        assert row["role"] == "decode" and row["local_prefills"] == 1, row
    finally:
        stop_server(proc)

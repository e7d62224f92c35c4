"""The router restarts while its workers live: `splitserve serve --prefill 0 --decode 0` runs the
router alone, and a prefill and a decode worker (`splitserve worker --router HOST:PORT`, their
own processes, as on other hosts) join it. The router is SIGKILLed twice while the decode
worker is in the middle of a long generation (ignore_eos, far more tokens than the test
waits for):

1. down for longer than its dead-worker timeout: the workers hear nothing, abort what they
   hold (nobody is left to want it) and keep asking to register; the router started again
   takes them back;
2. started again at once, within the timeout: its answer to their heartbeats (Rejoin: it has
   no registration for them) makes them abort and register again.

(First, a third worker whose KV dtype differs from the deployment's is refused, naming it.)
Each time the new router sees both workers idle, with no block held, having rejoined once
more, and a request then gets the offline engine's greedy text. A worker that ignored the
loss would still be decoding the orphan (running 1, blocks held) for minutes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serving_harness import Server, wait_for
from texts import GARDEN, SHIP

from splitserve.bench.compare import free_port

pytestmark = pytest.mark.real_model

HEARTBEAT_TIMEOUT_S = 6.0  # the router's --heartbeat-timeout (the workers' lease is half)
BACK_BOUND_S = 30.0  # a worker registers again within this of the new router's start


class _Router:
    def __init__(self, port: int, router_port: int, log_path):
        self.url = f"http://127.0.0.1:{port}"
        with open(log_path, "a") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "splitserve.cli", "serve", "--port", str(port),
                 "--router-bind", f"tcp://127.0.0.1:{router_port}", "--prefill", "0",
                 "--decode", "0", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S),
                 "--local-prefill", "off", "--log-level", "info"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True)

    def health(self) -> dict | None:
        try:
            return httpx.get(self.url + "/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _worker(role: str, router_port: int, log_path) -> subprocess.Popen:
    with open(log_path, "w") as logf:
        return subprocess.Popen(
            [sys.executable, "-m", "splitserve.cli", "worker", "--role", role,
             "--router", f"127.0.0.1:{router_port}", "--worker-id", f"{role}-x",
             *Server.COMMON], stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True)


def _rows_after(router: _Router, rejoins: int):
    """Both workers registered with `router`, idle, no block held, rejoined `rejoins` times."""
    h = router.health()
    if h is None or h["status"] != "ok":
        return None
    rows = {w["role"]: w for w in h["workers"] if w["alive"]}
    if set(rows) != {"prefill", "decode"}:
        return None
    if any(w["running"] or w["waiting"] or w["kv_blocks_used"] or w["rejoins"] != rejoins
           for w in rows.values()):
        return None
    return rows


def _decoding(router: _Router, prompt: str) -> threading.Thread:
    """A long generation streaming in a thread, once the decode worker is running it."""
    def stream():
        try:
            with httpx.stream("POST", router.url + "/v1/completions", timeout=600, json={
                    "model": "default", "prompt": prompt, "max_tokens": 4000,
                    "temperature": 0, "ignore_eos": True, "stream": True}) as r:
                for _ in r.iter_lines():
                    pass
        except httpx.HTTPError:
            pass  # the router is killed under it

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    wait_for(lambda: (h := router.health()) and any(
        w["role"] == "decode" and w["running"] == 1 and w["kv_blocks_used"] > 0
        for w in h["workers"]), 60, "the decode worker to be decoding")
    time.sleep(1.0)  # some tokens out
    return t


def test_workers_abort_their_orphans_and_register_again_when_the_router_restarts(
        real_model_path, tmp_path, offline):
    port, router_port = free_port(), free_port()
    router_log = tmp_path / "router.log"
    router = _Router(port, router_port, router_log)
    logs = {role: tmp_path / f"{role}.log" for role in ("prefill", "decode")}
    workers = {role: _worker(role, router_port, logs[role]) for role in logs}
    try:
        wait_for(lambda: _rows_after(router, 0), 180, "both workers to register")
        # a worker that does not match the deployment is refused, by name of what differs
        bad = subprocess.run(
            [sys.executable, "-m", "splitserve.cli", "worker", "--role", "decode", "--router",
             f"127.0.0.1:{router_port}", "--worker-id", "fp32", "--dtype", "float32",
             *Server.COMMON], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "refused" in bad.stderr and "dtype" in bad.stderr, bad.stderr
        assert _rows_after(router, 0) is not None
        ids = offline.encode(SHIP + " and then")
        want = offline(ids, 8)
        # phase 2 asks another prompt (its first block differs): the same one again would hit
        # the prefill worker's cache, and in bf16 a hit can flip a near-tie the offline
        # engine (no cache) does not (on an AMX CPU this one does)
        ids2 = offline.encode("Then: " + SHIP + " and then")
        want2 = offline(ids2, 8)

        # 1. down past the dead-worker timeout: the workers give it up by themselves
        _decoding(router, GARDEN)
        router.kill()
        for role, path in logs.items():
            wait_for(lambda p=path: "no answer from the router" in p.read_text()
                      and "aborted the" in p.read_text(), 4 * HEARTBEAT_TIMEOUT_S,
                      f"the {role} worker to give the router up")
        assert "aborted the 1 requests held here" in logs["decode"].read_text()
        router = _Router(port, router_port, router_log)
        rows = wait_for(lambda: _rows_after(router, 1), 60 + BACK_BOUND_S,
                         "both workers back with the new router, idle")
        assert all(w["epoch"] == 1 for w in rows.values()), rows  # the new router's first
        r = httpx.post(router.url + "/v1/completions", timeout=120, json={
            "model": "default", "prompt": ids, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text

        # 2. back within the timeout: its Rejoin tells them
        _decoding(router, GARDEN + " again")
        router.kill()
        t_kill = time.monotonic()
        router = _Router(port, router_port, router_log)
        rows = wait_for(lambda: _rows_after(router, 2), 60 + BACK_BOUND_S,
                         "both workers back with the restarted router, idle")
        assert "the router restarted" in logs["decode"].read_text()
        print(f"rejoined {time.monotonic() - t_kill:.1f} s after the kill")
        r = httpx.post(router.url + "/v1/completions", timeout=120, json={
            "model": "default", "prompt": ids2, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want2, r.text
        assert all(p.poll() is None for p in workers.values())  # the same processes all along
        time.sleep(1.5)  # their idle integrity checks ran
        assert all(w["integrity_errors"] == 0 and w["kv_blocks_used"] == 0
                   for w in _rows_after(router, 2).values())
    finally:
        router.kill()
        for p in workers.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()

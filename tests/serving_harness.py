"""Start `splitserve serve` as a real subprocess (router + worker processes) for end-to-end
tests, and read its workers' state back from /health."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time

import httpx

from splitserve.bench.compare import free_port, start_server, stop_server


class Server:
    # small pools and budgets keep several servers cheap; 64-token chunks make every longer
    # prompt a chunked prefill (and its KV a layer-by-layer, chunk-by-chunk transfer)
    COMMON = ["--threads", "1", "--kv-cache-gb", "0.05", "--max-num-batched-tokens", "64"]

    def __init__(self, *args: str, ready_timeout_s: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "splitserve.cli", "serve", "--port", str(self.port),
               *self.COMMON, *args]
        self.proc = start_server(cmd, self.port, ready_timeout_s, quiet=False)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def workers(self, role: str | None = None) -> list[dict]:
        return [w for w in self.health()["workers"] if role is None or w["role"] == role]

    def wait_idle(self, timeout_s: float = 10.0) -> list[dict]:
        """Every live worker idle with no block in use (as its next heartbeats report)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ws = [w for w in self.workers() if w["alive"]]
            idle = all(w["kv_blocks_used"] == 0 and w["running"] == 0 and w["waiting"] == 0
                       and w["outstanding"] == 0 for w in ws)
            if idle:
                time.sleep(1.2)  # two more heartbeats: still idle, and their integrity checks ran
                ws = [w for w in self.workers() if w["alive"]]
                if all(w["kv_blocks_used"] == 0 for w in ws):
                    return ws
            if time.monotonic() > deadline:
                return ws
            time.sleep(0.2)

    def close(self) -> None:
        stop_server(self.proc)


def wait_for(cond, timeout_s: float, what: str, poll_s: float = 0.1):
    """Poll cond() until it returns something true, and return that; fail the test after
    timeout_s naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(poll_s)
    return got


@contextlib.contextmanager
def app_in_thread(app):
    """An ASGI app served by uvicorn in a background thread on a free port; yields its
    http://127.0.0.1:PORT."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# A prefill worker's prompt steps each take this much longer (disagg/faults.py): the tests that
# act mid-prefill (kill, stall, abort while queued) need a prefill that lasts seconds, and a CPU
# with AMX ends a 700-token prompt in 0.6 s, before the heartbeats say it started.
SLOW_PREFILL = "slow_prefill:250@prefill"


def slow_prefill_server(*args: str):
    """A Server (serving_harness) whose prefill workers run SLOW_PREFILL."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLITSERVE_FAULTS", SLOW_PREFILL)
        return Server(*args)

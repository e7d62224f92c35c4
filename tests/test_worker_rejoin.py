"""A worker's side of losing its router, in-process: a co-located Worker on a tiny model runs in
a thread against a scripted router (a ZeroMQ ROUTER socket the test drives). Heard Rejoin, or
nothing for the router's dead-worker timeout, the worker aborts the request it is generating,
drops what the old router sent before the new Welcome, and registers again (a new nonce); a
Ping read late (it answers an older heartbeat) renews no newer lease."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from splitserve.disagg import messages as M
from splitserve.request import SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Router:
    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.addr = f"tcp://127.0.0.1:{port}"
        self.answer_heartbeats = True
        self.router_id = "router-1"

    def recv(self, want, timeout_s: float = 10.0, on_heartbeat=None):
        """The next message of type `want` from the worker (heartbeats answered meanwhile)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.sock.poll(50):
                continue
            ident, raw = self.sock.recv_multipart()
            msg = M.decode_to_router(raw)
            if isinstance(msg, M.Heartbeat):
                if on_heartbeat is not None:
                    on_heartbeat(ident, msg)
                elif self.answer_heartbeats:
                    self.send(ident, M.Ping(msg.sent))
                if want is M.Heartbeat:
                    return ident, msg
                continue
            if isinstance(msg, want):
                return ident, msg
        raise AssertionError(f"no {want.__name__} from the worker within {timeout_s} s")

    def send(self, ident: bytes, msg) -> None:
        self.sock.send_multipart([ident, M.encode(msg)])

    def welcome(self, ident: bytes, epoch: int = 1) -> None:
        self.send(ident, M.Welcome(True, lease_s=0.5, epoch=epoch, router_id=self.router_id))

    def close(self):
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def setup(tmp_path, make_tiny):
    from splitserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from splitserve.disagg.worker import Worker, WorkerConfig

    make_tiny(str(tmp_path), "llama")
    router = Router()
    cfg = WorkerConfig("colocated", router.addr, EngineConfig(
        model=str(tmp_path), dtype="float32", num_threads=1, fast_linear=False,
        cache=CacheConfig(num_blocks=64), scheduler=SchedulerConfig(max_num_batched_tokens=64)),
        worker_id="w0", register_timeout_s=2.0)
    worker = Worker(cfg)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    yield router, worker
    worker.running = False
    thread.join(10)
    router.close()


def _generating(router: Router, ident: bytes, worker, rid: str) -> None:
    params = M.Params.of(SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True))
    router.send(ident, M.Generate(rid, [5, 6, 7, 8], params))
    router.recv(M.Outputs)
    assert worker.engine.request_ids() == [rid]


def test_rejoin_aborts_what_it_holds_and_registers_anew(setup):
    router, worker = setup
    ident, reg1 = router.recv(M.Register)
    router.welcome(ident)
    _, hb = router.recv(M.Heartbeat)
    assert hb.router_id == "router-1" and hb.epoch == 1
    _generating(router, ident, worker, "a")  # ~250 tokens to go (the tiny model's context)

    # a restarted router answers the heartbeats of a worker it does not know with Rejoin
    router.send(ident + b"/hb", M.Rejoin("router-1"))
    _, reg2 = router.recv(M.Register, on_heartbeat=lambda *_: None)
    assert reg2.nonce and reg2.nonce != reg1.nonce and reg2.pid == reg1.pid
    assert worker.stats.aborts == 1, "the request it was generating was not aborted"
    assert worker.engine.request_ids() == [] and worker.stats.rejoins == 1
    assert not worker.engine.has_unfinished()
    # what the old router sent before the new Welcome is nobody's: dropped
    params = M.Params.of(SamplingParams(max_tokens=50, temperature=0.0))
    router.send(ident, M.Generate("stale", [9, 9], params))
    time.sleep(0.3)
    router.router_id = "router-2"
    router.welcome(ident, epoch=1)
    _, hb = router.recv(M.Heartbeat)
    while hb.router_id != "router-2":  # (one sent before the Welcome landed)
        _, hb = router.recv(M.Heartbeat)
    assert worker.engine.request_ids() == []
    # a Rejoin naming the router it left is stale: ignored
    router.send(ident + b"/hb", M.Rejoin("router-1"))
    time.sleep(0.3)
    assert worker.stats.rejoins == 1 and worker.registered.is_set()
    _generating(router, ident, worker, "b")  # and it serves the new router


def test_silence_past_the_timeout_aborts_and_registers_again(setup):
    router, worker = setup
    ident, reg1 = router.recv(M.Register)
    router.welcome(ident)
    router.recv(M.Heartbeat)
    router.answer_heartbeats = False
    t0 = time.monotonic()
    _, reg2 = router.recv(M.Register, timeout_s=10)
    waited = time.monotonic() - t0
    # lease 0.5 s: the router's timeout is 1 s; a heartbeat (0.5 s) of margin on top
    assert 1.5 <= waited < 4.0, waited
    assert reg2.nonce != reg1.nonce and worker.engine.request_ids() == []
    assert not worker.lease_valid()


def test_a_ping_answering_an_older_heartbeat_renews_nothing_newer(setup):
    router, worker = setup
    ident, _ = router.recv(M.Register)
    router.welcome(ident)
    router.answer_heartbeats = False
    _, first = router.recv(M.Heartbeat)
    _, second = router.recv(M.Heartbeat)
    router.send(ident + b"/hb", M.Ping(first.sent))  # late: answers the first one
    time.sleep(0.2)
    assert worker.router_seen == pytest.approx(first.sent) and worker.router_seen < second.sent

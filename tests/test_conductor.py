"""The conductor's view of the workers it started, without any worker process: /health says
"starting" until every one of them has registered or exited (a client that waits for "ok"
then sees the whole deployment), and a child that dies before registering counts as dead."""

from __future__ import annotations

from splitserve.router.conductor import Conductor


class FakeProc:
    def __init__(self):
        self.returncode = None

    def poll(self):
        return self.returncode


def test_health_waits_for_every_started_worker_and_counts_one_that_died_unregistered():
    c = Conductor()
    try:
        procs = {wid: FakeProc() for wid in ("prefill-0", "decode-1", "decode-2")}
        for wid, p in procs.items():
            c.attach_process(wid, p)
        h = c.health()
        assert h["status"] == "starting" and sorted(h["starting"]) == sorted(procs)
        procs["decode-2"].returncode = 1
        c._reap_unregistered()
        assert c.dead == ["decode-2"]
        assert sorted(c.health()["starting"]) == ["decode-1", "prefill-0"]
        assert c.health()["status"] == "starting"
        for p in procs.values():
            p.returncode = 1
        c._reap_unregistered()
        assert c.health() | {"workers": []} == {"status": "unavailable", "starting": [], "workers": [],
                                                "dead": ["decode-2", "prefill-0", "decode-1"],
                                                "restarting": {}}
    finally:
        c.ctx.term()


def test_local_prefill_goes_where_less_work_is_ahead_of_the_prompt():
    from splitserve.router.policies import DecodeLoad, LocalPrefill

    assert LocalPrefill().pick(500, 5000, [DecodeLoad("d0", 1, 0)]) is None  # default: idle only
    p = LocalPrefill(busy_slowdown=2.0, max_decoding=2)
    idle, decoding, full = DecodeLoad("d1", 0, 0), DecodeLoad("d0", 1, 0), DecodeLoad("d2", 3, 0)
    assert p.pick(500, 0, [idle, decoding]) is None  # nothing queued at prefill: pure P/D
    assert p.pick(500, 700, [full]) is None  # too many decoding there: leave their TPOT alone
    assert p.pick(500, 700, [full, decoding, idle]) == "d1"  # the idle one first
    assert p.pick(500, 400, [decoding]) is None  # 2 x 500 > 400 + 500: the prefill worker
    assert p.pick(500, 600, [decoding]) == "d0"  # 2 x 500 < 600 + 500
    busy_own = DecodeLoad("d1", 0, 800)  # idle but already prefilling 800 tokens of its own
    assert p.pick(500, 700, [busy_own]) is None and p.pick(500, 900, [busy_own]) == "d1"


def test_router_loads_follow_requests_through_every_path():
    """The loads LocalPrefill weighs are counters kept as requests move; after every event of
    a random mix of local, P/D, finished, failed and aborted requests, and of workers that die
    and re-register under their ids, they must equal what the requests in flight add up to
    (check_loads recomputes them)."""
    import random

    from splitserve.router.policies import LocalPrefill
    from splitserve.router.state import RouterState

    rng = random.Random(0)
    s = RouterState(LocalPrefill(max_decoding=1))
    for wid, role in (("p0", "prefill"), ("d0", "decode"), ("d1", "decode")):
        s.add_worker(wid, role, 100, 0.0)
    live, kinds = [], set()
    for i in range(400):
        op = rng.random()
        if op < 0.4 or not live:
            t = s.route(f"r{i}", rng.randrange(1, 900), 0.0)
            kinds.add("local" if t.worker else "pd")
            live.append(t.request_id)
        else:
            rid = rng.choice(live)
            t = s.tracks[rid]
            leg = t.worker or t.decode
            if op < 0.7:
                if t.decode and not t.admitted and s.on_reserved(rid, t.decode, 0.0):
                    s.prefill_sent(rid, True)
                s.on_output(rid, leg, handover=t.decode is not None)
            elif op < 0.95:  # finished, failed or aborted: the same end for the router's books
                s.finish(rid)
                live.remove(rid)
            else:  # a worker dies and comes back under its id before its requests have ended
                wid = rng.choice(["p0", "d0", "d1"])
                s.worker_died(wid)
                s.add_worker(wid, s.workers[wid].role, 100, 0.0)
                kinds.add("re-registered")
        s.check_loads()
    assert kinds == {"local", "pd", "re-registered"}
    for rid in live:
        s.finish(rid)
    s.check_loads()
    assert all((w.queued_prompt_tokens, w.prefill_tokens, w.decoding) == (0, 0, 0)
               for w in s.workers.values())


def test_a_prompt_no_worker_pool_can_hold_is_refused_and_one_some_can_goes_there():
    """The router refuses (a 400 naming the prompt) a prompt whose blocks no route's workers
    can hold, instead of sending it to wait for free blocks for ever; with pools of different
    sizes it routes a long prompt only to workers whose pool can hold it."""
    import pytest

    from splitserve.errors import InvalidRequestError
    from splitserve.router.policies import LocalPrefill
    from splitserve.router.state import RouterState

    def pd(decode_blocks, prefill_blocks=100, local=None):
        s = RouterState(local)
        s.block_size = 16
        s.add_worker("p0", "prefill", prefill_blocks, 0.0)
        for i, n in enumerate(decode_blocks):
            s.add_worker(f"d{i}", "decode", n, 0.0)
        return s

    s = pd([10])
    t = s.route("fits", 159, 0.0)  # 159 + 1 tokens: exactly 10 blocks of 16
    assert (t.prefill, t.decode) == ("p0", "d0")
    with pytest.raises(InvalidRequestError) as e:
        s.route("too-long", 160, 0.0)
    assert e.value.param == "prompt"
    assert "needs 11 KV blocks of 16 tokens" in str(e.value)
    assert "decode worker holds 10 blocks (160 tokens)" in str(e.value)
    assert "too-long" not in s.tracks and s.workers["d0"].requests == {"fits"}

    s = pd([10, 40, 10])  # only d1 can hold 300 tokens, however loaded it is
    assert {s.route(f"r{i}", 300, 0.0).decode for i in range(4)} == {"d1"}
    assert {s.route(f"s{i}", 20, 0.0).decode for i in range(6)} == {"d0", "d2"}  # less loaded

    s = pd([40], prefill_blocks=10)  # the prefill pool is the small one
    with pytest.raises(InvalidRequestError, match="prefill worker holds 10 blocks"):
        s.route("r", 300, 0.0)
    s = pd([40], prefill_blocks=10, local=LocalPrefill())  # the decode worker prefills it itself
    assert s.route("r", 300, 0.0).worker == "d0"

    s = RouterState()
    s.block_size = 16
    s.add_worker("c0", "colocated", 4, 0.0)
    with pytest.raises(InvalidRequestError, match="colocated worker holds 4 blocks"):
        s.route("r", 64, 0.0)
    s.block_size = None  # not known (the simulator's deployments): not checked
    assert s.route("r", 64, 0.0).worker == "c0"


def test_a_worker_back_under_its_id_is_a_new_epoch_and_nothing_of_its_old_life_counts():
    """Each registration of a worker id is a new incarnation (epoch 1, 2, ...) with empty
    loads; what the old incarnation says (late heartbeats, outputs, reservations, failures)
    is ignored, the new one never speaks for the old one's requests, and the aborts of those
    requests go to no incarnation of it."""
    from splitserve.router.state import AbortTo, RouterState

    s = RouterState()
    p, d = s.add_worker("p0", "prefill", 100, 0.0), s.add_worker("d0", "decode", 100, 0.0)
    assert (p.epoch, d.epoch) == (1, 1)
    s.route("a", 50, 0.0)  # P/D: p0 -> d0, admitted and decoding at d0
    assert s.on_reserved("a", "d0", 0.0, epoch=1) == "p0"
    s.prefill_sent("a", True)
    assert s.on_output("a", "d0", True, epoch=1) is not None
    s.route("b", 40, 0.0)  # Reserve sent, no answer yet
    assert s.heartbeat("d0", 7, 1.0, epoch=1) and d.kv_blocks_used == 7

    assert sorted(s.worker_died("d0")) == ["a", "b"]
    assert s.dead == ["d0"] and not s.heartbeat("d0", 3, 2.0, epoch=1)
    d2 = s.add_worker("d0", "decode", 100, 3.0)
    assert d2.epoch == 2 and d2 is s.workers["d0"] and s.dead == [] and s.epochs["d0"] == 2
    assert (d2.requests, d2.queued_prompt_tokens, d2.prefill_tokens, d2.decoding,
            d2.kv_blocks_used) == (set(), 0, 0, 0, 0)
    # late messages of the old incarnation
    assert not s.heartbeat("d0", 9, 4.0, epoch=1) and (d2.kv_blocks_used, d2.last_seen) == (0, 3.0)
    assert s.on_output("a", "d0", False, epoch=1) is None
    assert s.on_reserved("b", "d0", 4.0, epoch=1) is None
    assert s.speaker("a", "d0", epoch=1) is None
    # the new incarnation never had them
    assert s.on_output("a", "d0", False, epoch=2) is None and s.on_output("a", "d0", False) is None
    assert s.on_reserved("b", "d0", 4.0, epoch=2) is None and s.speaker("b", "d0") is None
    assert s.abort_plan("a") == [] and s.abort_plan("b") == []
    s.check_loads()
    for rid in ("a", "b"):
        s.finish(rid)
    s.check_loads()
    assert (d2.decoding, p.queued_prompt_tokens, p.requests) == (0, 0, set())
    assert s.heartbeat("d0", 2, 5.0, epoch=2) and d2.kv_blocks_used == 2

    # the prefill worker dies mid-transfer and comes back: its requests' Reserved and failures
    # are no one's to answer, and the decode worker's blocks need no fence (no writer is left)
    s.route("x", 30, 6.0)
    assert s.on_reserved("x", "d0", 6.0, epoch=2) == "p0"
    s.prefill_sent("x", True)
    assert s.abort_plan("x") == [AbortTo("p0", decode_peer="d0"), AbortTo("d0", fenced=True)]
    s.route("y", 20, 6.0)
    assert sorted(s.worker_died("p0")) == ["x", "y"]
    p2 = s.add_worker("p0", "prefill", 100, 7.0)
    assert p2.epoch == 2 and p2.queued_prompt_tokens == 0 and p2.requests == set()
    assert s.on_reserved("y", "d0", 7.0, epoch=2) is None  # not sent to the new p0
    assert s.speaker("x", "p0", epoch=1) is None and s.speaker("x", "p0", epoch=2) is None
    assert s.abort_plan("x") == [AbortTo("d0", fenced=False)]
    s.check_loads()
    for rid in ("x", "y"):
        s.finish(rid)
    t = s.route("z", 10, 8.0)  # the new incarnations serve
    assert (t.prefill, t.decode) == ("p0", "d0")
    assert s.on_reserved("z", "d0", 8.0, epoch=2) == "p0"
    assert p2.queued_prompt_tokens == 10 and p.queued_prompt_tokens == 0
    s.check_loads()


def test_a_restarted_router_tells_workers_of_its_predecessor_to_register_again():
    """Over a real socket: a heartbeat from a worker this router has no registration for, or
    one naming another router process, is answered Rejoin (naming the router it names, so a
    late answer cannot send a re-registered worker round again); a registered worker's is
    answered Ping echoing its send time (the lease runs from then); a Register repeated by the
    same attempt (same nonce) gets the same Welcome, not "a live worker already uses the id";
    a new attempt of the same live process (it gave the router up and aborted everything)
    makes that incarnation dead here too, and registers a new epoch."""
    import asyncio
    import os

    import msgspec
    import zmq

    from splitserve.disagg import messages as M

    async def run():
        c = Conductor(bind="tcp://127.0.0.1:0")
        c._tokenizer = object()  # no tokenizer needed: no request is served
        await c.start()
        ctx = zmq.Context()
        socks = {}
        for ident in ("w0", "w0/hb"):
            s = socks[ident] = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, ident.encode())
            s.setsockopt(zmq.LINGER, 0)
            s.connect(c.addr)

        async def ask(ident, msg):
            socks[ident].send(M.encode(msg))
            for _ in range(200):
                await asyncio.sleep(0.01)
                if socks[ident].poll(0):
                    return M.decode_to_worker(socks[ident].recv())
            raise AssertionError(f"no answer to {msg}")

        try:
            hb = M.Heartbeat(M.WorkerStats(), epoch=3, router_id="a-router-gone", sent=12.5)
            assert await ask("w0/hb", hb) == M.Rejoin("a-router-gone")
            spec = M.KVSpec("m", "bfloat16", 16, 2, 1, 8)
            reg = M.Register("w0", "decode", os.getpid(), "h", "m", 64, 100, spec, 10, "tcp",
                             "tcp://x:1", nonce="attempt-1")
            welcome = await ask("w0", reg)
            assert welcome.accepted and welcome.epoch == 1 and welcome.router_id == c.router_id
            assert await ask("w0", reg) == welcome  # the same attempt asking again
            other = M.Register("w0", "decode", os.getpid() + 1, "h", "m", 64, 100, spec, 10, "tcp", "tcp://x:1")
            refused = await ask("w0", other)
            assert not refused.accepted and "already uses the id" in refused.reason
            assert await ask("w0/hb", M.Heartbeat(M.WorkerStats(), 1, c.router_id, 7.25)) == M.Ping(7.25)
            # registered here, but the heartbeat names this router's predecessor
            assert await ask("w0/hb", hb) == M.Rejoin("a-router-gone")
            # a new attempt of the same process: it had given this router up
            again = await ask("w0", msgspec.structs.replace(reg, nonce="attempt-2"))
            assert again.accepted and again.epoch == 2, again
            assert c.workers["w0"].view.epoch == 2 and c.workers["w0"].alive
        finally:
            for s in socks.values():
                s.close()
            ctx.term()
            for t in c._tasks:
                t.cancel()
            c.sock.close()
            c.ctx.term()

    asyncio.run(run())

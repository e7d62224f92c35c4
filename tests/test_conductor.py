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
                                                "dead": ["decode-2", "prefill-0", "decode-1"]}
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

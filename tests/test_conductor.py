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


def test_local_prefill_picks_an_idle_decode_worker_only_when_the_prefill_worker_has_a_queue():
    from splitserve.router.policies import DecodeLoad, LocalPrefill

    p = LocalPrefill()
    idle, busy = DecodeLoad("d1", 0), DecodeLoad("d0", 2)
    assert p.pick(0, [idle, busy]) is None  # the prefill worker is free: the usual P/D path
    assert p.pick(700, [busy]) is None  # every decode worker is decoding: do not stall them
    assert p.pick(700, [busy, idle]) == "d1"
    assert LocalPrefill(min_queued_tokens=1000).pick(700, [idle]) is None

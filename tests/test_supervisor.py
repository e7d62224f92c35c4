"""serve's supervisor without any worker process: the backoff between restarts of one worker,
restarts bounded or off, the router told of the exit before the worker is started again, and a
worker the router declared dead while its process hangs on killed (so that it is restarted)."""

from __future__ import annotations

import pytest

from splitserve.server.supervisor import Backoff, Supervisor


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_process_stayed_up():
    b = Backoff()
    delays, now = [], 0.0
    for _ in range(9):
        b.on_start(now)
        now += 1.0  # each process lives a second
        delays.append(b.on_exit(now))
        now += delays[-1]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    b.on_start(now)
    assert b.on_exit(now + 60.0) == 0.5  # it had stayed up reset_after_s: a first exit again
    b.on_start(now + 60.5)
    assert b.on_exit(now + 61.0) == 1.0  # up a half second: the streak goes on
    assert b.restarts == 11


def test_restarts_bounded_or_off():
    off = Backoff(max_restarts=0)
    assert off.on_exit(1.0) is None and off.restarts == 0
    two = Backoff(max_restarts=2)
    assert [two.on_exit(t) for t in (1.0, 2.0, 3.0, 4.0)] == [0.5, 1.0, None, None]
    assert two.restarts == 2


class FakeProc:
    pids = iter(range(1000, 2000))

    def __init__(self):
        self.pid = next(self.pids)
        self.returncode = None
        self.killed = False

    def poll(self):
        return self.returncode

    def kill(self):
        self.killed = True
        self.returncode = -9


class FakeConductor:
    def __init__(self):
        self.stopping = False
        self.restarting: dict = {}
        self.attached: list = []
        self.checks: list = []
        self.dead_procs: set = set()

    def attach_process(self, wid, proc, restarts=0):
        self.attached.append((wid, proc, restarts))

    def check_workers(self):
        self.checks.append(len(self.attached))

    def declared_dead(self, wid, proc):
        return proc in self.dead_procs


@pytest.mark.parametrize("max_restarts", [None, 0])
def test_an_exited_worker_is_started_again_after_its_backoff_or_not_with_restarts_off(max_restarts):
    c = FakeConductor()
    sup = Supervisor(c, max_restarts)
    started = []
    first = sup.add("decode-1", lambda: started.append(FakeProc()) or started[-1])
    assert c.attached == [("decode-1", first, 0)]
    sup.tick(10.0)
    assert c.checks == [] and len(started) == 1  # still running: nothing to do
    first.returncode = -9
    sup.tick(10.0)
    assert c.checks == [1]  # the router hears of the exit before anything is started again
    if max_restarts == 0:
        for t in (10.5, 20.0, 100.0):
            sup.tick(t)
        assert len(started) == 1 and c.restarting == {} and sup.procs() == []
        return
    assert c.restarting == {"decode-1": {"restarts": 1, "delay_s": 0.5, "exit_code": -9}}
    sup.tick(10.4)
    assert len(started) == 1 and sup.procs() == []  # backing off
    sup.tick(10.5)
    assert len(started) == 2 and c.attached[-1] == ("decode-1", started[1], 1)
    started[1].returncode = 1  # dies at once again: twice the wait
    sup.tick(11.0)
    assert c.restarting["decode-1"]["delay_s"] == 1.0
    sup.tick(11.9)
    assert len(started) == 2
    sup.tick(12.0)
    assert len(started) == 3 and sup.procs() == [started[2]]
    c.stopping = True  # serve is stopping: an exit now is no failure
    started[2].returncode = 0
    for t in (13.0, 20.0, 100.0):
        sup.tick(t)
    assert len(started) == 3 and c.restarting["decode-1"]["restarts"] == 2


def test_a_worker_declared_dead_whose_process_hangs_on_is_killed_and_restarted():
    """A stalled worker gets HUNG_KILL_S to wake and be told to exit; then it is killed."""
    from splitserve.server.supervisor import HUNG_KILL_S

    c = FakeConductor()
    sup = Supervisor(c)
    started = []
    proc = sup.add("prefill-0", lambda: started.append(FakeProc()) or started[-1])
    c.dead_procs.add(proc)  # silent past the heartbeat timeout
    sup.tick(5.0)
    sup.tick(5.0 + HUNG_KILL_S - 0.1)
    assert not proc.killed
    sup.tick(5.0 + HUNG_KILL_S)
    assert proc.killed
    sup.tick(5.1 + HUNG_KILL_S)
    sup.tick(5.6 + HUNG_KILL_S)
    assert len(started) == 2 and c.attached[-1][2] == 1 and not started[1].killed

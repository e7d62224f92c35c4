"""serve's supervisor: the worker processes `splitserve serve` started, each started again when
its process exits while serve is not stopping (a crash, SIGKILL, the OOM killer) — the same
worker id, role, cores and flags — after a backoff that doubles while it keeps exiting.

    process exits ─► the router declares it dead (its requests fail, the other workers are
                     told: PeerGone); /health "degraded"
                  ─► wait the backoff: 0.5 s, 1 s, 2 s, ... 30 s at most (0.5 s again once a
                     process of it had stayed up 60 s)
                  ─► start it again ─► it registers: a new epoch, empty loads (router/state.py);
                     /health "ok" again once no worker is down
    --max-restarts N: at most N restarts per worker over serve's life (0: never); after that
    it stays down (logged)

A worker the router declared dead because it fell silent (hung, or stopped with SIGSTOP) is
told to exit when it wakes (its heartbeat is answered with Shutdown) and is then restarted;
one whose process is still there HUNG_KILL_S after it was declared dead is killed, so that a
worker hung for good is restarted too (it lost its lease long before: it writes no KV).
`Backoff` is the policy, plain (the time is passed in); `Supervisor` its I/O, polled every
0.1 s in serve's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("splitserve.serve")

HUNG_KILL_S = 60.0  # as long as a decode worker holds a silent writer's fenced blocks


@dataclass
class Backoff:
    """When to start one worker again after its process exited.

    on_exit(now) -> the delay before the next start, or None (restarts used up: not again);
    on_start(now) when a process of it starts. The delay doubles with each exit from
    `initial_s` up to `cap_s`, and goes back to `initial_s` once a process stayed up
    `reset_after_s` (its next exit is a first one again)."""

    initial_s: float = 0.5
    cap_s: float = 30.0
    reset_after_s: float = 60.0
    max_restarts: int | None = None  # None: no limit; 0: never restart
    restarts: int = 0  # starts after the first one, so far
    delay_s: float = 0.0  # the delay chosen at the last exit
    streak: int = 0  # exits in a row, none of whose processes stayed up reset_after_s
    started_at: float = 0.0

    def on_start(self, now: float) -> None:
        self.started_at = now

    def on_exit(self, now: float) -> float | None:
        if self.max_restarts is not None and self.restarts >= self.max_restarts:
            return None
        if now - self.started_at >= self.reset_after_s:
            self.streak = 0
        self.delay_s = min(self.cap_s, self.initial_s * 2.0 ** min(self.streak, 64))
        self.streak += 1
        self.restarts += 1
        return self.delay_s


@dataclass
class _Child:
    worker_id: str
    start: Callable[[], subprocess.Popen]  # starts a process of the worker
    backoff: Backoff
    proc: subprocess.Popen | None = None  # None: down, waiting for `due` (or given up)
    due: float | None = None  # when to start it again
    dead_since: float | None = None  # the router declared `proc` dead (silent) then


class Supervisor:
    """Starts serve's workers through `conductor` (Conductor.attach_process) and starts each
    again when it exits (see the module docstring); `conductor.restarting` shows in /health
    the workers down that it will start again."""

    def __init__(self, conductor, max_restarts: int | None = None,
                 backoff: Callable[[], Backoff] | None = None):
        self.conductor = conductor
        self.max_restarts = max_restarts
        self._backoff = backoff or (lambda: Backoff(max_restarts=max_restarts))
        self.children: dict[str, _Child] = {}

    def add(self, worker_id: str, start: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        """Start a worker now (and again whenever it exits)."""
        c = self.children[worker_id] = _Child(worker_id, start, self._backoff())
        self._start(c, time.monotonic())
        return c.proc

    def procs(self) -> list[subprocess.Popen]:
        """The workers' current processes."""
        return [c.proc for c in self.children.values() if c.proc is not None]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        for c in self.children.values():
            if self.conductor.stopping:
                return  # workers exiting now are no failure
            if c.proc is None:
                if c.due is not None and now >= c.due:
                    c.due = None
                    self._start(c, now)
                continue
            if c.proc.poll() is None:
                if not self.conductor.declared_dead(c.worker_id, c.proc):
                    continue
                if c.dead_since is None:
                    c.dead_since = now
                elif now - c.dead_since >= HUNG_KILL_S:
                    log.error("worker %s (pid %d) was declared dead %.0f s ago and has not "
                              "exited; killing it", c.worker_id, c.proc.pid, now - c.dead_since)
                    c.proc.kill()
                continue
            # the router fails the requests of this incarnation (and tells the other workers)
            # before a new one can register
            self.conductor.check_workers()
            self._exited(c, f"exited with code {c.proc.returncode}", c.proc.returncode, now)

    def _exited(self, c: _Child, why: str, code: int | None, now: float) -> None:
        pid = c.proc.pid if c.proc is not None else None
        c.proc = None
        delay = c.backoff.on_exit(now)
        if delay is None:
            self.conductor.restarting.pop(c.worker_id, None)
            limit = ("restarts are off" if not self.max_restarts else
                     f"restarted {c.backoff.restarts} times, --max-restarts {self.max_restarts}")
            log.error("worker %s (pid %s) %s; not started again (%s)", c.worker_id, pid, why, limit)
            return
        c.due = now + delay
        self.conductor.restarting[c.worker_id] = {"restarts": c.backoff.restarts,
                                                  "delay_s": delay, "exit_code": code}
        log.warning("worker %s (pid %s) %s; starting it again in %.1f s (restart %d)",
                    c.worker_id, pid, why, delay, c.backoff.restarts)

    def _start(self, c: _Child, now: float) -> None:
        c.backoff.on_start(now)
        c.dead_since = None
        try:
            c.proc = c.start()
        except OSError as e:  # no process: the same as one that exited at once
            c.proc = None
            if c.backoff.restarts == 0:  # serve's first start of it: serve fails
                raise
            self._exited(c, f"could not be started ({e})", None, now)
            return
        self.conductor.attach_process(c.worker_id, c.proc, c.backoff.restarts)
        if c.backoff.restarts:
            log.warning("started worker %s again (pid %d, restart %d)", c.worker_id, c.proc.pid,
                        c.backoff.restarts)

"""`splitserve serve`'s signals: SIGTERM drains, SIGINT stops.

    SIGTERM ─► draining: /v1/* answers 503, /health says "draining"; requests in flight go on
            ─► none left ─────────────────────────────────────► uvicorn's shutdown ─► workers
            ─► --drain-timeout passed: those left fail (503) ─► (2 s to send that)  stopped, exit 0
    SIGINT: uvicorn's shutdown (requests in flight get its 2 s, then are cut off), workers
    stopped, exit 0
    a second SIGTERM / SIGINT (while draining, say): the requests in flight fail at once (their
    clients get an error), workers stopped, exit 0

uvicorn re-raises the signals it handled once serve() returns (for a program embedding it); here
that would kill the process (SIGTERM's default action) or cancel run_deployment's cleanup (SIGINT:
asyncio.run cancels the main task) before the workers have stopped, so neither is re-raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass

import uvicorn

log = logging.getLogger("splitserve.serve")


@dataclass
class Drain:
    """When a drain that began at SIGTERM ends (plain: the time is passed in).

    on_tick(busy, now), every 0.1 s, with `busy` the HTTP requests still being answered:
        "exit" once none is left, or `answer_s` after the deadline's "fail";
        "fail" once, at the deadline: fail the requests left (their clients get an error);
        "wait" otherwise."""

    deadline: float
    answer_s: float = 2.0  # for the failed requests' error answers to be sent
    failed_at: float | None = None

    def on_tick(self, busy: int, now: float) -> str:
        if busy == 0:
            return "exit"
        if self.failed_at is None:
            if now < self.deadline:
                return "wait"
            self.failed_at = now
            return "fail"
        return "exit" if now >= self.failed_at + self.answer_s else "wait"


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM drains the requests in flight (see the module docstring).
    The app must have `state.draining` (openai_api.build_app); `conductor.fail_all(message)`
    fails what is left at the deadline."""

    def __init__(self, config: uvicorn.Config, conductor, drain_timeout_s: float):
        super().__init__(config)
        self.conductor = conductor
        self.drain_timeout_s = drain_timeout_s
        self.drain: Drain | None = None
        self._announced = False

    def handle_exit(self, sig: int, frame) -> None:
        # A signal.signal handler: it runs in the main thread between two bytecodes, perhaps
        # inside the event loop's own code, so it only sets flags; on_tick acts on them.
        if sig == signal.SIGTERM and self.drain is None and not self.should_exit:
            self.config.app.state.draining = True
            self.drain = Drain(time.monotonic() + self.drain_timeout_s)
            return
        if self.drain is not None or self.should_exit:
            self.force_exit = True  # the second signal: stop waiting for anything
        self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        if self.force_exit:
            # before uvicorn's shutdown: from Python 3.12.1 its wait_closed() waits for the open
            # connections, so streams must get their error event first or be cut off bare
            self.conductor.fail_all("The server was stopped before this request finished. "
                                    "Retry it on another replica.")
        await super().shutdown(sockets)
        if not self.force_exit:
            return
        # Forced, uvicorn neither waited for the requests still running nor cancelled them, nor
        # shut the app's lifespan down: asyncio.run would cancel them all at its end, once the
        # conductor can no longer tell the workers. Fail them now (their clients get an error),
        # cancel any that hang on, and end the lifespan (the app has no shutdown hooks to wait).
        tasks = {t for t in self.server_state.tasks if not t.done()}
        if tasks:
            self.conductor.fail_all("The server was stopped before this request finished. Retry "
                                    "it on another replica.")
            _, hung = await asyncio.wait(tasks, timeout=1.0)
            for t in hung:
                t.cancel()
            if hung:
                await asyncio.wait(hung, timeout=1.0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.lifespan.shutdown(), timeout=1.0)

    async def on_tick(self, counter: int) -> bool:
        if self.drain is not None and not self.should_exit:
            self._drain_tick(time.monotonic())
        return await super().on_tick(counter)

    def _drain_tick(self, now: float) -> None:
        busy = len(self.server_state.tasks)  # one per request being answered, streams included
        if not self._announced:
            self._announced = True
            log.warning("SIGTERM: draining %d request(s) in flight, for at most %g s; new "
                        "requests get 503 (a second SIGTERM or Ctrl-C stops at once)",
                        busy, self.drain_timeout_s)
        match self.drain.on_tick(busy, now):
            case "fail":
                n = self.conductor.fail_all(
                    f"The server shut down before this request finished: it was still running "
                    f"when the {self.drain_timeout_s:g} s drain timeout (--drain-timeout) ran "
                    f"out. Retry it on another replica.")
                log.warning("drain timeout (%g s): failed %d request(s) still running",
                            self.drain_timeout_s, n)
            case "exit":
                self.should_exit = True

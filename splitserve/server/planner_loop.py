"""`serve --planner auto`: the online planner (plan/online.py) in the API server's loop.

    conductor.observer ─► OnlinePlanner.on_arrival / on_finish         (every request)
    every interval:  window() ─► predict() (simulations, in a thread) ─► choose()
                     (all three at the same `now`: the window is the one predicted)
                     a switch ─► plan_flips() ─► conductor.set_role(...) one worker at a time

A flip that cannot start yet (the others could not serve while it drains) waits for the
next worker's flip to finish; what could not be done is logged and left to the next decision.
"""

from __future__ import annotations

import asyncio
import logging
import time

from splitserve.errors import SplitServeError
from splitserve.plan.online import OnlinePlanner, plan_flips

log = logging.getLogger("splitserve.planner")


class PlannerLoop:
    def __init__(self, conductor, planner: OnlinePlanner, ttft_s: float, tpot_s: float):
        self.conductor, self.planner = conductor, planner
        self.ttft_s, self.tpot_s = ttft_s, tpot_s
        self.errors = 0
        self.target: list[str] | None = None  # the roles of the last switch decided
        conductor.observer = conductor.planner = self

    @property
    def decisions(self) -> list[dict]:
        return [d.as_dict() for d in self.planner.decisions]

    # -- the conductor's observer ------------------------------------------------------------
    def on_arrival(self, now: float, prompt_len: int, max_tokens: int) -> None:
        self.planner.on_arrival(now, prompt_len, max_tokens)

    def on_finish(self, now: float, ok: bool, ttft_s: float | None, tpot_s: float | None,
                  n_out: int | None = None) -> None:
        met = ok and ttft_s is not None and ttft_s <= self.ttft_s and (
            tpot_s is None or tpot_s <= self.tpot_s)
        self.planner.on_finish(now, ttft_s, met, tpot_s, n_out)

    # -- the loop ----------------------------------------------------------------------------
    def live_roles(self) -> dict[str, str]:
        return {w.worker_id: w.role for w in self.conductor.state.live()}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.planner.interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed decision must not stop the planning
                self.errors += 1
                log.exception("planner decision failed")

    async def tick(self):
        p = self.planner
        if not self.conductor.is_ready():
            return None
        now = time.monotonic()
        roles = self.live_roles()
        arrivals = p.window(now)
        predicted = await asyncio.to_thread(p.predict, arrivals, now)
        d = p.choose(now, p.current(list(roles.values())), arrivals, predicted)
        log.log(logging.WARNING if d.target else logging.INFO, "planner: %s -> %s: %s "
                "(predicted %s; observed %s)", d.current, d.target or "stay", d.reason,
                {k: round(v, 3) for k, v in d.predicted.items()}, d.observed)
        if d.target:
            self.target = p.candidates[d.target]
            await self.apply(self.target, d.reason)
        elif d.current is None and self.target and len(roles) == len(self.target):
            # a switch left half done (a flip refused, a drain too long): carry it on
            await self.apply(self.target, "finishing the last switch")
        return d

    async def apply(self, target: list[str], reason: str) -> bool:
        """Re-role the live workers into `target`'s roles; whether all of them changed."""
        flips = plan_flips(self.live_roles(), target)
        while flips:
            for i, (wid, role) in enumerate(flips):
                try:
                    await self.conductor.set_role(wid, role, reason=f"planner: {reason}")
                except SplitServeError as e:
                    if i == len(flips) - 1 or "could not serve" not in str(e):
                        log.error("planner: %s could not become %s: %s", wid, role, e)
                        return False
                    continue  # another worker first
                del flips[i]
                break
        return True

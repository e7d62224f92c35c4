"""The virtual clock: a heap of (time, sequence, callback). Events at the same time run in the
order they were scheduled, so a run is a deterministic function of its inputs."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class EventLoop:
    def __init__(self):
        self.now = 0.0
        self._heap: list = []
        self._seq = itertools.count()
        self.events = 0  # callbacks run so far

    def at(self, t: float, fn: Callable, *args) -> None:
        """Run fn(*args) at virtual time t (not before now)."""
        heapq.heappush(self._heap, (t if t > self.now else self.now, next(self._seq), fn, args))

    def after(self, dt: float, fn: Callable, *args) -> None:
        self.at(self.now + dt, fn, *args)

    def run(self, until: float = float("inf")) -> None:
        heap, pop = self._heap, heapq.heappop
        while heap and heap[0][0] <= until:
            t, _, fn, args = pop(heap)
            self.now = t
            self.events += 1
            fn(*args)

    @property
    def pending(self) -> int:
        return len(self._heap)

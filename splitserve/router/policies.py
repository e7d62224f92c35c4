"""Which worker gets a request. Plain Python over plain data (no sockets, no clock): the
simulator will call these same functions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    outstanding: int  # requests the router has sent it that are not finished
    kv_free_blocks: int  # from its last heartbeat


class LeastLoaded:
    """Fewest outstanding requests; ties go round-robin so equal workers share the load."""

    def __init__(self):
        self._turn = 0

    def pick(self, workers: list[WorkerLoad]) -> str | None:
        if not workers:
            return None
        least = min(w.outstanding for w in workers)
        tied = sorted(w.worker_id for w in workers if w.outstanding == least)
        self._turn += 1
        return tied[self._turn % len(tied)]

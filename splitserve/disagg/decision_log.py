"""Decision logs: with SPLITSERVE_DECISION_LOG=DIR, every worker writes its engine core's
step-by-step decisions (EngineCore.trace: chunks, preemptions, reservations, admissions) to
DIR/<worker id>.jsonl when it stops, and the router its routing choices (RouterState.routes) to
DIR/router.jsonl — what the simulator's decision logs are compared against (a debugging aid
too: why did this request wait?)."""

from __future__ import annotations

import json
import os

from splitserve.engine.core import StepRecord

ENV = "SPLITSERVE_DECISION_LOG"


def directory() -> str | None:
    return os.environ.get(ENV) or None


def as_json(entry) -> list:
    """A trace entry as plain lists: ["step", chunks, preempted, finished] or the role
    operation's tuple ("add", id), ("reserve", id, blocks), ... ; a route (id, kind, workers)."""
    if isinstance(entry, StepRecord):
        return ["step", [list(c) for c in entry.chunks], list(entry.preempted),
                list(entry.finished)]
    return [list(x) if isinstance(x, tuple) else x for x in entry]


def write(name: str, entries: list) -> None:
    d = directory()
    if d is None or entries is None:
        return
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{name}.jsonl"), "w") as f:
        for e in entries:
            f.write(json.dumps(as_json(e)) + "\n")

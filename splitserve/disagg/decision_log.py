"""Decision logs: with SPLITSERVE_DECISION_LOG=DIR, every worker writes its engine core's
step-by-step decisions (EngineCore.trace: chunks, preemptions, reservations, admissions) to
DIR/<worker id>.jsonl as it goes (created when it starts, appended every half second and when
it stops, so a worker that was killed or crashed leaves its log up to then), and the router its routing choices (RouterState.routes)
to DIR/router.jsonl. The real shells add when things happened, on the monotonic clock every
process of a host shares: ["time", start, seconds] after each step, ["at", request, t] when a
decode worker admitted a hand-over, and a route's fourth field (its time at the router) — what the simulator's decision logs are compared against (a debugging aid
too: why did this request wait?)."""

from __future__ import annotations

import json
import os

from splitserve.engine.core import StepRecord

ENV = "SPLITSERVE_DECISION_LOG"


def directory() -> str | None:
    return os.environ.get(ENV) or None


TIMINGS = ("time", "at")


def decisions(entries: list) -> list:
    """The decisions alone, without the timings (a route keeps its first three fields)."""
    out = []
    for e in entries:
        if isinstance(e, list | tuple):
            if e[0] in TIMINGS:
                continue
            if len(e) == 4 and e[1] in ("whole", "local", "pd"):
                e = e[:3]
        out.append(e)
    return out


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


class Appender:
    """A worker's log file: created (empty) at once, then `flush(entries)` appends the entries
    and empties the list, so a long-running worker's trace does not grow in memory. A log
    already there (a restarted worker's earlier life) is kept as <name>.<k>.jsonl."""

    def __init__(self, name: str):
        d = directory()
        self.path = None if d is None else os.path.join(d, f"{name}.jsonl")
        if self.path is not None:
            os.makedirs(d, exist_ok=True)
            if os.path.exists(self.path):
                k = 1
                while os.path.exists(os.path.join(d, f"{name}.{k}.jsonl")):
                    k += 1
                os.replace(self.path, os.path.join(d, f"{name}.{k}.jsonl"))
            open(self.path, "w").close()

    def flush(self, entries: list | None) -> None:
        if self.path is None or not entries:
            return
        with open(self.path, "a") as f:
            for e in entries:
                f.write(json.dumps(as_json(e)) + "\n")
        entries.clear()


def read_dir(d: str) -> dict[str, list]:
    """Every log in `d` by worker id ("router" too), a restarted worker's earlier lives
    (<name>.<k>.jsonl) first, in order."""
    parts: dict[str, list[tuple[float, str]]] = {}
    for f in os.listdir(d):
        if not f.endswith(".jsonl"):
            continue
        name, _, k = f[:-6].rpartition(".")
        if not (name and k.isdigit()):
            name, k = f[:-6], "inf"
        parts.setdefault(name, []).append((float(k), f))
    out = {}
    for name, files in parts.items():
        out[name] = []
        for _, f in sorted(files):
            with open(os.path.join(d, f)) as fh:
                out[name] += [json.loads(line) for line in fh if line.strip()]
    return out

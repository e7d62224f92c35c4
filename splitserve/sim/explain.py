"""Where a request's time to first token went, from decision logs with timings — the real
server's (SPLITSERVE_DECISION_LOG) or the simulator's (the same entries on its virtual clock) —
so a gap between the two is found in the phase where it opens, not guessed.

    api_in    client send -> the router routes it
    queue     route -> its first prompt step starts (P/D: the Reserve round trip, waiting for
              the decode worker's loop, then for the prefill worker's queue)
    prefill   its first prompt step's start -> the end of the step that finished its prompt
    handover  P/D: that end -> the decode worker admits it (KVDone, then waiting for the decode
              worker's current step)
    out       the step's end (or the admission) -> the first token at the client

A log's entries (decision_log.py): ["step", chunks, ...] then ["time", start, seconds] for each
step; ["at", request, t] for an admission; routes (request, kind, workers, t).
"""

from __future__ import annotations

from collections import defaultdict

PHASES = ("api_in", "queue", "prefill", "handover", "out")


def _steps(log: list) -> dict[str, list[tuple[float, float, int, int]]]:
    """Per request id: (start, end, chunk start, chunk tokens) of every step it was in."""
    out: dict[str, list] = defaultdict(list)
    pending = None
    for e in log:
        kind = e[0]
        if kind == "step":
            pending = e[1]
        elif kind == "time" and pending is not None:
            start, secs = e[1], e[2]
            for rid, first, n in pending:
                out[rid].append((start, start + secs, first, n))
            pending = None
    return out


def _admissions(log: list) -> dict[str, float]:
    return {e[1]: e[2] for e in log if e[0] == "at"}


def phases(routes: list, worker_logs: dict[str, list], records: list, t0: float) -> list[dict]:
    """Each record's phases (see the module docstring). `routes`: the router's log, in the
    order the requests came (records are matched to routes in send order); `t0`: the records'
    zero on the logs' clock. Requests that failed, or whose steps are not in the logs, are
    left out."""
    steps = {wid: _steps(log) for wid, log in worker_logs.items()}
    admitted = {}
    for log in worker_logs.values():
        admitted |= _admissions(log)
    order = sorted(range(len(records)), key=lambda i: records[i].t_sent)
    out = []
    for i, route in zip(order, routes):
        r = records[i]
        rid, kind, workers, t_route = route[0], route[1], route[2], route[3]
        if not r.ok or not r.token_times:
            continue
        prefiller = workers[0]
        mine = steps.get(prefiller, {}).get(rid)
        if not mine:
            continue
        prompt = [s for s in mine if s[2] < r.input_len]
        done = next((s for s in prompt if s[2] + s[3] >= r.input_len), None)
        if not prompt or done is None:
            continue
        sent, first = t0 + r.t_sent, t0 + r.token_times[0]
        ph = {"api_in": t_route - sent, "queue": prompt[0][0] - t_route,
              "prefill": done[1] - prompt[0][0], "handover": 0.0}
        end = done[1]
        if kind == "pd":
            at = admitted.get(rid)
            if at is None:
                continue
            ph["handover"] = at - done[1]
            end = at
        ph["out"] = first - end
        ph["ttft"] = first - sent
        out.append(ph)
    return out


def mean_phases(rows: list[dict]) -> dict:
    if not rows:
        return {}
    return {k: sum(r[k] for r in rows) / len(rows) for k in (*PHASES, "ttft")}

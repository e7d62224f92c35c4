"""`splitserve bench soak`: start `splitserve serve` (P/D by default), drive steady load from one
asyncio client for --minutes, SIGKILL a random worker every --kill-every seconds (randomised),
and check every 200 against the offline engine.

    plan ─► serve up ─► load (Poisson arrivals; mixed lengths, a share streaming, a share whose
    client hangs up at a random moment) ║ killer (GET /health's worker pids, SIGKILL one)
         ─► idle: leaked blocks, integrity errors, RSS / fds ─► serve stopped ─► oracle ─► report

Every prompt starts with 16 random token ids of its own, so no two prompts share a KV block
(no prefix-cache hit shifts a prefill's chunks). Until the server is seen to restart a killed
worker, the killer spares the last decode-capable worker, so a serve without restarts stays
able to serve (and the report says how many were restarted and how many are alive).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from dataclasses import asdict

import httpx

from splitserve.bench import experiment as E
from splitserve.bench.compare import free_port, start_server, stop_server
from splitserve.bench.oracle import divergence, forks, oracle_texts
from splitserve.bench.soak_load import Plan, Soak, make_plan, run_load, text_pool
from splitserve.server.launch import split_cores


def share(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share in [0, 1]")
    return x


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=E.positive(float), default=30.0, help="how long the load runs")
    p.add_argument("--kill-every", type=E.non_negative, default=180.0, metavar="S",
                   help="SIGKILL a random worker every S seconds on average (x0.5-1.5); 0: never")
    p.add_argument("--cv", type=E.positive(float), default=1.0,
                   help="arrival burstiness: 1 Poisson, above 1 gamma-distributed gaps (bursts)")
    p.add_argument("--rate", type=E.positive(float), default=0.5,
                   help="arrivals per second (Poisson)")
    p.add_argument("--concurrency", type=E.positive(int), default=16,
                   help="at most this many in flight")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (with --decode)")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--colocated", type=int, default=0, help="co-located workers instead of P/D")
    p.add_argument("--local-prefill", default="auto", choices=["auto", "off"])
    g = p.add_argument_group("overload: serve's admission control (docs/admission.md)")
    g.add_argument("--admission", default="off", choices=["off", "reactive", "predictive"])
    g.add_argument("--ttft-slo", type=E.positive(float), default=None)
    g.add_argument("--tpot-slo", type=E.positive(float), default=None)
    g.add_argument("--latency-model", default=None)
    g.add_argument("--max-queue", type=int, default=None, help="default: serve's")
    p.add_argument("--cores", type=E.positive(int), default=None, help="default: this process's")
    p.add_argument("--kv-cache-gb", type=E.positive(float), default=0.25)
    p.add_argument("--max-prompt", type=E.positive(int), default=320, help="prompt tokens, at most")
    p.add_argument("--max-output", type=E.positive(int), default=48, help="output tokens, at most")
    p.add_argument("--stream-share", type=share, default=0.4)
    p.add_argument("--greedy-share", type=share, default=0.8, help="the rest samples (T=0.8)")
    p.add_argument("--disconnect-share", type=share, default=0.1,
                   help="requests whose client hangs up after a random 0-3 s")
    p.add_argument("--hang-timeout", type=E.positive(float), default=120.0,
                   help="a request with no answer after this many seconds is a hang")
    p.add_argument("--oracle-procs", type=E.positive(int), default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.path.normpath(E.DATA),
                   help="HumanEval.jsonl.gz here gives the prompts' text (else random ids)")
    p.add_argument("--out", default=None, help="JSON (default bench-results/soak-<time>.json)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--recheck", default=None, metavar="JSON",
                   help="judge a soak JSON's mismatches again (its prompts rebuilt from its seed "
                        "and rate) and rewrite its counts; nothing is served")


# -- the server's side ---------------------------------------------------------------------------
def proc_stats(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return {"pid": pid, "rss_mb": round(rss / 1024, 1), "fds": fds}
    except (OSError, StopIteration):
        return {"pid": pid, "rss_mb": None, "fds": None}


def snapshot(base: str, serve_pid: int) -> dict:
    ws = httpx.get(base + "/health", timeout=10).json()["workers"]
    return {"serve": proc_stats(serve_pid),
            **{w["worker_id"]: proc_stats(w["pid"]) for w in ws if w["alive"]}}


def wait_idle(base: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        h = httpx.get(base + "/health", timeout=10).json()
        ws = [w for w in h["workers"] if w["alive"]]
        if all(w["kv_blocks_used"] == 0 and w["running"] == 0 and w["waiting"] == 0
               and w["outstanding"] == 0 for w in ws) or time.monotonic() > deadline:
            time.sleep(1.2)  # two more heartbeats: their integrity checks ran idle
            return httpx.get(base + "/health", timeout=10).json()
        time.sleep(0.5)


def serve_command(a, port: int) -> list[str]:
    n = a.colocated or a.prefill + a.decode
    groups = split_cores(n, list(range(a.cores)) if a.cores else None)
    roles = (["--colocated", str(a.colocated)] if a.colocated
             else ["--prefill", str(a.prefill), "--decode", str(a.decode)])
    return [sys.executable, "-m", "splitserve.cli", "serve", "--port", str(port), "--threads", "1",
            "--kv-cache-gb", str(a.kv_cache_gb), "--local-prefill", a.local_prefill,
            "--worker-cores", ";".join(f"{g[0]}-{g[-1]}" for g in groups), *roles,
            *_admission_flags(a)]


def _admission_flags(a) -> list[str]:
    flags = ["--admission", a.admission]
    for flag, v in (("--ttft-slo", a.ttft_slo), ("--tpot-slo", a.tpot_slo),
                    ("--latency-model", a.latency_model), ("--max-queue", a.max_queue)):
        if v is not None:
            flags += [flag, str(v)]
    return flags


# -- the report ----------------------------------------------------------------------------------
def classify(s: Soak, plans: dict[int, Plan], oracle: dict, decode) -> dict:
    """Counts over the records, with each wrong or differing greedy 200 listed."""
    c = {k: 0 for k in ("sent", "correct_200", "sampled_200", "wrong_200", "differs_chunking",
                        "rejected_429", "err_in_flight_at_kill", "err_client_disconnect",
                        "err_other", "unclean", "hangs")}
    other_by_status: dict[str, int] = {}
    mismatches = []
    for r in s.recs:
        c["sent"] += 1
        at_kill = any(r.start <= k.t <= (r.end or k.t) for k in s.kills)
        p = plans[r.key]
        if r.outcome == "hang":
            c["hangs"] += 1
        elif r.outcome == "disconnect":
            c["err_client_disconnect"] += 1
        elif r.outcome in ("error", "broken"):
            if r.outcome == "broken":
                c["unclean"] += 1
            if r.status == 429:  # admission control refused it, at once and cleanly
                c["rejected_429"] += 1
            elif at_kill:
                c["err_in_flight_at_kill"] += 1
            else:
                c["err_other"] += 1
                key = f"{r.status}: {r.error[:80]}"
                other_by_status[key] = other_by_status.get(key, 0) + 1
        elif not p.greedy:
            c["sampled_200" if r.finish == "length" else "wrong_200"] += 1
        else:
            o = oracle[r.key]
            if r.text == o["text"] and r.finish == "length":
                c["correct_200"] += 1
                continue
            step, gap = divergence(r.text, o, decode)
            mismatches.append({"key": r.key, "kind": None, "step": step, "gap": gap,
                               "finish": r.finish,
                               "stream": p.stream, "prompt_len": len(p.prompt),
                               "server": r.text, "oracle": o["text"], "at_kill": at_kill})
    c["err_other_by_status"] = other_by_status
    c["mismatches"] = mismatches
    return c


def judge(c: dict, plans: dict[int, Plan], procs: int) -> None:
    """Each mismatch a 'differs (chunking)' or 'wrong' (bench/oracle.py); the counts with it."""
    todo = [(m["key"], plans[m["key"]].prompt, plans[m["key"]].max_tokens, m["server"])
            for m in c["mismatches"] if m["finish"] == "length"]
    found = forks(todo, procs)
    c["differs_chunking"] = c["wrong_200"] = 0
    for m in c["mismatches"]:
        m["forks"] = found.get(m["key"])
        tie = m["forks"] is not None
        m["kind"] = "differs (chunking)" if tie else "wrong"
        c["differs_chunking" if tie else "wrong_200"] += 1
    ok = c["correct_200"] + c["sampled_200"] + c["differs_chunking"]
    base = (c["sent"] - c["err_in_flight_at_kill"] - c["err_client_disconnect"]
            - c.get("rejected_429", 0))
    c["success_rate_excl_kills"] = ok / base if base else None


def _served_after(base: str, n: int = 3) -> str:
    """Once the load is over: does the server serve normally? n short requests, one at a time."""
    ok = 0
    for i in range(n):
        try:
            r = httpx.post(base + "/v1/completions", timeout=120, json={
                "model": "default", "prompt": f"After the soak, request {i}:", "max_tokens": 8,
                "temperature": 0})
            ok += r.status_code == 200 and bool(r.json()["choices"][0]["text"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            pass
    return f"{ok}/{n}"


def _health_summary(probes: list) -> dict:
    ms = sorted(m for _, m in probes if m is not None)
    return {"health_probes": len(probes), "health_failures": len(probes) - len(ms),
            "health_p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1) if ms else None,
            "health_max_ms": round(ms[-1], 1) if ms else None}


def _table(rows: list[tuple[str, object]]) -> str:
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _rows(r: dict, hang_timeout: float) -> list[tuple[str, object]]:
    w, rate = r["workers"], r["success_rate_excl_kills"]
    rows = [("requests sent", r["sent"]), ("correct 200s (greedy == offline)", r["correct_200"]),
            ("200s sampled (T=0.8, not compared)", r["sampled_200"]),
            ("differs (chunking near-tie)", r["differs_chunking"]),
            ("**wrong 200s**", r["wrong_200"]),
            ("refused (429, admission control)", r.get("rejected_429", 0)),
            ("errors: in flight at a kill", r["err_in_flight_at_kill"]),
            ("errors: client disconnects", r["err_client_disconnect"]),
            ("errors: other", r["err_other"]),
            ("of the errors, unclean (no error JSON / event)", r["unclean"]),
            (f"**hangs** (no answer in {hang_timeout:g} s)", r["hangs"]),
            ("success rate excl. in flight at a kill, disconnects and 429s",
             "-" if rate is None else f"{rate:.4f}"),
            ("kills (SIGKILL)", f"{len(r['kills'])} ("
             + ", ".join(k["worker_id"] for k in r["kills"]) + ")"
             + (f"; {r['kills_skipped_no_restart']} skipped (no restart seen)"
                if r["kills_skipped_no_restart"] else "")),
            ("workers started / alive at end / restarted",
             f"{w['started']} / {w['alive_at_end']} / {w['restarted']}"),
            ("**leaked blocks** (idle)", r["leaked_blocks"]),
            ("integrity errors", r["integrity_errors"]),
            ("served normally after the load (200s)", r.get("served_after", "-")),
            ("/health probes (every 2 s): failed / p99 / max ms",
             f"{r.get('health_failures', '-')} of {r.get('health_probes', '-')} / "
             f"{r.get('health_p99_ms', '-')} / {r.get('health_max_ms', '-')}"),
            ("client CPU", f"{r['client_cpu_s']:.1f} s ({r['client_cpu_share']:.1%} of a core)")]
    start, end = r["procs_start"], r["procs_end"]
    for name in sorted(set(start) | set(end)):
        b, e = start.get(name, {}), end.get(name, {})
        rows.append((f"{name} RSS MB / fds, start -> end",
                     f"{b.get('rss_mb', '-')} / {b.get('fds', '-')} -> "
                     f"{e.get('rss_mb', '-')} / {e.get('fds', '-')}"
                     + (" (new pid)" if b and e and b["pid"] != e["pid"] else "")))
    return rows


def recheck(a, tok, pool) -> int:
    with open(a.recheck) as f:
        r = json.load(f)
    a.seed, a.rate, a.minutes = r["seed"], r["rate"], r["minutes"]
    plans = {p.key: p for p in make_plan(a, int(a.minutes * 60 * a.rate * 2) + 50, pool)}
    judge(r, plans, a.oracle_procs)
    with open(a.recheck, "w") as f:
        json.dump(r, f, indent=1, default=str)
    print(_table(_rows(r, a.hang_timeout)))
    return 1 if failed(r) else 0


def failed(r: dict) -> bool:
    return bool(r["wrong_200"] or r["hangs"] or r["leaked_blocks"] or r["integrity_errors"]
                or r["unclean"])


def main(a) -> int:
    from splitserve.model.loader import load_tokenizer

    tok = load_tokenizer("default")
    pool = text_pool(a, tok)
    if a.recheck:
        return recheck(a, tok, pool)
    plans = make_plan(a, int(a.minutes * 60 * a.rate * 2) + 50, pool)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = serve_command(a, port)
    print(" ".join(cmd), file=sys.stderr)
    proc = start_server(cmd, port)
    s = Soak()
    try:
        start = snapshot(base, proc.pid)
        s.start_pids = {v["pid"] for k, v in start.items() if k != "serve"}
        s.t0 = time.monotonic()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        asyncio.run(run_load(base, plans, a, s))
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        load_s = s.now()
        idle = wait_idle(base)
        end = snapshot(base, proc.pid)
        after = _served_after(base)
    finally:
        stop_server(proc)
    client_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    by_key = {p.key: p for p in plans}
    todo = [(r.key, by_key[r.key].prompt, by_key[r.key].max_tokens) for r in s.recs
            if r.outcome == "ok" and by_key[r.key].greedy]
    t = time.monotonic()
    oracle = oracle_texts(todo, a.oracle_procs)
    c = classify(s, by_key, oracle, lambda ids: tok.decode(ids))
    judge(c, by_key, a.oracle_procs)
    oracle_s = time.monotonic() - t
    ws = idle["workers"]
    alive = [w for w in ws if w["alive"]]
    workers = {"started": len(s.start_pids), "alive_at_end": len(alive),
               "restarted": sum(w["pid"] not in s.start_pids for w in alive),
               "dead": idle.get("dead", []), "status_at_end": idle.get("status")}
    leaked = sum(w["kv_blocks_used"] for w in alive)
    integrity = sum(w.get("integrity_errors", 0) for w in ws)
    result = {"command": " ".join(sys.argv), "serve": cmd, "minutes": a.minutes,
              "load_s": round(load_s, 1), "rate": a.rate, "seed": a.seed,
              "prompt_text": "HumanEval" if pool else "random ids",
              "kills": [asdict(k) for k in s.kills], "kills_skipped_no_restart": s.skipped_kills,
              "workers": workers, "leaked_blocks": leaked, "integrity_errors": integrity,
              "client_cpu_s": round(client_cpu, 1),
              "client_cpu_share": round(client_cpu / load_s, 4) if load_s else None,
              "oracle_s": round(oracle_s, 1), "procs_start": start, "procs_end": end,
              "served_after": after, **_health_summary(s.health), **c}
    rows = _rows(result, a.hang_timeout)
    print(f"soak: {a.minutes:g} min at {a.rate:g} req/s, {' '.join(cmd[3:])}\n\n{_table(rows)}")
    for m in sorted(c["mismatches"], key=lambda m: m["kind"] != "wrong")[:10]:
        print(f"  {m['kind']}: request {m['key']} parts at step {m['step']} (oracle's margin "
              f"{m['gap']:.3f}), forked at (step, margin) {m['forks']}",
              file=sys.stderr)
    out = a.out or time.strftime("bench-results/soak-%Y%m%d-%H%M%S.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"json: {out}", file=sys.stderr)
    return 1 if failed(result) else 0

"""The soak's client (`splitserve bench soak`): the request plan, one asyncio load loop with
Poisson arrivals under a concurrency cap, and the killer that SIGKILLs a random worker.

Each request's outcome is one of: ok (a 200 with the whole text), error (an error JSON, or an
SSE error event before `[DONE]`), broken (no error JSON or event: a dropped connection, a
stream cut short), disconnect (this client hung up on purpose), hang (no answer in time).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import httpx
import msgspec

HEADER = 16  # random ids that open every prompt: one KV block of its own

@dataclass
class Plan:
    key: int
    prompt: list[int]
    max_tokens: int
    greedy: bool
    stream: bool
    hang_up_s: float | None  # the client goes away after this long (if not answered by then)


@dataclass
class Rec:
    key: int
    start: float
    end: float = 0.0
    outcome: str = ""  # ok | error | broken | disconnect | hang
    status: int | None = None
    text: str = ""
    finish: str | None = None
    error: str = ""


@dataclass
class Kill:
    t: float
    worker_id: str
    role: str
    pid: int


@dataclass
class Soak:
    t0: float = field(default_factory=time.monotonic)
    recs: list[Rec] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    skipped_kills: int = 0
    start_pids: set = field(default_factory=set)
    restart_seen: bool = False
    health: list = field(default_factory=list)  # (time, ms to answer /health, or None: failed)

    def now(self) -> float:
        return time.monotonic() - self.t0


def text_pool(a, tokenizer) -> list[int]:
    import gzip

    path = os.path.join(a.data_dir, "HumanEval.jsonl.gz")
    if tokenizer is None or not os.path.exists(path):
        return []
    with gzip.open(path, "rt") as f:
        text = "".join(json.loads(line)["prompt"] for line in f if line.strip())
    return list(tokenizer.encode(text, add_special_tokens=False))


def make_plan(a, n: int, pool: list[int], vocab: tuple[int, int] = (100, 49152)) -> list[Plan]:
    """n requests: a unique 16-id header, then a slice of real text (or random ids); prompt
    lengths from three bands (short / medium / long), outputs 4..--max-output tokens."""
    rng = random.Random(a.seed)
    plans = []
    for key in range(n):
        band = rng.choice([(8, 48), (48, 160), (160, a.max_prompt)])
        length = rng.randint(min(band[0], a.max_prompt), max(min(band[1], a.max_prompt), 1))
        body = max(length - HEADER, 1)
        if len(pool) > body:
            at = rng.randrange(len(pool) - body)
            text = pool[at:at + body]
        else:
            text = [rng.randrange(*vocab) for _ in range(body)]
        plans.append(Plan(key, [rng.randrange(*vocab) for _ in range(HEADER)] + text,
                          rng.randint(4, max(a.max_output, 4)), rng.random() < a.greedy_share,
                          rng.random() < a.stream_share,
                          rng.uniform(0.0, 3.0) if rng.random() < a.disconnect_share else None))
    return plans


# -- the client ---------------------------------------------------------------------------------
async def _send(h: httpx.AsyncClient, url: str, p: Plan, r: Rec) -> None:
    body = {"model": "default", "prompt": p.prompt, "max_tokens": p.max_tokens,
            "ignore_eos": True, "stream": p.stream,
            "temperature": 0.0 if p.greedy else 0.8, **({} if p.greedy else {"seed": p.key})}
    if not p.stream:
        resp = await h.post(url, json=body)
        r.status = resp.status_code
        try:
            j = msgspec.json.decode(resp.content)
        except msgspec.DecodeError:
            r.outcome, r.error = "broken", resp.text[:200]
            return
        if resp.status_code == 200 and "choices" in j:
            c = j["choices"][0]
            r.outcome, r.text, r.finish = "ok", c["text"], c["finish_reason"]
        else:
            r.outcome = "error" if "error" in j else "broken"
            r.error = str(j.get("error", j))[:200]
        return
    async with h.stream("POST", url, json=body) as resp:
        r.status = resp.status_code
        if resp.status_code != 200:
            raw = await resp.aread()
            r.outcome = "error" if b'"error"' in raw else "broken"
            r.error = raw[:200].decode(errors="replace")
            return
        done = False
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            j = msgspec.json.decode(line[6:])
            if "error" in j:
                r.outcome, r.error = "error", str(j["error"])[:200]
            else:
                c = j["choices"][0]
                r.text += c.get("text") or ""
                r.finish = c.get("finish_reason") or r.finish
        if not r.outcome:
            r.outcome = "ok" if done else "broken"
        elif not done:
            r.outcome = "broken"


async def _one(h, url: str, p: Plan, s: Soak, a, sem: asyncio.Semaphore) -> None:
    async with sem:
        r = Rec(p.key, s.now())
        s.recs.append(r)
        limit = min(a.hang_timeout, p.hang_up_s) if p.hang_up_s is not None else a.hang_timeout
        try:
            await asyncio.wait_for(_send(h, url, p, r), limit)
        except TimeoutError:
            hung_up = p.hang_up_s is not None and limit < a.hang_timeout
            r.outcome = "disconnect" if hung_up else "hang"
        except httpx.HTTPError as e:
            r.outcome, r.error = "broken", f"{type(e).__name__}: {e}"[:200]
        r.end = s.now()


async def _killer(base: str, a, s: Soak, stop_at: float, rng: random.Random) -> None:
    async with httpx.AsyncClient(timeout=10) as h:
        while True:
            wait = a.kill_every * rng.uniform(0.5, 1.5)
            if s.now() + wait >= stop_at - 5:
                return
            await asyncio.sleep(wait)
            ws = (await h.get(base + "/health")).json()["workers"]
            alive = [w for w in ws if w["alive"]]
            s.restart_seen |= any(w["pid"] not in s.start_pids for w in alive)
            servers = [w for w in alive if w["role"] in ("decode", "colocated")]
            pick = [w for w in alive if s.restart_seen or len(servers) > 1
                    or w["role"] not in ("decode", "colocated")]
            if not pick:
                s.skipped_kills += 1
                continue
            w = rng.choice(pick)
            os.kill(w["pid"], signal.SIGKILL)
            s.kills.append(Kill(s.now(), w["worker_id"], w["role"], w["pid"]))
            if not a.quiet:
                print(f"[{s.now():7.1f} s] SIGKILL {w['worker_id']} (pid {w['pid']})",
                      file=sys.stderr)


async def _health_prober(base: str, s: Soak, every_s: float = 2.0) -> None:
    """GET /health every `every_s` throughout: does the server answer while it is loaded?"""
    async with httpx.AsyncClient(timeout=5.0) as h:
        while True:
            t = time.monotonic()
            try:
                ok = (await h.get(base + "/health")).status_code in (200, 503)
            except httpx.HTTPError:
                ok = False
            s.health.append((s.now(), (time.monotonic() - t) * 1e3 if ok else None))
            await asyncio.sleep(max(0.0, every_s - (time.monotonic() - t)))


def _gap(rng: random.Random, rate: float, cv: float) -> float:
    """An inter-arrival time: Poisson at cv 1, burstier (gamma) above."""
    if cv == 1.0:
        return rng.expovariate(rate)
    shape = 1.0 / (cv * cv)
    return rng.gammavariate(shape, 1.0 / (rate * shape))


async def run_load(base: str, plans: list[Plan], a, s: Soak) -> None:
    rng = random.Random(a.seed + 1)
    stop_at = a.minutes * 60
    sem = asyncio.Semaphore(a.concurrency)
    killer = (asyncio.create_task(_killer(base, a, s, stop_at, random.Random(a.seed + 2)))
              if a.kill_every > 0 else None)
    prober = asyncio.create_task(_health_prober(base, s))
    tasks, next_t, last_print = [], 0.0, 0.0
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None)) as h:
        for p in plans:
            next_t += _gap(rng, a.rate, a.cv)
            if next_t >= stop_at:
                break
            await asyncio.sleep(max(0.0, next_t - s.now()))
            tasks.append(asyncio.create_task(_one(h, base + "/v1/completions", p, s, a, sem)))
            if not a.quiet and s.now() - last_print > 60:
                last_print = s.now()
                done = [r for r in s.recs if r.outcome]
                print(f"[{s.now():7.1f} s] sent {len(tasks)}, answered {len(done)}, ok "
                      f"{sum(r.outcome == 'ok' for r in done)}", file=sys.stderr)
        await asyncio.gather(*tasks)
    prober.cancel()
    await asyncio.gather(prober, return_exceptions=True)
    if killer is not None:
        killer.cancel()
        await asyncio.gather(killer, return_exceptions=True)

"""Many streams at once against a real P/D server whose decode pool is too small for them:
reservations queue at the decode worker and decode-side preemption happens, while the
requests mix n=2, seeds, stop strings and logprobs. Every text must equal the offline
engine's; then an abort storm: a third of 48 requests cancelled at random points
while the rest run, and nothing may leak.

The servers run in float32: the bf16 kernels are not row-invariant (the same prompt twice in
one batch can decode differently: measured 18 of these 64 choices differing from the offline
engine in bf16 with a pool large enough for no preemption at all, 0 in float32), so an exact
text oracle under concurrency needs float32."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
from serving_harness import Server

from splitserve.disagg import decision_log

pytestmark = pytest.mark.real_model

WORDS = ("river valley farmer spring water field stone bridge winter harvest market village "
         "road mill orchard barley meadow shepherd lantern forge quarry ferry").split()


def _prompts(n: int, seed: int) -> list[str]:
    """Prompts that share no 16-token block (each starts with its own words), so no request
    gets a prefix-cache hit from another and the server's chunks are the offline engine's."""
    rng = random.Random(seed)
    return [f"Story {i} of {seed}: " + " ".join(rng.choice(WORDS) for _ in range(8 + i % 13))
            for i in range(n)]


def _params(i: int) -> dict:
    """Request i's sampling fields: greedy or seeded, a stop string on some, logprobs on some."""
    p = {"max_tokens": 12 + (i % 5) * 4, "n": 2}
    if i % 3:
        p.update(temperature=0.8, top_p=0.9, seed=1000 + i)
    else:
        p.update(temperature=0.0)
    if i % 4 == 1:
        p["stop"] = [" the", "."]
    if i % 2 == 0:
        p["logprobs"] = 2
    return p


def _offline_texts(prompts: list[str], params: list[dict],
                   dtype: str = "float32") -> dict[tuple[int, int], tuple]:
    """(text, finish_reason, logprob tokens) of every choice, from one offline engine with the
    servers' settings, all sequences at once (batching does not change a token: test_engine)."""
    from splitserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from splitserve.engine.engine import LLMEngine
    from splitserve.request import SamplingParams

    eng = LLMEngine(EngineConfig(num_threads=1, dtype=dtype,
                                 cache=CacheConfig(enable_prefix_caching=False),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=64)))
    ids, out = {}, {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        for c in range(p["n"]):
            sp = SamplingParams(max_tokens=p["max_tokens"], temperature=p["temperature"],
                                top_p=p.get("top_p", 1.0),
                                seed=None if "seed" not in p else p["seed"] + c,
                                stop=tuple(p.get("stop", ())), logprobs=p.get("logprobs"),
                                ignore_eos=p.get("ignore_eos", False))
            ids[eng.add_request(eng.encode(prompt), sp)] = (i, c)
            out[(i, c)] = ["", None, []]
    while eng.has_unfinished():
        for o in eng.step():
            rec = out[ids[o.request_id]]
            rec[0] += o.new_text
            rec[2] += [len(lp[1]) for lp in o.new_logprobs]
            if o.finished:
                rec[1] = o.finish_reason
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


async def _stream(client: httpx.AsyncClient, url: str, prompt: str, p: dict,
                  cancel_after: int | None = None) -> dict[int, list]:
    """Choice index -> [text, finish_reason, top-logprob counts]; `cancel_after` events, then
    the client goes away (returns what it had)."""
    body = {"model": "default", "prompt": prompt, "stream": True, **p}
    got: dict[int, list] = {}
    events = 0
    async with client.stream("POST", url + "/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            for ch in ev["choices"]:
                rec = got.setdefault(ch["index"], ["", None, []])
                rec[0] += ch["text"]
                if ch.get("logprobs"):
                    rec[2] += [len(t) for t in ch["logprobs"]["top_logprobs"]]
                if ch.get("finish_reason"):
                    rec[1] = ch["finish_reason"]
            events += 1
            if cancel_after is not None and events >= cancel_after:
                break
    return got


def _clean(srv: Server) -> None:
    ws = srv.wait_idle(30)
    assert all(w["alive"] and w["kv_blocks_used"] == 0 and w["integrity_errors"] == 0
               and w["running"] == 0 and w["waiting"] == 0 for w in ws), ws
    assert srv.health()["dead"] == []


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory):
    """A float32 P/D server whose decode pool (0.04 GB: 54 blocks of 16 tokens) is far too
    small for 64 sequences of ~30-60 tokens, logging its decisions."""
    logs = tmp_path_factory.mktemp("decisions")
    mp = pytest.MonkeyPatch()
    mp.setenv(decision_log.ENV, str(logs))
    srv = Server("--prefill", "1", "--decode", "1", "--local-prefill", "off",
                 "--kv-cache-gb", "0.04", "--dtype", "float32")
    mp.undo()
    srv.logs = logs
    yield srv
    srv.close()


def test_thirty_two_mixed_streams_on_a_small_decode_pool_match_the_offline_engine(small_pool):
    prompts = _prompts(32, seed=1)
    params = [_params(i) for i in range(32)]
    srv = small_pool
    most_waiting = 0
    async def run():
        nonlocal most_waiting
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [asyncio.create_task(_stream(client, srv.base_url, pr, p))
                     for pr, p in zip(prompts, params)]
            while not all(t.done() for t in tasks):
                h = (await client.get(srv.url + "/health")).json()
                dec = [w for w in h["workers"] if w["role"] == "decode"][0]
                most_waiting = max(most_waiting, dec["waiting"])
                await asyncio.wait(tasks, timeout=0.2)
            return [t.result() for t in tasks]

    results = asyncio.run(run())
    _clean(srv)
    assert most_waiting > 0, "reservations never queued at the decode worker: shrink its pool"
    time.sleep(0.6)  # the worker appends its log every half second
    log = [json.loads(x) for x in (srv.logs / "decode-1.jsonl").read_text().splitlines()]
    assert any(e[0] == "step" and e[2] for e in log), "no decode-side preemption happened"

    want = _offline_texts(prompts, params)
    got = {(i, c): tuple(rec) for i, res in enumerate(results) for c, rec in res.items()}
    assert sorted(got) == sorted(want)
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, f"{len(wrong)} of {len(want)} choices differ: {list(wrong.items())[:3]}"
    assert {w[1] for w in want.values()} == {"stop", "length"}


def test_an_abort_storm_leaks_nothing_and_the_rest_are_answered_right(small_pool):
    rng = random.Random(5)
    prompts = _prompts(48, seed=2)
    params = [{"max_tokens": 8 + (i % 4) * 6, "n": 1, "temperature": 0.0, "ignore_eos": True}
              for i in range(48)]
    cancel = {i: rng.randrange(0, 8) for i in rng.sample(range(48), 16)}  # 0: before any event
    srv = small_pool
    before = sum(w["aborts"] for w in srv.workers())
    async def one(client, i):
        await asyncio.sleep(rng.random() * 3)  # arrivals over three seconds
        if cancel.get(i) == 0:  # gone before the answer starts
            t = asyncio.create_task(_stream(client, srv.base_url, prompts[i], params[i]))
            await asyncio.sleep(rng.random() * 0.5)
            t.cancel()
            return None
        return await _stream(client, srv.base_url, prompts[i], params[i], cancel.get(i))

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(48)),
                                        return_exceptions=True)

    results = asyncio.run(run())
    _clean(srv)
    aborts = sum(w["aborts"] for w in srv.workers()) - before
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    done = [i for i in range(48) if i not in cancel]
    want = _offline_texts([prompts[i] for i in done], [params[i] for i in done])
    wrong = [i for k, i in enumerate(done) if (results[i][0][0], results[i][0][1]) != want[(k, 0)][:2]]
    assert not wrong, f"{len(wrong)} of {len(done)} differ"
    assert aborts > 0

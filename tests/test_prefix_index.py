"""The router's global prefix index (router/prefix_index.py) against the workers' own pools:
after random stores and evictions on many workers, delivered as KV events in batches of any
size (with snapshots, lost batches and workers that die), it answers exactly what each
worker's pool holds."""

from __future__ import annotations

import random

import pytest

from splitserve.kv.block_pool import BlockPool
from splitserve.kv.hashing import block_hashes, root_hash
from splitserve.router.prefix_index import PrefixIndex

ROOT = root_hash("m", 4)


def _prompts(rng: random.Random, n: int) -> list[list[bytes]]:
    """Chains with shared prefixes: a few system prompts, each with many continuations."""
    heads = [[rng.randrange(1000) for _ in range(4 * rng.randrange(1, 6))] for _ in range(5)]
    out = []
    for _ in range(n):
        toks = rng.choice(heads) + [rng.randrange(1000) for _ in range(4 * rng.randrange(0, 6))]
        out.append(block_hashes(toks, 4, ROOT))
    return out


def _run_prefix(pool: BlockPool, chain: list[bytes]) -> int:
    k = 0
    for h in chain:
        if pool.lookup(h) is None:
            break
        k += 1
    return k


def test_the_index_answers_what_every_pool_holds_under_churn():
    rng = random.Random(0)
    pools = {f"w{i}": BlockPool(rng.choice([8, 16, 40])) for i in range(6)}
    index, seq = PrefixIndex(), {}
    for wid, pool in pools.items():
        pool.events = []
        index.snapshot(wid, pool.cached_hashes())
        seq[wid] = 1
    prompts = _prompts(rng, 60)
    kinds = set()

    def deliver(wid: str, everything: bool = False):
        pool = pools[wid]
        n = len(pool.events) if everything else rng.randrange(len(pool.events) + 1)
        batch, pool.events[:] = pool.events[:n], pool.events[n:]
        assert index.apply(wid, seq[wid], batch)
        seq[wid] += 1

    for step in range(3000):
        wid = rng.choice(list(pools))
        pool = pools[wid]
        op = rng.random()
        if op < 0.6:  # a request: its prompt's blocks (hits taken, the rest computed), then freed
            chain = rng.choice(prompts)
            hit = _run_prefix(pool, chain)
            blocks = [pool.lookup(h) for h in chain[:hit]]
            pool.touch(blocks)
            need = len(chain) - hit
            if need > pool.num_free_blocks:
                pool.free(blocks)
                continue
            new = pool.allocate(need)
            for b, h in zip(new, chain[hit:]):
                pool.cache(b, h)
            pool.free(reversed(blocks + new))  # the tail first: evicted first
            kinds.add("request")
        elif op < 0.9:
            deliver(wid)
        elif op < 0.92:  # the cache dropped (reset, or a role change turning caching off)
            pool.reset_prefix_cache()
            kinds.add("reset")
        elif op < 0.95:  # reconnect: a snapshot replaces whatever the index had of it
            pool.events.clear()
            index.snapshot(wid, pool.cached_hashes())
            seq[wid] = 1
            kinds.add("snapshot")
        elif op < 0.97:  # a batch lost on the way: the index drops the worker, then resyncs
            assert not index.apply(wid, seq[wid] + 1, [])
            assert index.holds(wid) == set()
            pool.events.clear()
            index.snapshot(wid, pool.cached_hashes())
            seq[wid] = 1
            kinds.add("lost")
        elif op < 0.98:  # the worker dies and comes back empty
            index.drop(wid)
            pools[wid] = pool = BlockPool(pool.num_blocks)
            pool.events = []
            index.snapshot(wid, [])
            seq[wid] = 1
            kinds.add("died")
        if step % 50 == 0:  # everything delivered: the index must agree with every pool
            for w in pools:
                deliver(w, everything=True)
                assert index.holds(w) == set(pools[w].cached_hashes())
            for chain in rng.sample(prompts, 10):
                want = {w: _run_prefix(p, chain) for w, p in pools.items()}
                assert index.longest(chain) == {w: k for w, k in want.items() if k}
    assert kinds == {"request", "reset", "snapshot", "lost", "died"}
    assert index.resyncs > 0


def test_longest_prefix_by_hand():
    index = PrefixIndex()
    a, b, c, d = (bytes([i]) * 16 for i in range(4))
    index.snapshot("x", [a, b, c])
    index.snapshot("y", [a, c, d])  # holds c and d but not b: only a counts
    index.snapshot("z", [b, c])  # no first block: nothing
    assert index.longest([a, b, c, d]) == {"x": 3, "y": 1}
    assert index.longest([]) == {} and index.longest([b"\xff" * 16, a]) == {}
    assert index.apply("x", 1, [(False, b), (True, d), (True, b)])  # order matters
    assert index.longest([a, b, c, d]) == {"x": 4, "y": 1}
    index.drop("x")
    assert index.longest([a, b]) == {"y": 1} and index.num_blocks == 4


def test_a_block_held_in_any_tier_counts_until_it_leaves_the_last():
    index = PrefixIndex()
    a, b, c = (bytes([i]) * 16 for i in range(3))
    index.snapshot("x", [a], [("dram", True, b), ("disk", True, b)])
    assert index.longest([a, b, c]) == {"x": 2}
    # the pool evicts a into DRAM; DRAM pushes b out (it stays on disk); c comes to the pool
    assert index.apply("x", 1, [(False, a), (True, c)],
                       [("dram", True, a), ("dram", False, b)])
    assert index.longest([a, b, c]) == {"x": 3}
    assert index.holds("x", "device") == {c} and index.holds("x", "dram") == {a}
    assert index.holds("x", "disk") == {b}
    assert index.apply("x", 2, [], [("disk", False, b)])  # gone from its last tier
    assert index.longest([a, b, c]) == {"x": 1} and index.num_blocks == 2
    assert index.apply("x", 3, [], [("disk", False, b)])  # a repeat changes nothing
    index.drop("x")
    assert index.num_blocks == 0 and index.longest([a]) == {}


def test_cache_aware_routing_weighs_the_cached_prefix_against_the_queue():
    from splitserve.router.state import RouterState

    s = RouterState(routing="cache-aware")
    s.block_size = 4
    for w in ("c0", "c1"):
        s.add_worker(w, "colocated", 1000, 0.0)
    chain = block_hashes(list(range(400)), 4, ROOT)  # 100 blocks
    s.prefix_index.snapshot("c0", [])
    s.prefix_index.snapshot("c1", chain[:50])  # c1 caches the first 200 tokens
    t = s.route("a", 400, 0.0, block_hashes=chain)
    assert t.worker == "c1" and t.cached_tokens == 200
    # c1 now has 400 tokens queued: 400 + 200 uncached > 0 + 400 at c0
    assert s.route("b", 400, 0.0, block_hashes=chain).worker == "c0"
    s.finish("a")
    s.finish("b")
    # a prompt nobody caches: the load decides (round-robin between equals), not the index
    assert {s.route(f"r{i}", 400, 0.0, block_hashes=block_hashes([7] * 400, 4, ROOT)).worker
            for i in range(2)} == {"c0", "c1"}
    # the balance guard: a worker holding the prefix but 5 more requests in flight (decoding,
    # nothing queued) than another does not compete
    for i in range(5):
        s.route(f"d{i}", 8, 0.0)  # (no hashes: least-loaded spreads them)
    busy = max(s.workers.values(), key=lambda w: w.outstanding)
    other = "c0" if busy.worker_id == "c1" else "c1"
    s.prefix_index.snapshot(busy.worker_id, chain)
    s.prefix_index.snapshot(other, [])
    for i in range(4):  # (as if 4 more decoded there) the gap is > 4: only the other competes
        busy.requests.add(f"x{i}")
    assert s.route("e", 400, 0.0, block_hashes=chain).worker == other
    s.worker_died("c1")
    assert s.prefix_index.longest(chain) == {}
    # blind routing ignores the index
    b = RouterState(routing="round-robin")
    assert b.prefix_index is None


def test_routing_cost_stays_flat_as_workers_and_cached_blocks_grow():
    """(the figures are `splitserve bench routing`'s; here only that it runs and answers)"""
    from splitserve.bench.routing import measure

    for n in (1, 8):
        r = measure(n, cached_blocks=2000, requests=50)
        assert r["workers"] == n and r["index_blocks"] >= 1000 and r["route_us_p50"] > 0
        assert r["hit_rate"] > 0.3


@pytest.mark.real_model
def test_a_shared_prefix_follows_its_cache_across_two_colocated_workers(real_model_path):
    """Through real processes: after one request computes a long prompt, every follow-up
    that extends it is routed to the worker that caches it (the router learns it from the
    workers' KV events) and reports the hit in usage; blind routing would alternate them
    between the two workers and miss every other one."""
    import httpx
    from serving_harness import Server

    base = ("The history of the printing press begins in the fifteenth century, when Johannes "
            "Gutenberg combined movable metal type, oil-based ink and a screw press. ") * 6
    s = Server("--colocated", "2")  # cache-aware is serve's default
    try:
        def ask(prompt: str) -> dict:
            r = httpx.post(s.base_url + "/completions", timeout=60, json={
                "prompt": prompt, "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["usage"]

        first = ask(base)
        assert first["prompt_tokens"] > 128
        assert first["prompt_tokens_details"]["cached_tokens"] == 0

        # (no wait: the worker sends the step's KV events before that request's last output,
        # on the same ordered socket, so the router has them before the answer is complete)
        full_blocks = first["prompt_tokens"] // 16 * 16
        for k in range(4):
            u = ask(base + f" Question {k}: who printed the first book?")
            assert u["prompt_tokens_details"]["cached_tokens"] >= full_blocks - 16, (k, u)
        def hits() -> dict:
            out = {}
            for line in httpx.get(s.url + "/metrics", timeout=5).text.splitlines():
                if line.startswith("splitserve_prefix_cache_hits_total{"):
                    out[line.split('worker_id="')[1].split('"')[0]] = float(line.split()[-1])
            return out

        s.wait_idle()  # (the counters come with the workers' heartbeats: a fast machine
        got = hits()   # answers before they do)
        assert sorted(v > 0 for v in got.values()) == [False, True], got  # one worker only
    finally:
        s.close()


def test_the_simulator_routes_by_the_same_index():
    """The same policy in the simulator (KV events reach its router a hop after each step):
    traffic that shares a few long prefixes over 4 co-located workers, whose pools each hold
    only some of them, hits the prefix caches far more with cache-aware routing than
    round-robin (which brings every prefix to every worker and evicts them)."""
    from latency_models import CpuLike

    from splitserve.bench import workloads as W
    from splitserve.bench.deployments import parse_deployment
    from splitserve.sim.run import SimSettings, Simulator

    rng = random.Random(1)
    heads = [[rng.randrange(100, 40000) for _ in range(512)] for _ in range(8)]
    specs = []
    for i in range(80):
        p = rng.choice(heads) + [rng.randrange(100, 40000) for _ in range(rng.randrange(16, 96))]
        specs.append(W.RequestSpec(i * 0.5, p, len(p), 8))
    hit = {}
    for routing in ("cache-aware", "round-robin"):
        # pools of ~3 prefixes each: 8 prefixes fit the deployment, not every worker
        sim = Simulator(parse_deployment("colocated:4"), CpuLike(), SimSettings(kv_cache_gb=0.036),
                        quiet=True, routing=routing)
        recs = sim(specs).records
        assert all(r.ok for r in recs)
        ws = sim.simulation.workers.values()
        hit[routing] = sum(w.core.kv.num_hit_tokens for w in ws) / sum(s.input_len for s in specs)
    # (when written: 0.669 vs 0.313, least-loaded 0.286; the ideal, an infinite cache, 0.81)
    assert hit["cache-aware"] > 1.4 * hit["round-robin"], hit


def test_the_ideal_hit_rate_and_the_servers_counters():
    from serving_harness import app_in_thread
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from splitserve.bench.load import prefix_counters
    from splitserve.bench.workloads import RequestSpec, ideal_hit_rate

    a, b, c = list(range(32)), list(range(100, 116)), list(range(200, 216))
    specs = [RequestSpec(0, a, 32, 1), RequestSpec(0, a + b, 48, 1), RequestSpec(0, c, 16, 1),
             RequestSpec(0, a, 32, 1), RequestSpec(0, "text", 4, 1)]
    # a: none; a+b: a's two blocks; c: none; a again: one block (its last token is computed)
    assert ideal_hit_rate(specs, 16) == (32 + 16) / (32 + 48 + 16 + 32)
    assert ideal_hit_rate([RequestSpec(0, "x", 1, 1)]) is None

    text = ('splitserve_prefix_cache_hits_total{role="colocated",worker_id="c0"} 30.0\n'
            'splitserve_prefix_cache_hits_total{role="colocated",worker_id="c1"} 12.0\n'
            'splitserve_prefix_cache_queries_total{role="colocated",worker_id="c0"} 100.0\n'
            'splitserve_prefix_cache_queries_created{role="colocated",worker_id="c0"} 1.7e9\n')
    app = Starlette(routes=[Route("/metrics", lambda r: PlainTextResponse(text))])
    with app_in_thread(app) as url:
        assert prefix_counters(url + "/v1") == (42.0, 100.0)
    empty = Starlette(routes=[Route("/metrics", lambda r: PlainTextResponse("other 1\n"))])
    with app_in_thread(empty) as url:
        assert prefix_counters(url) is None

"""`splitserve bench routing`: what a cache-aware routing decision costs the router, as the
deployment and the cluster's cached blocks grow: RouterState.route (prefix-index lookup and
policy) plus finish, and the prompt's block hashing, per request, at N co-located workers
whose caches hold `cached_blocks` blocks between them (prompts share prefixes of a few system
prompts, as chat and agent traffic does). Prints p50 / p99 in microseconds.
"""

from __future__ import annotations

import random
import statistics
import time

from splitserve.kv.hashing import block_hashes, root_hash
from splitserve.router.state import RouterState

BLOCK = 16


def measure(workers: int, cached_blocks: int = 100_000, requests: int = 2000,
            prompt_blocks: int = 64, seed: int = 0, routing: str = "cache-aware") -> dict:
    rng = random.Random(seed)
    root = root_hash("bench", BLOCK)
    s = RouterState(routing=routing)
    s.block_size = BLOCK
    ids = [f"w{i}" for i in range(workers)]
    for w in ids:
        s.add_worker(w, "colocated", 10**7, 0.0)
    heads = [[rng.randrange(50000) for _ in range(BLOCK * 32)] for _ in range(16)]

    def prompt() -> list[int]:
        return rng.choice(heads) + [rng.randrange(50000)
                                    for _ in range(BLOCK * (prompt_blocks - 32))]

    held = {w: set() for w in ids}
    total = 0
    while total < cached_blocks:  # each worker's cache: whole prompts' chains
        w = rng.choice(ids)
        chain = block_hashes(prompt(), BLOCK, root)
        new = [h for h in chain if h not in held[w]]
        held[w].update(new)
        total += len(new)
    for w in ids:
        if s.prefix_index is not None:
            s.prefix_index.snapshot(w, held[w])
    route_us, hash_us, hits = [], [], 0
    for i in range(requests):
        toks = prompt()
        t0 = time.perf_counter()
        hashes = block_hashes(toks, BLOCK, root)
        t1 = time.perf_counter()
        t = s.route(f"r{i}", len(toks), 0.0, block_hashes=hashes)
        s.finish(t.request_id)
        t2 = time.perf_counter()
        hash_us.append((t1 - t0) * 1e6)
        route_us.append((t2 - t1) * 1e6)
        hits += t.cached_tokens
    q = statistics.quantiles(route_us, n=100)
    return {"workers": workers,
            "index_blocks": s.prefix_index.num_blocks if s.prefix_index is not None else 0,
            "prompt_tokens": BLOCK * prompt_blocks, "route_us_p50": round(statistics.median(route_us), 2),
            "route_us_p99": round(q[98], 2), "hash_us_p50": round(statistics.median(hash_us), 2),
            "hit_rate": round(hits / (requests * BLOCK * prompt_blocks), 3)}


def add_args(p) -> None:
    p.add_argument("--workers", default="1,8,64")
    p.add_argument("--cached-blocks", type=int, default=100_000)
    p.add_argument("--requests", type=int, default=2000)


def main(a) -> int:
    print("| workers | cached blocks | route µs p50 | p99 | prompt hashing µs p50 | hit rate "
          "| least-loaded route µs p50 (no index) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in a.workers.split(",")):
        r = measure(n, a.cached_blocks, a.requests)
        blind = measure(n, 0, a.requests, routing="least-loaded")
        print(f"| {n} | {r['index_blocks']:,} | {r['route_us_p50']} | {r['route_us_p99']} | "
              f"{r['hash_us_p50']} | {r['hit_rate']} | {blind['route_us_p50']} |")
    return 0

"""The KV tiers on the virtual clock (sim/tiers.py): the simulated workers' EngineCores take
the same prefix-hit path through a DRAM tier and a shared store as the real ones, the loads
are charged to the step, and the store's blocks reach the router's index."""

import pytest

from splitserve.bench import workloads as W
from splitserve.config import SchedulerConfig
from splitserve.router.prefix_index import STORE_ID
from splitserve.sim.kvlink import KVLink
from splitserve.sim.latency.registry import ConstantLatency
from splitserve.sim.simulation import SimConfig, Simulation
from splitserve.sim.worker import WorkerSpec

B = 16


def _specs(n_conv=6, rounds=2, gap=1.0):
    """n_conv distinct 96-token prompts, the whole set sent `rounds` times, one at a time."""
    prompts = [list(range(1000 * (c + 1), 1000 * (c + 1) + 96)) for c in range(n_conv)]
    return [W.RequestSpec(gap * i, p, len(p), 2) for i, p in enumerate(prompts * rounds)]


def _run(specs, host_blocks=0, shared_blocks=0, load_s=None, routing="round-robin"):
    # 8-block pools: each prompt takes 7 with its tokens, so the next prompt evicts it
    workers = [WorkerSpec("colocated", SchedulerConfig(), 8, B, host_blocks=host_blocks)
               for _ in range(2)]
    sim = Simulation(workers, ConstantLatency(0.1),
                     SimConfig(KVLink(1.0, 1e18, "inline"), local_prefill=False,
                               shared_blocks=shared_blocks, tier_load_s=load_s or {}),
                     routing=routing)
    res = sim.run(specs, [s.prompt for s in specs])
    assert all(r.ok for r in res.records), [r.error for r in res.records if not r.ok][:3]
    kv = [w.core.kv for w in sim.workers.values()]
    return sim, res, kv


def _hits(kv, tier=None):
    return sum(m.hit_tokens_by_tier.get(tier, 0) if tier else m.num_hit_tokens for m in kv)


def test_a_shared_store_gives_every_repeat_its_whole_prefix_whichever_worker_serves_it():
    specs = _specs()
    repeats = len(specs) // 2
    want = repeats * ((96 - 1) // B * B)  # every block before the last token of each repeat
    _, _, kv = _run(specs)  # the pools alone: evicted before the repeats come
    assert _hits(kv) == 0
    _, _, kv = _run(specs, shared_blocks=100)
    assert _hits(kv) == want and _hits(kv, "shared") == want
    # a DRAM tier per worker: round-robin sends each repeat to the worker that computed it
    # (6 prompts, 2 workers: same parity), so it hits there too, from DRAM
    _, _, kv = _run(specs, host_blocks=100)
    assert _hits(kv, "dram") == want
    # ... but with an odd number of prompts, every repeat lands on the other worker
    odd = _specs(n_conv=5)
    _, _, kv = _run(odd, host_blocks=100)
    assert _hits(kv) == 0
    _, _, kv = _run(odd, host_blocks=100, shared_blocks=100)
    assert _hits(kv, "shared") == 5 * 80


def test_a_store_too_small_for_the_set_evicts_and_the_repeats_miss():
    _, _, kv = _run(_specs(), shared_blocks=10)  # room for ~1.5 prompts of 6 blocks
    assert _hits(kv) < 6 * 80 // 2


def test_loads_are_charged_to_the_step_that_makes_them():
    specs = _specs(n_conv=3, gap=2.0)
    _, free, _ = _run(specs, shared_blocks=100, load_s={"shared": 0.0})
    _, paid, _ = _run(specs, shared_blocks=100, load_s={"shared": 0.01})
    first = [r.ttft for r in free.records[:3]]
    assert [r.ttft for r in paid.records[:3]] == pytest.approx(first)  # nothing loaded yet
    for a, b in zip(free.records[3:], paid.records[3:]):
        assert b.ttft == pytest.approx(a.ttft + 5 * 0.01)  # 5 blocks loaded, 10 ms each


def test_the_routers_index_follows_the_store():
    sim, _, _ = _run(_specs(), shared_blocks=100, routing="cache-aware")
    idx = sim.state.prefix_index
    held = idx.holds(STORE_ID, "shared")
    assert len(held) == 6 * 6  # 6 prompts of 6 full blocks
    assert held == set(sim.store._blocks)
    prompt = list(range(1000, 1096))
    from splitserve.kv.hashing import block_hashes

    hits, common = idx.longest_shared(block_hashes(prompt, B, sim._root))
    assert common == 6  # every worker can load the whole prompt

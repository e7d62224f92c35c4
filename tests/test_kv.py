"""Chained block hashes, the block pool and the KV cache manager (plain Python, no model)."""

import subprocess
import sys

import pytest

from splitserve.errors import IntegrityError
from splitserve.kv.block_pool import BlockPool, NoFreeBlocksError
from splitserve.kv.hashing import block_hashes, extend_block_hashes, hash_block, root_hash
from splitserve.kv.manager import KVCacheManager
from splitserve.request import Request, SamplingParams

ROOT = root_hash("m", 4)


def test_hashes_are_chained_and_only_cover_full_blocks():
    toks = list(range(10))
    hs = block_hashes(toks, 4, ROOT)
    assert len(hs) == 2  # tokens 8, 9 form a partial block
    assert hs[0] == hash_block(ROOT, [0, 1, 2, 3])
    assert hs[1] == hash_block(hs[0], [4, 5, 6, 7])
    # same second block after a different first block -> a different hash
    other = block_hashes([9, 1, 2, 3, 4, 5, 6, 7], 4, ROOT)
    assert other[1] != hs[1]
    # extending a chain equals hashing from scratch
    assert extend_block_hashes(hs[:1], toks, 4, ROOT) == hs


def test_root_depends_on_model_block_size_and_salt():
    assert len({root_hash("m", 4), root_hash("n", 4), root_hash("m", 8), root_hash("m", 4, "s")}) == 4


def test_hashes_identical_across_processes():
    code = (
        "from splitserve.kv.hashing import block_hashes, root_hash;"
        "print(','.join(h.hex() for h in block_hashes(list(range(40)), 16, root_hash('m', 16))))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout
        for seed in (1, 2)
    }
    assert len(outs) == 1
    here = ",".join(h.hex() for h in block_hashes(list(range(40)), 16, root_hash("m", 16)))
    assert outs == {here + "\n"}


def test_pool_lru_eviction_and_integrity():
    pool = BlockPool(4)
    a = pool.allocate(2)
    b = pool.allocate(2)
    pool.cache(a[0], b"h0")
    pool.cache(a[1], b"h1")
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    pool.free(reversed(a))  # a[1] queued first: evicted first
    assert pool.usage() == {"total": 4, "in_use": 2, "cached": 2, "free": 0}
    pool.check_integrity([b])
    # a cache hit on a free block takes it off the queue
    hit = pool.lookup(b"h0")
    assert hit is a[0]
    pool.touch([hit])
    (new,) = pool.allocate(1)
    assert new is a[1] and new.block_hash is None and pool.lookup(b"h1") is None
    pool.check_integrity([b, [hit], [new]])


def test_integrity_check_catches_corruption():
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    with pytest.raises(IntegrityError):
        pool.check_integrity([blocks[:1]])  # a block with a reference nobody holds
    pool.check_integrity([blocks])
    pool._free[blocks[0].block_id] = None  # a referenced block in the free queue
    with pytest.raises(IntegrityError):
        pool.check_integrity([blocks])
    del pool._free[blocks[0].block_id]
    pool._cached[b"x"] = blocks[1]  # a hash entry the block does not carry
    with pytest.raises(IntegrityError):
        pool.check_integrity([blocks])


def test_integrity_checks_still_run_under_python_O():
    """Real exceptions, not asserts: `python -O` strips asserts, never these checks (the
    scheduler's included)."""
    code = """
from splitserve.errors import IntegrityError
from splitserve.kv.block_pool import BlockPool
from splitserve.kv.manager import KVCacheManager
from splitserve.engine.scheduler import Scheduler
from splitserve.config import SchedulerConfig
from splitserve.request import Request, SamplingParams
assert False, "asserts are on"
caught = []
pool = BlockPool(3)
blocks = pool.allocate(2)
try:
    pool.check_integrity([blocks[:1]])
except IntegrityError:
    caught.append("pool")
s = Scheduler(SchedulerConfig(), KVCacheManager(8, 4, b"r"), 64)
s.add_request(Request("a", [1, 2, 3], SamplingParams()))
s.kv.req_blocks["a"] = []  # a waiting request holding blocks
try:
    s.check_integrity()
except IntegrityError:
    caught.append("scheduler")
print(" ".join(caught))
"""
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pool", "scheduler"]


def test_double_free_raises():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([b])


def _req(rid, toks):
    return Request(rid, list(toks), SamplingParams(max_tokens=4))


def test_manager_prefix_hits_leave_one_token_and_survive_free():
    m = KVCacheManager(num_blocks=10, block_size=4, root_hash=ROOT)
    r1 = _req("a", range(12))
    computed, n = m.get_computed_blocks(r1)
    assert (computed, n) == ([], 0)
    assert m.allocate_slots(r1, 12)
    r1.num_computed_tokens = 12
    m.cache_blocks(r1, 12)
    m.free(r1)
    m.check_integrity()
    # a request with the same 12 tokens: at most 2 blocks hit (the last token must be computed)
    r2 = _req("b", range(12))
    computed, n = m.get_computed_blocks(r2)
    assert n == 8 and len(computed) == 2
    assert m.allocate_slots(r2, 4, computed)
    assert m.block_ids("b")[:2] == [b.block_id for b in computed]
    # a request sharing only the first block
    r3 = _req("c", [0, 1, 2, 3, 99, 98, 97, 96, 5])
    computed3, n3 = m.get_computed_blocks(r3)
    assert n3 == 4 and computed3[0] is computed[0]
    assert m.allocate_slots(r3, 5, computed3)
    assert computed[0].ref_cnt == 2
    m.check_integrity()
    m.free(r2)
    m.free(r3)
    m.check_integrity()
    assert m.pool.usage()["in_use"] == 0


def test_manager_refuses_without_side_effects():
    m = KVCacheManager(num_blocks=3, block_size=4, root_hash=ROOT)
    r = _req("a", range(20))
    assert not m.allocate_slots(r, 20)
    assert m.block_ids("a") == [] and m.pool.num_free_blocks == 3
    m.check_integrity()


def test_caching_disabled_never_hits():
    m = KVCacheManager(num_blocks=8, block_size=4, root_hash=ROOT, enable_caching=False)
    r = _req("a", range(9))
    assert m.allocate_slots(r, 9)
    r.num_computed_tokens = 9
    m.cache_blocks(r, 9)
    m.free(r)
    assert m.get_computed_blocks(_req("b", range(9))) == ([], 0)
    m.check_integrity()

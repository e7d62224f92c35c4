"""The KV tiers below the pool (kv/tiers.py): blocks the pool evicts go to DRAM, then to disk,
and come back bit for bit; a bad disk file is refused (recomputed), never served."""

import os
from types import SimpleNamespace

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.errors import InvalidRequestError
from splitserve.kv.cache import KVCache
from splitserve.kv.manager import KVCacheManager
from splitserve.kv.tiers import HEADER, KVTiers
from splitserve.request import Request

MC = SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=8)


def _filled(num_blocks=4, block_size=4):
    kv = KVCache(MC, num_blocks, block_size, torch.bfloat16, "cpu")
    kv.kv.copy_(torch.randn(kv.kv.shape))
    return kv


def _h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_blocks_go_down_the_tiers_and_come_back_bit_for_bit(tmp_path):
    kv = _filled()
    t = KVTiers(kv, dram_blocks=2, disk_dir=str(tmp_path), disk_blocks=3)
    t.events = []
    want = {i: kv.kv[:, :, i].clone() for i in range(4)}
    for i in range(4):  # DRAM holds 2: blocks 0 and 1 go on to disk
        t.offload(_h(i), i)
    assert [t.find(_h(i)) for i in range(4)] == ["disk", "disk", "dram", "dram"]
    assert len(os.listdir(tmp_path)) == 2
    kv.kv.zero_()
    for i in range(4):
        assert t.load(_h(i), i)
        assert torch.equal(kv.kv[:, :, i], want[i])
    assert t.find(_h(9)) is None and not t.load(_h(9), 0)
    per = t.block_nbytes
    assert t.moved == {("device", "dram"): 4 * per, ("dram", "disk"): 2 * per,
                       ("dram", "device"): 2 * per, ("disk", "device"): 2 * per}
    assert t.events[:3] == [("dram", True, _h(0)), ("dram", True, _h(1)), ("dram", False, _h(0))]
    assert ("disk", True, _h(0)) in t.events


def test_disk_tier_is_bounded_and_least_recently_used_goes_first(tmp_path):
    kv = _filled(num_blocks=8)
    t = KVTiers(kv, dram_blocks=1, disk_dir=str(tmp_path), disk_blocks=2)
    for i in range(3):
        t.offload(_h(i), i)  # disk: 0, 1
    assert t.find(_h(0)) == "disk"  # 0 used again: 1 is now the oldest
    t.offload(_h(3), 3)  # 2 goes to disk, pushing 1 out
    assert t.find(_h(1)) is None and t.find(_h(0)) == "disk" and t.find(_h(2)) == "disk"
    assert len(os.listdir(tmp_path)) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "rename", "delete"])
def test_a_bad_disk_block_is_refused_and_forgotten(tmp_path, damage):
    kv = _filled()
    t = KVTiers(kv, dram_blocks=1, disk_dir=str(tmp_path), disk_blocks=4)
    t.offload(_h(0), 0)
    t.offload(_h(1), 1)  # 0 to disk
    path = os.path.join(tmp_path, _h(0).hex() + ".kv")
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        data[HEADER + 100] ^= 0x40
        open(path, "wb").write(data)
    elif damage == "truncate":
        open(path, "wb").write(data[:-8])
    elif damage == "rename":  # another block's file under this one's name
        data[8:24] = _h(7)
        open(path, "wb").write(data)
    else:
        os.unlink(path)
    before = kv.kv[:, :, 3].clone()
    assert t.find(_h(0)) == "disk"
    assert not t.load(_h(0), 3)
    assert torch.equal(kv.kv[:, :, 3], before)  # nothing of the bad block was written
    assert t.find(_h(0)) is None  # a miss from now on: recomputed
    assert (t.lost if damage == "delete" else t.corrupt) == 1
    assert not os.path.exists(path)


def test_a_restarted_worker_finds_its_disk_blocks(tmp_path):
    kv = _filled()
    t = KVTiers(kv, dram_blocks=1, disk_dir=str(tmp_path), disk_blocks=4)
    for i in range(3):
        t.offload(_h(i), i)
    want = kv.kv[:, :, 1].clone()
    again = KVTiers(_filled(), dram_blocks=1, disk_dir=str(tmp_path), disk_blocks=4)
    assert again.find(_h(1)) == "disk" and again.load(_h(1), 0)
    assert torch.equal(again.kv.kv[:, :, 0], want)


def test_a_copy_that_raises_is_a_miss_not_an_exception_and_cut_writes_are_swept(tmp_path):
    kv = _filled()
    t = KVTiers(kv, dram_blocks=2)
    t.offload(_h(0), 0)
    t.dram = torch.empty(1)  # every copy into or out of the tier now raises
    t.offload(_h(1), 1)  # logged and dropped: the pool's allocation must go on
    assert t.find(_h(1)) is None and t._dram_free == [1]  # its slot was given back
    assert not t.load(_h(0), 2)  # logged: a miss, recomputed
    (tmp_path / (_h(5).hex() + ".kv.tmp")).write_bytes(b"half a block")
    KVTiers(_filled(), dram_blocks=1, disk_dir=str(tmp_path), disk_blocks=2)
    assert os.listdir(tmp_path) == []


def test_manager_hit_runs_from_the_pool_into_the_tiers_and_a_failed_load_changes_nothing():
    class FakeTiers:  # the calls the manager makes, with a load that can fail
        def __init__(self):
            self.held, self.loaded, self.fail, self.computed_ = {}, [], set(), []

        def find_run(self, hashes):
            run = []
            for h in hashes:
                if h not in self.held:
                    break
                run.append(self.held[h])
            return run

        def costs(self):
            return {}, None

        def computed(self, h, block_id):
            self.computed_.append(h)

        def load(self, h, block_id):
            if h in self.fail:
                return False
            self.loaded.append((h, block_id))
            return True

        def offload(self, h, block_id):
            self.held[h] = "dram"

    m = KVCacheManager(num_blocks=4, block_size=4, root_hash=b"r" * 16)
    tiers = FakeTiers()
    m.attach_tiers(tiers)
    a = Request("a", list(range(13)), None)
    assert m.allocate_slots(a, 13)
    m.cache_blocks(a, 13)
    m.free(a)  # blocks 0..2 cached (freed tail first: 2, 1, 0)
    b = Request("b", list(range(100, 112)), None)
    assert m.allocate_slots(b, 12)  # takes the partial block, then evicts a's blocks 2 and 1 (the tail) into the tiers
    m.free(b)
    assert set(tiers.held) == {a.block_hashes[1], a.block_hashes[2]}
    a2 = Request("a2", list(range(13)), None)
    computed, n = m.get_computed_blocks(a2)
    loads = m.tier_hits(a2, len(computed))
    assert n == 4 and [h for h, _ in loads] == a2.block_hashes[1:3]
    tiers.fail = {a2.block_hashes[2]}
    usage = m.pool.usage()
    assert not m.allocate_slots(a2, 1, computed, loads)
    assert "a2" not in m.req_blocks and m.pool.usage()["in_use"] == usage["in_use"]
    m.check_integrity()
    tiers.fail = set()
    assert m.allocate_slots(a2, 1, computed, loads)
    held = m.req_blocks["a2"]
    assert len(held) == 4 and held[0] is computed[0]
    assert [bid for _, bid in tiers.loaded][-2:] == [b.block_id for b in held[1:3]]
    assert [m.pool.lookup(h) for h in a2.block_hashes[:3]] == held[:3]  # findable again
    m.count_lookup(13, 12, loads)
    assert m.hit_tokens_by_tier == {"device": 4, "dram": 8, "disk": 0, "shared": 0}
    m.check_integrity()


def test_tier_config_errors():
    with pytest.raises(InvalidRequestError, match="disk KV tier"):
        LLM("default", host_cache_gb=0, disk_cache_dir="/tmp/x", disk_cache_gb=1)
    with pytest.raises(InvalidRequestError, match=">= 0"):
        LLM("default", host_cache_gb=-1)


# -- the real model: loaded blocks give the tokens recomputation gives -----------------------
PROMPT = ("List three facts about the Moon. Mention its distance from the Earth, its gravity "
          "and the tides. Be concise and precise in every answer you give to the reader.")
OTHERS = ["The quick brown fox jumps over the lazy dog and keeps running far away from home.",
          "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:",
          "Translate to French: The cat sleeps on the warm windowsill in the afternoon sun."]
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)


def _make(ck, **kw):
    return LLM("default", checkpoint=ck, dtype="float32", block_size=4, num_blocks=20, **kw)


@pytest.fixture(scope="module")
def recomputed(real_checkpoint):
    return _make(real_checkpoint, enable_prefix_caching=False).generate([PROMPT], GREEDY)[0]


def _same(out, want):
    """Same greedy tokens, and logprobs within fp32 noise of recomputation's (a few greedy
    tokens alone can survive a wrong block)."""
    assert out.token_ids == want.token_ids
    got = [lp for lp, _ in out.logprobs]
    ref = [lp for lp, _ in want.logprobs]
    assert got == pytest.approx(ref, abs=1e-3)


@pytest.mark.real_model
@pytest.mark.parametrize("tier", ["dram", "disk"])
def test_loaded_blocks_give_the_same_greedy_output_as_recomputation(real_checkpoint, recomputed,
                                                                    tmp_path, tier):
    from splitserve.kv.cache import kv_bytes_per_block

    want = recomputed
    per = kv_bytes_per_block(real_checkpoint.config, 4, torch.float32) / 2**30
    # DRAM room for the prompt's blocks, or for one block with the rest on disk
    dram = 40 if tier == "dram" else 1
    llm = _make(real_checkpoint, host_cache_gb=dram * per, disk_cache_dir=str(tmp_path / "kv"),
               disk_cache_gb=(40 * per if tier == "disk" else 0))
    _same(llm.generate([PROMPT], GREEDY)[0], want)
    for p in OTHERS:  # each needs most of the 20-block pool: the prompt's blocks are evicted
        llm.generate([p], GREEDY)
    kvm, tiers = llm.engine.kv_manager, llm.engine.kv_tiers
    from splitserve.kv.hashing import block_hashes

    hashes = block_hashes(llm.engine.encode(PROMPT), 4, kvm.root_hash)
    assert sum(kvm.pool.lookup(h) is not None for h in hashes) <= 2  # evicted from the pool
    before = dict(kvm.hit_tokens_by_tier)
    out = llm.generate([PROMPT], GREEDY)[0]
    _same(out, want)
    got = {k: kvm.hit_tokens_by_tier[k] - before[k] for k in before}
    assert got[tier] >= 4 * 4, got  # half the prompt or more came back from that tier
    assert out.num_cached_tokens == sum(got.values())
    assert tiers.moved[(tier, "device")] > 0
    llm.engine.check_integrity()

    if tier != "disk":
        return
    # every disk file corrupted (the prompt's blocks are still there: the tiers are
    # inclusive), the prompt's blocks evicted from the pool again: refused, recomputed
    for name in os.listdir(tmp_path / "kv"):
        path = tmp_path / "kv" / name
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x10
        path.write_bytes(data)
    for p in OTHERS:
        llm.generate([p], GREEDY)
    before = dict(kvm.hit_tokens_by_tier)
    corrupt = tiers.corrupt
    out = llm.generate([PROMPT], GREEDY)[0]
    _same(out, want)
    assert tiers.corrupt > corrupt
    assert kvm.hit_tokens_by_tier["disk"] == before["disk"]  # nothing served from a bad file
    llm.engine.check_integrity()


@pytest.mark.real_model
def test_a_served_prompt_comes_back_from_the_dram_and_disk_tiers_and_metrics_say_so(tmp_path):
    """Through real processes: serve's tier flags reach the worker, a prompt the pool has
    evicted is loaded back from the tiers (usage's cached tokens), and /metrics counts the
    tier hits and the bytes moved between tiers."""
    import httpx
    from serving_harness import Server

    def ask(s, prompt):
        r = httpx.post(s.base_url + "/completions", timeout=120, json={
            "prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    a = "The history of the printing press begins with Gutenberg's movable type. " * 8
    others = [f"Topic {k}: the migration of birds across continents in autumn. " * 8
              for k in range(3)]
    # a 20-block pool (16 tokens each) holds one prompt of ~130 tokens at a time; a DRAM tier
    # of 6 blocks, the rest on disk
    per = 30 * 2 * 16 * 3 * 64 * 4 / 2**30
    s = Server("--colocated", "1", "--dtype", "float32", "--num-blocks", "20",
               "--kv-host-gb", repr(6 * per), "--kv-disk-dir", str(tmp_path),
               "--kv-disk-gb", repr(100 * per))
    try:
        first = ask(s, a)
        for p in others:
            ask(s, p)
        again = ask(s, a)
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= first["usage"]["prompt_tokens"] // 16 * 16 - 16, again["usage"]
        s.wait_idle()
        m = {}
        for line in httpx.get(s.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(("splitserve_prefix_cache_tier_hits_total{",
                                "splitserve_kv_tier_bytes_total{")):
                name, labels = line.split("{", 1)
                lab = dict(kv.split("=") for kv in labels.split("}")[0].replace('"', "").split(","))
                m[(name, lab.get("tier") or f'{lab["src"]}>{lab["dst"]}')] = float(line.split()[-1])
        hits = {k[1]: v for k, v in m.items() if k[0].endswith("tier_hits_total")}
        moved = {k[1]: v for k, v in m.items() if k[0].endswith("tier_bytes_total")}
        assert hits["dram"] + hits["disk"] >= cached - 16 * 2, hits
        assert moved["device>dram"] > 0 and moved["dram>disk"] > 0, (moved, hits)
        assert moved.get("dram>device", 0) + moved.get("disk>device", 0) > 0, moved
        assert os.listdir(tmp_path) == ["colocated-0"] or len(os.listdir(tmp_path)) == 1
    finally:
        s.close()

"""The shared KV tier (kv/store.py, kv/store_client.py): a block one worker computes is loaded,
not recomputed, by another; a damaged block is refused; a dead store is a miss; the router's
index follows what the store holds."""

import asyncio
import os
import random
import socket
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.errors import InvalidRequestError
from splitserve.kv import store as S
from splitserve.kv.cache import KVCache
from splitserve.kv.manager import KVCacheManager, worth_loading
from splitserve.kv.store_client import KVStoreClient
from splitserve.kv.tiers import KVTiers
from splitserve.request import Request
from splitserve.router.prefix_index import PrefixIndex


def _h(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.fixture
def store():
    srv = S.serve_store("127.0.0.1", 0, 8 * 1000)
    yield srv
    srv.stop()


def _dead_addr() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


# -- the store and its client ----------------------------------------------------------------
def test_the_store_evicts_least_recently_used_within_its_bytes_and_records_each_change():
    st = S.BlockStore(3 * 10)
    sub = st.subscribe()
    assert sub.next_batch(0) == []  # the snapshot of an empty store
    for i in range(3):
        assert st.put(_h(i), b"d" * 16, bytes([i]) * 10) == b"+"
    assert st.get(_h(0))[1] == b"\x00" * 10  # 0 used: 1 is now the oldest
    assert st.put(_h(0), b"d" * 16, b"x" * 10) == b"="  # had it: kept as it was
    assert st.put(_h(3), b"d" * 16, b"\x03" * 10) == b"+"
    assert st.get(_h(1)) is None and st.get(_h(0))[1] == b"\x00" * 10
    assert st.put(_h(9), b"d" * 16, b"y" * 31) == b"!"  # larger than the whole store
    assert st.match([_h(0), _h(2), _h(3), _h(1), _h(0)]) == 3
    assert st.nbytes == 30 and st.info()["evictions"] == 1
    assert sub.next_batch(0) == [(True, _h(0)), (True, _h(1)), (True, _h(2)), (False, _h(1)),
                                 (True, _h(3))]
    late = st.subscribe()
    assert sorted(late.next_batch(0)) == sorted((True, _h(i)) for i in (0, 2, 3))


def test_a_subscriber_that_falls_behind_is_cut_off_not_buffered_for_ever(monkeypatch):
    monkeypatch.setattr(S, "MAX_BACKLOG", 5)
    st = S.BlockStore(100 * 10)
    sub = st.subscribe()
    sub.next_batch(0)
    for i in range(6):
        st.put(_h(i), b"d" * 16, b"v" * 10)
    assert sub.next_batch(0) is None and st._subs == []  # it resubscribes: a snapshot


def test_blocks_put_by_one_client_are_got_by_another_and_a_damaged_one_is_refused(store):
    a, b = KVStoreClient(store.addr), KVStoreClient(store.addr)
    blocks = {_h(i): os.urandom(1000) for i in range(4)}
    for k, v in blocks.items():
        a.put(k, v)
    assert a.flush() and a.put_bytes == 4000
    assert b.match(list(blocks) + [_h(99), _h(0)]) == 4
    assert all(b.get(k) == v for k, v in blocks.items())
    assert b.get(_h(99)) is None
    # damaged in the store (or anywhere on the way): the digest no longer matches
    digest, payload = store.store._blocks[_h(2)]
    store.store._blocks[_h(2)] = (digest, bytes(payload[:-1]) + bytes([payload[-1] ^ 1]))
    assert b.get(_h(2)) is None and b.corrupt == 1
    assert b.get(_h(3)) == blocks[_h(3)]  # the connection is still good


def test_a_dead_store_is_a_miss_at_once_and_puts_are_dropped_not_raised():
    c = KVStoreClient(_dead_addr(), timeout_s=0.5, retry_s=30)
    t0 = time.monotonic()
    assert c.get(_h(0)) is None and c.match([_h(0)]) == 0
    for _ in range(50):  # the store is left alone for retry_s: no connect per block
        assert c.get(_h(1)) is None
    assert time.monotonic() - t0 < 2
    c.put(_h(0), b"v" * 10)
    assert c.flush() and c.dropped == 1 and c.put_bytes == 0


def test_a_store_that_comes_back_is_used_again(store):
    host, port = store.server_address[:2]
    store.stop()
    c = KVStoreClient(f"{host}:{port}", timeout_s=0.5, retry_s=0.05)
    assert c.match([_h(0)]) == 0
    again = S.serve_store(host, port, 8000)
    try:
        time.sleep(0.1)
        c.put(_h(0), b"v" * 10)
        assert c.flush() and c.get(_h(0)) == b"v" * 10
    finally:
        again.stop()


def test_bad_requests_get_an_error_frame_not_a_dead_server(store):
    with socket.create_connection(store.server_address[:2], timeout=2) as s:
        s.sendall(S.frame(b"G", b"short"))
        assert S.recv_frame(s)[0] == b"?"
        s.sendall(S.frame(b"I"))
        assert S.recv_frame(s)[0] == b"+"


def test_shared_cache_address_is_checked_at_the_edge():
    with pytest.raises(InvalidRequestError, match="host:port"):
        LLM("default", shared_cache="nowhere")


# -- fetch or recompute ----------------------------------------------------------------------
def test_loading_stops_where_it_no_longer_pays():
    run = ["dram", "shared", "shared", "disk"]
    assert worth_loading(run, {}, None) == 4  # nothing measured yet: load
    assert worth_loading(run, {"dram": 0.1, "shared": 0.5, "disk": 3.0}, 1.0) == 3
    assert worth_loading(run, {"shared": 2.0}, 1.0) == 1  # the store is slower than computing
    # a slow block early is worth loading for the cheap ones after it
    assert worth_loading(["shared", "dram", "dram"], {"shared": 1.5, "dram": 0.1}, 1.0) == 3
    assert worth_loading(run, {"dram": 1.0, "shared": 1.0, "disk": 1.0}, 1.0) == 0


def test_the_manager_cuts_a_run_of_loads_by_the_measured_costs(store):
    mc = SimpleNamespace(num_layers=2, num_kv_heads=1, head_dim=4)
    kv = KVCache(mc, 8, 4, torch.float32, "cpu")
    kv.kv.copy_(torch.randn(kv.kv.shape))
    tiers = KVTiers(kv, shared=KVStoreClient(store.addr))
    m = KVCacheManager(num_blocks=8, block_size=4, root_hash=b"r" * 16)
    m.attach_tiers(tiers)
    a = Request("a", list(range(13)), None)
    assert m.allocate_slots(a, 13)
    m.cache_blocks(a, 13)  # 3 full blocks computed: shared
    assert tiers.shared.flush()
    blocks = [kv.kv[:, :, b].clone() for b in m.block_ids("a")[:3]]
    m.free(a)
    m.pool.reset_prefix_cache()  # the pool forgets them: the store still has them
    b = Request("b", list(range(13)), None)
    loads = m.tier_hits(b, 0)
    assert [t for _, t in loads] == ["shared"] * 3
    assert m.allocate_slots(b, 1, [], loads)
    assert all(torch.equal(kv.kv[:, :, bid], blk) for bid, blk in zip(m.block_ids("b"), blocks))
    assert tiers.moved[("shared", "device")] == 3 * tiers.block_nbytes
    m.free(b)
    m.pool.reset_prefix_cache()
    tiers.load_s["shared"], tiers.recompute_s = 1.0, 0.5  # loading costs more than computing
    assert m.tier_hits(Request("c", list(range(13)), None), 0) == []
    m.check_integrity()


# -- the router's index: the store's blocks count for every worker ----------------------------
def test_longest_shared_counts_the_stores_blocks_for_every_worker():
    idx = PrefixIndex()
    idx.add_shared("store")
    hs = [_h(i) for i in range(6)]
    idx.snapshot("store", [], [("shared", True, h) for h in hs[:2]])
    idx.snapshot("w1", hs[:4])
    idx.snapshot("w2", hs[2:3])
    # blocks 0, 1 in the store; 2 on w1 and w2; 3 on w1 only
    assert idx.longest_shared(hs) == ({"w1": 4, "w2": 3}, 2)
    idx.apply("store", 1, [], [("shared", True, hs[3]), ("shared", True, hs[4])])
    assert idx.longest_shared(hs) == ({"w1": 5, "w2": 5}, 2)  # w2: 2 its own, 3 and 4 loaded
    idx.remove_shared("store")
    assert idx.longest_shared(hs) == ({"w1": 4}, 0)


def test_longest_shared_matches_a_brute_force_oracle_under_churn():
    rng = random.Random(7)
    hs = [_h(i) for i in range(40)]
    workers = [f"w{i}" for i in range(5)]
    idx = PrefixIndex()
    idx.add_shared("store")
    held = {w: set() for w in workers + ["store"]}
    seq = {w: 0 for w in held}
    for w in held:
        idx.snapshot(w, [])
        seq[w] = 1
    for _ in range(3000):
        w = rng.choice(list(held))
        h = rng.choice(hs)
        stored = rng.random() < 0.6
        (held[w].add if stored else held[w].discard)(h)
        ev = ([], [("shared", stored, h)]) if w == "store" else ([(stored, h)], [])
        assert idx.apply(w, seq[w], *ev)
        seq[w] += 1
        start = rng.randrange(len(hs))
        prompt = hs[start:start + rng.randrange(1, 12)]
        want = {}
        for x in workers:
            k = 0
            while k < len(prompt) and (prompt[k] in held[x] or prompt[k] in held["store"]):
                k += 1
            want[x] = k
        common = 0
        while common < len(prompt) and prompt[common] in held["store"]:
            common += 1
        got, c = idx.longest_shared(prompt)
        assert c == common
        assert {x: got.get(x, c) for x in workers} == want


def test_the_routers_feed_follows_the_store_and_forgets_it_while_it_is_gone():
    from splitserve.server.shared_kv import STORE_ID, feed_index

    async def main():
        srv = S.serve_store("127.0.0.1", 0, 8 * 1000)
        host, port = srv.server_address[:2]
        idx = PrefixIndex()
        c = KVStoreClient(f"{host}:{port}")
        c.put(_h(0), b"v" * 1000)  # before the router subscribes: in its snapshot
        assert c.flush()
        task = asyncio.create_task(feed_index(f"{host}:{port}", idx, retry_s=0.05))

        async def until(pred, what):
            for _ in range(200):
                if pred():
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(what)

        await until(lambda: idx.holds(STORE_ID, "shared") == {_h(0)}, "the snapshot")
        for i in range(1, 10):  # 8 fit: 0 and 1 are evicted
            c.put(_h(i), b"v" * 1000)
        assert await asyncio.to_thread(c.flush)
        await until(lambda: idx.holds(STORE_ID) == {_h(i) for i in range(2, 10)}, "the events")
        assert idx.longest_shared([_h(2), _h(3), _h(0)]) == ({}, 2)
        srv.stop()
        await until(lambda: idx.holds(STORE_ID) == set(), "forgotten when the store is gone")
        again = S.serve_store(host, port, 8000)  # a new, empty store on the same address
        c2 = KVStoreClient(f"{host}:{port}")
        c2.put(_h(5), b"v" * 1000)
        assert await asyncio.to_thread(c2.flush)
        await until(lambda: idx.holds(STORE_ID) == {_h(5)}, "subscribed again")
        task.cancel()
        again.stop()

    asyncio.run(main())


# -- the real model: a prefix computed by one engine, loaded by another --------------------------
PROMPT = ("List three facts about the Moon. Mention its distance from the Earth, its gravity "
          "and the tides. Be concise and precise in every answer you give to the reader.")
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)


@pytest.mark.real_model
def test_a_prompt_computed_on_one_engine_is_loaded_by_another_with_the_same_output(
        real_checkpoint, store):
    big = S.serve_store("127.0.0.1", 0, 64 * 2**20)
    addr = big.addr
    try:
        def make(**kw):
            return LLM("default", checkpoint=real_checkpoint, dtype="float32", block_size=4,
                       num_blocks=40, **kw)

        want = make(enable_prefix_caching=False).generate([PROMPT], GREEDY)[0]
        a, b = make(shared_cache=addr), make(shared_cache=addr)
        first = a.generate([PROMPT], GREEDY)[0]
        assert first.num_cached_tokens == 0
        assert a.engine.kv_tiers.shared.flush()
        out = b.generate([PROMPT], GREEDY)[0]
        n_full = (len(first.prompt_token_ids) - 1) // 4 * 4
        assert out.num_cached_tokens == n_full  # every block before the last token: loaded
        assert b.engine.kv_manager.hit_tokens_by_tier["shared"] == n_full
        for got in (first, out):
            assert got.token_ids == want.token_ids
            assert [lp for lp, _ in got.logprobs] == pytest.approx(
                [lp for lp, _ in want.logprobs], abs=1e-3)
        # every block damaged in the store: refused, recomputed, the same output
        for k, (digest, payload) in list(big.store._blocks.items()):
            big.store._blocks[k] = (digest, bytes(payload[:-8]) + bytes(8))
        c = make(shared_cache=addr)
        again = c.generate([PROMPT], GREEDY)[0]
        assert again.token_ids == want.token_ids and again.num_cached_tokens == 0
        assert c.engine.kv_tiers.shared.corrupt >= 1
        assert c.engine.kv_manager.hit_tokens_by_tier["shared"] == 0
        c.engine.check_integrity()
    finally:
        big.stop()


# -- through serve: two workers share one store ------------------------------------------------
def _metrics(s) -> dict:
    import httpx

    out = {}
    for line in httpx.get(s.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(("splitserve_prefix_cache_tier_hits_total{",
                            "splitserve_kv_tier_bytes_total{")):
            name, labels = line.split("{", 1)
            lab = dict(kv.split("=") for kv in labels.split("}")[0].replace('"', "").split(","))
            key = (name, lab["worker_id"], lab.get("tier") or f'{lab["src"]}>{lab["dst"]}')
            out[key] = float(line.split()[-1])
    return out


def _total(m: dict, what: str) -> float:
    return sum(v for (_, _, k), v in m.items() if k == what)


def _store_pid(serve_pid: int) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == serve_pid and b"splitserve.kv.store" in cmd:
            return int(pid)
    return None


@pytest.mark.real_model
def test_served_workers_load_each_others_prefixes_from_the_store_and_outlive_it():
    """Real processes: serve starts the store and tells the workers; a prompt computed on one
    worker is loaded by the other (round-robin sends the repeat there), with the same text;
    /metrics counts the shared hits and the bytes each way. The store killed: requests still
    succeed (misses), serve starts it again, and sharing resumes."""
    import signal

    import httpx
    from serving_harness import Server, wait_for

    def ask(s, prompt):
        r = httpx.post(s.base_url + "/completions", timeout=120, json={
            "prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    block_bytes = 30 * 2 * 16 * 3 * 64 * 4  # fp32, 16 tokens
    s = Server("--colocated", "2", "--dtype", "float32", "--kv-shared-gb", "0.05",
               "--routing", "round-robin")
    try:
        for round_, prompt in enumerate([
                "The history of the printing press begins with Gutenberg's movable type. " * 6,
                "Volcanoes form where magma rises through the crust of the planet. " * 6]):
            pushed = _total(_metrics(s), "device>shared")
            first = ask(s, prompt)
            n = first["usage"]["prompt_tokens"]
            # its blocks are in the store (the worker says so with its next heartbeats)
            want = pushed + (n - 1) // 16 * block_bytes
            wait_for(lambda want=want: _total(_metrics(s), "device>shared") >= want, 20,
                     "the first worker's blocks in the store")
            hits = _total(_metrics(s), "shared")
            again = ask(s, prompt)  # the other worker
            assert again["choices"][0]["text"] == first["choices"][0]["text"]
            cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached == (n - 1) // 16 * 16, again["usage"]
            s.wait_idle()
            m = _metrics(s)
            assert _total(m, "shared") - hits == cached, m
            assert _total(m, "shared>device") >= cached // 16 * block_bytes
            if round_ == 0:  # the store dies: serve starts it again, empty
                pid = _store_pid(s.proc.pid)
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                ask(s, "While the store is down, requests are served all the same. " * 3)
                wait_for(lambda pid=pid: _store_pid(s.proc.pid) not in (None, pid), 20,
                         "the store started again")
    finally:
        s.close()


# -- Mooncake Store, when installed (never a dependency) ---------------------------------------
def test_mooncake_addresses_are_checked_at_the_edge():
    from splitserve.kv.store_mooncake import parse_mooncake

    assert parse_mooncake("mooncake://10.0.0.5:50051?segment_gb=2") == ("10.0.0.5:50051", 2.0)
    assert parse_mooncake("mooncake://h:1") == ("h:1", 1.0)
    for bad in ("mooncake://h", "mooncake://h:1?segment_gb=0", "mooncake://h:1?size=3"):
        with pytest.raises(ValueError):
            parse_mooncake(bad)
    with pytest.raises(InvalidRequestError, match="segment_gb"):
        LLM("default", shared_cache="mooncake://h:1?segment_gb=x")


@pytest.fixture
def mooncake_master():
    import shutil
    import subprocess

    pytest.importorskip("mooncake.store")
    exe = shutil.which("mooncake_master") or os.path.join(os.path.dirname(sys.executable),
                                                          "mooncake_master")
    if not os.path.exists(exe):
        pytest.skip("mooncake_master is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics = s.getsockname()[1]
    proc = subprocess.Popen([exe, f"--rpc_port={port}", f"--metrics_port={metrics}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mooncake_master did not start"
                time.sleep(0.05)
        yield f"mooncake://127.0.0.1:{port}?segment_gb=0.0625"
    finally:
        proc.terminate()
        proc.wait(10)


def test_mooncake_store_client_puts_gets_matches_and_refuses_a_damaged_block(mooncake_master):
    from splitserve.kv.store_mooncake import MooncakeStoreClient

    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    a, b = MooncakeStoreClient(mooncake_master), MooncakeStoreClient(mooncake_master)
    blocks = {_h(i): os.urandom(4096) for i in range(4)}
    for k, v in blocks.items():
        a.put(k, v)
    assert a.flush() and a.dropped == 0
    assert b.match(list(blocks) + [_h(99)]) == 4
    assert all(b.get(k) == v for k, v in blocks.items())
    assert b.get(_h(99)) is None
    with a._lock:  # damaged in the store: a value whose digest no longer matches
        a._store.remove(a._key(_h(1)), True)
        assert a._store.put(a._key(_h(1)), bytes(16) + blocks[_h(1)]) == 0
    assert b.get(_h(1)) is None and b.corrupt == 1
    assert b.match(list(blocks)) == 1  # removed: the next lookup misses
    b.close()
    a.close()

"""Decode-side prefix reuse: a decode worker keeps its prefix cache, a reservation reuses the
leading blocks it holds (a conversation's earlier turns, decoded there), the prefill worker
writes only the rest, and the router hands a prompt to the decode worker that holds most of
it."""

import pytest

from splitserve.config import SchedulerConfig
from splitserve.disagg.handover import DecodeSide, PrefillSide, Reserved
from splitserve.engine.scheduler import Scheduler
from splitserve.errors import SplitServeError
from splitserve.kv.hashing import block_hashes
from splitserve.kv.manager import KVCacheManager
from splitserve.request import Request, SamplingParams

ROOT = b"\x00" * 16


def _decode_scheduler(num_blocks=32, block_size=4):
    kv = KVCacheManager(num_blocks, block_size, ROOT)
    return Scheduler(SchedulerConfig(role="decode", max_num_batched_tokens=64), kv, 1024)


def _finish(s: Scheduler, rid: str, first: int, n_decode: int) -> Request:
    """Admit rid with its first token and decode it to the end (every token: 5)."""
    s.admit(rid, first)
    req = s.requests[rid]
    while not req.is_finished:
        out = s.schedule()
        s.update_from_output(out, {c.request.request_id: 5 for c in out.chunks if c.sample})
    return req


def test_a_reservation_reuses_the_blocks_of_the_conversation_decoded_here():
    s = _decode_scheduler()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    turn1 = Request("t1", list(range(10, 20)), params)  # 10 tokens: blocks 0, 1 full
    ids1 = s.reserve(turn1)
    assert turn1.num_cached_tokens == 0 and len(ids1) == 3
    done = _finish(s, "t1", 99, 5)
    # prompt + answer: 16 tokens; the last one's KV was never computed, so blocks 0..2 full
    history = done.all_token_ids
    turn2 = Request("t2", history + [7, 8, 9, 1, 2, 3], params)  # 22 tokens
    ids2 = s.reserve(turn2)
    assert turn2.num_cached_tokens == 12  # the full blocks of what turn 1 computed here
    assert ids2[:2] == ids1[:2] and len(ids2) == 6  # (block 2: filled by decoding here)
    hashes = block_hashes(turn2.prompt_token_ids, 4, ROOT)
    assert [s.kv.pool.lookup(h).block_id for h in hashes[:3]] == ids2[:3]
    assert s.kv.num_hit_tokens == 12 and s.kv.num_queried_tokens == 10 + 22
    s.check_integrity()
    # a prompt that is all cached full blocks reuses all of them (the prefill worker computes
    # the first token; nothing of the prompt moves)
    again = Request("t3", history[:12], params)
    assert len(s.reserve(again)) == 3 and again.num_cached_tokens == 12
    s.check_integrity()


def test_the_prefill_worker_writes_only_the_blocks_after_those_held():
    side = PrefillSide(block_size=4)
    t = side.add("r", "d0", list(range(10, 16)), prompt_len=22, skip_blocks=3)
    # its own cache had 8 tokens: the first chunk [8, 16) lies partly in the held blocks
    assert t.chunk_blocks(8, 8, 4) == (3, 4)
    t.chunk_written(8, 8, 4)
    assert t.chunk_blocks(16, 6, 4) == (4, 6)
    # a chunk wholly inside the held blocks writes nothing
    u = side.add("u", "d0", list(range(6)), prompt_len=22, skip_blocks=4)
    assert u.chunk_blocks(0, 8, 4) == (4, 4)
    with pytest.raises(SplitServeError, match="held already"):
        side.add("v", "d0", list(range(6)), prompt_len=22, skip_blocks=6)
    # without skip, as before: from block 0 on the first chunk (the prefill's own hits too)
    w = side.add("w", "d0", list(range(6)), prompt_len=22)
    assert w.chunk_blocks(8, 8, 4) == (0, 4)


def test_the_decode_side_reports_the_reused_blocks():
    d = DecodeSide()
    d.queue("r", "p0", "payload")
    acts = d.tick(0.0, lambda payload: ([4, 5, 6], 2))
    assert acts == [Reserved("r", [4, 5, 6], 2)]


def test_the_router_hands_a_conversation_to_the_decode_worker_that_holds_it():
    from splitserve.router.state import RouterState

    s = RouterState(routing="cache-aware")
    s.block_size = 4
    s.add_worker("p0", "prefill", 1000, 0.0)
    for w in ("d0", "d1"):
        s.add_worker(w, "decode", 1000, 0.0)
    assert s.wants_hashes()  # one prefill worker, but two decode workers to choose from
    chain = block_hashes(list(range(40)), 4, ROOT)
    s.prefix_index.snapshot("p0", [])
    s.prefix_index.snapshot("d0", [])
    s.prefix_index.snapshot("d1", chain[:6])
    for i in range(3):
        t = s.route(f"r{i}", 40, 0.0, block_hashes=chain)
        assert t.decode == "d1"
    # the balance guard: d1 now has 3 more in flight; 2 more and it has 5 > 4: d0 takes it
    for i in range(2):
        s.workers["d1"].requests.add(f"x{i}")
    assert s.route("r9", 40, 0.0, block_hashes=chain).decode == "d0"
    # nothing held anywhere: the load decides
    other = block_hashes([3] * 40, 4, ROOT)
    assert s.route("n", 40, 0.0, block_hashes=other).decode == "d0"


@pytest.mark.real_model
def test_multi_turn_chat_moves_only_the_new_blocks_and_matches_the_offline_engine(
        real_checkpoint):
    """Through real processes (1 prefill + 1 decode worker): each turn's prompt is the last
    one + its answer + a new message. From the second turn on, the KV bytes the prefill
    worker sends (its transfer counter) cover only the blocks after those of the previous
    prompt, which the decode worker holds; the greedy answers equal the offline engine's."""
    import httpx
    from serving_harness import Server

    from splitserve import LLM

    per_block = 30 * 2 * 16 * 3 * 64 * 4  # fp32 KV of one 16-token block of the real model
    questions = ["Name a planet with rings.", "How many moons does it have, roughly?",
                 "And which spacecraft visited it first?"]
    offline = LLM("default", checkpoint=real_checkpoint, dtype="float32")
    greedy = SamplingParams(temperature=0, max_tokens=12)

    def sent_bytes(s) -> float:
        s.wait_idle()  # (its heartbeats carry the counters)
        return sum(float(line.split()[-1])
                   for line in httpx.get(s.url + "/metrics", timeout=5).text.splitlines()
                   if line.startswith("splitserve_kv_transfer_bytes_total{")
                   and 'direction="sent"' in line)

    # tcp: the decode worker checks each layer's blocks (none below those it reused)
    s = Server("--prefill", "1", "--decode", "1", "--dtype", "float32", "--kv-transport", "tcp")
    try:
        msgs, last_len, before = [], 0, sent_bytes(s)
        for k, q in enumerate(questions):
            msgs.append({"role": "user", "content": q})
            r = httpx.post(s.base_url + "/chat/completions", timeout=120, json={
                "messages": msgs, "max_tokens": 12, "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            answer = body["choices"][0]["message"]["content"]
            want = offline.generate([offline.engine.apply_chat_template(msgs)], greedy)[0].text
            assert answer == want, k
            n = body["usage"]["prompt_tokens"]
            after = sent_bytes(s)
            moved = (after - before) / per_block
            total = -(-n // 16)
            print(f"turn {k + 1}: {n} prompt tokens in {total} blocks, {moved:g} moved")
            if k == 0:
                assert moved == total  # the whole prompt
            else:  # only what follows the previous prompt's full blocks (held by decode)
                assert 1 <= moved <= total - last_len // 16, (k, moved, total, last_len)
                # usage counts the prefill worker's hit (the previous prompt it computed), not
                # the decode worker's reuse (which also holds the previous answer)
                cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
                assert cached == min(last_len // 16, (n - 1) // 16) * 16, (k, cached)
            before, last_len = after, n
            msgs.append({"role": "assistant", "content": answer})
    finally:
        s.close()


def test_the_balance_guard_is_a_setting():
    from splitserve.errors import InvalidRequestError
    from splitserve.router.state import RouterState

    chain = block_hashes(list(range(40)), 4, ROOT)
    for imbalance, want in ((4, "c0"), (100, "c1")):
        s = RouterState(routing="cache-aware", max_imbalance=imbalance)
        s.block_size = 4
        for w in ("c0", "c1"):
            s.add_worker(w, "colocated", 1000, 0.0)
        s.prefix_index.snapshot("c0", [])
        s.prefix_index.snapshot("c1", chain)
        for i in range(6):  # c1 busy decoding 6 more than c0 (nothing queued)
            s.workers["c1"].requests.add(f"x{i}")
        assert s.route("r", 40, 0.0, block_hashes=chain).worker == want, imbalance
    with pytest.raises(InvalidRequestError, match="max_imbalance"):
        RouterState(routing="cache-aware", max_imbalance=-1)

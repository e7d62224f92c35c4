"""The scheduler and its three roles, driven with a fake model (plain Python, no torch)."""

import pytest

from splitserve.config import SchedulerConfig
from splitserve.engine.scheduler import Scheduler
from splitserve.errors import InvalidRequestError
from splitserve.kv.hashing import root_hash
from splitserve.kv.manager import KVCacheManager
from splitserve.request import Request, RequestStatus, SamplingParams

EOS = 2


def make(num_blocks=64, block_size=4, budget=16, chunked=True, role="colocated", max_seqs=16, max_len=256,
         cap=None):
    kv = KVCacheManager(num_blocks, block_size, root_hash("m", block_size))
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                          chunked_prefill=chunked, role=role, prefill_chunk_while_decoding=cap)
    return Scheduler(cfg, kv, max_model_len=max_len, eos_token_ids=[EOS])


def req(rid, n_prompt, max_tokens=4, prefix=None, **kw):
    """Prompts of different ids share no tokens (no accidental prefix hits) unless `prefix`."""
    base = 1000 * (sum(map(ord, prefix or rid)) % 50 + 1)
    return Request(rid, [base + i for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens, **kw))


def step(s, token=lambda r: 7):
    """One step with a fake model that samples token(r)."""
    out = s.schedule()
    assert out.num_batched_tokens <= s.config.max_num_batched_tokens or len(out.chunks) == 1
    sampled = {c.request.request_id: token(c.request) for c in out.chunks if c.sample}
    s.update_from_output(out, sampled)
    s.check_integrity()
    return out


def run(s, max_steps=1000, token=lambda r: 7):
    outs = []
    while s.has_unfinished() and max_steps:
        outs.append(step(s, token))
        max_steps -= 1
    assert not s.has_unfinished()
    return outs


def test_chunked_prefill_runs_decodes_first_then_fills_budget():
    s = make(budget=16)
    s.add_request(req("a", 6, max_tokens=10))
    step(s)  # a: whole prompt (6 tokens), samples its first token
    s.add_request(req("b", 40))
    out = step(s)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("a", 1), ("b", 15)]
    assert not out.chunks[1].sample
    out = step(s)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("a", 1), ("b", 15)]
    out = step(s)  # b's last 10 tokens, then b samples
    assert [(c.request.request_id, c.num_new_tokens, c.sample) for c in out.chunks] == [
        ("a", 1, True), ("b", 10, True)]
    run(s)
    assert s.kv.pool.usage()["in_use"] == 0


def test_prefill_priority_stalls_decodes_and_never_chunks():
    s = make(budget=16, chunked=False)
    s.add_request(req("a", 6, max_tokens=10))
    step(s)
    s.add_request(req("b", 12))
    out = step(s)  # b's whole prompt, a's decode waits
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("b", 12)]
    out = step(s)
    assert sorted(c.request.request_id for c in out.chunks) == ["a", "b"]
    # a prompt longer than the budget still runs whole, alone
    s.add_request(req("c", 40))
    out = step(s)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("c", 40)]
    run(s)


def test_finishes_on_length_eos_and_stop_token():
    s = make()
    a, b, c = req("a", 5, max_tokens=3), req("b", 5, max_tokens=50), req("c", 5, max_tokens=50, stop_token_ids=(9,))
    for r in (a, b, c):
        s.add_request(r)
    run(s, token=lambda r: {"a": 7, "b": EOS if len(r.output_token_ids) == 2 else 7, "c": 9}[r.request_id])
    assert (a.status, len(a.output_token_ids)) == (RequestStatus.FINISHED_LENGTH, 3)
    assert (b.status, b.stop_reason, len(b.output_token_ids)) == (RequestStatus.FINISHED_STOPPED, EOS, 3)
    assert (c.status, c.stop_reason, c.output_token_ids) == (RequestStatus.FINISHED_STOPPED, 9, [9])
    d = req("d", 5, max_tokens=3, ignore_eos=True)
    s.add_request(d)
    run(s, token=lambda r: EOS)
    assert d.status is RequestStatus.FINISHED_LENGTH and d.output_token_ids == [EOS] * 3


def test_context_limit_finishes_with_length():
    s = make(max_len=8)
    r = req("a", 6, max_tokens=100)
    s.add_request(r)
    run(s)
    assert r.num_tokens == 8 and r.status is RequestStatus.FINISHED_LENGTH


def test_bad_requests_are_refused_before_queueing():
    s = make(num_blocks=4, block_size=4, max_len=100)
    with pytest.raises(InvalidRequestError, match="context"):
        s.add_request(req("a", 100))
    with pytest.raises(InvalidRequestError, match="KV blocks"):
        s.add_request(req("b", 30))
    s.add_request(req("c", 3))
    with pytest.raises(InvalidRequestError, match="already in use"):
        s.add_request(req("c", 3))
    assert len(s.waiting) == 1


def test_preemption_by_recompute_when_blocks_run_out():
    # 6 blocks of 4 tokens: two requests of 8-token prompts growing to 16 tokens cannot both fit
    s = make(num_blocks=6, block_size=4, budget=64)
    a, b = req("a", 8, max_tokens=8), req("b", 8, max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    seen_preempt = False
    while s.has_unfinished():
        out = step(s, token=lambda r: 20 + len(r.output_token_ids))
        seen_preempt |= bool(out.preempted)
    assert seen_preempt and b.num_preemptions >= 1 and a.num_preemptions == 0
    # recompute reproduces the same sequence as an uninterrupted run
    assert a.output_token_ids == b.output_token_ids == [20 + i for i in range(8)]
    assert s.kv.pool.usage()["in_use"] == 0


def test_prefix_cache_hit_skips_computed_tokens():
    s = make(budget=64)
    s.add_request(req("a", 13, max_tokens=1))
    run(s)
    b = req("b", 13, max_tokens=1, prefix="a")
    s.add_request(b)
    out = step(s)
    assert out.chunks[0].start == 12 and out.chunks[0].num_new_tokens == 1
    assert b.num_cached_tokens == 12
    run(s)


def test_max_num_seqs_limits_the_batch():
    s = make(max_seqs=2, budget=64)
    for i in range(4):
        s.add_request(req(f"r{i}", 3, max_tokens=5))
    out = step(s)
    assert len(out.chunks) == 2
    run(s)


def test_abort_frees_blocks_wherever_the_request_is():
    s = make(budget=8)
    s.add_request(req("run", 20, max_tokens=50))
    s.add_request(req("wait", 20))
    step(s)  # "run" mid-prefill, "wait" queued
    assert s.kv.block_ids("run")
    s.finish_request("run", RequestStatus.FINISHED_ABORTED)
    s.finish_request("wait", RequestStatus.FINISHED_ABORTED)
    s.check_integrity()
    assert not s.has_unfinished() and s.kv.pool.usage()["in_use"] == 0


def test_abort_during_step_is_ignored_by_update():
    s = make()
    s.add_request(req("a", 5))
    out = s.schedule()
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    s.update_from_output(out, {"a": 7})
    s.check_integrity()
    assert s.kv.pool.usage()["in_use"] == 0


def test_prefill_role_holds_blocks_until_release():
    s = make(role="prefill")
    r = req("a", 9, max_tokens=50)
    s.add_request(r)
    run(s)
    assert r.status is RequestStatus.FINISHED_PREFILLED and r.output_token_ids == [7]
    held = s.kv.block_ids("a")
    assert len(held) == 3  # 9 prompt tokens in blocks of 4
    s.check_integrity()
    s.release("a")
    s.check_integrity()
    assert s.kv.pool.usage()["in_use"] == 0


def test_decode_role_reserve_admit_decode():
    s = make(role="decode", num_blocks=8)
    r = req("a", 9, max_tokens=4)
    blocks = s.reserve(r)
    assert len(blocks) == 3 and r.status is RequestStatus.WAITING_FOR_KV
    assert s.reserve(req("big", 30)) is None  # does not fit now: refused, nothing held
    s.check_integrity()
    s.admit("a", 42)
    assert r.output_token_ids == [42] and r.num_computed_tokens == 9
    out = step(s)
    assert [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks] == [("a", 9, 1)]
    run(s)
    assert r.output_token_ids == [42, 7, 7, 7] and s.kv.pool.usage()["in_use"] == 0
    with pytest.raises(InvalidRequestError):
        s.admit("nope", 1)


def test_decode_role_prefills_locally_in_small_chunks_beside_its_decodes():
    # conditional disaggregation: the router gave the decode worker a prompt of its own
    s = make(role="decode", budget=16, cap=3)
    own = req("own", 20, max_tokens=2)
    s.add_request(own)
    out = step(s)  # nothing decoding: the whole budget goes to the prompt
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("own", 16)]
    handed = req("handed", 8, max_tokens=5)
    s.reserve(handed)
    s.admit("handed", 42)  # a hand-over lands while the local prefill is half done
    out = step(s)
    assert {c.request.request_id: c.num_new_tokens for c in out.chunks} == {"own": 3, "handed": 1}
    out = step(s)  # the last prompt token: the prompt is done, its first token sampled
    assert {c.request.request_id: c.num_new_tokens for c in out.chunks} == {"own": 1, "handed": 1}
    assert own.output_token_ids == [7]
    run(s)
    assert own.output_token_ids == [7, 7] and handed.output_token_ids == [42, 7, 7, 7, 7]
    assert s.kv.pool.usage()["in_use"] == 0


def test_prefill_chunk_while_decoding_caps_waiting_prompts_too_and_not_without_decodes():
    s = make(budget=16, cap=4)
    a = req("a", 4, max_tokens=8)
    s.add_request(a)
    step(s)  # a prefilled, decoding from now on
    s.add_request(req("b", 12))
    s.add_request(req("c", 12))
    out = step(s)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("a", 1), ("b", 4)]
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    out = step(s)  # nothing decodes: the cap is off, the full budget prefills
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("b", 8), ("c", 8)]
    with pytest.raises(InvalidRequestError):
        SchedulerConfig(prefill_chunk_while_decoding=0)


def test_a_chunk_table_caps_prompt_tokens_by_how_many_decode():
    """(16, 6, 3, 1): alone the full budget, beside 1 decode 6 prompt tokens a step, beside 2
    decodes 3, beside 3 or more 1 (never none: the prompt under way must end)."""
    s = make(budget=16, cap=(16, 6, 3, 1))
    a, b = req("a", 4, max_tokens=20), req("b", 4, max_tokens=20)
    s.add_request(a)
    step(s)  # a decodes from now on
    s.add_request(req("p", 40))
    assert [(c.request.request_id, c.num_new_tokens) for c in step(s).chunks] == [("a", 1), ("p", 6)]
    s.add_request(b)  # waits behind p (FIFO), then joins
    chunks = [(c.request.request_id, c.num_new_tokens) for c in step(s).chunks]
    assert chunks == [("a", 1), ("p", 6)], chunks
    s.finish_request("p", RequestStatus.FINISHED_ABORTED)
    step(s)  # b prefilled (beside 1 decode: 4 <= 6 tokens)
    s.add_request(req("q", 40))
    chunks = [(c.request.request_id, c.num_new_tokens) for c in step(s).chunks]
    assert chunks == [("a", 1), ("b", 1), ("q", 3)], chunks
    s.add_request(c3 := req("c", 1, max_tokens=20))
    s.finish_request("q", RequestStatus.FINISHED_ABORTED)
    step(s)  # c (1 token) prefilled beside 2 decodes
    assert c3.output_token_ids
    s.add_request(req("r", 40))
    chunks = [(c.request.request_id, c.num_new_tokens) for c in step(s).chunks]
    assert chunks == [("a", 1), ("b", 1), ("c", 1), ("r", 1)], chunks  # 3 decodes: 1 token
    with pytest.raises(InvalidRequestError, match=">= 1"):
        SchedulerConfig(prefill_chunk_while_decoding=(6, 0))


def test_decode_role_first_token_can_finish():
    s = make(role="decode")
    r = req("a", 5, max_tokens=1)
    s.reserve(r)
    s.admit("a", 7)
    assert r.status is RequestStatus.FINISHED_LENGTH and s.kv.pool.usage()["in_use"] == 0


def test_request_outgrowing_the_whole_pool_finishes_with_length_not_a_livelock():
    s = make(num_blocks=2, block_size=4)
    r = req("a", 3, max_tokens=50, ignore_eos=True)
    s.add_request(r)
    outs = run(s, max_steps=50)
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_tokens <= 9
    # one last step finishes it (reported in `finished`); no empty spinning before that
    assert all(not o.is_empty for o in outs[:-1]) and outs[-1].finished == [r]
    assert s.kv.pool.usage()["in_use"] == 0


def test_release_of_an_unfinished_prefill_aborts_it():
    s = make(role="prefill", budget=4)
    r = req("a", 9)
    s.add_request(r)
    step(s)  # mid-prefill
    s.release("a")
    s.check_integrity()
    assert r.status is RequestStatus.FINISHED_ABORTED and not s.has_unfinished()
    assert s.kv.pool.usage()["in_use"] == 0


def test_decode_role_local_prefill_waits_while_reservations_hold_every_sequence_slot():
    s = make(role="decode", max_seqs=2)
    s.reserve(req("r1", 4))
    s.reserve(req("r2", 4))
    s.add_request(req("own", 4))
    assert step(s).is_empty  # two reservations fill max_num_seqs: the local prompt waits
    s.finish_request("r1", RequestStatus.FINISHED_ABORTED)
    assert [c.request.request_id for c in step(s).chunks] == ["own"]


def test_a_prompts_last_token_is_not_taken_for_a_decode():
    s = make(budget=5, cap=2)
    s.add_request(req("a", 6))
    step(s)  # 5 of 6 prompt tokens
    s.add_request(req("b", 8))
    out = step(s)  # a's last prompt token is no decode: the cap stays off, b gets the rest
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("a", 1), ("b", 4)]

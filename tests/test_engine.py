"""Engine invariants on the real model (greedy, fp32): batching, chunking, prefix caching and
preemption must not change a single token; the fast attention must match its plain twin."""

import pytest

from splitserve import LLM, SamplingParams
from splitserve.engine.engine import LLMEngine
from splitserve.errors import InvalidRequestError

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "List three facts about the Moon. Mention its distance from the Earth, its gravity and the "
    "tides. Be concise and precise in every answer you give to the reader of this text.",
    "1, 2, 3, 5, 8, 13,",
    "Translate to French: The cat sleeps on the warm windowsill in the afternoon sun.",
]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def ck(real_checkpoint):
    return real_checkpoint


def make(ck, **kw):
    kw.setdefault("dtype", "float32")
    kw.setdefault("kv_cache_memory_gb", 0.25)
    return LLM("default", checkpoint=ck, **kw)


def tokens(llm, prompts=PROMPTS, params=GREEDY):
    outs = llm.generate(prompts, params)
    llm.engine.check_integrity()
    assert llm.engine.kv_manager.pool.usage()["in_use"] == 0
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def baseline(ck):
    """One prompt at a time, whole prefill, no prefix caching."""
    llm = make(ck, enable_prefix_caching=False, max_num_batched_tokens=4096)
    return [tokens(llm, [p])[0] for p in PROMPTS]


def test_batched_equals_one_at_a_time(ck, baseline):
    assert tokens(make(ck, enable_prefix_caching=False, max_num_batched_tokens=4096)) == baseline


def test_chunked_prefill_equals_whole_prefill(ck, baseline):
    # 7-token budget: prompts cut into chunks that straddle block boundaries
    assert tokens(make(ck, enable_prefix_caching=False, max_num_batched_tokens=7)) == baseline


def test_prefill_priority_mode_equals_baseline(ck, baseline):
    assert tokens(make(ck, chunked_prefill=False, max_num_batched_tokens=64)) == baseline


def test_prefix_cache_hit_equals_miss(ck, baseline):
    llm = make(ck, block_size=4)
    assert tokens(llm) == baseline  # fills the cache
    outs = llm.generate(PROMPTS, GREEDY)  # every prompt now hits its own prefix
    assert [o.token_ids for o in outs] == baseline
    # every prompt with at least one full block before its last token hits
    assert all(o.num_cached_tokens == (len(o.prompt_token_ids) - 1) // 4 * 4 for o in outs)
    assert sum(o.num_cached_tokens for o in outs) > 0
    # a prompt that shares a prefix with an earlier one but continues differently
    shared = PROMPTS[2].replace("concise", "brief")
    miss = make(ck, enable_prefix_caching=False).generate([shared], GREEDY)[0]
    hit = llm.generate([shared], GREEDY)[0]
    assert hit.num_cached_tokens > 0 and hit.token_ids == miss.token_ids
    llm.engine.check_integrity()


def test_preempted_equals_uninterrupted(ck):
    # 40 new tokens each: the first two requests (4 and 18 prompt tokens) grow to 3 + 4 blocks
    # of 16, more than the 5 there are, so the later one is preempted and recomputed
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = tokens(make(ck, enable_prefix_caching=False), PROMPTS[:3], params)
    eng = make(ck, num_blocks=5, enable_prefix_caching=False).engine
    ids = [eng.add_request(p, params) for p in PROMPTS[:3]]
    reqs = dict(eng.scheduler.requests)
    out = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.token_ids
        eng.check_integrity()
    assert sum(r.num_preemptions for r in reqs.values()) > 0
    assert [out[i] for i in ids] == expected


def test_reference_attention_matches_fast_attention(ck, baseline):
    llm = make(ck, max_num_batched_tokens=7)  # chunks with cached context, and decodes
    llm.engine.model.set_attention_backend("reference")
    assert tokens(llm) == baseline


def test_streaming_deltas_add_up_and_stop_strings_cut(ck):
    llm = make(ck)
    eng = llm.engine
    eng.add_request(PROMPTS[3], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    text = ""
    while eng.has_unfinished():
        for o in eng.step():
            text += o.new_text
            final = o
    assert text == final.text and final.finish_reason == "length" and len(final.token_ids) == 30
    # stop at the second comma-separated number that appears
    stop = final.text.strip().split(",")[1].strip()
    assert stop
    o = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop and stop not in o.text
    assert final.text.startswith(o.text)
    eng.check_integrity()


def test_abort_frees_everything(ck):
    eng = make(ck, max_num_batched_tokens=8).engine
    a = eng.add_request(PROMPTS[2], GREEDY)
    b = eng.add_request(PROMPTS[0], GREEDY)
    eng.step()
    eng.step()
    assert eng.abort_request(a).finish_reason == "abort"
    eng.abort_request(b)
    assert not eng.has_unfinished()
    eng.check_integrity()
    assert eng.kv_manager.pool.usage()["in_use"] == 0


def test_a_step_whose_forward_raises_fails_its_requests_and_the_engine_goes_on(ck, baseline):
    """The requests of the failed step (one decoding, one mid-prefill) end with "error"; their
    blocks are freed and none of that step's KV is cached; the engine then serves the same
    prompts to the baseline's tokens."""
    llm = make(ck, enable_prefix_caching=True)
    eng = llm.engine
    poison = eng.encode(PROMPTS[2])

    def boom(out):
        if any(ch.request.prompt_token_ids == poison for ch in out.chunks):
            raise RuntimeError("boom")

    eng.before_forward = boom
    a = eng.add_request(PROMPTS[0], GREEDY)
    for _ in range(3):
        eng.step()  # a is decoding
    p = eng.add_request(poison, GREEDY)
    outs = {o.request_id: o for o in eng.step()}  # a's decode and p's prefill: one step
    assert {r: (o.finish_reason, o.error) for r, o in outs.items()} == {
        a: ("error", "RuntimeError: boom"), p: ("error", "RuntimeError: boom")}
    assert len(outs[a].token_ids) == 3 and outs[p].token_ids == []
    assert not eng.has_unfinished() and eng.step_errors == 1
    eng.check_integrity()
    assert eng.kv_manager.pool.usage()["in_use"] == 0
    eng.before_forward = None
    outs = llm.generate([PROMPTS[0], PROMPTS[2]], GREEDY)
    assert [o.token_ids for o in outs] == [baseline[0], baseline[2]]
    assert outs[1].num_cached_tokens == 0, "the failed step's KV must not be in the prefix cache"


def test_bad_prompts_raise_and_lose_nothing(ck):
    llm = make(ck, max_model_len=64)
    with pytest.raises(InvalidRequestError, match="context"):
        llm.generate(["word " * 100], GREEDY)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate([[1, 2, 10**9]], GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]], GREEDY)
    # a batch with one bad prompt queues nothing
    with pytest.raises(InvalidRequestError):
        llm.generate(["fine", "word " * 100], GREEDY)
    assert not llm.engine.has_unfinished()
    assert llm.engine.kv_manager.pool.usage()["in_use"] == 0
    assert len(llm.generate(["fine"], GREEDY)[0].token_ids) == 12


def test_engine_config_errors(ck):
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        LLMEngine(checkpoint=ck, dtype="float32", max_model_len=10**6)
    with pytest.raises(InvalidRequestError, match="dtype"):
        LLMEngine(checkpoint=ck, dtype="float16")


def test_duplicate_id_leaves_the_live_request_alone(ck):
    eng = make(ck).engine
    eng.add_request(PROMPTS[0], GREEDY, request_id="a")
    eng.step()
    with pytest.raises(InvalidRequestError, match="already in use"):
        eng.add_request(PROMPTS[1], GREEDY, request_id="a")
    final = None
    while eng.has_unfinished():
        for o in eng.step():
            final = o
        eng.check_integrity()
    assert final.request_id == "a" and len(final.token_ids) == GREEDY.max_tokens


def test_sequence_larger_than_the_cache_ends_with_length(ck):
    # 3 blocks of 16 tokens hold 48 tokens: generation stops there instead of spinning
    llm = make(ck, num_blocks=3)
    o = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))[0]
    assert o.finish_reason == "length" and len(o.prompt_token_ids) + len(o.token_ids) <= 49
    llm.engine.check_integrity()

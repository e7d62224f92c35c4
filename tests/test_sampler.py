"""Batched sampling and SamplingParams validation."""

import pytest
import torch

from splitserve.engine.sampler import Sampler
from splitserve.errors import InvalidRequestError
from splitserve.request import SamplingParams


def logits(n=4, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * 3


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    s = Sampler(torch.device("cpu"))
    x = logits()
    ids = [f"r{i}" for i in range(4)]
    greedy = s.sample(x, ids, [SamplingParams(temperature=0)] * 4).token_ids
    assert greedy == x.argmax(-1).tolist()
    topk1 = s.sample(x, ids, [SamplingParams(temperature=1.5, top_k=1)] * 4).token_ids
    assert topk1 == greedy
    tiny_p = s.sample(x, ids, [SamplingParams(temperature=1.0, top_p=1e-6)] * 4).token_ids
    assert tiny_p == greedy


def test_mixed_batch_keeps_greedy_rows_greedy():
    s = Sampler(torch.device("cpu"))
    x = logits(8)
    params = [SamplingParams(temperature=0 if i % 2 else 2.0) for i in range(8)]
    toks = s.sample(x, [f"r{i}" for i in range(8)], params).token_ids
    for i in range(1, 8, 2):
        assert toks[i] == int(x[i].argmax())


def test_seeded_requests_do_not_depend_on_the_batch():
    x = logits(3, seed=1)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [Sampler(torch.device("cpu"), seed=0).sample(x[1:2], ["a"], [p]).token_ids[0] for _ in range(1)]
    s = Sampler(torch.device("cpu"), seed=99)
    batched = s.sample(x, ["x", "a", "y"], [SamplingParams(temperature=1.0), p, SamplingParams()]).token_ids
    assert batched[1] == alone[0]
    # and a seeded stream continues deterministically over steps
    def stream(seed_other):
        s = Sampler(torch.device("cpu"), seed=seed_other)
        return [s.sample(x[1:2], ["a"], [p]).token_ids[0] for _ in range(20)]
    assert stream(1) == stream(2)
    assert len(set(stream(1))) > 1  # it really samples


def test_sampling_follows_the_distribution():
    vocab = 5
    x = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0001]])).repeat(4000, 1)
    s = Sampler(torch.device("cpu"), seed=0)
    toks = torch.tensor(s.sample(x, [f"r{i}" for i in range(4000)], [SamplingParams()] * 4000).token_ids)
    freq = torch.bincount(toks, minlength=vocab).float() / 4000
    assert torch.allclose(freq[:4], torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.03)
    # top_k=2 keeps only the two most likely tokens, renormalised
    toks = torch.tensor(s.sample(x, [f"r{i}" for i in range(4000)], [SamplingParams(top_k=2)] * 4000).token_ids)
    freq = torch.bincount(toks, minlength=vocab).float() / 4000
    assert freq[:2].sum() == 0 and abs(freq[3] - 4 / 7) < 0.03
    # top_p=0.65 keeps {0.4, 0.3} (mass before 0.3 is 0.4 < 0.65; before 0.2 it is 0.7)
    toks = torch.tensor(s.sample(x, [f"r{i}" for i in range(4000)], [SamplingParams(top_p=0.65)] * 4000).token_ids)
    assert set(toks.tolist()) == {2, 3}


def test_logprobs_match_log_softmax():
    s = Sampler(torch.device("cpu"))
    x = logits(2)
    res = s.sample(x, ["a", "b"], [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)])
    ref = torch.log_softmax(x, -1)
    chosen, top = res.logprobs[0]
    assert chosen == pytest.approx(float(ref[0].max()), abs=1e-5)
    assert [t for t, _ in top] == ref[0].topk(3).indices.tolist()
    assert [v for _, v in top] == pytest.approx(ref[0].topk(3).values.tolist(), abs=1e-5)
    assert res.logprobs[1] is None


@pytest.mark.parametrize("kw,match", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=1.5), "max_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(seed="x"), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(logprobs=21), "logprobs"),
])
def test_invalid_sampling_params_name_the_problem(kw, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**kw)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="END").stop == ("END",)

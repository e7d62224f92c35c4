"""SlackChunks (serve --local-prefill slo, the decode workers' side) against hand-computed
figures: a linear latency model (10 ms a step, 1 ms a prompt token, 5 ms a decode), a TPOT SLO
of 40 ms planned to in full (headroom 1), so every slack is a sum one can do on paper."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from splitserve.router.admission import CostModel
from splitserve.router.policies import SlackChunks
from splitserve.sim.latency.base import Batch, LatencyModel


class Linear(LatencyModel):
    name = "linear"

    def step_time(self, batch: Batch) -> float:
        return 0.010 + 0.001 * batch.num_prefill_tokens + 0.005 * batch.num_decodes


def policy(calibration: int = 0) -> SlackChunks:
    return SlackChunks(CostModel(Linear(), chunk_tokens=512), 0.040, headroom=1.0,
                       calibration=calibration)


def r(rid, max_tokens, out=1, prompt=20, computed=None):
    """A request as the policy reads it: `out` tokens generated so far."""
    return SimpleNamespace(request_id=rid, params=SimpleNamespace(max_tokens=max_tokens),
                           output_token_ids=[7] * out, num_tokens=prompt + out,
                           num_computed_tokens=prompt if computed is None else computed)


PROMPT = r("p", 16, out=0, prompt=400, computed=0)  # the local prefill whose chunk is sized


def test_idle_takes_the_whole_budget_unless_a_hand_over_is_on_its_way():
    assert policy().cap(0.0, [], [], PROMPT, 300) == 300
    assert policy().cap(0.0, [], [], None, 300) == 0  # no prompt: nothing to size
    # one of 3 tokens reserved here may land during the step and wait for it (its first token
    # comes at its admission): the step is held to the slack it will have, 2 x (40 - 15) =
    # 50 ms, a whole idle step: 10 ms + 40 tokens
    assert policy().cap(0.0, [], [r("x", 3)], PROMPT, 300) == 40
    assert policy().cap(0.0, [], [r("x", 1)], PROMPT, 300) == 300  # no TPOT to keep


def test_a_decodes_slack_is_what_it_banked_and_will_bank_and_time_spent_is_measured():
    p = policy()
    a = r("a", 11)
    # at 0 (just admitted, 1 of 11 out): 40 ms x 10 - 10 steps x 15 ms = 250 ms: a chunk of
    # 250 tokens (1 ms each) beside its decode
    assert p.cap(0.0, [a], [], PROMPT, 499) == 250
    # 0.2 s later only 5 more tokens (steps took longer than predicted): 400 - 200 - 5 x 15
    # = 125 ms left
    a6 = r("a", 11, out=6)
    assert p.cap(0.2, [a6], [], PROMPT, 499) == 125
    # at 0.4 s it can no longer meet 40 ms (400 - 400 - 75 < 0): its steps are held to the
    # SLO, 25 ms over its decode
    assert p.cap(0.4, [a6], [], PROMPT, 499) == 25
    # planned to 90 % of the SLO (36 ms) it is out of slack by 0.3 s, but not lost: no chunk
    q = SlackChunks(CostModel(Linear(), chunk_tokens=512), 0.040, headroom=0.9, calibration=0)
    q.cap(0.0, [a], [], None, 499)
    assert q.cap(0.3, [a6], [], PROMPT, 499) == 0  # 360 - 300 - 75 < 0 <= 400 - 300 - 75


def test_requests_on_their_way_join_the_batch_its_steps_are_priced_at():
    # a (11 tokens) decoding, x (30) reserved and taken to land now: a's 10 steps at 20 ms,
    # 400 - 200 = 200 ms (alone it had 250; x's own, 29 x (40 - 20) = 580 ms, does not bind)
    a = r("a", 11)
    assert policy().cap(0.0, [a], [r("x", 30)], PROMPT, 499) == 200
    assert policy().cap(0.0, [a], [], PROMPT, 499) == 250
    # 0.22 s on with no new token: with x landing now a could not make 40 ms (400 - 220 - 200
    # < 0), but x may land later: a is not lost (400 - 220 - 150 >= 0), so no chunk, not the
    # 25 ms a lost one's steps may take
    p = policy()
    p.cap(0.0, [a], [], None, 499)
    assert p.cap(0.22, [a], [r("x", 30)], PROMPT, 499) == 0
    assert p.cap(0.22, [a], [], PROMPT, 499) == 30


def test_the_steps_to_come_are_priced_at_the_batch_still_decoding_then():
    """b (21 tokens, its clock started 0.46 s ago, 1 out) and a (3 tokens, just admitted):
    2 steps of both at 20 ms, then 18 of b alone at 15 ms: a's slack 80 - 40 = 40 ms, b's
    800 - 460 - 310 = 30 ms, so 30 tokens. (Priced at today's batch for all of b's 20 steps,
    b would be lost: 800 - 460 - 400 < 0, and the step held to 20 ms over its decode.)"""
    p = policy()
    b = r("b", 21)
    p.cap(0.0, [b], [], None, 500)  # b's clock starts
    assert p.cap(0.46, [b, r("a", 3)], [], PROMPT, 500) == 30
    # the state is the batch's: nothing decoding, nothing kept
    p.cap(1.0, [], [], None, 500)
    assert p._start == {}


def test_steps_slower_than_predicted_scale_every_prediction_after_them():
    """Each step really takes twice what the model says (between two schedulings: the step
    and the worker's own work): the scale, averaged over ~8 steps, goes to 2, and a decode's
    slack and the chunks it buys are priced at that."""
    p = policy(calibration=8)
    now = 0.0
    for i in range(60):  # a (71 tokens) decodes alone, no prompt: 15 ms predicted, 30 taken
        p.cap(now, [r("a", 71, out=1 + i)], [], None, 500)
        now += 0.030
    assert p.scale == pytest.approx(2.0, rel=1e-3)
    # 61 out at 1.8 s: 40 x 70 - 1800 - 10 steps x 30 ms = 700 ms, at 2 ms a prompt token:
    # 350 tokens (priced at the model's 15 ms steps and 1 ms tokens: the whole budget, 500)
    assert p.cap(now, [r("a", 71, out=61)], [], PROMPT, 500) == 350
    # an idle gap (a step sized, then nothing for 100 s) leaves the scale alone
    p.cap(now + 100.0, [], [], None, 500)
    assert p.scale == pytest.approx(2.0, rel=1e-3)


def test_bad_settings_are_refused_by_name():
    c = CostModel(Linear())
    for tpot in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="TPOT SLO"):
            SlackChunks(c, tpot)
    with pytest.raises(ValueError, match="headroom"):
        SlackChunks(c, 0.04, headroom=0.0)


def test_the_scheduler_asks_the_policy_only_when_given_the_time():
    from splitserve.config import SchedulerConfig
    from splitserve.engine.scheduler import Scheduler
    from splitserve.kv.hashing import root_hash
    from splitserve.kv.manager import KVCacheManager
    from splitserve.request import Request, RequestStatus, SamplingParams

    calls = []

    class Fixed:
        def cap(self, now, decoding, reserved, prompt, budget):
            calls.append((now, [x.request_id for x in decoding], [x.request_id for x in reserved],
                          prompt and prompt.request_id, budget))
            return 5

    kv = KVCacheManager(64, 4, root_hash("m", 4))
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=16, role="decode",
                                  prefill_chunk_while_decoding=(16, 2)), kv, 256, prefill_policy=Fixed())

    def req(rid, n, m=8):
        return Request(rid, list(range(100, 100 + n)), SamplingParams(max_tokens=m))

    s.reserve(req("d", 4))
    s.admit("d", 7)  # decoding
    s.reserve(req("w", 4))  # on its way
    s.add_request(req("own", 40))
    out = s.schedule(1.5)
    assert calls == [(1.5, ["d"], ["w"], "own", 15)]  # 16 less the decode's token
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("d", 1), ("own", 5)]
    s.update_from_output(out, {"d": 7})
    out = s.schedule()  # no time: the config's table (beside 1 decode: 2)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("d", 1), ("own", 2)]
    assert len(calls) == 1
    s.update_from_output(out, {"d": 7})
    # the policy priced one prompt's chunk: a second prompt does not take what is left
    Fixed.cap = lambda self, now, decoding, reserved, prompt, budget: 15
    s.finish_request("own", RequestStatus.FINISHED_ABORTED)
    s.add_request(req("short", 3))
    s.add_request(req("next", 30))
    out = s.schedule(2.0)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("d", 1), ("short", 3)]


def test_a_preempted_request_recomputing_past_its_prompt_is_the_prompt_the_policy_sizes():
    """Recomputed after preemption, a request past its prompt but with many tokens left is
    neither decoding nor in prefill: the policy must size its chunks, or it never runs."""
    from splitserve.config import SchedulerConfig
    from splitserve.engine.scheduler import Scheduler
    from splitserve.kv.hashing import root_hash
    from splitserve.kv.manager import KVCacheManager
    from splitserve.request import Request, SamplingParams

    class Three:
        def cap(self, now, decoding, reserved, prompt, budget):
            return min(3, budget) if prompt is not None else 0

    kv = KVCacheManager(64, 4, root_hash("m", 4), enable_caching=False)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=16), kv, 256, prefill_policy=Three())
    x = Request("x", [100, 101, 102, 103], SamplingParams(max_tokens=20))
    s.add_request(x)
    for t in range(8):  # prefilled in 3 + 1, then decodes
        s.update_from_output(out := s.schedule(float(t)), {c.request.request_id: 7
                                                           for c in out.chunks if c.sample})
    assert len(x.output_token_ids) == 7
    s._preempt(x)  # 11 tokens to recompute, 3 a step
    before = len(x.output_token_ids)
    for t in range(8, 16):
        out = s.schedule(float(t))
        assert out.chunks, f"step {t}: nothing scheduled ({x.num_computed_tokens}/{x.num_tokens})"
        s.update_from_output(out, {c.request.request_id: 7 for c in out.chunks if c.sample})
    assert len(x.output_token_ids) > before


def test_the_cost_models_memo_stays_bounded():
    from splitserve.router import admission

    c = CostModel(Linear(), chunk_tokens=512)
    for i in range(admission.MEMO_MAX + 10):
        c.step_s(1 + i % 64, 64 * (i // 64), 1 + i % 500, 0)
    assert len(c._chunk) <= admission.MEMO_MAX



class CpuLike(LatencyModel):
    """This machine's shape, roughly (its fitted profile: ~4 ms a prompt token, a chunk's own
    overhead, a second decode ~30 % dearer than the first): a lone request decodes at 42 ms."""

    name = "cpu-like"

    def step_time(self, batch: Batch) -> float:
        return (0.030 + 0.0042 * batch.num_prefill_tokens + 0.010 * len(batch.prefill_tokens)
                + 0.012 * batch.num_decodes)


def test_in_the_simulator_slo_local_prefill_keeps_pure_pds_attainment_and_beats_it_loaded():
    """Prefill-heavy traffic, TPOT SLO 1.5x a lone request's (63 ms), TTFT 20 s: at a light
    rate going local must cost nothing (pure P/D meets nearly everything), at a rate the one
    prefill worker cannot keep up with it must keep clearly more requests within both SLOs
    (the fixed-chunk policy, --local-prefill auto, loses to both under this TPOT)."""
    from splitserve.bench import workloads as W
    from splitserve.bench.deployments import parse_deployment
    from splitserve.router.policies import SloLocalPrefill
    from splitserve.sim.run import SimSettings, Simulator

    lat = CpuLike()
    local = SloLocalPrefill.for_slo(CostModel(lat, 512, 8), 0.063, 64, ttft_s=20.0)
    base = W.synthetic("prefill-heavy", 60, 0)

    def met(deployment, rate, policy=None):
        sim = Simulator(parse_deployment(deployment, 256, 4096), lat, SimSettings(), quiet=True,
                        local_prefill=policy)
        recs = sim(W.at_rate(base, rate, 1.0, 0)).records
        return sum(1 for x in recs if x.ok and x.ttft <= 20.0
                   and (x.t_last - x.t_first) / max(1, x.n_out - 1) <= 0.063)

    # measured when written: 0.08 req/s 60 / 60 / 57 of 60 (pure / slo / auto), 0.25 req/s
    # 42 / 56 / 37
    assert met("pd", 0.08, local) >= met("pd-pure", 0.08)
    pure, slo, auto = met("pd-pure", 0.25), met("pd", 0.25, local), met("pd", 0.25)
    assert slo >= 1.25 * pure and slo > auto, (pure, slo, auto)

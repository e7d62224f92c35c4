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


def policy() -> SlackChunks:
    return SlackChunks(CostModel(Linear(), chunk_tokens=512), 0.040, headroom=1.0)


def r(rid, max_tokens, out=1, prompt=20, computed=None):
    """A request as the policy reads it: `out` tokens generated so far."""
    return SimpleNamespace(request_id=rid, params=SimpleNamespace(max_tokens=max_tokens),
                           output_token_ids=[7] * out, num_tokens=prompt + out,
                           num_computed_tokens=prompt if computed is None else computed)


PROMPT = r("p", 16, out=0, prompt=400, computed=0)  # the local prefill whose chunk is sized


def test_idle_with_nothing_on_the_way_takes_the_whole_budget():
    assert policy().cap(0.0, [], [], PROMPT, 300) == 300
    assert policy().cap(0.0, [], [], None, 300) == 0  # no prompt: nothing to size


def test_a_decodes_slack_is_what_it_banked_and_will_bank_and_time_spent_is_measured():
    p = policy()
    a = r("a", 11)
    # at 0 (just landed, 1 of 11 out): 40 ms x 10 - 10 steps x 15 ms = 250 ms; but one not
    # reserved yet, as short as a, could land too: 10 x (40 - 20 ms) = 200 ms binds
    assert p.cap(0.0, [a], [], PROMPT, 499) == 200
    assert p._last_extra == pytest.approx(0.200)
    # 0.2 s later only 5 more tokens (steps took longer than predicted): 400 - 200 - 5 x 15
    # = 125 ms of its own left. (`a` is not charged for the chunk above: its start stays 0.)
    a6 = r("a", 11, out=6)
    assert p.cap(0.2, [a6], [], PROMPT, 499) == 125
    # at 0.4 s it can no longer meet 40 ms; its steps are still held to the SLO: 40 - 15
    assert p.cap(0.4, [a6], [], PROMPT, 499) == 25


def test_a_reserved_request_bounds_the_step_it_may_land_in():
    # nothing decoding; one of 3 tokens on its way: 2 x 40 - 2 x 15 = 50 ms, a whole idle step
    p = policy()
    assert p.cap(0.0, [], [r("x", 3)], PROMPT, 512) == 40  # 10 ms + 40 tokens
    # it lands (charged the 50 ms that step took: it may have waited for all of it): its
    # slack is 80 - 50 - 2 x 15 = 0: no chunk until it is done
    assert p.cap(0.05, [r("x", 3)], [], PROMPT, 511) == 0
    # one prefilled here is not charged: its first token came at the end of its own step
    q = policy()
    assert q.cap(0.0, [], [], r("own", 3, out=0, computed=0), 512) == 512
    # its own 80 - 2 x 15 = 50 ms, and one as short not reserved yet 2 x (40 - 20) = 40 ms:
    # 40 tokens beside its decode (charged the 522 ms step before, it would be past saving: 25)
    assert q.cap(0.0, [r("own", 3)], [], PROMPT, 511) == 40


def test_the_steps_to_come_are_priced_at_the_batch_still_decoding_then():
    # two on the way, of 3 and 21 tokens: 2 steps of both (20 ms), then 18 of one (15 ms):
    # the short one's slack 80 - 40 = 40 ms, the long one's 800 - 310 = 490 ms
    p = policy()
    assert p.cap(0.0, [], [r("a", 3), r("b", 21)], PROMPT, 512) == 30
    # priced as if alone (15 ms steps) the short one would have had 50 ms: 40 tokens
    assert policy().cap(0.0, [], [r("a", 3)], PROMPT, 512) == 40


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
    from splitserve.request import Request, SamplingParams

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
    from splitserve.sim.run import Simulator, SimSettings
    from splitserve.router.policies import SloLocalPrefill

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

"""Admission arithmetic against hand-computed figures: a linear latency model (10 ms a step,
1 ms a prompt token, 5 ms a decode) makes every prediction a sum one can do on paper."""

from __future__ import annotations

import pytest

from splitserve.router.admission import SLO, Admission, CostModel, Overloaded
from splitserve.router.state import RouterState
from splitserve.sim.latency.base import Batch, LatencyModel


class Linear(LatencyModel):
    name = "linear"

    def step_time(self, batch: Batch) -> float:
        return 0.010 + 0.001 * batch.num_prefill_tokens + 0.005 * batch.num_decodes


def cost() -> CostModel:
    return CostModel(Linear(), chunk_tokens=100, busy_chunk_tokens=10)


def test_prefill_time_is_the_backlog_then_the_prompt_in_chunks():
    c = cost()
    # backlog 250 = 100 + 100 + 50: 0.11 + 0.11 + 0.06; prompt 150 = 100 + 50: 0.11 + 0.06
    assert c.prefill_s(250, 150) == pytest.approx(0.45)
    assert c.prefill_s(0, 0) == 0.0
    # a worker that also decodes 2 requests: 10-token chunks, each step +10 ms of decodes
    assert c.prefill_s(0, 25, decodes=2) == pytest.approx(2 * 0.030 + 0.025)
    assert CostModel(Linear(), 100, overhead_s=0.2).prefill_s(0, 100) == pytest.approx(0.31)
    assert c.decode_step_s(4, 500) == pytest.approx(0.030)
    assert c.max_batch(0.030, 100) == 4 and c.max_batch(0.012, 100) == 0


def _pd(admission: Admission | None = None) -> RouterState:
    s = RouterState(admission=admission)
    s.add_worker("p0", "prefill", 1000, 0.0)
    s.add_worker("d0", "decode", 1000, 0.0)
    return s


def _decoding(s: RouterState, rid: str, prompt: int, max_tokens: int, out: int) -> None:
    """A P/D request admitted at d0 that has generated `out` tokens."""
    s.route(rid, prompt, 0.0, max_tokens=max_tokens)
    assert s.on_reserved(rid, "d0", 0.0) == "p0"
    s.prefill_sent(rid, True)
    assert s.on_output(rid, "d0", True, tokens=out) is not None


def test_predictive_counts_its_own_prefill_and_reactive_only_the_backlog():
    slo = SLO(ttft_s=0.5, tpot_s=1.0)
    for mode, admitted in (("reactive", True), ("predictive", False)):
        s = _pd(Admission(mode, cost(), slo))
        s.admission.mode = "off"
        s.route("q", 300, 0.0, max_tokens=10)  # 300 tokens queued at p0: 0.33 s
        s.admission.mode = mode
        try:
            s.route("r", 300, 0.0, max_tokens=10)  # + its own 300: 0.66 s > 0.5 s
            got = True
        except Overloaded as e:
            got = False
            v = e.verdict
            assert v.reason == "ttft" and v.ttft_s == pytest.approx(0.66)
            assert e.retry_after_s == 1  # 0.16 s over, in whole seconds, at least 1
            assert "time to first token 0.66 s exceeds the SLO of 0.5 s" in str(e)
        assert got is admitted, mode
        s.check_loads()
        if not got:  # refused: nothing charged, nothing tracked
            assert "r" not in s.tracks and s.workers["p0"].queued_prompt_tokens == 300
            assert s.admission.counts == {"admitted": 1, "ttft": 1, "tpot": 0, "queue": 0}


def test_predictive_lets_in_what_will_fit_when_it_arrives_reactive_refuses_on_the_batch_now():
    """d0 decodes 3 requests with 2 tokens left each; a step of 4 decodes (30 ms) is over the
    25 ms TPOT SLO, but the newcomer's prefill (0.11 s) outlasts their 2 x 25 ms: predicted,
    it decodes beside nobody."""
    slo = SLO(ttft_s=1.0, tpot_s=0.025)
    outcomes = {}
    for mode in ("reactive", "predictive"):
        s = _pd(Admission("off", cost(), slo))
        for i in range(3):
            _decoding(s, f"d{i}", 50, 10, 8)
        s.admission.mode = mode
        try:
            s.route("new", 100, 0.0, max_tokens=10)
            outcomes[mode] = "admitted"
        except Overloaded as e:
            outcomes[mode] = e.verdict
    assert outcomes["predictive"] == "admitted"
    v = outcomes["reactive"]
    assert v.reason == "tpot" and v.tpot_s == pytest.approx(0.030)
    # one of the 3 must finish for 3 to fit (max_batch(25 ms) = 3): 2 tokens at 25 ms each
    assert v.retry_after_s == 1


def test_predictive_counts_requests_still_in_prefill_for_the_decode_worker():
    """Requests routed to d0 but not handed over yet will be decoding there when the newcomer
    arrives: 2 decoding (many tokens left) + 2 in prefill + it = 5 decodes, 35 ms > 30 ms."""
    slo = SLO(ttft_s=10.0, tpot_s=0.030)
    s = _pd(Admission("off", cost(), slo))
    for i in range(2):
        _decoding(s, f"d{i}", 50, 1000, 1)
    for i in range(2):
        s.route(f"p{i}", 20, 0.0, max_tokens=1000)
    s.admission.mode = "predictive"
    with pytest.raises(Overloaded) as e:
        s.route("new", 20, 0.0, max_tokens=10)
    assert e.value.reason == "tpot" and e.value.verdict.tpot_s == pytest.approx(0.035)
    # 5 in the batch, 4 fit: the first to leave are the decoding two, 999 tokens x 20 ms
    assert e.value.retry_after_s == 20
    s.admission.mode = "reactive"  # the batch now (2 + it) fits
    s.route("new", 20, 0.0, max_tokens=10)
    s.check_loads()


def test_a_full_worker_queue_refuses_in_every_mode_and_a_request_slo_only_tightens():
    s = _pd(Admission("off", max_queue=2))
    s.route("a", 10, 0.0)
    s.route("b", 10, 0.0)
    with pytest.raises(Overloaded) as e:
        s.route("c", 10, 0.0)
    assert e.value.reason == "queue" and e.value.retry_after_s == 1 and "queue is full" in str(e.value)
    s.finish("a")
    s.route("c", 10, 0.0)
    s.check_loads()

    s = _pd(Admission("predictive", cost(), SLO(0.2, 1.0)))
    with pytest.raises(Overloaded):
        s.route("x", 100, 0.0, max_tokens=4, slo=SLO(0.05, 1.0))  # its own: 0.11 s > 50 ms
    s.route("x", 100, 0.0, max_tokens=4, slo=SLO(100.0, 100.0))  # looser: the deployment's holds
    s.finish("x")
    # the deployment's TPOT (10 ms: less than one decode step), not the request's looser one
    v = Admission("predictive", cost(), SLO(10.0, 0.01)).decide(s, s.route("y", 10, 0.0), 0.0,
                                                                 SLO(10.0, 10.0))
    assert not v.admit and v.reason == "tpot"


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="admission mode"):
        Admission("sometimes")
    with pytest.raises(ValueError, match="needs a cost model"):
        Admission("predictive", None, SLO(1, 1))
    with pytest.raises(ValueError, match="tpot_s"):
        SLO(1.0, 0)
    with pytest.raises(ValueError, match="max_queue"):
        Admission("off", max_queue=-1)


def test_less_important_requests_are_refused_first():
    """priority 1 uses 80 % of the SLOs and 75 % of a queue: at a load the default priority
    still fits, it is refused; a more important one (-1) is judged by the full SLOs."""
    s = _pd(Admission("predictive", cost(), SLO(ttft_s=0.12, tpot_s=1.0), max_queue=4))
    # 100 prompt tokens: 0.11 s predicted; 0.12 s for priority <= 0, 0.096 s for priority 1
    with pytest.raises(Overloaded) as e:
        s.route("low", 100, 0.0, max_tokens=4, priority=1)
    assert e.value.reason == "ttft"
    s.route("normal", 100, 0.0, max_tokens=4)
    s.finish("normal")
    s.route("high", 100, 0.0, max_tokens=4, priority=-1)
    s.finish("high")
    s.admission.mode = "off"
    for i in range(3):
        s.route(f"q{i}", 10, 0.0, priority=-5)
    with pytest.raises(Overloaded) as e:  # 3 in flight = 75 % of 4
        s.route("low", 10, 0.0, priority=2)
    assert e.value.reason == "queue" and "for priority > 0" in str(e.value)
    s.route("normal", 10, 0.0)  # the 4th place is the default priority's
    with pytest.raises(Overloaded):
        s.route("more", 10, 0.0, priority=-1)
    s.check_loads()


def test_the_chunk_table_keeps_busy_steps_within_the_tpot_slo():
    c = cost()
    # 10 ms + 1 ms/prompt token + 5 ms/decode <= 40 ms: 25, 20, 15, 10, 5 tokens beside 1-5
    # decodes, then none; beside none, the whole budget (the decode workers' SlackChunks
    # hold such a step to what a hand-over on its way can absorb)
    assert c.chunk_table(0.040, 64, 100) == (100, 25, 20, 15, 10, 5, 0)
    assert c.chunk_table(0.040, 3, 100) == (100, 25, 20, 15)
    assert CostModel(Linear(), chunk_tokens=12).chunk_table(0.040, 64, 100) == (12, 12, 12, 12, 10, 5, 0)
    assert c.chunk_table(1.0, 8, 100) == (100,)  # the whole budget, whatever the batch


def test_slo_local_prefill_goes_local_only_where_the_chunks_fit_and_it_is_sooner():
    from splitserve.config import SchedulerConfig
    from splitserve.router.policies import DecodeLoad, SloLocalPrefill

    c = cost()
    table = c.chunk_table(0.040, 64, 100)
    p = SloLocalPrefill(c, table, context=100)
    # prefill worker: 300 queued + 100 = 4 chunks of 0.11 s = 0.44 s
    busy = DecodeLoad("d-busy", decoding=6, prefill_tokens=0)  # table: 0 -> no room
    two = DecodeLoad("d-two", decoding=2, prefill_tokens=0)  # 20-token chunks, 40 ms each
    assert p.local_s(busy, 100) is None
    assert p.local_s(DecodeLoad("d-5", decoding=5, prefill_tokens=0), 100) is not None  # 5 >= 4
    p4 = SloLocalPrefill(cost(), (25, 25, 20, 15, 10, 3), context=100)
    assert p4.local_s(DecodeLoad("d-5", decoding=5, prefill_tokens=0), 100) is None  # 3 < 4
    assert p.local_s(two, 100) == pytest.approx(5 * 0.040)
    assert p.pick(100, 300, [busy, two]) == "d-two"
    assert p.pick(100, 0, [busy, two]) is None  # 0.11 s on the prefill worker is sooner
    idle = DecodeLoad("d-idle", decoding=0, prefill_tokens=0)
    assert p.local_s(idle, 100) == pytest.approx(0.110)  # idle: one chunk of the whole budget
    assert p.pick(100, 0, [two, idle]) is None  # 0.11 s on the prefill worker too: not sooner
    assert p.pick(100, 1, [two, idle]) == "d-idle"  # 0.121 s on the prefill worker
    # with a TTFT SLO the prefill worker meets, no decode worker is slowed for it
    ttft = SloLocalPrefill(c, table, context=100, ttft_s=0.5)
    assert ttft.pick(100, 300, [busy, two]) is None  # 0.44 s <= 0.5 s
    assert ttft.pick(100, 400, [busy, two]) == "d-two"  # 0.55 s: over it, and d-two is sooner
    # a decode worker run without SlackChunks caps its steps with the same table, with at
    # least 1 token: a prefill under way ends however many hand-overs arrive
    assert p.worker_chunks() == (100, 25, 20, 15, 10, 5, 1)
    cfg = SchedulerConfig(role="decode", prefill_chunk_while_decoding=p.worker_chunks())
    assert [cfg.prefill_cap(b) for b in (0, 1, 2, 5, 6, 40)] == [100, 25, 20, 5, 1, 1]
    assert SchedulerConfig(prefill_chunk_while_decoding=8).prefill_cap(0) is None
    with pytest.raises(ValueError, match="one per number of decodes"):
        SchedulerConfig(role="decode", prefill_chunk_while_decoding=(4, -1))


def test_a_colocated_worker_prefills_in_whole_budget_chunks_beside_its_decodes():
    """No cap there: 200 prompt tokens beside 4 decodes are 2 steps of 100 + 4 decodes
    (0.13 s each), not 20 steps of the decode workers' 10-token chunks."""
    s = RouterState(admission=Admission("off", cost(), SLO(10.0, 10.0)))
    s.add_worker("c0", "colocated", 1000, 0.0)
    for i in range(4):
        s.route(f"d{i}", 10, 0.0, max_tokens=50)
        s.on_output(f"d{i}", "c0", False, tokens=1)
    s.admission.mode = "predictive"
    s.admission.slo = SLO(0.27, 10.0)
    t = s.route("new", 200, 0.0, max_tokens=4)
    assert t.worker == "c0"
    s.admission.slo = SLO(0.25, 10.0)
    with pytest.raises(Overloaded) as e:
        s.route("newer", 200, 0.0, max_tokens=4)
    assert e.value.verdict.ttft_s == pytest.approx(4 * 0.13)  # "new" (200 tokens) is ahead


def test_a_refused_request_leaves_the_round_robin_where_it_was():
    s = RouterState(admission=Admission("predictive", cost(), SLO(0.01, 1.0)))
    s.add_worker("p0", "prefill", 1000, 0.0)
    for d in ("d0", "d1"):
        s.add_worker(d, "decode", 1000, 0.0)
    turns = {r: p.turn for r, p in s.policies.items()}
    with pytest.raises(Overloaded):
        s.route("x", 100, 0.0)
    assert {r: p.turn for r, p in s.policies.items()} == turns
    s.admission.mode = "off"
    assert [s.route(f"r{i}", 10, 0.0).decode for i in range(2)] == ["d1", "d0"]


# -- serve's flags ------------------------------------------------------------------------------
def _serve_args(*argv):
    from splitserve.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_serve_flags_build_the_policies_and_bad_ones_are_refused_by_name():
    from splitserve.router.policies import LocalPrefill, SloLocalPrefill
    from splitserve.server.launch import build_admission, local_prefill_policy, run_serve

    a = _serve_args("--admission", "predictive", "--ttft-slo", "2", "--tpot-slo", "0.05",
                    "--latency-model", "constant:0.01", "--local-prefill", "slo",
                    "--max-num-batched-tokens", "256", "--max-queue", "32")
    local = local_prefill_policy(a)
    adm = build_admission(a)
    assert isinstance(local, SloLocalPrefill) and adm.mode == "predictive"
    assert adm.slo == SLO(2.0, 0.05) and adm.max_queue == 32 and adm.cost.chunk_tokens == 256
    # the decode workers get the chunk table, and admission prices their prefills with it
    assert a.local_prefill_chunk == local.worker_chunks() == adm.cost.busy_chunk_tokens
    assert local.ttft_s == 2.0 and local.tpot_s == 0.05
    # ... and the TPOT SLO and latency model their chunk policy (SlackChunks) needs
    from splitserve.server.launch import worker_command

    cmd = worker_command("decode", "tcp://127.0.0.1:1", "decode-1", [1], a)
    assert cmd[cmd.index("--tpot-slo") + 1] == "0.05"
    assert cmd[cmd.index("--latency-model") + 1] == "constant:0.01"
    assert "--tpot-slo" not in worker_command("prefill", "tcp://127.0.0.1:1", "prefill-0", [0], a)
    assert isinstance(local_prefill_policy(_serve_args()), LocalPrefill)
    assert local_prefill_policy(_serve_args("--local-prefill", "off")) is None
    assert build_admission(_serve_args("--max-queue", "0")) is None  # off and unbounded
    for argv, says in (
            (["--admission", "predictive"], "needs --ttft-slo, --tpot-slo, --latency-model"),
            (["--local-prefill", "slo", "--tpot-slo", "0.05"], "needs --latency-model"),
            (["--admission", "reactive", "--ttft-slo", "inf", "--tpot-slo", "1",
              "--latency-model", "constant:1"], "--ttft-slo must be a positive number"),
            (["--max-queue", "-1"], "--max-queue must be >= 0")):
        with pytest.raises(SystemExit, match=says):
            run_serve(_serve_args(*argv))
    with pytest.raises(SystemExit):  # argparse: a chunk of 0 tokens
        _serve_args("--local-prefill-chunk", "8,0")
    assert _serve_args("--local-prefill-chunk", "8,4,2").local_prefill_chunk == (8, 4, 2)

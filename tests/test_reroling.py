"""Changing a worker's role while the server runs (router/reroling.py): the router's rules
model-free, then through real processes — requests in flight at each flip finish with the
offline engine's greedy text, the roles and epochs change, nothing stays held."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from splitserve.errors import InvalidRequestError, ServiceUnavailable
from splitserve.router.reroling import blocker, must_finish
from splitserve.router.state import RouterState


def test_what_each_change_must_finish_first():
    assert must_finish("colocated", "decode") == "nothing"
    assert must_finish("decode", "colocated") == "hand-overs"
    for old, new in (("colocated", "prefill"), ("prefill", "colocated"), ("prefill", "decode"),
                     ("decode", "prefill")):
        assert must_finish(old, new) == "everything"
    assert blocker("decode", "colocated", requests=5, handovers=0) is None  # decodes carry on
    assert "hand-over" in blocker("decode", "colocated", requests=5, handovers=1)
    assert "2 request" in blocker("colocated", "prefill", requests=2, handovers=0)
    assert blocker("colocated", "decode", requests=9, handovers=0) is None
    with pytest.raises(ValueError, match="role must be"):
        must_finish("colocated", "router")


def _pd() -> RouterState:
    s = RouterState()  # local prefill off: only a worker draining lets decode go whole
    s.add_worker("p0", "prefill", 100, 0.0)
    s.add_worker("d0", "decode", 100, 0.0)
    return s


def test_a_draining_prefill_worker_gets_nothing_new_and_flips_once_its_legs_are_admitted():
    s = _pd()
    t = s.route("a", 50, 0.0)
    assert (t.prefill, t.decode) == ("p0", "d0")
    epoch = s.begin_rerole("p0", "colocated")
    assert epoch == 2 and s.workers["p0"].draining
    assert s.route("b", 50, 0.0).worker == "d0"  # whole on the decode worker meanwhile
    assert not s.drained("p0")
    s.on_reserved("a", "d0", 0.0)
    s.prefill_sent("a", True)
    s.on_output("a", "d0", handover=True)  # admitted: the prefill leg is over
    assert s.drained("p0")
    assert s.heartbeat("p0", 0, 1.0, epoch=2) and s.heartbeat("p0", 0, 1.0, epoch=1)
    assert not s.rerole_done("p0", "colocated", 3)  # not the change under way
    assert s.rerole_done("p0", "colocated", 2)
    p0 = s.workers["p0"]
    assert (p0.role, p0.epoch, p0.draining) == ("colocated", 2, False)
    assert s.route("c", 50, 0.0).worker == "p0"  # co-located first
    assert s.heartbeat("p0", 0, 2.0, epoch=1) and not s.heartbeat("p0", 0, 2.0, epoch=3)
    for rid in ("a", "b", "c"):
        s.finish(rid)
    s.check_loads()


def test_a_decode_worker_keeps_its_decodes_and_waits_only_for_its_hand_overs():
    s = _pd()
    s.add_worker("c0", "colocated", 100, 0.0)
    s.workers["c0"].alive = False  # (only so that the P/D pair is routed to)
    s.route("a", 50, 0.0)
    s.on_reserved("a", "d0", 0.0)
    s.on_output("a", "d0", handover=True)  # decoding at d0
    s.route("b", 50, 0.0)  # reserved at d0, not yet written
    s.workers["c0"].alive = True
    s.begin_rerole("d0", "colocated")
    assert not s.drained("d0")
    s.on_reserved("b", "d0", 0.0)
    s.on_output("b", "d0", handover=True)
    assert s.drained("d0") and s.workers["d0"].requests == {"a", "b"}
    s.rerole_done("d0", "colocated", 2)
    assert s.speaker("a", "d0", outputs=True, epoch=2) is not None  # under the new epoch
    # one under the old epoch after the flip is stale (on one socket the worker's outputs of
    # before the flip come before its answer): dropped
    assert s.on_output("a", "d0", False, epoch=1) is None


def test_changes_that_would_leave_nothing_to_serve_or_make_no_sense_are_refused():
    s = _pd()
    with pytest.raises(ServiceUnavailable, match="could not serve"):
        s.begin_rerole("d0", "colocated")  # the prefill worker alone cannot serve
    assert not s.workers["d0"].draining
    with pytest.raises(InvalidRequestError, match="no live worker"):
        s.begin_rerole("x", "decode")
    with pytest.raises(InvalidRequestError, match="role must be"):
        s.begin_rerole("p0", "router")
    s.begin_rerole("p0", "colocated")
    with pytest.raises(InvalidRequestError, match="already becoming colocated"):
        s.begin_rerole("p0", "decode")
    s.rerole_done("p0", "colocated", 2, ok=False)  # refused: it stays what it was
    assert s.workers["p0"].role == "prefill" and not s.workers["p0"].draining
    # a colocated worker becoming decode carries everything on: never stops taking requests
    # (with local prefill: a decode worker alone prefills every request itself)
    from splitserve.router.policies import LocalPrefill

    c = RouterState(LocalPrefill())
    c.add_worker("c0", "colocated", 100, 0.0)
    c.begin_rerole("c0", "decode")
    assert not c.workers["c0"].draining and c.route("r", 10, 0.0).worker == "c0"
    # without local prefill, a lone decode worker would 503 everything after the flip
    c = RouterState()
    c.add_worker("c0", "colocated", 100, 0.0)
    with pytest.raises(ServiceUnavailable, match="no route"):
        c.begin_rerole("c0", "decode")
    s = _pd()
    with pytest.raises(ServiceUnavailable, match="no route"):
        s.begin_rerole("p0", "decode")  # drains fine, but leaves decode workers only


# -- through real processes -------------------------------------------------------------------
PROMPTS = ["The history of the printing press begins in the fifteenth century, when",
           "A recipe for bread needs flour, water, salt and",
           "The three laws of motion were first written down by",
           "In the deep ocean, far from any light, there live animals that"]


@pytest.fixture(scope="module")
def offline_texts():
    from splitserve.config import EngineConfig, SchedulerConfig
    from splitserve.engine.engine import LLMEngine
    from splitserve.request import SamplingParams

    eng = LLMEngine(EngineConfig(num_threads=1, dtype="float32",
                                 scheduler=SchedulerConfig(max_num_batched_tokens=64)))
    out = {}
    for p in PROMPTS:
        eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
        text = ""
        while eng.has_unfinished():
            for o in eng.step():
                text += o.new_text
        out[p] = text
    return out


MAX_TOKENS = 96


@pytest.mark.real_model
def test_workers_change_role_under_load_and_every_request_finishes_as_offline(
        real_model_path, offline_texts):
    from serving_harness import Server

    # local prefill off: every prompt is prefilled whole (one chunk, as offline), never in a
    # decode worker's 8-token chunks; fp32: each prompt comes three times (prefix-cache hits
    # on every worker by the third) in batches of four, and in bf16 a hit or another batch
    # shape can fork a 96-token greedy text at a near-tie (on an AMX CPU one did)
    s = Server("--prefill", "1", "--decode", "1", "--local-prefill", "off", "--reroleable",
               "--dtype", "float32")
    try:
        results: dict[str, str] = {}

        def ask(key: str, prompt: str):
            r = httpx.post(s.base_url + "/completions", timeout=120, json={
                "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True})
            results[key] = (r.json()["choices"][0]["text"] if r.status_code == 200
                            else f"HTTP {r.status_code}: {r.text}")

        def wave(tag: str) -> list[threading.Thread]:
            ts = [threading.Thread(target=ask, args=(f"{tag}{i}", p)) for i, p in enumerate(PROMPTS)]
            for t in ts:
                t.start()
            time.sleep(1.5)  # their prompts are in, their decodes under way
            return ts

        def outstanding(wid: str) -> int:
            return next(w["outstanding"] for w in s.workers() if w["worker_id"] == wid)

        def flip(wid: str, role: str) -> dict:
            r = httpx.post(s.url + "/admin/role", timeout=300,
                           json={"worker_id": wid, "role": role, "reason": "test"})
            assert r.status_code == 200, r.text
            return r.json()

        # P/D -> two co-located: the prefill worker drains its legs, then the decode worker
        # carries the decodes handed over to it on as a co-located worker
        ts = wave("pd")
        assert flip("prefill-0", "colocated")["from"] == "prefill"
        carried = outstanding("decode-1")
        assert carried, "nothing in flight on the decode worker: the test proves nothing"
        assert flip("decode-1", "colocated")["drain_s"] < 1.0  # its decodes did not wait
        ts += wave("c")  # whole requests on the co-located workers
        # two co-located -> P/D: the one becoming decode carries its requests on; the one
        # becoming prefill drains everything it runs first (meanwhile the router sends whole
        # requests to the decode worker)
        carried2 = outstanding("decode-1")
        assert carried2, "nothing in flight on decode-1 at the second flip"
        assert flip("decode-1", "decode")["drain_s"] < 1.0
        busy = outstanding("prefill-0")
        rec = flip("prefill-0", "prefill")
        assert not busy or rec["drain_s"] > 0
        ts += wave("pd2-")  # P/D again
        for t in ts:
            t.join(180)
        assert len(results) == 12
        for key, text in results.items():
            assert text == offline_texts[PROMPTS[int(key[-1])]], (key, text)
        roles = httpx.get(s.url + "/admin/roles", timeout=5).json()
        assert roles["workers"] == {"prefill-0": "prefill", "decode-1": "decode"}
        assert [(c["worker_id"], c["to"]) for c in roles["changes"]] == [
            ("prefill-0", "colocated"), ("decode-1", "colocated"), ("decode-1", "decode"),
            ("prefill-0", "prefill")]
        epochs = {w["worker_id"]: w["epoch"] for w in s.workers()}
        assert epochs == {"prefill-0": 3, "decode-1": 3}
        ws = s.wait_idle()
        assert all(w["kv_blocks_used"] == 0 and w["integrity_errors"] == 0 and w["alive"]
                   for w in ws), ws
        assert all(w["role_changes"] == 2 for w in ws), ws
        metrics = httpx.get(s.url + "/metrics", timeout=5).text
        assert 'splitserve_role_changes_total{from="prefill",outcome="ok",to="colocated"} 1.0' in metrics
        # bad requests: an unknown role and worker are a 400 naming them; nothing changes
        r = httpx.post(s.url + "/admin/role", json={"worker_id": "decode-1", "role": "router"})
        assert r.status_code == 400 and "role must be" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/admin/role", json={"worker_id": "nobody", "role": "decode"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "worker_id"
        r = httpx.post(s.url + "/admin/role", content=b"[1]")
        assert r.status_code == 400
    finally:
        s.close()


def test_a_worker_started_without_reroleable_refuses():
    """Model-free: the conductor refuses by name before anything is drained."""
    import asyncio
    from types import SimpleNamespace

    from splitserve.router.conductor import Conductor, WorkerHandle

    c = Conductor()
    try:
        view = c.state.add_worker("colocated-0", "colocated", 100, 0.0)
        c.workers["colocated-0"] = WorkerHandle(SimpleNamespace(reroleable=False), view)
        with pytest.raises(InvalidRequestError, match="--reroleable"):
            asyncio.run(c.set_role("colocated-0", "decode"))
        assert view.rerole is None and not view.draining and c.role_changes == []
    finally:
        c.ctx.term()


def test_the_answer_is_applied_before_the_next_message_under_the_new_epoch():
    """Model-free, the conductor's side of a flip: the RoleSet and the worker's first output
    under the new epoch arrive back to back (one socket); the output must reach the request's
    stream, not be dropped as another epoch's. A refusal keeps the old role and epoch."""
    import asyncio
    from types import SimpleNamespace

    from splitserve.disagg import messages as M
    from splitserve.router.conductor import Conductor, WorkerHandle, _Stream

    async def main():
        c = Conductor()
        try:
            view = c.state.add_worker("w0", "colocated", 100, 0.0)
            c.workers["w0"] = WorkerHandle(SimpleNamespace(reroleable=True, role="colocated"), view)
            c.state.route("r", 10, 0.0)
            c._streams["r"] = s = _Stream([1] * 10, None, asyncio.Queue())
            c._send = lambda *a, **k: True  # (no socket)
            task = asyncio.create_task(c.set_role("w0", "decode", reason="test"))
            await asyncio.sleep(0.05)
            assert view.rerole == ("decode", 2)
            c._handle("w0", M.RoleSet("decode", 2, True, epoch=2))
            c._handle("w0", M.Outputs([M.Delta("r", [5], "x", False)], epoch=2))
            assert s.queue.qsize() == 1  # counted under the new epoch
            c._handle("w0", M.Outputs([M.Delta("r", [6], "y", False)], epoch=1))
            assert s.queue.qsize() == 1  # the old epoch after the flip: stale
            rec = await task
            assert (rec["from"], rec["to"], rec["ok"]) == ("colocated", "decode", True)
            assert (view.role, view.epoch, c.workers["w0"].info.role) == ("decode", 2, "decode")
            # refused: stays decode at epoch 2
            c.state.add_worker("c1", "colocated", 100, 0.0)  # (so that w0 may drain)
            task = asyncio.create_task(c.set_role("w0", "colocated"))
            await asyncio.sleep(0.05)
            c._handle("w0", M.RoleSet("colocated", 3, False, "busy", epoch=2))
            with pytest.raises(Exception, match="refused to become colocated: busy"):
                await task
            assert (view.role, view.epoch, view.rerole, view.draining) == ("decode", 2, None, False)
        finally:
            c.ctx.term()

    asyncio.run(main())

"""The conductor: the router's side of the control plane, in the API server's asyncio loop —
the I/O shell around RouterState (state.py), which makes every decision.

It registers workers (every worker must agree on model and KV layout with the first one),
sends each request to the workers RouterState picks, drives the P/D hand-off (Reserve at a
decode worker, then Prefill at a prefill worker naming the reserved blocks), relays outputs
to the request's stream, and turns a worker's death or failure into an error on exactly the
requests it held.

    generate(): Reserve ─► decode ... Reserved ─► Prefill ─► prefill ... Outputs (from decode)
    generator closed early (client gone) ─► Abort to both workers (see messages.Abort)
    set_role(): drain what the new role cannot carry (reroling.py) ─► SetRole ─► RoleSet
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from splitserve.disagg import decision_log
from splitserve.disagg import messages as M
from splitserve.errors import InvalidRequestError, RequestFailed, ServiceUnavailable
from splitserve.kv.hashing import block_hashes
from splitserve.request import SamplingParams
from splitserve.router.admission import SLO
from splitserve.router.policies import LocalPrefill
from splitserve.router.state import RouterState, WorkerView
from splitserve.tokenization import PromptEncoder

log = logging.getLogger("splitserve.router")


@dataclass
class WorkerHandle:
    info: M.Register
    view: WorkerView  # the router state's record of it (alive, its requests)
    stats: M.WorkerStats = field(default_factory=M.WorkerStats)
    proc: subprocess.Popen | None = None

    @property
    def alive(self) -> bool:
        return self.view.alive

    @property
    def peer(self) -> M.DecodePeer:
        i = self.info
        return M.DecodePeer(i.worker_id, i.data_addr or "", i.host, i.kv, i.num_blocks, i.shm_path,
                            self.view.epoch)


@dataclass
class _Stream:
    """What only the I/O side needs of a request in flight: its prompt and params (sent to
    workers) and the queue its outputs reach the API through."""

    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    done: bool = False


class Conductor:
    def __init__(self, model: str = "default", served_model_name: str = "default",
                 bind: str = "tcp://127.0.0.1:0", heartbeat_timeout_s: float = 10.0,
                 tokenizer=None, local_prefill=True, admission=None, routing: str = "cache-aware",
                 cache_imbalance: int = 4):
        self.model = model
        self.served_model_name = served_model_name
        self.bind = bind
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._tokenizer = tokenizer
        self.prompts: PromptEncoder | None = None
        # admission.Admission (None: accept everything, no queue bound)
        # local_prefill: True (policies.LocalPrefill), False / None (off), or a policy object
        if local_prefill is True:
            local_prefill = LocalPrefill()
        self.state = RouterState(local_prefill or None, admission, routing, cache_imbalance)
        self._hash_root: bytes | None = None  # the workers' (Register.hash_root)
        if decision_log.directory():
            self.state.routes = []
        self.workers: dict[str, WorkerHandle] = {}
        self.reference: M.Register | None = None  # the first worker: the others must agree
        self._streams: dict[str, _Stream] = {}
        self._tasks: list[asyncio.Task] = []
        self.addr = ""
        # this router process: a worker that registered with another one (this router's
        # previous process) hears Rejoin and registers again
        self.router_id = os.urandom(8).hex()
        self._stopping = False
        self._procs: dict[str, subprocess.Popen] = {}
        self._restarts: dict[str, int] = {}  # how often serve started each worker again
        # workers down that serve will start again (server/supervisor.py keeps this): worker
        # id -> {"restarts", "delay_s" (the backoff before its next start), "exit_code"}
        self.restarting: dict[str, dict] = {}
        self.ctx = zmq.asyncio.Context()
        self.sock = None
        self._role_answers: dict[str, asyncio.Future] = {}  # worker id -> its change's record
        self._role_pending: dict[str, dict] = {}  # worker id -> the change it was asked for
        # told of every request: on_arrival(now, prompt_len, max_tokens) once routed, and
        # on_finish(now, ok, ttft_s, tpot_s, tokens out) at its end (server/planner_loop.py), or None
        self.observer = None
        self.planner = None  # server/planner_loop.PlannerLoop with serve --planner auto
        # every role change taken or refused: {"t", "worker_id", "from", "to", "ok",
        # "drain_s", "reason"} (the caller's reason; the worker's, when it refused)
        self.role_changes: list[dict] = []

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # never drop a message silently: unknown peers raise, queues do not overflow
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        host, _, port = self.bind.rpartition(":")
        if port in ("0", "*"):
            port = self.sock.bind_to_random_port(host)
        else:
            self.sock.bind(self.bind)
        # what workers connect to (a wildcard bind is reached through loopback here)
        connect_host = host.replace("*", "127.0.0.1").replace("0.0.0.0", "127.0.0.1")
        self.addr = f"{connect_host}:{port}"
        if self._tokenizer is None:
            from splitserve.model.loader import load_tokenizer

            self._tokenizer = await asyncio.to_thread(load_tokenizer, self.model)
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._monitor_loop())]

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True  # workers exiting now are no failure to report
        decision_log.write("router", self.state.routes)
        for w in self.workers.values():
            if w.alive:
                self._send(w.info.worker_id, M.Shutdown())
        deadline = time.monotonic() + timeout_s
        for w in self.workers.values():
            if w.proc is not None:
                while w.proc.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if w.proc.poll() is None:
                    log.warning("worker %s did not stop within %.0f s; killed",
                                w.info.worker_id, timeout_s)
                    w.proc.kill()
                elif w.proc.returncode != 0:
                    log.warning("worker %s exited with code %s while stopping",
                                w.info.worker_id, w.proc.returncode)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.sock.close(linger=0)
        self.ctx.term()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def attach_process(self, worker_id: str, proc: subprocess.Popen, restarts: int = 0) -> None:
        """A worker this process started (`restarts`: started again that often after its
        process exited): its exit is noticed at once, not by heartbeat."""
        self._procs[worker_id] = proc
        self._restarts[worker_id] = restarts
        w = self.workers.get(worker_id)
        if w is not None and w.proc is None:  # (a restarted one's registration makes a new handle)
            w.proc = proc

    def declared_dead(self, worker_id: str, proc: subprocess.Popen) -> bool:
        """The router gave up on this process of worker_id (silent too long) though it has
        not exited."""
        w = self.workers.get(worker_id)
        return w is not None and w.proc is proc and not w.alive

    # -- what the API asks -------------------------------------------------------------------
    @property
    def dead(self) -> list[str]:
        """Workers that died (or exited before registering), in that order."""
        return self.state.dead

    def is_ready(self) -> bool:
        return self.state.is_ready()

    def unready_reason(self) -> str:
        """Why requests cannot be served now (is_ready() is False), for the 503's message."""
        if not self.workers:
            return "The server is starting: no workers have registered yet."
        roles = {w.info.role for w in self.workers.values()}
        live = {w.info.role for w in self.workers.values() if w.alive}
        missing = ("colocated" if "colocated" in roles else
                   "decode" if "decode" not in live else "prefill")
        parts = []
        for wid in self.dead:
            w = self.workers.get(wid)
            if w is not None and w.info.role != missing:
                continue
            r = self.restarting.get(wid)
            parts.append(f"{wid} is being started again (restart {r['restarts']})" if r
                         else f"{wid} is down")
        parts += [f"{wid} is starting" for wid in self.starting()]
        return f"No {missing} worker is up" + (f" ({'; '.join(parts)})" if parts else "") + "."

    def starting(self) -> list[str]:
        """Workers this process started that have neither registered nor exited yet."""
        return [wid for wid, proc in self._procs.items()
                if wid not in self.workers and wid not in self.dead and proc.poll() is None]

    @property
    def max_model_len(self) -> int:
        return self.reference.max_model_len if self.reference else 0

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        ids = self._encoder().encode(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self._encoder().apply_chat_template(messages)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return [self._tokenizer.decode([t]) for t in token_ids]

    def _encoder(self) -> PromptEncoder:
        if self.reference is None:
            raise ServiceUnavailable("no worker has registered yet")
        if self.prompts is None:
            self.prompts = PromptEncoder(self._tokenizer, self.reference.vocab_size)
        return self.prompts

    def status(self) -> str:
        """"starting" until every worker this process started has registered (or died) and
        requests can be served; then "ok", or "degraded" while a worker is down (it died, or
        never came up, and has not registered again: serve may be restarting it);
        "unavailable" when the workers up cannot serve."""
        starting = bool(self.starting())
        if self.is_ready() and not starting:
            return "ok" if not self.dead else "degraded"
        return "starting" if starting or not self.dead else "unavailable"

    def health(self) -> dict:
        return {"status": self.status(), "starting": self.starting(), "workers": [
            {**self._worker_row(w), "pid": w.info.pid, "alive": w.alive, "epoch": w.view.epoch,
             "restarts": self._restarts.get(w.info.worker_id, 0),
             "outstanding": len(w.view.requests), "kv_transport": w.info.transport}
            for w in self.workers.values()], "dead": list(self.dead),
            "restarting": {wid: dict(r) for wid, r in self.restarting.items() if wid in self.dead}}

    def worker_stats(self) -> list[dict]:
        return [self._worker_row(w) for w in self.workers.values() if w.alive]

    @staticmethod
    def _worker_row(w: WorkerHandle) -> dict:
        """A worker's identity and its last heartbeat's numbers (every WorkerStats field)."""
        return {"worker_id": w.info.worker_id, "role": w.info.role,
                **msgspec.structs.asdict(w.stats)}

    # -- requests ----------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, slo: tuple[float | None, float | None] = (None, None),
                       priority: int = 0) -> AsyncIterator[M.Delta]:
        """The request's outputs. `slo`: its own (TTFT, TPOT) in seconds where it gives them;
        admission control judges it by them (the deployment's fill in the other), and by its
        `priority` (lower: more important)."""
        wp = M.Params.of(params)  # everything that can fail before the route is taken
        s = _Stream(list(prompt_token_ids), params, asyncio.Queue())
        t0 = time.monotonic()
        hashes = None
        if self._hash_root and self.state.block_size and self.state.wants_hashes():
            hashes = block_hashes(s.prompt, self.state.block_size, self._hash_root)
        t = self.state.route(request_id, len(prompt_token_ids), t0,
                             max_tokens=params.max_tokens, slo=SLO.given(*slo), priority=priority,
                             block_hashes=hashes)
        self._streams[request_id] = s
        obs = self.observer
        if obs is not None:
            obs.on_arrival(t0, len(prompt_token_ids), params.max_tokens)
        t_first = t_last = None
        n_out, ok = 0, False
        if t.worker is not None:
            self._send(t.worker, M.Generate(request_id, s.prompt, wp, t.views[t.worker].epoch),
                       request_id)
        else:
            log.debug("%s -> prefill %s, decode %s", request_id, t.prefill, t.decode)
            self._send(t.decode, M.Reserve(request_id, s.prompt, wp, t.prefill,
                                           t.views[t.decode].epoch), request_id)
        try:
            while True:
                item = await s.queue.get()
                if isinstance(item, Exception):
                    s.done = True  # every side is told to let go (idempotent where it did)
                    self._abort(request_id)
                    raise item
                if obs is not None and item.new_token_ids:
                    t_last = time.monotonic()
                    t_first = t_first or t_last
                    n_out += len(item.new_token_ids)
                yield item
                if item.finished:
                    s.done = ok = True
                    return
        finally:
            if not s.done:
                self._abort(request_id)
            self._streams.pop(request_id, None)
            self.state.finish(request_id)
            if obs is not None:
                tpot = (t_last - t_first) / (n_out - 1) if n_out > 1 else None
                obs.on_finish(time.monotonic(), ok, t_first - t0 if t_first else None, tpot,
                              n_out)

    def _fail(self, request_id: str, message: str) -> None:
        s = self._streams.get(request_id)
        if s is not None:
            s.queue.put_nowait(RequestFailed(message))

    def fail_all(self, message: str) -> int:
        """Fail every request in flight with ServiceUnavailable(message) (a 503: serve's drain
        ran out of time); how many there were."""
        live = [s for s in self._streams.values() if not s.done]
        for s in live:
            s.queue.put_nowait(ServiceUnavailable(message))
        return len(live)

    def _abort(self, request_id: str) -> None:
        for a in self.state.abort_plan(request_id):
            if a.decode_peer is not None:
                self._send(a.worker_id, M.Abort(request_id, decode_peer=self.workers[a.decode_peer].peer))
            else:
                self._send(a.worker_id, M.Abort(request_id, fenced=a.fenced))

    def _send(self, wid: str | None, msg, request_id: str | None = None) -> bool:
        """Send to a live worker; when that fails and `request_id` is given, the request fails."""
        w = self.workers.get(wid) if wid else None
        ok = w is not None and w.alive and self._raw_send(wid, msg, request_id)
        if not ok and request_id is not None and not (w is not None and w.alive):
            self._fail(request_id, f"worker {wid} cannot be reached")
        return ok

    # -- role changes (reroling.py) ----------------------------------------------------------
    async def set_role(self, worker_id: str, role: str, reason: str = "",
                       drain_timeout_s: float = 300.0) -> dict:
        """Make a live worker `role` while serving: stop routing it what the new role cannot
        carry on, wait until it holds none of that (at most drain_timeout_s: then it is routed
        to as before and ServiceUnavailable says why), send SetRole under a new epoch and
        apply its answer. Returns the change's record (see role_changes); raises
        InvalidRequestError for a worker that cannot change (unknown, not --reroleable) and
        RequestFailed when the worker refused or died meanwhile."""
        w = self.workers.get(worker_id)
        if w is None or not w.alive:
            raise InvalidRequestError(f"no live worker {worker_id!r}", param="worker_id")
        if not w.info.reroleable:
            raise InvalidRequestError(f"worker {worker_id} was started without --reroleable: it "
                                      "cannot change role while it runs", param="worker_id")
        view = w.view
        if view.rerole is not None:
            raise InvalidRequestError(f"worker {worker_id} is already becoming {view.rerole[0]}")
        old = view.role
        if role == old:
            return {"t": time.time(), "worker_id": worker_id, "from": old, "to": role, "ok": True,
                    "drain_s": 0.0, "reason": reason}
        epoch = self.state.begin_rerole(worker_id, role)
        t0 = time.monotonic()
        try:
            while True:
                if not view.alive or self.state.workers.get(worker_id) is not view:
                    raise RequestFailed(f"worker {worker_id} died while draining to become {role}")
                if self.state.drained(worker_id):
                    break
                if time.monotonic() - t0 > drain_timeout_s:
                    raise ServiceUnavailable(f"worker {worker_id} did not finish its requests "
                                             f"within {drain_timeout_s:g} s; it stays {old}")
                await asyncio.sleep(0.02)
        except BaseException:
            self.state.cancel_rerole(worker_id)
            raise
        # From here the worker may flip at any moment. Its answer is applied where it is
        # received (_role_set), before any message it sends under the new epoch is looked at;
        # the change is never given up here (not on cancellation either): the router would
        # then drop what the flipped worker says.
        fut = asyncio.get_running_loop().create_future()
        self._role_answers[worker_id] = fut
        self._role_pending[worker_id] = {"worker_id": worker_id, "from": old, "to": role,
                                         "drain_s": round(time.monotonic() - t0, 3),
                                         "reason": reason}
        self._send(worker_id, M.SetRole(role, epoch))
        while not fut.done():
            if not view.alive:
                self._role_answers.pop(worker_id, None)
                self._role_pending.pop(worker_id, None)
                raise RequestFailed(f"worker {worker_id} died while becoming {role}")
            await asyncio.wait([fut], timeout=0.1)
        rec = fut.result()
        if not rec["ok"]:
            raise RequestFailed(f"worker {worker_id} refused to become {role}: {rec['reason']}")
        return rec

    def _role_set(self, wid: str, msg: M.RoleSet) -> None:
        """A worker's answer to SetRole: applied at once (a flipped worker's next message,
        under the new epoch, may be the very next one on the socket)."""
        w = self.workers.get(wid)
        v = w.view if w is not None else None
        if v is None or not v.alive or v.rerole != (msg.role, msg.new_epoch):
            return  # not the change under way (a previous incarnation's, or a stray)
        ok = msg.ok and msg.epoch == msg.new_epoch
        if not ok and msg.epoch != v.epoch:
            return  # a refusal comes under the old epoch
        old = v.role
        self.state.rerole_done(wid, msg.role, msg.new_epoch, ok)
        rec = {"t": time.time(), **self._role_pending.pop(wid, {"worker_id": wid, "from": old,
                                                               "to": msg.role, "drain_s": None,
                                                               "reason": ""}), "ok": ok}
        if not ok:
            rec["reason"] = msg.reason
            log.error("worker %s refused to become %s: %s", wid, msg.role, msg.reason)
        else:
            w.info.role = msg.role
            if old == "decode":  # the prefill workers' connections to its data socket go
                for other in self.workers.values():
                    if other.alive and other is not w:
                        self._send(other.info.worker_id, M.PeerGone(wid))
            log.warning("worker %s: %s -> %s (epoch %d, drained in %s s)%s", wid, old, msg.role,
                        msg.new_epoch, rec["drain_s"], f": {rec['reason']}" if rec["reason"] else "")
        self.role_changes.append(rec)
        fut = self._role_answers.pop(wid, None)
        if fut is not None and not fut.done():
            fut.set_result(rec)

    # -- messages from workers ---------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) != 2:
                continue
            ident, raw = frames
            wid = ident.decode(errors="replace")
            try:
                msg = M.decode_to_router(raw)
            except Exception as e:
                log.error("dropped a malformed message from %s: %s", wid, e)
                continue
            try:
                self._handle(wid, msg)
            except Exception:  # one bad message must not stop the router
                log.exception("handling %s from %s", type(msg).__name__, wid)

    def _handle(self, wid: str, msg) -> None:
        if wid.endswith("/hb"):  # the heartbeat socket of worker `wid[:-3]`
            self._heartbeat(wid, msg)
            return
        if isinstance(msg, M.Register):
            self._register(wid, msg)
            return
        if isinstance(msg, M.RoleSet):  # (under the new epoch when taken: before the check)
            self._role_set(wid, msg)
            return
        w = self.workers.get(wid)
        if w is None or not w.alive or msg.epoch != w.view.epoch:
            return  # (another epoch: sent by a previous incarnation, arriving late)
        match msg:
            case M.Outputs():
                for d in msg.items:
                    t = self.state.on_output(d.request_id, wid, d.handover is not None, msg.epoch,
                                             tokens=len(d.new_token_ids))
                    if t is None:
                        continue  # only the worker serving this leg may speak for it
                    if d.handover is not None:
                        d.handover.reserve_seconds = t.reserve_seconds
                    self._streams[d.request_id].queue.put_nowait(d)
            case M.Failed():
                if self.state.speaker(msg.request_id, wid, epoch=msg.epoch) is not None:
                    self._fail(msg.request_id, msg.message)
            case M.KVEvents():
                index = self.state.prefix_index
                if index is None:
                    return
                if msg.snapshot:
                    index.snapshot(wid, [h for _, h in msg.events], msg.tier_events)
                elif not index.apply(wid, msg.seq, msg.events, msg.tier_events):
                    log.warning("KV events of %s out of sequence (batch %d); asking for a "
                                "snapshot", wid, msg.seq)
                    self._send(wid, M.KVResync())
            case M.Reserved():
                rid = msg.request_id
                prefill = self.state.on_reserved(rid, wid, time.monotonic(), msg.epoch)
                if prefill is None:
                    self._send(wid, M.Abort(rid))  # nobody will write these blocks
                    return
                s = self._streams[rid]
                epoch = self.state.tracks[rid].views[prefill].epoch
                self.state.prefill_sent(rid, self._send(prefill, M.Prefill(
                    rid, s.prompt, M.Params.of(s.params), w.peer, msg.block_ids, epoch,
                    skip_blocks=msg.cached_blocks), rid))

    def _heartbeat(self, hb_ident: str, msg) -> None:
        w = self.workers.get(hb_ident[:-3])
        if not isinstance(msg, M.Heartbeat):
            return
        if w is None or (msg.router_id and msg.router_id != self.router_id):
            # it registered with a router that is gone (this one's previous process): what
            # it holds is nobody's now; it aborts it all and registers here
            self._raw_send(hb_ident, M.Rejoin(msg.router_id))
            return
        if not self.state.heartbeat(w.info.worker_id, msg.stats.kv_blocks_used,
                                    time.monotonic(), msg.epoch):
            # declared dead but still talking (it was stalled), or a previous incarnation: it
            # must not come back to life with stale work, and its lease must not be renewed.
            # The Shutdown names its epoch: a newer incarnation that gets it stays.
            self._raw_send(hb_ident, M.Shutdown(msg.epoch))
            return
        w.stats = msg.stats
        self._raw_send(hb_ident, M.Ping(msg.sent))

    def _raw_send(self, ident: str, msg, request_id: str | None = None) -> bool:
        """Send without waiting. zmq.asyncio reports a failed send (ROUTER_MANDATORY: the
        peer is gone) through the returned future, usually already done: report it, and fail
        the request `request_id` when one is given."""

        def check(fut) -> bool:
            e = fut.exception() if not fut.cancelled() else None
            if e is None:
                return True
            log.warning("could not send %s to %s: %s", type(msg).__name__, ident, e)
            if request_id is not None:
                self._fail(request_id, f"worker {ident} cannot be reached ({e})")
            return False

        try:
            fut = self.sock.send_multipart([ident.encode(), M.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("could not send %s to %s: %s", type(msg).__name__, ident, e)
            return False
        if fut.done():
            return check(fut)
        fut.add_done_callback(check)
        return True

    def _register(self, wid: str, msg: M.Register) -> None:
        reason = None
        if msg.worker_id != wid:
            reason = f"worker id {msg.worker_id!r} does not match its socket identity {wid!r}"
        elif wid in self.workers and self.workers[wid].alive:
            w = self.workers[wid]
            same_process = (w.info.pid, w.info.host) == (msg.pid, msg.host)
            if same_process and msg.nonce and msg.nonce == w.info.nonce:
                # the same attempt asking again (its first Register was queued while this
                # router was not up yet, and it timed out): the same answer
                self._raw_send(wid, self._welcome(w.view.epoch))
                return
            if same_process:
                # it gave this router up (silent too long from where it stands) and aborted
                # all it held: that incarnation's requests fail here too, the other workers
                # drop what they had with it, and it comes back as a new epoch
                self._worker_died(w, "it registered again, having lost contact with the "
                                  "router (it aborted what it held)", unlink=False)
                return self._register(wid, msg)
            reason = f"a live worker already uses the id {wid!r}"
        elif msg.role not in ("colocated", "prefill", "decode"):
            reason = f"unknown role {msg.role!r}"
        elif msg.role == "decode" and not msg.data_addr:
            reason = "a decode worker must announce its KV data address"
        elif self.reference is not None:
            ref = self.reference
            if msg.model_name != ref.model_name:
                reason = f"model {msg.model_name!r} differs from the deployment's {ref.model_name!r}"
            elif msg.kv.mismatch(ref.kv):
                reason = f"KV cache differs from the deployment's: {msg.kv.mismatch(ref.kv)}"
            elif msg.max_model_len != ref.max_model_len:
                reason = f"max_model_len {msg.max_model_len} differs from {ref.max_model_len}"
            elif msg.hash_root != ref.hash_root:
                reason = ("its block hashes differ from the deployment's (another hash salt?): "
                          f"root {msg.hash_root[:12]} vs {ref.hash_root[:12]}")
        if reason:
            log.error("refused worker %s: %s", wid, reason)
            self._raw_send(wid, M.Welcome(False, reason))
            return
        if self.reference is None:
            self.reference = msg
            self.state.max_model_len = msg.max_model_len
            self.state.block_size = msg.kv.block_size  # every worker's (mismatches are refused)
            self._hash_root = bytes.fromhex(msg.hash_root) if msg.hash_root else None
        view = self.state.add_worker(wid, msg.role, msg.num_blocks, time.monotonic())
        self.workers[wid] = WorkerHandle(msg, view, proc=self._procs.get(wid))
        self.workers[wid].stats.kv_blocks_total = msg.num_blocks
        self._send(wid, self._welcome(view.epoch))
        log.log(logging.WARNING if view.epoch > 1 else logging.INFO,
                "worker %s (%s, pid %d) registered, epoch %d", wid, msg.role, msg.pid, view.epoch)

    def _welcome(self, epoch: int) -> M.Welcome:
        return M.Welcome(True, lease_s=self.heartbeat_timeout_s / 2, epoch=epoch,
                         router_id=self.router_id)

    # -- failure detection -------------------------------------------------------------------
    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.check_workers()

    def check_workers(self) -> None:
        """Declare dead the workers whose process exited or that fell silent (serve's
        supervisor calls this too before it starts an exited worker again: the old
        incarnation's requests fail first)."""
        self._reap_unregistered()
        now = time.monotonic()
        silent = set(self.state.silent(now, self.heartbeat_timeout_s))
        for w in list(self.workers.values()):
            if not w.alive:
                continue
            exited = w.proc is not None and w.proc.poll() is not None
            if exited or w.info.worker_id in silent:
                why = (f"exited with code {w.proc.returncode}" if exited else
                       f"silent for {now - w.view.last_seen:.1f} s")
                if not self._stopping:
                    self._worker_died(w, why)

    def _reap_unregistered(self) -> None:
        """A child that exited before it registered is dead too (or health would say
        "starting" for ever)."""
        for wid, proc in self._procs.items():
            if wid not in self.workers and wid not in self.dead and proc.poll() is not None:
                self.dead.append(wid)
                log.error("worker %s exited with code %s before registering", wid, proc.returncode)

    def _worker_died(self, w: WorkerHandle, why: str, unlink: bool = True) -> None:
        """`unlink`: the process is gone, its shm pool file with it (not when it lives on)."""
        wid = w.info.worker_id
        log.error("worker %s (%s) is gone: %s", wid, w.info.role, why)
        for rid in self.state.worker_died(wid):
            self._fail(rid, f"{w.info.role} worker {wid} died ({why})")
        for other in self.workers.values():
            if other.alive:
                self._send(other.info.worker_id, M.PeerGone(wid))
        if unlink and w.info.shm_path and w.proc is not None:  # a child of ours cannot unlink its pool now
            with contextlib.suppress(OSError):
                os.unlink(w.info.shm_path)

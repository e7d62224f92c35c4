"""The conductor: the router's state and its side of the control plane, in the API server's
asyncio loop.

It keeps the worker registry (every worker must agree on model and KV layout with the first
one), picks workers for each request, drives the P/D hand-off (Reserve at a decode worker,
then Prefill at a prefill worker naming the reserved blocks), relays outputs to the request's
stream, and turns a worker's death or failure into an error on exactly the requests it held.

    generate(): Reserve ─► decode ... Reserved ─► Prefill ─► prefill ... Outputs (from decode)
    generator closed early (client gone) ─► Abort to both workers (see messages.Abort)
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

from splitserve.disagg import messages as M
from splitserve.errors import InvalidRequestError, RequestFailed, ServiceUnavailable
from splitserve.request import SamplingParams
from splitserve.router.policies import DecodeLoad, LeastLoaded, LocalPrefill, WorkerLoad
from splitserve.tokenization import PromptEncoder

log = logging.getLogger("splitserve.router")


@dataclass
class WorkerHandle:
    info: M.Register
    last_seen: float
    stats: M.WorkerStats = field(default_factory=M.WorkerStats)
    requests: set[str] = field(default_factory=set)
    proc: subprocess.Popen | None = None
    alive: bool = True

    @property
    def peer(self) -> M.DecodePeer:
        i = self.info
        return M.DecodePeer(i.worker_id, i.data_addr or "", i.host, i.kv, i.num_blocks, i.shm_path)


@dataclass
class _Track:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    worker: str | None = None  # colocated, or a decode worker prefilling it itself
    prefill: str | None = None
    decode: str | None = None
    prefill_sent: bool = False
    prefill_done: bool = False  # the decode worker has admitted it
    first_token: bool = False  # an output arrived
    done: bool = False
    t_reserve: float = 0.0
    reserve_seconds: float = 0.0


class Conductor:
    def __init__(self, model: str = "default", served_model_name: str = "default",
                 bind: str = "tcp://127.0.0.1:0", heartbeat_timeout_s: float = 10.0,
                 tokenizer=None, local_prefill: bool = True):
        self.model = model
        self.served_model_name = served_model_name
        self.bind = bind
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._tokenizer = tokenizer
        self.prompts: PromptEncoder | None = None
        self.workers: dict[str, WorkerHandle] = {}
        self.reference: M.Register | None = None  # the first worker: the others must agree
        self.policies = {role: LeastLoaded() for role in ("colocated", "prefill", "decode")}
        self.local_prefill = LocalPrefill() if local_prefill else None
        self._tracks: dict[str, _Track] = {}
        self._tasks: list[asyncio.Task] = []
        self.addr = ""
        self.dead: list[str] = []
        self._stopping = False
        self._procs: dict[str, subprocess.Popen] = {}
        self.ctx = zmq.asyncio.Context()
        self.sock = None

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
        for w in self.workers.values():
            if w.alive:
                self._send(w.info.worker_id, M.Shutdown())
        deadline = time.monotonic() + timeout_s
        for w in self.workers.values():
            if w.proc is not None:
                while w.proc.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if w.proc.poll() is None:
                    w.proc.kill()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.sock.close(linger=0)
        self.ctx.term()

    def attach_process(self, worker_id: str, proc: subprocess.Popen) -> None:
        """A worker this process started: its exit is noticed at once, not by heartbeat."""
        self._procs[worker_id] = proc
        if worker_id in self.workers:
            self.workers[worker_id].proc = proc

    # -- what the API asks -------------------------------------------------------------------
    def is_ready(self) -> bool:
        """Requests can be served: a co-located worker, or a prefill and a decode worker, live
        (with local prefill, a decode worker alone: it prefills every request itself)."""
        live = [w.info.role for w in self.workers.values() if w.alive]
        return "colocated" in live or ("decode" in live and (
            "prefill" in live or self.local_prefill is not None))

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
        requests can be served; then "ok", or "degraded" once a worker has died; "unavailable"
        when the workers left cannot serve."""
        starting = bool(self.starting())
        if self.is_ready() and not starting:
            return "ok" if not self.dead else "degraded"
        return "starting" if starting or not self.dead else "unavailable"

    def health(self) -> dict:
        return {"status": self.status(), "starting": self.starting(), "workers": [
            {**self._worker_row(w), "pid": w.info.pid, "alive": w.alive,
             "outstanding": len(w.requests), "kv_transport": w.info.transport}
            for w in self.workers.values()], "dead": list(self.dead)}

    def worker_stats(self) -> list[dict]:
        return [self._worker_row(w) for w in self.workers.values() if w.alive]

    @staticmethod
    def _worker_row(w: WorkerHandle) -> dict:
        """A worker's identity and its last heartbeat's numbers (every WorkerStats field)."""
        return {"worker_id": w.info.worker_id, "role": w.info.role,
                **msgspec.structs.asdict(w.stats)}

    # -- requests ----------------------------------------------------------------------------
    def _pick(self, role: str) -> str | None:
        return self.policies[role].pick([
            WorkerLoad(w.info.worker_id, len(w.requests), w.stats.kv_blocks_total - w.stats.kv_blocks_used)
            for w in self.workers.values() if w.alive and w.info.role == role])

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[M.Delta]:
        if request_id in self._tracks:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight")
        if not self.is_ready():
            raise ServiceUnavailable("no worker is ready to serve (starting, or all died)")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {len(prompt_token_ids)} tokens; this model's "
                                      f"context is {self.max_model_len}")
        t = _Track(request_id, list(prompt_token_ids), params, asyncio.Queue())
        wp = M.Params.of(params)
        # one worker runs the whole request: a co-located one, or a decode worker prefilling
        # it itself (conditional disaggregation)
        whole = self._pick("colocated")
        prefill = self._pick("prefill") if whole is None else None
        if whole is None and self.local_prefill is not None:
            # no prefill worker left (all died): the decode workers serve whole requests
            whole = (self._local_prefill_target(prefill, len(t.prompt)) if prefill is not None
                     else self._pick("decode"))
        if whole is not None:
            t.worker = whole
            self._own(t, whole)
            self._tracks[request_id] = t
            self._send(whole, M.Generate(request_id, t.prompt, wp), t)
        else:
            t.prefill, t.decode = prefill, self._pick("decode")
            if t.prefill is None or t.decode is None:
                raise ServiceUnavailable("no prefill+decode pair is alive")
            self._own(t, t.prefill)
            self._own(t, t.decode)
            log.debug("%s -> prefill %s, decode %s", request_id, t.prefill, t.decode)
            t.t_reserve = time.monotonic()
            self._tracks[request_id] = t
            self._send(t.decode, M.Reserve(request_id, t.prompt, wp, t.prefill), t)
        try:
            while True:
                item = await t.queue.get()
                if isinstance(item, Exception):
                    t.done = True  # every side is told to let go (idempotent where it did)
                    self._abort(t)
                    raise item
                yield item
                if item.finished:
                    t.done = True
                    return
        finally:
            if not t.done:
                self._abort(t)
            self._tracks.pop(request_id, None)
            for wid in (t.worker, t.prefill, t.decode):
                if wid in self.workers:
                    self.workers[wid].requests.discard(request_id)

    def _local_prefill_target(self, prefill: str, prompt_tokens: int) -> str | None:
        """A decode worker that should prefill this request itself (see LocalPrefill), or None."""
        tracks = [t for t in self._tracks.values() if not t.done]
        queued = sum(len(t.prompt) for t in tracks if t.prefill == prefill and not t.prefill_done)
        # a decode worker's requests: handed over (t.decode) or its own (t.worker); decoding
        # once their first token is out (for a hand-over, that is its admission)
        decodes = [DecodeLoad(wid, sum(1 for t in tracks if wid in (t.decode, t.worker) and t.first_token),
                              sum(len(t.prompt) for t in tracks if t.worker == wid and not t.first_token))
                   for wid, w in self.workers.items() if w.alive and w.info.role == "decode"]
        return self.local_prefill.pick(prompt_tokens, queued, decodes)

    def _own(self, t: _Track, wid: str) -> None:
        self.workers[wid].requests.add(t.request_id)

    def _abort(self, t: _Track) -> None:
        rid = t.request_id
        if t.worker:
            self._send(t.worker, M.Abort(rid))
            return
        fenced = t.prefill_sent and not t.prefill_done
        if fenced and t.decode in self.workers:
            self._send(t.prefill, M.Abort(rid, decode_peer=self.workers[t.decode].peer))
        if t.decode:
            self._send(t.decode, M.Abort(rid, fenced=fenced))

    def _send(self, wid: str | None, msg, track: _Track | None = None) -> bool:
        """Send to a live worker; when that fails and `track` is given, the request fails."""
        w = self.workers.get(wid) if wid else None
        ok = w is not None and w.alive and self._raw_send(wid, msg, track)
        if not ok and track is not None and not (w is not None and w.alive):
            track.queue.put_nowait(RequestFailed(f"worker {wid} cannot be reached"))
        return ok

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
        w = self.workers.get(wid)
        if w is None or not w.alive:
            return
        if isinstance(msg, M.Outputs):
            for d in msg.items:
                t = self._tracks.get(d.request_id)
                # only the worker serving this leg of the request may speak for it
                if t is not None and wid in (t.worker, t.decode):
                    t.first_token = True
                    if d.handover is not None:
                        d.handover.reserve_seconds = t.reserve_seconds
                        t.prefill_done = True
                        if t.prefill in self.workers:
                            # the prefill worker is done with it: its death no longer concerns us
                            self.workers[t.prefill].requests.discard(t.request_id)
                    t.queue.put_nowait(d)
        elif isinstance(msg, M.Failed):
            t = self._tracks.get(msg.request_id)
            if t is not None and wid in (t.worker, t.prefill, t.decode):
                t.queue.put_nowait(RequestFailed(msg.message))
        elif isinstance(msg, M.Reserved):
            t = self._tracks.get(msg.request_id)
            if t is None or t.decode != wid:
                self._send(wid, M.Abort(msg.request_id))  # nobody will write these blocks
                return
            pw = self.workers.get(t.prefill)
            if t.done or pw is None or not pw.alive:
                self._send(wid, M.Abort(msg.request_id))
                return
            t.prefill_sent = self._send(t.prefill, M.Prefill(
                msg.request_id, t.prompt, M.Params.of(t.params), w.peer, msg.block_ids), t)
            t.reserve_seconds = time.monotonic() - t.t_reserve

    def _heartbeat(self, hb_ident: str, msg) -> None:
        w = self.workers.get(hb_ident[:-3])
        if w is None or not isinstance(msg, M.Heartbeat):
            return  # not registered (yet): no lease
        if not w.alive:
            # declared dead but still talking (it was stalled): it must not come back to life
            # with stale work, and its lease must not be renewed
            self._raw_send(hb_ident, M.Shutdown())
            return
        w.last_seen = time.monotonic()
        w.stats = msg.stats
        self._raw_send(hb_ident, M.Ping())

    def _raw_send(self, ident: str, msg, track: _Track | None = None) -> bool:
        """Send without waiting. zmq.asyncio reports a failed send (ROUTER_MANDATORY: the
        peer is gone) through the returned future, usually already done: report it, and fail
        `track`'s request when one is given."""

        def check(fut) -> bool:
            e = fut.exception() if not fut.cancelled() else None
            if e is None:
                return True
            log.warning("could not send %s to %s: %s", type(msg).__name__, ident, e)
            if track is not None:
                track.queue.put_nowait(RequestFailed(f"worker {ident} cannot be reached ({e})"))
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
        if reason:
            log.error("refused worker %s: %s", wid, reason)
            self._raw_send(wid, M.Welcome(False, reason))
            return
        if self.reference is None:
            self.reference = msg
        self.workers[wid] = WorkerHandle(msg, time.monotonic(), proc=self._procs.get(wid))
        self.workers[wid].stats.kv_blocks_total = msg.num_blocks
        self._send(wid, M.Welcome(True, lease_s=self.heartbeat_timeout_s / 2))
        log.info("worker %s (%s, pid %d) registered", wid, msg.role, msg.pid)

    # -- failure detection -------------------------------------------------------------------
    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self._reap_unregistered()
            now = time.monotonic()
            for w in list(self.workers.values()):
                if not w.alive:
                    continue
                exited = w.proc is not None and w.proc.poll() is not None
                if exited or now - w.last_seen > self.heartbeat_timeout_s:
                    why = (f"exited with code {w.proc.returncode}" if exited else
                           f"silent for {now - w.last_seen:.1f} s")
                    if not self._stopping:
                        self._worker_died(w, why)

    def _reap_unregistered(self) -> None:
        """A child that exited before it registered is dead too (or health would say
        "starting" for ever)."""
        for wid, proc in self._procs.items():
            if wid not in self.workers and wid not in self.dead and proc.poll() is not None:
                self.dead.append(wid)
                log.error("worker %s exited with code %s before registering", wid, proc.returncode)

    def _worker_died(self, w: WorkerHandle, why: str) -> None:
        wid = w.info.worker_id
        w.alive = False
        if wid not in self.dead:
            self.dead.append(wid)
        log.error("worker %s (%s) is gone: %s", wid, w.info.role, why)
        for rid in list(w.requests):
            t = self._tracks.get(rid)
            if t is not None:
                t.queue.put_nowait(RequestFailed(f"{w.info.role} worker {wid} died ({why})"))
        for other in self.workers.values():
            if other.alive:
                self._send(other.info.worker_id, M.PeerGone(wid))
        if w.info.shm_path and w.proc is not None:  # a child of ours cannot unlink its pool now
            with contextlib.suppress(OSError):
                os.unlink(w.info.shm_path)

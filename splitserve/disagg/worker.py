"""A worker process: one engine (colocated, prefill or decode role) driven by messages.

The loop is single-threaded, like the engine it drives: between two engine steps it drains the
control socket (requests, aborts) and, on a decode worker, the data plane (KV layers, done and
fence notices), then runs one step and sends the step's outputs. A prefill worker's engine
calls `_on_layer` from inside the forward pass, as each layer's K/V lands in its cache.

The hand-over's bookkeeping — which blocks a chunk writes, reservations, deadlines, fences —
is in handover.py (PrefillSide, DecodeSide: plain state machines the simulator drives too);
this file does their I/O. A prefill worker writes only while it holds a lease (the router
answered a heartbeat within `lease_s`, half the router's dead-worker timeout), so by the time
the router declares it dead it has stopped writing, even if it was only stalled.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, replace

import zmq

from splitserve.config import EngineConfig
from splitserve.disagg import decision_log, faults
from splitserve.disagg import messages as M
from splitserve.disagg.handover import DecodeSide, Fail, Free, PrefillSide, Reserved
from splitserve.disagg.transfer.base import KVSender, TransferError
from splitserve.engine.engine import LLMEngine, RequestOutput
from splitserve.errors import IntegrityError, SplitServeError
from splitserve.request import RequestStatus
from splitserve.router.reroling import blocker

log = logging.getLogger("splitserve.worker")

HEARTBEAT_S = 0.5
# a role change waits this long for what the router no longer counts but this worker still
# holds (a fenced reservation is freed within DecodeSide.fence_max_s, 60 s)
ROLE_WAIT_S = 75.0


def host_identity() -> str:
    """hostname|boot id: two workers may share memory only when these are equal."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}|{boot}"


@dataclass(frozen=True)
class WorkerConfig:
    role: str  # colocated | prefill | decode
    router_addr: str  # tcp://host:port of the router's control socket
    engine: EngineConfig
    worker_id: str = ""
    kv_transport: str = "auto"  # auto | shm | tcp
    # A hand-over that makes no progress (no chunk written) for this long fails the request.
    # Before its first chunk the request is only queued at the prefill worker: it may wait
    # `kv_queue_timeout_s` (a dead prefill worker is reported by the router sooner).
    kv_timeout_s: float = 30.0
    kv_queue_timeout_s: float = 600.0
    data_host: str = "127.0.0.1"  # where a decode worker's data socket listens
    cores: tuple[int, ...] | None = None
    parent_pid: int | None = None  # exit when this process is gone (workers started by serve)
    register_timeout_s: float = 60.0
    # decode: sizes its own prefills' chunks (router.policies.SlackChunks), or None: the
    # engine's --local-prefill-chunk
    prefill_policy: object | None = None
    # it can change role while it runs (SetRole, router/reroling.py): it sets up the decode
    # role's data socket (and shared-memory pool) and the prefill role's writer whatever its
    # role; `decode_prefill_chunk` is then the decode role's --local-prefill-chunk
    reroleable: bool = False
    decode_prefill_chunk: int | tuple[int, ...] | None = None


def wire_logprobs(lp: tuple[float, list[tuple[int, float]]]) -> list:
    """One token's (logprob, [(token, logprob)] top) as msgpack lists."""
    return [lp[0], [list(t) for t in lp[1]]]


def to_delta(o: RequestOutput, handover: M.Handover | None = None) -> M.Delta:
    lps = [wire_logprobs(lp) for lp in o.new_logprobs]
    return M.Delta(o.request_id, o.new_token_ids, o.new_text, o.finished, o.finish_reason,
                   o.stop_reason, lps, o.num_prompt_tokens, o.num_cached_tokens,
                   len(o.token_ids), handover)


class Worker:
    def __init__(self, cfg: WorkerConfig):
        if cfg.role not in ("colocated", "prefill", "decode"):
            raise SplitServeError(f"role must be colocated, prefill or decode, got {cfg.role!r}")
        self.cfg = cfg
        self.role = cfg.role
        self.worker_id = cfg.worker_id or f"{cfg.role}-{socket.gethostname()}-{os.getpid()}"
        if cfg.cores:
            os.sched_setaffinity(0, cfg.cores)
        # every role caches: a decode worker's reservation reuses the blocks it holds (a
        # conversation's earlier turns), and the prefill worker writes only the rest
        self._prefix_caching = cfg.engine.cache.enable_prefix_caching
        ec = replace(cfg.engine, scheduler=self._scheduler_config(cfg.role),
                     cache=replace(cfg.engine.cache,
                                   enable_prefix_caching=self._prefix_caching))
        decode_capable = cfg.role == "decode" or cfg.reroleable
        if decode_capable and cfg.data_host in ("*", "0.0.0.0", "::", ""):
            raise SplitServeError(f"--data-host {cfg.data_host!r} is not an address prefill workers "
                                  "can connect to; give this host's IP")
        self.shm_path: str | None = None
        want_shm = decode_capable and cfg.kv_transport in ("auto", "shm")
        self.engine = LLMEngine(ec, kv_allocator=self._shm_pool if want_shm else None)
        eng = self.engine
        if cfg.prefill_policy is not None and cfg.role == "decode":
            eng.scheduler.prefill_policy = cfg.prefill_policy
        faults.install(eng, cfg.role)
        self.decisions = decision_log.Appender(self.worker_id)
        if self.decisions.path is not None:
            eng.core.trace = []
        self.spec = self._kv_spec(eng)
        self.host = host_identity()
        self.ctx = zmq.Context.instance()
        self.ctrl = self.ctx.socket(zmq.DEALER)
        self.ctrl.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        self.ctrl.setsockopt(zmq.LINGER, 1000)
        self.ctrl.setsockopt(zmq.SNDHWM, 0)  # never block the engine loop on a slow router
        self.ctrl.connect(cfg.router_addr)
        # the lease: a prefill worker writes KV only while the router answers its heartbeats
        self.lease_s = 5.0
        self.router_seen = time.monotonic()
        self.epoch = 0  # this incarnation of worker_id, as the router's Welcome numbers it
        self.epochs: set[int] = set()
        self.router_id = ""  # the router process it registered with (Welcome.router_id)
        # heartbeats go out only while registered; the heartbeat thread clears it and names
        # why in `router_lost` when the router is gone, and the loop registers again
        self.registered = threading.Event()
        self.router_lost: str | None = None
        self.poller = zmq.Poller()
        self.poller.register(self.ctrl, zmq.POLLIN)
        self.stats = M.WorkerStats(kv_blocks_total=eng.kv_cache.num_blocks)
        self._retired: list[KVSender] = []  # closed (their peer died); counted in the stats
        self.running = True
        self.receiver = None
        # prefill
        self.prefill_side = PrefillSide(self.spec.block_size)
        self.peers: dict[str, M.DecodePeer] = {}  # decode workers this one has written to
        self.senders: dict[str, KVSender] = {}
        # decode
        self.decode_side = DecodeSide(cfg.kv_timeout_s, cfg.kv_queue_timeout_s)
        self._handlers = {M.Shutdown: self._on_shutdown, M.Generate: self._on_generate,
                          M.Abort: self._on_abort, M.PeerGone: self._on_peer_gone,
                          M.Prefill: self._on_prefill, M.Reserve: self._on_reserve,
                          M.SetRole: self._on_set_role, M.KVResync: self._on_kv_resync}
        if decode_capable:
            self._setup_decode()
        if self.role == "prefill" or cfg.reroleable:
            eng.kv_layer_hook = self._on_layer  # (acts only on the requests it hands over)
        self.role_changes = 0
        # KV events for the router's prefix index: the pool records them, the loop sends them
        eng.kv_manager.pool.events = []
        if eng.kv_tiers is not None:
            eng.kv_tiers.events = []
        self.kv_seq = 0
        self._role_wanted: tuple[M.SetRole, float] | None = None  # a SetRole waiting (see there)

    # -- set-up ----------------------------------------------------------------------------
    def _scheduler_config(self, role: str):
        """The engine's scheduler settings in `role`: as configured for the role it started in;
        in another, the decode role caps its own prefills (decode_prefill_chunk), the others
        do not."""
        base = self.cfg.engine.scheduler
        if role == self.cfg.role:
            return replace(base, role=role)
        chunk = self.cfg.decode_prefill_chunk if role == "decode" else None
        return replace(base, role=role, prefill_chunk_while_decoding=chunk)

    @staticmethod
    def _kv_spec(eng: LLMEngine) -> M.KVSpec:
        mc = eng.model_config
        return M.KVSpec(eng.model_id, eng.config.dtype, eng.config.cache.block_size,
                        mc.num_layers, mc.num_kv_heads, mc.head_dim)

    def _shm_pool(self, eng: LLMEngine, num_blocks: int):
        """Decode worker: the KV pool in shared memory (allocated there from the start)."""
        from splitserve.disagg.transfer.shm import create_pool

        if eng.device.type != "cpu":
            if self.cfg.kv_transport == "shm":
                raise SplitServeError("--kv-transport shm needs the KV pool in host memory; "
                                      f"this worker runs on {eng.device} (use tcp)")
            return None
        try:
            self.shm_path, tensor = create_pool(self._kv_spec(eng), num_blocks)
            return tensor
        except TransferError:
            if self.cfg.kv_transport == "shm":
                raise
            log.warning("no shared-memory KV pool; prefill workers will send KV over tcp")
            return None

    def _setup_decode(self) -> None:
        from splitserve.disagg.transfer.receiver import KVReceiver

        self.receiver = KVReceiver(self.ctx, self.engine.kv_cache, self.spec, self.cfg.data_host,
                                   self._reserved_blocks)
        self.poller.register(self.receiver.sock, zmq.POLLIN)

    def _reserved_blocks(self, request_id: str, sender_id: str) -> list[int] | None:
        """Blocks a tcp layer of request_id from sender_id may be written into, or None."""
        if self.decode_side.writer_of(request_id) != sender_id:
            return None
        # not the leading blocks it reused: other requests read them (a writer that ignored
        # Prefill.skip_blocks, e.g. an older prefill worker, fails its request instead)
        return self.engine.kv_manager.block_ids(request_id)[self.decode_side.cached_blocks(request_id):]

    def register(self, retry: bool = False) -> None:
        """Register and wait for the Welcome: for register_timeout_s (then raise), or with
        `retry` (registering again after the router was lost) until one comes, asking again
        every register_timeout_s. A router answers a Register repeated by the same attempt (its
        nonce) with the same Welcome."""
        eng = self.engine
        transport = self.cfg.kv_transport
        if self.role == "decode":
            transport = "shm" if self.shm_path else "tcp"
        register = M.Register(
            self.worker_id, self.role, os.getpid(), self.host, eng.model_config.name,
            eng.max_model_len, eng.model_config.vocab_size, self.spec, eng.kv_cache.num_blocks,
            transport, self.receiver.addr if self.receiver else None, self.shm_path,
            nonce=os.urandom(8).hex(), reroleable=self.cfg.reroleable,
            hash_root=eng.kv_manager.root_hash.hex())
        self._send(register)
        deadline = time.monotonic() + self.cfg.register_timeout_s
        while True:
            if not self.ctrl.poll(500):
                if self._orphaned():
                    raise SplitServeError(f"parent {self.cfg.parent_pid} is gone before the router answered")
                if not self.running:
                    raise SplitServeError("stopped before the router answered")
                if time.monotonic() > deadline:
                    if not retry:
                        raise SplitServeError(f"no answer from the router at {self.cfg.router_addr} "
                                              f"within {self.cfg.register_timeout_s:.0f} s")
                    self._send(register)
                    deadline = time.monotonic() + self.cfg.register_timeout_s
                continue
            try:
                msg = M.decode_to_worker(self.ctrl.recv())
            except Exception as e:
                log.error("dropped a malformed control message: %s", e)
                continue
            if isinstance(msg, M.Welcome):
                break
            # (sent by the router that is gone, before it went: what it asked for is nobody's)
            log.info("dropped a %s that came before the Welcome", type(msg).__name__)
        if not msg.accepted:
            raise SplitServeError(f"the router refused this worker: {msg.reason}")
        self.lease_s = msg.lease_s
        self.epoch = msg.epoch
        self.epochs = {msg.epoch}  # this registration's (a role change adds one)
        self.router_id = msg.router_id
        self.router_seen = time.monotonic()
        self.registered.set()
        self._kv_snapshot()

    def _rejoin(self) -> None:
        """The router this worker registered with is gone (`router_lost` says how): abort every
        request held here (their clients were that router's), then register again. Blocks a
        prefill worker may be writing stay fenced until its KVFence (or fence_max_s), as for
        any abort."""
        why, self.router_lost = self.router_lost, None  # (_lose_router ended the lease)
        held = self._abort_everything()
        self.stats.aborts += held
        # (the fences went out first) new connections to the decode workers: the router
        # tells them this incarnation is gone, and they stop listening to its old ones
        for wid in list(self.senders):
            self._retired.append(s := self.senders.pop(wid))
            s.close()
        self.stats.rejoins += 1
        log.warning("%s; aborted the %d requests held here, registering again", why, held)
        try:
            self.register(retry=True)
        except SplitServeError as e:
            if self.running and not self._orphaned():
                raise  # refused (a mismatch, its id taken): exit as a first refusal does
            log.warning("not registered again: %s", e)  # stopped (Ctrl-C), or serve is gone
            self.running = False
            return
        log.warning("registered again with the router at %s (epoch %d)", self.cfg.router_addr, self.epoch)

    def _abort_everything(self) -> int:
        """Abort every request this worker holds, as if the router had aborted each: how many."""
        side = self.decode_side
        rids = set(self.engine.request_ids()) | set(self.prefill_side.targets)
        rids |= {p.request_id for p in side.pending} | set(side.reservations)
        for rid in rids:
            if self.role == "decode":
                self._decode_abort(rid, fenced=True)
            else:
                self.engine.abort_request(rid)
                self._drop_prefill(rid)
        return len(rids)

    def close(self) -> None:
        self.decisions.flush(self.engine.core.trace)
        for s in self.senders.values():
            s.close()
        if self.receiver:
            self.receiver.close()
        self.ctrl.close(linger=500)
        if self.shm_path:
            try:
                os.unlink(self.shm_path)
            except OSError:
                pass
            self.shm_path = None

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        # Ctrl-C at a terminal reaches the whole process group: stop cleanly (the pool file is
        # unlinked in close()). SIGTERM too, unless serve started this worker: then a SIGTERM
        # sent to the whole group (systemd's default) must not end it under serve's drain;
        # serve stops it with Shutdown once the drain is over (or it exits when serve is gone)
        stop = lambda *_: setattr(self, "running", False)  # noqa: E731
        if threading.current_thread() is threading.main_thread():  # (tests run it in a thread)
            signal.signal(signal.SIGINT, stop)
            signal.signal(signal.SIGTERM, signal.SIG_IGN if self.cfg.parent_pid else stop)
        hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        last_stats = 0.0
        try:
            self.register()
            hb.start()
            while self.running:
                if self.router_lost:
                    self._rejoin()
                busy = self.engine.has_unfinished()
                timeout = 0 if busy else 50
                if self.role == "decode" and self.decode_side.busy:
                    timeout = min(timeout, 10)
                events = dict(self.poller.poll(timeout))
                if self.ctrl in events:
                    self._drain_ctrl()
                if self.receiver is not None and self.receiver.sock in events:
                    self._drain_data()
                if self.role == "decode":
                    self._decode_housekeeping(time.monotonic())
                if self._role_wanted is not None:
                    self._try_set_role()
                if self.engine.has_unfinished():
                    self._step()
                self._flush_kv_events()
                now = time.monotonic()
                if now - last_stats >= HEARTBEAT_S:
                    self._update_stats()
                    self.decisions.flush(self.engine.core.trace)
                    last_stats = now
                    if self._orphaned():
                        log.warning("parent %s is gone; exiting", self.cfg.parent_pid)
                        break
        finally:
            self.running = False
            if hb.is_alive():
                hb.join(2)
            self.close()

    def _heartbeat_loop(self) -> None:
        """Own thread, own socket: heartbeats go out during long engine steps too (torch and
        the C kernels release the GIL), and the router's Ping renews the lease."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"{self.worker_id}/hb".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)  # a heartbeat nobody reads is worthless: drop it
        sock.connect(self.cfg.router_addr)
        unanswered = 0  # heartbeats in a row that got no answer
        try:
            while self.running:
                if not self.registered.wait(HEARTBEAT_S):
                    continue
                # the lease runs from when a heartbeat went out, not from when its Ping is read:
                # a Ping that waited to be read across a stall (SIGSTOP) answers an older
                # heartbeat and must not renew the lease from now (it echoes its send time)
                sent = time.monotonic()
                try:
                    sock.send(M.encode(M.Heartbeat(self.stats, self.epoch, self.router_id, sent)),
                              zmq.NOBLOCK)
                except zmq.Again:
                    pass
                unanswered += 1
                deadline = time.monotonic() + HEARTBEAT_S
                while self.running and (left := deadline - time.monotonic()) > 0:
                    if not sock.poll(int(left * 1000) + 1):
                        continue
                    try:
                        msg = M.decode_to_worker(sock.recv())
                    except Exception:
                        continue
                    if isinstance(msg, M.Ping) and self.registered.is_set():
                        self.router_seen = max(self.router_seen, msg.sent)
                        unanswered = 0 if msg.sent == sent else unanswered
                    elif isinstance(msg, M.Shutdown) and msg.epoch in (0, self.epoch):
                        log.error("the router declared this worker dead; exiting")
                        self.router_seen = float("-inf")
                        self.running = False
                    elif (isinstance(msg, M.Rejoin) and msg.router_id == self.router_id
                          and self.registered.is_set()):
                        self._lose_router("the router restarted (it has no registration for "
                                          "this worker)")
                        unanswered = 0
                # the router's dead-worker timeout (twice the lease) with no answer: it is gone,
                # or it has declared this worker dead and failed its requests. Two heartbeats
                # unanswered at least, so that waking from a stall (the clock jumped) first
                # hears what the router says (Shutdown) before concluding it is gone.
                # (a heartbeat's time on top: the router measures from when the last one
                # arrived, this from when the last answered one went out)
                silent = time.monotonic() - self.router_seen
                if (unanswered >= 2 and silent > 2 * self.lease_s + 2 * HEARTBEAT_S
                        and self.registered.is_set()):
                    self._lose_router(f"no answer from the router for {silent:.0f} s")
                    unanswered = 0
        finally:
            sock.close(linger=0)

    def _lose_router(self, why: str) -> None:
        """(heartbeat thread) Stop heartbeats and the lease; the loop aborts and registers again."""
        self.registered.clear()
        self.router_seen = float("-inf")
        self.router_lost = why

    def _orphaned(self) -> bool:
        """The `serve` process that started this worker is gone."""
        return bool(self.cfg.parent_pid) and os.getppid() != self.cfg.parent_pid

    def lease_valid(self) -> bool:
        return time.monotonic() - self.router_seen < self.lease_s

    def _send(self, msg) -> None:
        if not isinstance(msg, M.Register):
            msg.epoch = self.epoch  # the router ignores what another incarnation says
        self.ctrl.send(M.encode(msg))

    def _fail(self, request_id: str, message: str) -> None:
        self._send(M.Failed(request_id, message))

    # -- KV events (router/prefix_index.py) --------------------------------------------------
    def _kv_snapshot(self) -> None:
        """Batch 0: every hash the pool and its tiers can hit now (what was recorded before
        is in it)."""
        pool, tiers = self.engine.kv_manager.pool, self.engine.kv_tiers
        pool.events.clear()
        held = []
        if tiers is not None:
            tiers.events.clear()
            held = [(t, True, h) for t, hs in tiers.hashes().items() for h in hs]
        self._send(M.KVEvents(0, [(True, h) for h in pool.cached_hashes()], snapshot=True,
                              tier_events=held))
        self.kv_seq = 1

    def _flush_kv_events(self) -> None:
        events = self.engine.kv_manager.pool.events
        tiers = self.engine.kv_tiers
        tier_events = tiers.events if tiers is not None else []
        if (events or tier_events) and self.registered.is_set():
            self._send(M.KVEvents(self.kv_seq, list(events), tier_events=list(tier_events)))
            events.clear()
            tier_events.clear()
            self.kv_seq += 1

    def _on_kv_resync(self, msg: M.KVResync) -> None:
        self._kv_snapshot()

    def _update_stats(self) -> None:
        """Refresh the numbers the heartbeat thread sends; when idle, check the block pool."""
        eng, st = self.engine, self.stats
        st.prefix_cache_queries = eng.kv_manager.num_queried_tokens
        st.prefix_cache_hits = eng.kv_manager.num_hit_tokens
        st.prefix_cache_hits_by_tier = dict(eng.kv_manager.hit_tokens_by_tier)
        if eng.kv_tiers is not None:
            t = eng.kv_tiers
            st.kv_tier_bytes = {f"{a}>{b}": n for (a, b), n in t.moved_bytes().items()}
            st.kv_tier_corrupt = t.corrupt + t.lost + (t.shared.corrupt if t.shared else 0)
            u = t.usage()
            st.kv_tier_blocks = {"dram": u["dram_blocks"], "disk": u["disk_blocks"]}
        st.running = len(eng.scheduler.running)
        st.waiting = len(eng.scheduler.waiting) + len(self.decode_side.pending)
        st.kv_blocks_used = eng.kv_manager.pool.usage()["in_use"]
        if self.role == "prefill":
            senders = [*self.senders.values(), *self._retired]
            st.kv_bytes_sent = sum(s.bytes_sent for s in senders)
            st.kv_transfer_seconds = sum(s.seconds for s in senders)
            st.kv_transfers = sum(s.transfers for s in senders)
        if self.receiver is not None:
            st.kv_bytes_received = self.receiver.bytes_received
        if not (eng.has_unfinished() or self.decode_side.busy or self.prefill_side.targets):
            try:
                eng.check_integrity()
                if st.kv_blocks_used:
                    raise IntegrityError(f"{st.kv_blocks_used} blocks in use while idle")
            except IntegrityError as e:
                st.integrity_errors += 1
                log.error("block pool integrity check failed: %s", e)

    def _drain_ctrl(self) -> None:
        while True:
            try:
                raw = self.ctrl.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = M.decode_to_worker(raw)
            except Exception as e:  # a malformed frame must not kill the worker
                log.error("dropped a malformed control message: %s", e)
                continue
            handler = self._handlers.get(type(msg))
            if handler is None:
                continue
            try:
                handler(msg)
            except Exception as e:  # one bad request must not take the worker down
                log.exception("handling %s", type(msg).__name__)
                rid = getattr(msg, "request_id", None)
                if rid is not None:
                    self.engine.abort_request(rid)
                    self.prefill_side.pop(rid)
                    self._fail(rid, f"{type(msg).__name__} failed on {self.worker_id}: {e}")

    def _on_shutdown(self, msg: M.Shutdown) -> None:
        if msg.epoch in (0, self.epoch):  # (one meant for a previous incarnation is not ours)
            self.running = False

    def _fenced(self, msg, roles: tuple[str, ...]) -> bool:
        """A request message this worker must not act on — sent to another registration of it
        (msg.epoch), or needing a role it no longer has (it changed role since the router
        chose it): the request fails here, and True. A role change keeps the registration: a
        Generate sent just before a change that carries it on (colocated -> decode) stands."""
        if (msg.epoch and msg.epoch not in self.epochs) or self.role not in roles:
            self._fail(msg.request_id, f"{type(msg).__name__} reached {self.worker_id} as a "
                       f"{self.role} worker (epoch {self.epoch}; sent for epoch {msg.epoch})")
            return True
        return False

    def _on_set_role(self, msg: M.SetRole) -> None:
        self._role_wanted = (msg, time.monotonic())
        self._try_set_role()

    def _try_set_role(self) -> None:
        """Become the asked role if what this worker holds carries on there
        (router/reroling.py), answering under the new epoch; or refuse under the old one. What
        it holds that the new role cannot carry and the router no longer counts (a reservation
        fenced until its writer's KVFence, a prefilled prompt not yet released) is waited for,
        up to ROLE_WAIT_S, re-checked every loop."""
        msg, since = self._role_wanted
        old = self.role
        try:
            why = None
            if not self.cfg.reroleable:
                why = "it was started without --reroleable (no decode data socket / prefill writer)"
            elif msg.epoch <= self.epoch:
                why = f"epoch {msg.epoch} is not after this worker's {self.epoch} (a stale request)"
            else:
                pending = len(self.decode_side.pending)
                held = blocker(old, msg.role, requests=len(self.engine.request_ids()) + pending,
                               handovers=pending + len(self.decode_side.reservations))
                if held is not None and time.monotonic() - since < ROLE_WAIT_S:
                    return  # not yet: the next loop looks again
                why = held
            if why is None:
                eng = self.engine
                config = self._scheduler_config(msg.role)
                policy = self.cfg.prefill_policy if msg.role == "decode" else None
                eng.core.set_role(config, self._prefix_caching)
                eng.scheduler.prefill_policy = policy
                self.role, self.epoch = msg.role, msg.epoch
                self.epochs.add(msg.epoch)
        except ValueError as e:  # (an unknown role)
            why = str(e)
        except Exception as e:  # never leave the router waiting for an answer
            log.exception("changing role to %s", msg.role)
            why = f"{type(e).__name__}: {e}"
        self._role_wanted = None
        if why is not None:
            log.warning("refused to become %s: %s", msg.role, why)
            self._send(M.RoleSet(msg.role, msg.epoch, False, why))
            return
        self.role_changes += 1
        self.stats.role_changes = self.role_changes
        self._send(M.RoleSet(msg.role, msg.epoch, True))
        log.warning("changed role %s -> %s (epoch %d); carrying on %d request(s)", old, msg.role,
                    msg.epoch, len(self.engine.request_ids()))

    def _on_generate(self, msg: M.Generate) -> None:
        """The whole request here: a co-located worker's, or a decode worker's own prefill."""
        if self._fenced(msg, ("colocated", "decode")):
            return
        try:
            self.engine.add_request(msg.prompt_token_ids, msg.params.to_sampling_params(), msg.request_id)
        except SplitServeError as e:
            self._fail(msg.request_id, str(e))
            return
        if self.role == "decode":
            self.stats.local_prefills += 1

    def _on_abort(self, msg: M.Abort) -> None:
        rid = msg.request_id
        if self.role == "decode":
            found = self._decode_abort(rid, msg.fenced)
        else:
            found = self.engine.abort_request(rid) is not None
            found = self._drop_prefill(rid, msg.decode_peer) or found
        self.stats.aborts += found  # an abort that found its request here

    def _drop_prefill(self, rid: str, decode_peer: M.DecodePeer | None = None) -> bool:
        """Forget the request's hand-over target and fence it at its decode worker; whether
        there was a target."""
        target = self.prefill_side.pop(rid)
        peer = self.peers.get(target.peer_id) if target else decode_peer
        sender = self.senders.get(peer.worker_id) if self.role == "prefill" and peer else None
        if sender is not None:
            # the decode worker keeps the blocks until it knows no write of ours is left. No
            # connection, no write ever went out: the decode worker learns that from PeerGone
            # or the fence deadline, never from a blocking connect here.
            try:
                sender.fence(rid)
            except TransferError as e:
                log.warning("could not fence %s at %s: %s", rid, peer.worker_id, e)
        return target is not None

    def _on_peer_gone(self, msg: M.PeerGone) -> None:
        s = self.senders.pop(msg.worker_id, None)
        if s is not None:
            s.close()
            self._retired.append(s)
        if self.receiver is not None:  # nothing more from its connections is looked at
            self.receiver.forget(msg.worker_id)
        # the requests this worker was writing to it, or it to this one
        for rid in self.prefill_side.drop_peer(msg.worker_id) + self.decode_side.on_peer_gone(msg.worker_id):
            self.engine.abort_request(rid)

    # -- prefill role ----------------------------------------------------------------------
    def _sender(self, peer: M.DecodePeer) -> KVSender:
        s = self.senders.get(peer.worker_id)
        if s is not None and self.peers.get(peer.worker_id, peer) != peer:
            # a new incarnation of that decode worker (restarted: a new data socket and pool)
            # whose predecessor's PeerGone did not reach us: what was written to the old one
            # is lost, and the connection to it goes
            log.warning("decode worker %s is a new incarnation (epoch %d); reconnecting",
                        peer.worker_id, peer.epoch)
            self._on_peer_gone(M.PeerGone(peer.worker_id))
            s = None
        if s is None:
            t = self.cfg.kv_transport
            same_host = peer.host == self.host and peer.shm_path is not None
            if t == "shm" and not same_host:
                raise TransferError(f"--kv-transport shm, but decode worker {peer.worker_id} has no "
                                    "shared-memory pool on this host; use tcp or auto")
            if t in ("auto", "shm") and same_host and self.engine.device.type == "cpu":
                from splitserve.disagg.transfer.shm import ShmSender as cls
            else:
                from splitserve.disagg.transfer.tcp import TcpSender as cls
            s = cls(self.ctx, self.worker_id, peer, self.spec, self.engine.kv_cache)
            self.senders[peer.worker_id] = s
            self.peers[peer.worker_id] = peer
        return s

    def _on_prefill(self, msg: M.Prefill) -> None:
        rid = msg.request_id
        if self._fenced(msg, ("prefill",)):
            return
        try:
            self._sender(msg.peer)
            # refuses a duplicate id (the live request's target stays) and too few blocks
            self.prefill_side.add(rid, msg.peer.worker_id, msg.block_ids, len(msg.prompt_token_ids),
                                  msg.skip_blocks)
        except SplitServeError as e:
            self._fail(rid, str(e))
            return
        self.peers[msg.peer.worker_id] = msg.peer
        try:
            self.engine.add_request(msg.prompt_token_ids, msg.params.to_sampling_params(), rid)
        except SplitServeError as e:
            self.prefill_side.pop(rid)
            self._fail(rid, str(e))

    def _on_layer(self, layer: int, chunks) -> None:
        """Engine hook (inside the forward): layer `layer` of every prompt chunk of this step is
        in the local cache; write it to each request's decode worker (the blocks of each chunk:
        handover.Target.chunk_blocks)."""
        bs = self.spec.block_size
        last = layer == self.spec.num_layers - 1
        lease_ok = self.lease_valid()
        for ch in chunks:
            rid = ch.request.request_id
            t = self.prefill_side.get(rid)
            if t is None or t.error or ch.num_new_tokens == 0:
                continue
            if layer == 0:  # a new chunk: the decode worker's transfer deadline restarts
                try:
                    self.senders[t.peer_id].progress(rid)
                except (TransferError, KeyError):
                    pass  # the write below reports it
            if not lease_ok:
                # the router may have declared us dead and the decode worker freed these
                # blocks for someone else: never write without a live lease
                t.error = "lost contact with the router (lease expired)"
                continue
            b0, b1 = t.chunk_blocks(ch.start, ch.num_new_tokens, bs)
            if b1 == b0:  # the chunk lies in blocks the decode worker holds already
                if last:
                    t.chunk_written(ch.start, ch.num_new_tokens, bs)
                continue
            src = self.engine.kv_manager.block_ids(rid)[b0:b1]
            try:
                sender = self.senders[t.peer_id]
                before = sender.seconds  # the sender times its writes; this request's share
                t.bytes += sender.write_layer(rid, layer, src, t.dst_blocks[b0:b1])
                t.write_seconds += sender.seconds - before
            except (TransferError, KeyError) as e:
                t.error = str(e) if isinstance(e, TransferError) else "decode worker is gone"
            if last:
                t.chunk_written(ch.start, ch.num_new_tokens, bs)

    def _prefill_outputs(self, outs: list[RequestOutput]) -> None:
        for o in outs:
            rid = o.request_id
            t = self.prefill_side.get(rid)
            what = self.prefill_side.on_output(rid, o.finished, bool(o.new_token_ids))
            if what == "failed":
                self.engine.abort_request(rid)
                self._fail(rid, f"KV transfer to {t.peer_id} failed: {t.error}")
                continue
            if what == "no-token":  # finished without a token (outgrew the pool)
                self._fail(rid, f"prefill could not finish ({o.finish_reason})")
                continue
            if what != "done":
                continue
            first_lp = wire_logprobs(o.new_logprobs[0]) if o.new_logprobs else None
            try:
                sender = self.senders[t.peer_id]
                sender.done(M.KVDone(rid, o.new_token_ids[0], first_lp, t.bytes, t.write_seconds,
                                     time.monotonic(), sender.transport, o.num_cached_tokens))
            except (TransferError, KeyError) as e:
                self._fail(rid, f"KV hand-over to {t.peer_id} failed: {e}")
            if o.finish_reason == RequestStatus.FINISHED_PREFILLED.value:
                self.engine.release(rid)

    # -- decode role -----------------------------------------------------------------------
    def _on_reserve(self, msg: M.Reserve) -> None:
        if self._fenced(msg, ("decode",)):
            return
        self.decode_side.queue(msg.request_id, msg.prefill_worker_id, msg)

    def _reserve(self, msg: M.Reserve) -> tuple[list[int], int] | None:
        return self.engine.reserve(msg.prompt_token_ids, msg.params.to_sampling_params(),
                                   msg.request_id)

    def _decode_housekeeping(self, now: float) -> None:
        for a in self.decode_side.tick(now, self._reserve):
            match a:
                case Reserved():
                    self._send(M.Reserved(a.request_id, a.block_ids,
                                          cached_blocks=a.cached_blocks))
                case Fail():
                    self._fail(a.request_id, a.message)
                case Free():  # fenced, and the writer never said it stopped
                    log.warning("no fence for %s from %s after %.0f s; freeing its blocks",
                                a.request_id, a.writer, self.decode_side.fence_max_s)
                    self.engine.abort_request(a.request_id)

    def _decode_abort(self, rid: str, fenced: bool) -> bool:
        """Whether the request was here (queued, reserved or in the engine)."""
        what = self.decode_side.on_abort(rid, fenced, time.monotonic())
        if what in ("free", "engine"):
            return self.engine.abort_request(rid) is not None or what == "free"
        return True

    def _drain_data(self) -> None:
        side = self.decode_side
        for sender, msg in self.receiver.poll():
            rid = msg.request_id
            match msg:
                case M.KVProgress():
                    side.on_progress(rid, sender, time.monotonic())
                    continue
                case M.KVFence():
                    if side.on_fence(rid, sender):  # the writer has stopped: free the blocks
                        self.engine.abort_request(rid)
                    continue
            what = side.on_done(rid, sender)
            if what is None:
                continue  # already freed, or not the worker that writes this request
            # "free": it was fenced meanwhile (its request has failed); the writer has stopped
            problem = None
            if what == "admit" and rid in self.receiver.bad:
                problem = "a KV layer arrived malformed"
            elif what == "admit" and not 0 <= msg.first_token < self.engine.model_config.vocab_size:
                problem = f"first token {msg.first_token} is outside the vocabulary"
            if what == "free" or problem:
                self.receiver.bad.discard(rid)
                self.engine.abort_request(rid)
                if problem:
                    self._fail(rid, f"KV hand-over from {sender} failed: {problem}")
                continue
            # usage's cached tokens are the prefill worker's hit (the reuse here saved a copy,
            # not compute): set before admit, so every delta says the same
            self.engine.scheduler.requests[rid].num_cached_tokens = msg.cached_tokens
            o = self.engine.admit(rid, msg.first_token, msg.first_logprobs)
            if self.engine.core.trace is not None:
                self.engine.core.trace.append(("at", rid, time.monotonic()))
            notify = time.monotonic() - msg.t_sent
            self.stats.kv_transfers += 1
            self.stats.kv_transfer_seconds += notify
            d = to_delta(o, M.Handover(msg.bytes, msg.write_seconds, notify, msg.transport))
            d.num_cached_tokens = msg.cached_tokens  # (the prefill worker's hit, not ours)
            self._send(M.Outputs([d]))

    # -- the step --------------------------------------------------------------------------
    def _step(self) -> None:
        trace = self.engine.core.trace
        logged = len(trace) if trace is not None else 0
        t0 = time.monotonic() if trace is not None else 0.0
        outs = self.engine.step()
        if trace is not None and len(trace) > logged:  # the step did something: when it ran
            trace.append(("time", t0, time.monotonic() - t0))
        self.stats.steps += 1
        for o in outs:
            if o.finish_reason == "error":  # the step raised: its requests fail, we go on
                log.error("a step failed (%s); failing %s", o.error, o.request_id)
                if self.role == "prefill":
                    self._drop_prefill(o.request_id)
                self._fail(o.request_id, f"a step failed on {self.worker_id}: {o.error}")
        self.stats.step_errors = self.engine.step_errors
        outs = [o for o in outs if o.finish_reason != "error"]
        if self.role == "prefill":
            self._prefill_outputs(outs)
            return
        items = [to_delta(o) for o in outs if o.finish_reason != "abort"]
        if items:
            self._send(M.Outputs(items))


def run_worker(cfg: WorkerConfig) -> int:
    worker = Worker(cfg)
    worker.run()
    return 0

"""A simulated worker: the server's EngineCore and hand-over state machines, with a latency
model in place of the forward pass — the second shell around the classes disagg/worker.py
drives (see that file for the real loop this one mirrors).

The real worker is single-threaded: between two engine steps it drains its control and data
sockets, reserves blocks for queued hand-overs, then runs one step and sends its outputs. So
here a message that arrives while a step runs waits in `inbox` until the step ends, and a step
is scheduled at once when the worker is idle:

    deliver(msg) ─► inbox ─► (idle, or at the step's end) drain ─► housekeeping ─► step
    step: EngineCore.step(forward) at its start; it ends latency.step_time(batch) later, and
    its outputs leave then (one Outputs message per step, as the real worker sends)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from splitserve.config import SchedulerConfig
from splitserve.disagg.handover import DecodeSide, Fail, Free, PrefillSide, Reserved
from splitserve.engine.core import EngineCore
from splitserve.errors import SplitServeError
from splitserve.kv.hashing import root_hash
from splitserve.request import Request, RequestStatus, SamplingParams
from splitserve.sim.latency.base import Batch, LatencyModel
from splitserve.sim.tiers import SimTiers

# The token every simulated step samples: any id works (requests run to max_tokens with
# ignore_eos and no eos ids), it only has to be a valid token for the block hashes.
SIM_TOKEN = 1


@dataclass(frozen=True)
class WorkerSpec:
    """One worker of a simulated deployment: what its engine would be configured with."""

    role: str  # colocated | prefill | decode
    scheduler: SchedulerConfig
    num_blocks: int
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_model_len: int = 8192
    # () -> a fresh policy for the scheduler's own-prefill chunks (policies.SlackChunks), or None
    prefill_policy: Callable[[], object] | None = None
    latency: LatencyModel | None = None  # its own step times (None: the deployment's)
    host_blocks: int = 0  # a host DRAM tier below the pool (sim/tiers.py), in blocks


# -- the messages a simulated worker receives (the real ones are in disagg/messages.py) ------
@dataclass
class Generate:
    request: Request


@dataclass
class Reserve:
    request: Request
    prefill_worker_id: str


@dataclass
class Prefill:
    request: Request
    decode_worker_id: str
    block_ids: list[int]
    skip_blocks: int = 0  # held by the decode worker already: not written


@dataclass
class Abort:
    request_id: str
    fenced: bool = False
    decode_peer: str | None = None


@dataclass
class KVProgress:
    request_id: str
    sender: str


@dataclass
class KVDone:
    request_id: str
    sender: str
    first_token: int
    bytes: int


@dataclass
class KVFence:
    request_id: str
    sender: str


@dataclass
class WorkerCounters:
    steps: int = 0
    busy_s: float = 0.0
    kv_bytes_sent: int = 0
    local_prefills: int = 0
    preemptions: int = 0
    tokens: int = 0


@dataclass
class _Output:
    """One request's output of a step, as the router receives it."""

    request_id: str
    num_new_tokens: int
    finished: bool
    handover: bool = False  # the decode worker's admission of a hand-over
    failed: str | None = None


class SimWorker:
    def __init__(self, sim, worker_id: str, spec: WorkerSpec, latency: LatencyModel):
        self.sim = sim  # the Simulation: its loop, router, workers and KV link
        self.worker_id = worker_id
        self.role = spec.role
        self.spec = spec
        self.latency = spec.latency or latency
        # every role caches, as the real worker: a decode worker's reservations reuse its blocks
        enable_caching = spec.enable_prefix_caching
        self.core = EngineCore(spec.scheduler, spec.num_blocks, spec.block_size,
                               root_hash("sim", spec.block_size), spec.max_model_len,
                               enable_prefix_caching=enable_caching,
                               prefill_policy=spec.prefill_policy() if spec.prefill_policy else None)
        self.inbox: list = []
        self.stepping = False
        self.counters = WorkerCounters()
        self.prefill_side = PrefillSide(spec.block_size) if spec.role == "prefill" else None
        self.decode_side = (DecodeSide(sim.config.kv_timeout_s, sim.config.kv_queue_timeout_s)
                            if spec.role == "decode" else None)
        self.kv_lands: dict[str, float] = {}  # prefill side: when a request's last KV write lands
        self.tiers = None
        store = getattr(sim, "store", None)
        if enable_caching and (spec.host_blocks or store is not None):
            self.tiers = SimTiers(spec.host_blocks, store, sim.config.tier_load_s)
            self.core.kv.attach_tiers(self.tiers)
        self.link_free_at = 0.0  # prefill side: its KV link is busy until then

    # -- messages --------------------------------------------------------------------------
    def deliver(self, msg) -> None:
        self.inbox.append(msg)
        if not self.stepping:
            self._loop()

    def _drain(self) -> list[_Output]:
        """The inbox in the real loop's order: control messages, then the data plane's."""
        out: list[_Output] = []
        inbox, self.inbox = self.inbox, []
        for msg in inbox:
            match msg:
                case Generate(request=req):
                    try:
                        self.core.add_request(req)
                    except SplitServeError as e:
                        out.append(_Output(req.request_id, 0, True, failed=str(e)))
                        continue
                    if self.role == "decode":
                        self.counters.local_prefills += 1
                case Reserve(request=req, prefill_worker_id=pid):
                    self.decode_side.queue(req.request_id, pid, req)
                case Prefill():
                    self._on_prefill(msg, out)
                case Abort():
                    self._on_abort(msg)
        for msg in inbox:
            match msg:
                case KVProgress(request_id=rid, sender=s):
                    self.decode_side.on_progress(rid, s, self.sim.loop.now)
                case KVDone():
                    self._on_kv_done(msg, out)
                case KVFence(request_id=rid, sender=s):
                    if self.decode_side.on_fence(rid, s):
                        self.core.abort(rid)
        return out

    def _on_prefill(self, msg: Prefill, out: list[_Output]) -> None:
        req = msg.request
        try:
            self.prefill_side.add(req.request_id, msg.decode_worker_id, msg.block_ids,
                                  req.num_prompt_tokens, msg.skip_blocks)
        except SplitServeError as e:
            out.append(_Output(req.request_id, 0, True, failed=str(e)))
            return
        try:
            self.core.add_request(req)
        except SplitServeError as e:
            self.prefill_side.pop(req.request_id)
            out.append(_Output(req.request_id, 0, True, failed=str(e)))

    def _on_abort(self, msg: Abort) -> None:
        rid = msg.request_id
        if self.role == "decode":
            what = self.decode_side.on_abort(rid, msg.fenced, self.sim.loop.now)
            if what in ("free", "engine"):
                self.core.abort(rid)
            return
        self.core.abort(rid)
        target = self.prefill_side.pop(rid) if self.prefill_side else None
        peer = target.peer_id if target else msg.decode_peer
        if self.role == "prefill" and peer is not None:
            self.kv_lands.pop(rid, None)
            self.sim.send_data(peer, KVFence(rid, self.worker_id), 0.0)

    def _on_kv_done(self, msg: KVDone, out: list[_Output]) -> None:
        what = self.decode_side.on_done(msg.request_id, msg.sender)
        if what == "free":
            self.core.abort(msg.request_id)
        elif what == "admit":
            req = self.core.admit(msg.request_id, msg.first_token)
            if self.core.trace is not None:  # the timings the real worker logs too
                self.core.trace.append(("at", req.request_id, self.sim.loop.now))
            out.append(_Output(req.request_id, 1, req.is_finished, handover=True))

    def _housekeeping(self, out: list[_Output]) -> None:
        now = self.sim.loop.now
        for a in self.decode_side.tick(now, self.core.reserve):
            match a:
                case Reserved(request_id=rid, block_ids=blocks, cached_blocks=cached):
                    self.sim.router_receive(self, "reserved", rid, blocks, cached)
                case Fail(request_id=rid, message=m):
                    out.append(_Output(rid, 0, True, failed=m))
                case Free(request_id=rid):
                    self.core.abort(rid)

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        """A loop iteration of the real worker: drain, housekeeping, maybe a step."""
        out = self._drain()
        if self.decode_side is not None:
            self._housekeeping(out)
        if out:
            self.sim.router_receive(self, "outputs", out)
        if self.core.has_unfinished():
            self._start_step()
        else:
            self.stepping = False
            self._wake_for_deadline()

    def _wake_for_deadline(self) -> None:
        """The real loop checks deadlines every 10 ms while reservations are open; an idle
        simulated worker wakes when the next one is due."""
        due = self.decode_side.next_deadline() if self.decode_side is not None else None
        if due is not None:
            self.sim.loop.at(due + 1e-9, self._wake)

    def _wake(self) -> None:
        if not self.stepping:
            self._loop()

    def _forward(self, sched_out) -> dict[str, int]:
        return {c.request.request_id: SIM_TOKEN for c in sched_out.chunks if c.sample}

    def _start_step(self) -> None:
        now = self.sim.loop.now
        sched_out, stepped = self.core.step(self._forward, now)
        if sched_out.is_empty:
            # nothing can run (e.g. the pool is full of waiting prompts): the real worker spins
            # on empty steps until a message changes that; here it waits for one (or a deadline)
            self.stepping = False
            self._wake_for_deadline()
            if sched_out.finished:
                self.sim.router_receive(self, "outputs", [
                    _Output(r.request_id, 0, True) for r in sched_out.finished])
            return
        dt = self.latency.step_time(Batch.of(sched_out))
        if self.tiers is not None:  # the blocks scheduling loaded from the tiers
            dt += self.tiers.take_load_s()
        if self.prefill_side is not None:
            dt += self.sim.kv.write(self, sched_out, dt)
        dt += self.sim.host_cpu_taken(self)
        c = self.counters
        c.steps += 1
        if self.core.trace is not None:
            self.core.trace.append(("time", now, dt))
        c.busy_s += dt
        c.preemptions += len(sched_out.preempted)
        self.stepping = True
        self.sim.loop.at(now + dt, self._end_step, sched_out, stepped)

    def _end_step(self, sched_out, stepped: list[Request]) -> None:
        events = self.core.kv.pool.events  # (None: the router keeps no prefix index)
        tier_events = self.tiers.events if self.tiers is not None else []
        if events is not None and (events or tier_events):  # the real loop's KVEvents
            self.sim.router_receive(self, "kv", list(events), list(tier_events))
            events.clear()
        tier_events.clear()
        self.sim.store_changed()
        outs = [_Output(r.request_id, 0, True) for r in sched_out.finished]
        self.counters.tokens += len(stepped)
        if self.role == "prefill":
            self._prefill_outputs(sched_out, stepped, outs)
        else:
            outs += [_Output(r.request_id, 1, r.is_finished) for r in stepped]
        if outs:
            self.sim.router_receive(self, "outputs", outs)
        self._loop()

    def _prefill_outputs(self, sched_out, stepped: list[Request], outs: list[_Output]) -> None:
        """What the real worker's _prefill_outputs does: KVDone to the decode worker for each
        prompt that got its first token (it lands once its last KV write has), a failure for
        one that could not finish. Nothing else goes to the router from a prefill worker."""
        got = {r.request_id for r in stepped}
        outs.clear()
        for req in (*sched_out.finished, *stepped):
            rid = req.request_id
            target = self.prefill_side.get(rid)
            what = self.prefill_side.on_output(rid, req.is_finished, rid in got)
            if what == "done":
                lands = self.kv_lands.pop(rid, self.sim.loop.now)
                self.sim.send_data(target.peer_id, KVDone(rid, self.worker_id,
                                                          req.output_token_ids[0], target.bytes),
                                   max(0.0, lands - self.sim.loop.now))
                if req.status is RequestStatus.FINISHED_PREFILLED:
                    self.core.release(rid)
            elif what in ("failed", "no-token"):
                self.kv_lands.pop(rid, None)
                if what == "failed":
                    self.core.abort(rid)
                outs.append(_Output(rid, 0, True, failed=f"prefill could not finish ({req.status.value})"))


def sim_params(output_len: int) -> SamplingParams:
    """What the load generator asks for: exactly output_len tokens, greedy."""
    return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

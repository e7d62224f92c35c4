"""A deployment on a virtual clock: the server's RouterState routes, SimWorkers (EngineCore +
hand-over state machines + a latency model) serve, a KV link prices the hand-over, and each
request's client-side timeline comes out as the same RequestRecord a real load run records.

A request's path and the latencies charged on it (SimConfig):

    client ─api_s─► router: RouterState.route
      whole: ─hop_s─► worker Generate ... outputs ─hop_s─► router ─api_s─► client
      P/D:   ─hop_s─► decode Reserve ─(reserve at its next loop)─ Reserved ─hop_s─► router
             ─hop_s─► prefill Prefill ... KV writes (kvlink.py) ... KVDone ─data_hop_s─►
             decode (admits at its next loop) ─hop_s─► router ─api_s─► client (first token)

Workers handle messages only between steps, as the real single-threaded loop does, so a
message that lands during a step waits for its end: that wait is part of what is simulated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.bench.goodput import RequestRecord
from splitserve.bench.workloads import RequestSpec
from splitserve.errors import InvalidRequestError, ServiceUnavailable
from splitserve.kv.hashing import block_hashes, root_hash
from splitserve.request import Request
from splitserve.router.admission import Overloaded
from splitserve.router.policies import LocalPrefill
from splitserve.router.prefix_index import STORE_ID
from splitserve.router.state import RouterState
from splitserve.sim.events import EventLoop
from splitserve.sim.kvlink import KVLink
from splitserve.sim.latency.base import LatencyModel
from splitserve.sim.tiers import SimStore
from splitserve.sim.worker import (
    Abort,
    Generate,
    Prefill,
    Reserve,
    SimWorker,
    WorkerSpec,
    sim_params,
)


@dataclass(frozen=True)
class SimConfig:
    kv: KVLink
    api_s: float = 0.0  # client <-> router, one way: HTTP, the API server's own work
    hop_s: float = 0.0  # router <-> worker, one way (ZeroMQ, the router's event loop)
    data_hop_s: float = 0.0  # prefill -> decode notices (KVDone, KVProgress, KVFence)
    kv_timeout_s: float = 30.0
    kv_queue_timeout_s: float = 600.0
    local_prefill: bool = True  # P/D: conditional disaggregation (serve --local-prefill auto)
    # CPU the API server, the router and the client spend per streamed token on the workers'
    # host (they are not pinned: on a host whose cores all run workers they take it from them)
    host_cpu_per_token_s: float = 0.0
    record: bool = False  # keep every worker's decision log (EngineCore.trace)
    # the shared KV tier (sim/tiers.py; serve --kv-shared-gb), in blocks (0: none), and each
    # tier's load time per block
    shared_blocks: int = 0
    tier_load_s: dict = field(default_factory=dict)


@dataclass
class _Client:
    """One request's timeline as the client sees it."""

    spec: RequestSpec
    token_times: list[float] = field(default_factory=list)
    n_out: int = 0
    t_done: float | None = None
    error: str | None = None
    rejected: bool = False  # admission control refused it (a 429)
    prompt: list[int] = field(default_factory=list)


@dataclass
class SimResult:
    records: list[RequestRecord]
    makespan_s: float  # virtual time from the first arrival to the last request's end
    events: int
    workers: dict  # worker id -> its counters
    routes: list  # (request id, "whole" | "local" | "pd", worker ids, time) in arrival order


class Simulation:
    def __init__(self, workers: list[WorkerSpec], latency: LatencyModel, config: SimConfig,
                 admission=None, local_prefill=None, routing: str = "cache-aware"):
        """`admission`: a router.admission.Admission (the server's own), or None: accept all.
        `local_prefill`: the conditional-disaggregation policy when config.local_prefill
        (default policies.LocalPrefill). `routing`: RouterState's (cache-aware: the workers'
        KV events reach the router's prefix index hop_s after each step, as the server's)."""
        if not workers:
            raise ValueError("a deployment needs at least one worker")
        self.config = config
        self.kv = config.kv
        self.loop = EventLoop()
        roles = {w.role for w in workers}
        local = config.local_prefill and "decode" in roles
        self.state = RouterState((local_prefill or LocalPrefill()) if local else None, admission,
                                 routing)
        self.state.routes = []
        self.state.block_size = workers[0].block_size
        self._root = root_hash("sim", workers[0].block_size)  # (the SimWorkers' own)
        self._kv_seq: dict[str, int] = {}
        self.store = SimStore(config.shared_blocks) if config.shared_blocks else None
        if self.store is not None and self.state.prefix_index is not None:
            self.state.prefix_index.add_shared(STORE_ID)
            self.state.prefix_index.snapshot(STORE_ID, [])
            self._kv_seq[STORE_ID] = 1
        self.workers: dict[str, SimWorker] = {}
        for i, spec in enumerate(workers):
            wid = f"{spec.role}-{i}"
            w = self.workers[wid] = SimWorker(self, wid, spec, latency)
            if config.record:
                w.core.trace = []
            self.state.add_worker(wid, spec.role, spec.num_blocks, 0.0)
            if self.state.prefix_index is not None:
                w.core.kv.pool.events = []
                self.state.prefix_index.snapshot(wid, [])
                self._kv_seq[wid] = 1
        if not self.state.is_ready():
            raise ValueError(f"a deployment of {sorted(roles)} workers cannot serve: it needs a "
                             "co-located worker, or prefill and decode workers")
        self.state.max_model_len = min(w.max_model_len for w in workers)
        self.host_cpu_owed = 0.0  # the API side's CPU not yet taken from a worker
        self.clients: dict[str, _Client] = {}

    # -- running ---------------------------------------------------------------------------
    def run(self, specs: list[RequestSpec], prompts: list[list[int]]) -> SimResult:
        """Serve every spec (prompts[i]: its token ids) from its arrival time to the end."""
        for i, (spec, prompt) in enumerate(zip(specs, prompts)):
            rid = f"sim-{i}"
            self.clients[rid] = _Client(spec, prompt=prompt)
            self.loop.at(spec.arrival_s + self.config.api_s, self._route, rid)
        self.loop.run()
        records = [self._record(c) for c in self.clients.values()]
        first = min((s.arrival_s for s in specs), default=0.0)
        last = max((r.t_done for r in records), default=first)  # not a later idle wake-up
        return SimResult(records, last - first, self.loop.events,
                         {wid: w.counters for wid, w in self.workers.items()}, self.state.routes)

    def _record(self, c: _Client) -> RequestRecord:
        s = c.spec
        error = c.error
        if error is None and c.t_done is None:
            error = "never finished (the simulated deployment stalled)"
        ok = error is None and bool(c.token_times)
        if error is None and not c.token_times:
            error = "finished without any token"
        return RequestRecord(ok=ok, t_due=s.arrival_s, t_sent=s.arrival_s,
                             t_done=c.t_done if c.t_done is not None else self.loop.now,
                             token_times=c.token_times, n_out=c.n_out, input_len=len(c.prompt),
                             output_len=s.output_len, error=error, meta=s.meta,
                             rejected=c.rejected)

    # -- the router ------------------------------------------------------------------------
    def _route(self, rid: str) -> None:
        c = self.clients[rid]
        now = self.loop.now
        try:
            hashes = (block_hashes(c.prompt, self.state.block_size, self._root)
                      if self.state.wants_hashes() else None)
            t = self.state.route(rid, len(c.prompt), now, max_tokens=c.spec.output_len,
                                 block_hashes=hashes)
        except Overloaded as e:  # refused at once: the client gets its 429
            c.error, c.rejected, c.t_done = str(e), True, now + self.config.api_s
            return
        except (ServiceUnavailable, InvalidRequestError) as e:
            self._fail(rid, str(e))
            return
        params = sim_params(c.spec.output_len)
        if t.worker is not None:
            self._to_worker(t.worker, Generate(Request(rid, c.prompt, params, arrival_time=now)))
        else:
            self._to_worker(t.decode, Reserve(Request(rid, c.prompt, params, arrival_time=now),
                                              t.prefill))

    def _to_worker(self, wid: str, msg) -> None:
        self.loop.at(self.loop.now + self.config.hop_s, self.workers[wid].deliver, msg)

    def router_receive(self, worker: SimWorker, kind: str, *args) -> None:
        """A worker sends the router a message; it lands hop_s later."""
        handler = {"outputs": self._on_outputs, "reserved": self._on_reserved,
                   "kv": self._on_kv}[kind]
        self.loop.at(self.loop.now + self.config.hop_s, handler, worker.worker_id, *args)

    def store_changed(self) -> None:
        """The shared store's changes since the last call reach the index hop_s later (its
        event feed)."""
        if self.store is not None and self.store.events:
            events, self.store.events = self.store.events, []
            if self.state.prefix_index is not None:
                self.loop.at(self.loop.now + self.config.hop_s, self._on_kv, STORE_ID, [],
                             [("shared", stored, h) for stored, h in events])

    def _on_outputs(self, wid: str, outs) -> None:
        at_client = self.loop.now + self.config.api_s
        for o in outs:
            rid = o.request_id
            if o.failed is not None:
                if self.state.speaker(rid, wid) is not None:
                    self._fail(rid, o.failed)
                continue
            if self.state.on_output(rid, wid, o.handover, tokens=o.num_new_tokens) is None:
                continue
            c = self.clients[rid]
            if o.num_new_tokens:
                c.token_times.append(at_client)
                c.n_out += o.num_new_tokens
                self.host_cpu_owed += o.num_new_tokens * self.config.host_cpu_per_token_s
            if o.finished:
                c.t_done = at_client
                self.state.finish(rid)

    def _on_kv(self, wid: str, events: list, tier_events=()) -> None:
        seq = self._kv_seq[wid]
        self._kv_seq[wid] = seq + 1
        self.state.prefix_index.apply(wid, seq, events, tier_events)

    def _on_reserved(self, wid: str, rid: str, block_ids: list[int], cached_blocks: int = 0) -> None:
        pid = self.state.on_reserved(rid, wid, self.loop.now)
        if pid is None:  # nobody will write these blocks
            self._to_worker(wid, Abort(rid))
            return
        c = self.clients[rid]
        req = Request(rid, c.prompt, sim_params(c.spec.output_len), arrival_time=self.loop.now)
        self._to_worker(pid, Prefill(req, wid, list(block_ids), cached_blocks))
        self.state.prefill_sent(rid, True)

    def _fail(self, rid: str, message: str) -> None:
        """The request fails: its client gets the error, every worker lets go of it."""
        c = self.clients[rid]
        if c.t_done is None:
            c.error = message
            c.t_done = self.loop.now + self.config.api_s
        for a in self.state.abort_plan(rid):
            self._to_worker(a.worker_id, Abort(rid, fenced=a.fenced, decode_peer=a.decode_peer))
        self.state.finish(rid)

    def host_cpu_taken(self, worker: SimWorker) -> float:
        """The time a step of `worker` loses to the API side's CPU work: none while another
        worker of the host is idle (its core does that work), else its share of what is owed
        (every worker is on one host: a CPU deployment)."""
        owed = self.host_cpu_owed
        if not owed:
            return 0.0
        if any(not w.stepping for w in self.workers.values() if w is not worker):
            self.host_cpu_owed = 0.0
            return 0.0
        share = owed / len(self.workers)
        self.host_cpu_owed -= share
        return share

    # -- the data plane --------------------------------------------------------------------
    def send_data(self, dst: str, msg, delay: float) -> None:
        """prefill -> decode: lands `delay` (the KV still in flight) + data_hop_s from now."""
        w = self.workers.get(dst)
        if w is not None:
            self.loop.at(self.loop.now + delay + self.config.data_hop_s, w.deliver, msg)

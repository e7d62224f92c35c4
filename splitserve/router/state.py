"""The router's decisions, apart from its sockets: which workers serve a request, what each
worker's message means for it, whom to tell when it ends. Plain Python over plain data — no
asyncio, no sockets, no clock (`now` is passed in) — so the simulator drives this same class.
The Conductor (conductor.py) is its I/O shell: it turns messages into these calls and the
answers into sends.

A request's route:
    whole  one worker runs all of it: a co-located worker, or a decode worker prefilling it
           itself (conditional disaggregation, policies.LocalPrefill; also every request when
           no prefill worker is left)
    P/D    Reserve ─► decode ... Reserved ─► Prefill ─► prefill ... first output (the decode
           worker's admission) ─► decode ... last output

A worker id can register again after it died (serve restarts the process): each registration
is a new incarnation with its own `epoch` (1, 2, ...) and a fresh view with empty loads. A
request keeps the views it was routed to, so what a previous incarnation (or a message sent by
it, arriving late) says about a request is ignored, and it is never charged to the new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.errors import IntegrityError, InvalidRequestError, ServiceUnavailable
from splitserve.router.admission import Overloaded
from splitserve.router.policies import (
    CacheAware,
    CachedDecode,
    LeastLoaded,
    LocalPrefill,
    RoundRobin,
)
from splitserve.router.prefix_index import PrefixIndex
from splitserve.router.reroling import EVERYTHING, HANDOVERS, NOTHING, ROLES, must_finish

ROUTINGS = ("cache-aware", "least-loaded", "round-robin")


def _can_serve(roles: set[str], decode_whole: bool) -> bool:
    """Workers of these roles can serve a request: a co-located one, or a decode one with a
    prefill one (or alone when decode workers prefill whole requests themselves)."""
    return "colocated" in roles or ("decode" in roles and ("prefill" in roles or decode_whole))


@dataclass
class WorkerView:
    """What the router knows of one worker."""

    worker_id: str
    role: str
    last_seen: float
    kv_blocks_total: int = 0
    epoch: int = 1  # this incarnation of worker_id (see the module docstring)
    kv_blocks_used: int = 0  # from its last heartbeat
    alive: bool = True
    requests: set[str] = field(default_factory=set)  # in flight there (its legs of them)
    # the loads LocalPrefill weighs, kept as requests move (a pass over every request in
    # flight per route would make routing quadratic in the deployment's size)
    queued_prompt_tokens: int = 0  # prefill: P/D prompts sent here, not yet admitted at decode
    prefill_tokens: int = 0  # whole requests' prompts here before their first token
    decoding: int = 0  # requests past their first token here (handed over, or its own)
    # a role change under way (begin_rerole): (new role, the epoch it will come under)
    rerole: tuple[str, int] | None = None
    draining: bool = False  # routed nothing new while it finishes what its new role cannot carry
    prev_epoch: int = 0  # the epoch before its last role change (its heartbeats may lag)

    # what the policies read (policies.WorkerLoad and DecodeLoad are the same shapes)
    @property
    def outstanding(self) -> int:
        return len(self.requests)

    @property
    def kv_free_blocks(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used


@dataclass
class Track:
    """One request in flight, as the router sees it."""

    request_id: str
    prompt_len: int
    max_tokens: int = 0  # what it may generate (admission's estimate of its decode leg)
    tokens_out: int = 0  # generated so far (the outputs that counted)
    worker: str | None = None  # whole: a co-located worker, or a decode worker prefilling it
    prefill: str | None = None
    decode: str | None = None
    prefill_sent: bool = False
    admitted: bool = False  # P/D: the decode worker has admitted it (the prefill leg is over)
    first_token: bool = False  # an output arrived
    t_reserve: float = 0.0
    reserve_seconds: float = 0.0
    cached_tokens: int = 0  # what the prefix index said its computing worker holds of it
    # the views this request's load was charged to: a worker that re-registers under its old
    # id gets a fresh view, and the old requests must not be taken off the new one
    views: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class AbortTo:
    """Tell `worker_id` to abort the request. `fenced`: a prefill worker may still write the
    decode worker's blocks (it is told which decode worker, `decode_peer`, and fences there)."""

    worker_id: str
    fenced: bool = False
    decode_peer: str | None = None


class RouterState:
    def __init__(self, local_prefill: LocalPrefill | None = None, admission=None,
                 routing: str = "least-loaded", max_imbalance: int = 4):
        """`routing`: how the worker that computes a prompt is chosen — cache-aware (the
        prefix index's cached tokens weighed against the tokens queued there: policies.
        CacheAware; the index is fed by the workers' KV events), least-loaded (fewest
        outstanding), round-robin. A decode worker: the one holding most of the prompt when
        cache-aware (policies.CachedDecode), else least-loaded. `max_imbalance`: the
        cache-aware policies' balance guard."""
        if max_imbalance < 0:
            raise InvalidRequestError(f"max_imbalance must be >= 0, got {max_imbalance}")
        if routing not in ROUTINGS:
            raise InvalidRequestError(f"routing must be one of {', '.join(ROUTINGS)}, got "
                                      f"{routing!r}")
        self.routing = routing
        self.prefix_index = PrefixIndex() if routing == "cache-aware" else None
        self._cache_policy = CacheAware(max_imbalance)
        self._decode_cache_policy = CachedDecode(max_imbalance)
        self.workers: dict[str, WorkerView] = {}
        # admission.Admission: decides once the workers are chosen (None: accept every request)
        self.admission = admission
        self._by_role: dict[str, list[WorkerView]] = {role: [] for role in ROLES}
        self.tracks: dict[str, Track] = {}
        self.policies = {role: RoundRobin() if routing == "round-robin" and role != "decode"
                         else LeastLoaded() for role in ROLES}
        self.local_prefill = local_prefill
        self.dead: list[str] = []  # workers down now: died (or never came up), not back yet
        self.epochs: dict[str, int] = {}  # each worker id's latest incarnation
        self.max_model_len: int | None = None  # the deployment's context, once known
        self.block_size: int | None = None  # tokens per KV block, once known (None: unchecked)
        # when a list: every route chosen, (request id, "whole" | "local" | "pd", worker ids,
        # now)
        self.routes: list | None = None

    # -- the registry ----------------------------------------------------------------------
    def add_worker(self, worker_id: str, role: str, num_blocks: int, now: float) -> WorkerView:
        """A registration: a new incarnation of worker_id (its epoch is one more than the
        last one's). The caller refuses a worker id whose incarnation is still alive."""
        old = self.workers.get(worker_id)
        if old is not None:  # a worker re-registering under its old id after it died
            self._by_role[old.role].remove(old)
        epoch = self.epochs[worker_id] = self.epochs.get(worker_id, 0) + 1
        w = self.workers[worker_id] = WorkerView(worker_id, role, now, kv_blocks_total=num_blocks,
                                                 epoch=epoch)
        self._by_role[role].append(w)
        if worker_id in self.dead:
            self.dead.remove(worker_id)
        return w

    def heartbeat(self, worker_id: str, kv_blocks_used: int, now: float,
                  epoch: int | None = None) -> bool:
        """Whether the heartbeat counts: from the live incarnation `epoch` (None: the
        current one) of a registered worker."""
        w = self.workers.get(worker_id)
        if w is None or not w.alive or (epoch is not None and epoch not in self._epochs_of(w)):
            return False
        w.last_seen = now
        w.kv_blocks_used = kv_blocks_used
        return True

    @staticmethod
    def _epochs_of(w: WorkerView) -> tuple[int, ...]:
        """The epochs one live incarnation may send heartbeats under: its own, and around a
        role change the one before and the one to come (the heartbeat has its own socket, so
        it may overtake the worker's answer or trail it)."""
        return (w.epoch, w.prev_epoch, w.rerole[1] if w.rerole else w.epoch)

    def silent(self, now: float, timeout_s: float) -> list[str]:
        """Live workers not heard from for longer than timeout_s."""
        return [w.worker_id for w in self.workers.values()
                if w.alive and now - w.last_seen > timeout_s]

    def worker_died(self, worker_id: str) -> list[str]:
        """Mark its incarnation dead; returns the requests it held (they fail; their tracks
        keep the dead view until they finish, so nothing of them reaches a next incarnation)."""
        w = self.workers[worker_id]
        w.alive = False
        if self.prefix_index is not None:  # (its next incarnation sends a snapshot)
            self.prefix_index.drop(worker_id)
        if worker_id not in self.dead:
            self.dead.append(worker_id)
        return list(w.requests)

    def live(self, role: str | None = None) -> list[WorkerView]:
        pool = self.workers.values() if role is None else self._by_role[role]
        return [w for w in pool if w.alive]

    def routable(self, role: str, but: str | None = None) -> list[WorkerView]:
        """The live workers of `role` new requests may go to (not draining; not `but`)."""
        return [w for w in self._by_role[role] if w.alive and not w.draining and w.worker_id != but]

    def _decode_serves_whole(self, changing: bool = False) -> bool:
        """With no prefill worker to route to, the decode workers prefill requests themselves:
        with local prefill, or while a worker drains to change role (`changing`: one is about
        to), rather than refuse requests for the drain's length."""
        return (self.local_prefill is not None or changing
                or any(w.draining for w in self.workers.values() if w.alive))

    def is_ready(self, but: str | None = None) -> bool:
        """Requests can be served: a co-located worker, or a prefill and a decode worker, to
        route to (with local prefill, a decode worker alone: it prefills every request
        itself). `but`: as if that worker took no new requests (may it drain?)."""
        ok = {role for role in ROLES if self.routable(role, but)}
        return _can_serve(ok, self._decode_serves_whole(changing=but is not None))

    # -- role changes (reroling.py) --------------------------------------------------------
    def begin_rerole(self, worker_id: str, role: str) -> int:
        """Start changing a live worker's role: returns the epoch it will answer under. It is
        routed nothing new unless its new role carries everything on; raises
        ServiceUnavailable when the others could not serve meanwhile (flip another first),
        InvalidRequestError for an unknown worker or role, or one already changing."""
        w = self.workers.get(worker_id)
        if w is None or not w.alive:
            raise InvalidRequestError(f"no live worker {worker_id!r}", param="worker_id")
        if role not in ROLES:
            raise InvalidRequestError(f"role must be one of {', '.join(ROLES)}, got {role!r}",
                                      param="role")
        if w.rerole is not None:
            raise InvalidRequestError(f"worker {worker_id} is already becoming {w.rerole[0]}")
        drain = must_finish(w.role, role) != NOTHING
        if drain and not self.is_ready(but=worker_id):
            raise ServiceUnavailable(f"worker {worker_id} cannot stop taking requests now: the "
                                     "other workers could not serve them meanwhile")
        after = {v.role for v in self.workers.values()
                 if v.alive and not v.draining and v.worker_id != worker_id} | {role}
        if not _can_serve(after, self.local_prefill is not None):
            raise ServiceUnavailable(f"worker {worker_id} as {role} would leave no route for "
                                     f"requests ({', '.join(sorted(after))} workers"
                                     f"{'' if self.local_prefill else ', local prefill off'})")
        epoch = self.epochs[worker_id] = self.epochs[worker_id] + 1
        w.rerole, w.draining = (role, epoch), drain
        return epoch

    def drained(self, worker_id: str) -> bool:
        """The worker holds nothing its new role (begin_rerole) cannot carry on."""
        w = self.workers[worker_id]
        what = must_finish(w.role, w.rerole[0])
        if what == EVERYTHING:
            return not w.requests
        if what == HANDOVERS:
            return not any(self.tracks[r].decode == worker_id and not self.tracks[r].admitted
                           for r in w.requests)
        return True

    def rerole_done(self, worker_id: str, role: str, epoch: int, ok: bool = True) -> bool:
        """The worker answered the change begun for (role, epoch): it took the role (`ok`), or
        refused and keeps its old one. False when that is not the change under way."""
        w = self.workers.get(worker_id)
        if w is None or not w.alive or w.rerole != (role, epoch):
            return False
        w.rerole, w.draining = None, False
        if ok:
            self._by_role[w.role].remove(w)
            self._by_role[role].append(w)
            w.role, w.prev_epoch, w.epoch = role, w.epoch, epoch
        return True

    def cancel_rerole(self, worker_id: str) -> None:
        """Give up a change under way (it took too long): route to it again as before."""
        w = self.workers.get(worker_id)
        if w is not None:
            w.rerole, w.draining = None, False

    # -- routing -----------------------------------------------------------------------------
    def wants_hashes(self) -> bool:
        """A prompt's block hashes can change the route: cache-aware, with more than one
        worker that could compute it, or more than one decode worker to hand it to."""
        return self.prefix_index is not None and (
            len(self.routable("colocated")) + len(self.routable("prefill")) > 1
            or len(self.routable("decode")) > 1)

    def _pick(self, role: str, need: int = 0, prompt: tuple[int, dict] | None = None) -> str | None:
        """`prompt`: (its tokens, worker -> tokens cached, tokens every worker has cached
        through the shared tier), when routing is cache-aware: for a worker that computes it
        (CacheAware), or a decode worker it is handed to (CachedDecode)."""
        # the views themselves: a WorkerLoad per worker per route costs O(workers) objects
        fitting = self._fitting(role, need)
        if prompt is not None and (prompt[2] or any(w.worker_id in prompt[1] for w in fitting)):
            policy = self._decode_cache_policy if role == "decode" else self._cache_policy
            return policy.pick(fitting, *prompt)
        return self.policies[role].pick(fitting)  # (no candidate caches any: the load decides)

    def _fitting(self, role: str, need: int) -> list[WorkerView]:
        """The routable workers of `role` whose KV pool can hold `need` blocks."""
        live = self.routable(role)
        return [w for w in live if w.kv_blocks_total >= need] if need else live

    def _check_fits(self, prompt_len: int) -> int:
        """The KV blocks the prompt needs (0 while the block size is unknown). Raises
        InvalidRequestError when no route has workers whose pools can hold them: such a
        request would wait for free blocks for ever (a prompt and its first token must fit
        in one worker's pool, as the scheduler's check on entry says)."""
        if not self.block_size:
            return 0
        need = -(-(prompt_len + 1) // self.block_size)
        fit = {role for role in ROLES if self._fitting(role, need)}
        if _can_serve(fit, self._decode_serves_whole()):
            return need
        # name the pool that is too small: the decode workers' unless they are not the problem
        roles = [r for r in ("colocated", "decode", "prefill") if self.live(r) and r not in fit]
        role = roles[0] if roles else "decode"
        largest = max((w.kv_blocks_total for w in self.live(role)), default=0)
        raise InvalidRequestError(
            f"the prompt has {prompt_len} tokens and needs {need} KV blocks of "
            f"{self.block_size} tokens (with its first generated token), but the largest KV "
            f"cache of a {role} worker holds {largest} blocks ({largest * self.block_size} "
            "tokens): shorten the prompt, or serve with more KV cache per worker "
            "(--kv-cache-gb)", param="prompt")

    def route(self, request_id: str, prompt_len: int, now: float, max_tokens: int = 0,
              slo=None, priority: int = 0, block_hashes=None) -> Track:
        """Choose the request's workers and start tracking it (the caller then sends Generate
        to track.worker, or Reserve to track.decode naming track.prefill). With an admission
        policy, it may refuse (admission.Overloaded) before anything is charged; `slo`: the
        request's own (admission.SLO), else the deployment's; `priority`: lower is more
        important (0 the default; see admission.py)."""
        if request_id in self.tracks:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight")
        if not self.is_ready():
            raise ServiceUnavailable("no worker is ready to serve (starting, or all died)")
        if self.max_model_len is not None and prompt_len >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {prompt_len} tokens; this model's "
                                      f"context is {self.max_model_len}", param="prompt")
        need = self._check_fits(prompt_len)
        t = Track(request_id, prompt_len, max_tokens)
        restore = [*self.policies.values(), self._cache_policy, self._decode_cache_policy]
        turns = [p.turn for p in restore]
        prompt = held = None
        if self.prefix_index is not None and block_hashes:
            # what a computing worker will hit: whole blocks, the prompt's last token always
            # computed; a decode worker reuses every whole block it holds
            bs = self.block_size or 1
            most = (prompt_len - 1) // bs
            hits, common = self.prefix_index.longest_shared(block_hashes)
            whole_blocks = prompt_len // bs
            prompt = (prompt_len, {w: min(k, most) * bs for w, k in hits.items()},
                      min(common, most) * bs)
            held = (prompt_len, {w: min(k, whole_blocks) * bs for w, k in hits.items()},
                    min(common, whole_blocks) * bs)
        whole = self._pick("colocated", need, prompt)
        prefill = self._pick("prefill", need, prompt) if whole is None else None
        if whole is None and prefill is None and self._decode_serves_whole():
            # no prefill worker to route to (all died, or draining): the decode workers serve
            # whole requests
            whole = self._pick("decode", need)
        elif whole is None and self.local_prefill is not None:
            whole = self._local_prefill_target(prefill, prompt_len, need)
        if whole is not None:
            t.worker = whole
        else:
            t.prefill, t.decode = prefill, self._pick("decode", need, held)
            if t.prefill is None or t.decode is None:
                raise ServiceUnavailable("no prefill+decode pair is alive")
            t.t_reserve = now
        if self.admission is not None:
            verdict = self.admission.decide(self, t, now, slo, priority)
            if not verdict.admit:  # as if it never came: the round-robin turns go back too
                for p, turn in zip(restore, turns):
                    p.turn = turn
                raise Overloaded(verdict)
        for wid in (t.worker, t.prefill, t.decode):
            if wid is not None:
                t.views[wid] = self.workers[wid]
                t.views[wid].requests.add(request_id)
        if t.worker is not None:
            t.views[t.worker].prefill_tokens += prompt_len
        else:
            t.views[t.prefill].queued_prompt_tokens += prompt_len
        if prompt is not None:
            t.cached_tokens = prompt[1].get(t.worker or t.prefill, prompt[2])
        self.tracks[request_id] = t
        if self.routes is not None:
            kind = "pd" if t.worker is None else (
                "local" if self.workers[t.worker].role == "decode" else "whole")
            self.routes.append((request_id, kind,
                                (t.worker,) if t.worker else (t.prefill, t.decode), now))
        return t

    def _local_prefill_target(self, prefill: str, prompt_tokens: int, need: int = 0) -> str | None:
        """A decode worker that should prefill this request itself (see LocalPrefill), or None."""
        return self.local_prefill.pick(prompt_tokens, self.workers[prefill].queued_prompt_tokens,
                                       self._fitting("decode", need))

    # -- what workers say ------------------------------------------------------------------
    def _current(self, t: Track, worker_id: str, epoch: int | None = None) -> bool:
        """The request's leg on worker_id is on that worker's live incarnation `epoch` (None:
        whichever is current) — not on one that died, nor one that came after."""
        v = t.views.get(worker_id)
        return (v is not None and v.alive and v is self.workers.get(worker_id)
                and (epoch is None or v.epoch == epoch))

    def speaker(self, request_id: str, worker_id: str, outputs: bool = False,
                epoch: int | None = None) -> Track | None:
        """The request's track when `worker_id` (its incarnation `epoch`; None: the current
        one) may speak for it: outputs only from the worker serving its decoding leg, failures
        from any of its workers, and only from the incarnation the request was routed to."""
        t = self.tracks.get(request_id)
        if t is None:
            return None
        legs = (t.worker, t.decode) if outputs else (t.worker, t.prefill, t.decode)
        return t if worker_id in legs and self._current(t, worker_id, epoch) else None

    def on_output(self, request_id: str, worker_id: str, handover: bool,
                  epoch: int | None = None, tokens: int = 0) -> Track | None:
        """An output from worker_id (incarnation `epoch`); the track when it counts (None:
        drop it). `handover`: it is the decode worker's admission of a P/D request, so the
        prefill leg is over (that worker's death no longer concerns the request)."""
        t = self.speaker(request_id, worker_id, outputs=True, epoch=epoch)
        if t is None:
            return None
        t.tokens_out += tokens
        if not t.first_token:
            t.first_token = True
            w = t.views[worker_id]
            w.decoding += 1
            if t.worker is not None:
                w.prefill_tokens -= t.prompt_len
        if handover and not t.admitted:
            t.admitted = True
            p = t.views[t.prefill]
            p.requests.discard(request_id)
            p.queued_prompt_tokens -= t.prompt_len
        return t

    def on_reserved(self, request_id: str, worker_id: str, now: float,
                    epoch: int | None = None) -> str | None:
        """The decode worker (incarnation `epoch`) reserved blocks: the prefill worker to send
        Prefill to, or None when nobody will write them (abort at worker_id) — also when the
        request's prefill worker died, even if it is back as a new incarnation."""
        t = self.tracks.get(request_id)
        if t is None or t.decode != worker_id or not self._current(t, worker_id, epoch):
            return None
        if not self._current(t, t.prefill):
            return None
        t.reserve_seconds = now - t.t_reserve
        return t.prefill

    def prefill_sent(self, request_id: str, ok: bool) -> None:
        t = self.tracks.get(request_id)
        if t is not None:
            t.prefill_sent = ok

    # -- the end of a request --------------------------------------------------------------
    def abort_plan(self, request_id: str) -> list[AbortTo]:
        """Whom to tell that the request is over before its end (failed, or the client left)."""
        t = self.tracks.get(request_id)
        if t is None:
            return []
        if t.worker:  # (a leg whose incarnation died has nothing left to tell)
            return [AbortTo(t.worker)] if self._current(t, t.worker) else []
        plan = []
        fenced = t.prefill_sent and not t.admitted
        decode = t.decode if self._current(t, t.decode) else None
        if fenced and self._current(t, t.prefill):
            plan.append(AbortTo(t.prefill, decode_peer=decode))
        if decode:  # fenced only while a live writer may still write its blocks
            plan.append(AbortTo(decode, fenced=fenced and self._current(t, t.prefill)))
        return plan

    def finish(self, request_id: str) -> None:
        """Stop tracking the request (finished, failed or aborted)."""
        t = self.tracks.pop(request_id, None)
        if t is None:
            return
        for w in t.views.values():
            w.requests.discard(request_id)
        if t.first_token:
            t.views[t.worker or t.decode].decoding -= 1
        elif t.worker is not None:
            t.views[t.worker].prefill_tokens -= t.prompt_len
        if t.prefill is not None and not t.admitted:
            t.views[t.prefill].queued_prompt_tokens -= t.prompt_len

    def check_loads(self) -> None:
        """Raise IntegrityError unless every worker's load counters equal what its requests
        in flight add up to (the definitions the counters are kept by)."""
        for w in self.workers.values():
            wid = w.worker_id
            tracks = [t for t in self.tracks.values() if t.views.get(wid) is w]
            queued = sum(t.prompt_len for t in tracks if t.prefill == wid and not t.admitted)
            own = sum(t.prompt_len for t in tracks if t.worker == wid and not t.first_token)
            decoding = sum(1 for t in tracks if wid in (t.decode, t.worker) and t.first_token)
            if (w.queued_prompt_tokens, w.prefill_tokens, w.decoding) != (queued, own, decoding):
                raise IntegrityError(f"{wid}: loads {w} vs {queued}, {own}, {decoding}")


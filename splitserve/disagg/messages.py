"""Every message that crosses a socket, as typed msgspec structs (msgpack on the wire).

No pickle anywhere: a decoder only ever builds these structs, and a frame that does not match
their schema is refused (msgspec.ValidationError), not executed.

Control plane (router <-> worker, one ZeroMQ ROUTER socket at the router, a DEALER per worker):

    worker                      router
      Register  ──────────────►         (model, KV spec, role, where its KV can be written)
                ◄──────────────  Welcome (accepted with an epoch, or refused with a reason)
      Heartbeat ──────────────►         (every ~0.5 s, own thread and socket: load, KV stats)
                ◄──────────────  Ping    (renews the worker's lease; Shutdown to a worker
                                          already declared dead; Rejoin from a router that
                                          has no registration for it: a restarted router)

    The epoch numbers the registrations of one worker id (a worker restarted by serve comes
    back under its id): the worker sends it on everything it sends the router, which ignores
    what any other incarnation says. A router names itself (router_id, new at each start): a
    worker whose router restarted, or that has not heard from it for the router's dead-worker
    timeout, aborts every request it holds and registers again.

    colocated:  Generate ─► worker ─► Outputs ... (last one finished) ─► router
    P/D:        Reserve ─► decode ─► Reserved(block ids) ─► router ─► Prefill(peer, block ids)
                ─► prefill: KV layer by layer + KVDone over the data plane ─► decode
                ─► decode: Outputs ... ─► router
    any time:   Abort ─► worker;  worker ─► Failed(request, message)
    role change (router/reroling.py): SetRole(role, new epoch) ─► worker ─► RoleSet (under the
                new epoch when it took the role)
    prefix cache (router/prefix_index.py): worker ─► KVEvents(seq 0 = snapshot, after every
                Welcome; then 1, 2, ... as blocks are cached and evicted); router ─► KVResync
                when a batch comes out of sequence

Data plane (prefill -> decode, a DEALER at the prefill worker to the decode worker's ROUTER):
    Hello(KV spec) ─► HelloAck(ok | reason);  per chunk: KVProgress, [KVLayer + raw bytes (tcp
    only)] per layer ...;  KVDone
    (or, once aborted, KVFence: no more writes for that request; see Abort)
"""

from __future__ import annotations

from typing import Any

import msgspec

from splitserve.request import SamplingParams


class KVSpec(msgspec.Struct, frozen=True):
    """What both ends of a KV hand-over must agree on, byte for byte."""

    model_id: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout: str = "layer,kv,block,slot,kv_head,head_dim"

    def mismatch(self, other: KVSpec) -> str | None:
        """A sentence naming every field that differs, or None when they agree."""
        diffs = [f"{f}: {getattr(self, f)!r} vs {getattr(other, f)!r}"
                 for f in self.__struct_fields__ if getattr(self, f) != getattr(other, f)]
        return "; ".join(diffs) or None


class Params(msgspec.Struct, frozen=True):
    """SamplingParams on the wire (validated again when rebuilt on the worker)."""

    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    logprobs: int | None
    include_stop_str_in_output: bool

    @classmethod
    def of(cls, p: SamplingParams) -> Params:
        return cls(p.max_tokens, float(p.temperature), p.top_k, float(p.top_p), p.seed, list(p.stop),
                   list(p.stop_token_ids), p.ignore_eos, p.logprobs, p.include_stop_str_in_output)

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(**{f: getattr(self, f) for f in self.__struct_fields__})


class WorkerStats(msgspec.Struct):
    running: int = 0
    waiting: int = 0  # decode: reservations waiting for blocks too
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_bytes_sent: int = 0
    kv_bytes_received: int = 0
    kv_transfer_seconds: float = 0.0  # time spent writing KV (prefill) / in hand-overs (decode)
    kv_transfers: int = 0
    local_prefills: int = 0  # decode: prompts the router had it prefill itself
    steps: int = 0
    # the block pool's integrity check, run whenever the worker is idle; > 0 means a bug
    integrity_errors: int = 0
    step_errors: int = 0  # steps whose forward raised (their requests failed, the worker went on)
    aborts: int = 0  # requests aborted here (the client went away, or the router said so)
    rejoins: int = 0  # times it lost its router, aborted everything and registered again
    role_changes: int = 0  # SetRole taken (router/reroling.py)
    # the prefix cache (vLLM's convention): prompt tokens looked up, and found cached
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # found cached, by tier ("device": the pool; "dram", "disk": kv/tiers.py)
    prefix_cache_hits_by_tier: dict[str, int] = msgspec.field(default_factory=dict)
    # KV bytes copied between tiers, "from>to" (device>dram, dram>disk, dram>device, ...)
    kv_tier_bytes: dict[str, int] = msgspec.field(default_factory=dict)
    kv_tier_corrupt: int = 0  # disk blocks refused (bad checksum, size or name) or lost
    kv_tier_blocks: dict[str, int] = msgspec.field(default_factory=dict)  # held now, by tier


class DecodePeer(msgspec.Struct, frozen=True):
    """Where and how a prefill worker writes a decode worker's KV."""

    worker_id: str
    data_addr: str  # the decode worker's data-plane ROUTER socket
    host: str  # hostname|boot id: shm only between workers of one host
    kv: KVSpec
    num_blocks: int
    shm_path: str | None = None  # the decode worker's KV pool, when it lives in shared memory
    epoch: int = 0  # its incarnation (Welcome.epoch): a new one has a new socket and pool


# -- control plane ------------------------------------------------------------------------
class Register(msgspec.Struct, tag=True):
    worker_id: str
    role: str  # colocated | prefill | decode
    pid: int
    host: str
    model_name: str
    max_model_len: int
    vocab_size: int
    kv: KVSpec
    num_blocks: int
    transport: str  # the KV transport this worker uses (prefill) / offers (decode): shm | tcp
    data_addr: str | None = None  # decode only
    shm_path: str | None = None  # decode only
    # this registration attempt (random): a Register repeated while waiting for the answer
    # carries the same one; a new one from a live worker means it lost contact and aborted
    # everything, and the router fails what that incarnation held
    nonce: str = ""
    # it can change role while it runs (SetRole): it has a KV data socket (and pool) for the
    # decode role and the prefill role's writer whatever role it starts in
    reroleable: bool = False
    # the root of its chained block hashes (kv/hashing.root_hash: model, block size, salt),
    # hex: the router's prefix index compares hashes, so every worker must share it
    hash_root: str = ""


class Welcome(msgspec.Struct, tag=True):
    accepted: bool
    reason: str = ""
    # A prefill worker that has not heard from the router for this long stops writing KV
    # (the router declares a silent worker dead after twice this, and the decode workers
    # then free the blocks it was writing).
    lease_s: float = 5.0
    # This registration's incarnation of the worker id: 1 at its first registration, one more
    # at each later one (a restarted process). The worker puts it on every message it sends
    # the router, which drops messages of any other incarnation.
    epoch: int = 0
    # This router process (random, new at each start): a worker's heartbeats name it, and a
    # Rejoin for it means that router is gone.
    router_id: str = ""


class Ping(msgspec.Struct, tag=True):
    """The router's answer to each heartbeat: the worker's lease is renewed, from when that
    heartbeat was sent (a Ping read late, after a stall, renews nothing newer)."""

    sent: float = 0.0  # the answered Heartbeat's `sent`


class Rejoin(msgspec.Struct, tag=True):
    """The router's answer to a heartbeat from a worker it has no registration for: the
    router that worker registered with (`router_id`, as the heartbeat names it) is gone, its
    requests with it; the worker aborts them all and registers again."""

    router_id: str


class Heartbeat(msgspec.Struct, tag=True):
    """Sent every ~0.5 s by the worker's heartbeat thread, on its own socket (identity
    "<worker id>/hb"), so that a long engine step does not look like a dead worker."""

    stats: WorkerStats
    epoch: int = 0
    router_id: str = ""  # the router this worker registered with (Welcome.router_id)
    sent: float = 0.0  # when it went out (the worker's monotonic clock); the Ping echoes it


class Generate(msgspec.Struct, tag=True):
    """Colocated worker: run the request to the end."""

    request_id: str
    prompt_token_ids: list[int]
    params: Params
    # the worker's epoch as the router knew it when it chose the role this message needs
    # (0: unchecked); a worker under another epoch (it changed role since) fails the request.
    # So do Reserve's and Prefill's.
    epoch: int = 0


class Reserve(msgspec.Struct, tag=True):
    """Decode worker: hold blocks for the prompt (queued while none are free); the KV must
    arrive from `prefill_worker_id` within the worker's transfer timeout of the reservation."""

    request_id: str
    prompt_token_ids: list[int]
    params: Params
    prefill_worker_id: str
    epoch: int = 0


class Reserved(msgspec.Struct, tag=True):
    request_id: str
    block_ids: list[int]
    epoch: int = 0  # the sender's incarnation (Welcome.epoch); so are Outputs' and Failed's
    cached_blocks: int = 0  # leading blocks holding the prompt's KV already (its prefix cache)


class Prefill(msgspec.Struct, tag=True):
    """Prefill worker: compute the prompt, write each layer's KV into `block_ids` of `peer`."""

    request_id: str
    prompt_token_ids: list[int]
    params: Params
    peer: DecodePeer
    block_ids: list[int]
    epoch: int = 0
    skip_blocks: int = 0  # the peer holds the first block_ids already: write from this one on


class Abort(msgspec.Struct, tag=True):
    """Stop the request and free its blocks. To a prefill worker, `decode_peer` names the
    decode worker it was writing to: the prefill worker answers it with a KVFence. To a decode
    worker, `fenced` says a prefill worker may still be writing its blocks: they stay
    held until that worker's KVFence (or its death) says the writes have stopped."""

    request_id: str
    decode_peer: DecodePeer | None = None
    fenced: bool = False


class PeerGone(msgspec.Struct, tag=True):
    """A worker died: a prefill worker drops its connection to it; a decode worker frees the
    blocks it held for that worker's writes."""

    worker_id: str


class Shutdown(msgspec.Struct, tag=True):
    epoch: int = 0  # only that incarnation stops (0: whichever gets it)


class SetRole(msgspec.Struct, tag=True):
    """Become `role` and speak under `epoch` from now on (router/reroling.py): the router has
    routed it nothing new that the new role cannot carry, and waited until it holds none of
    that. The worker checks so itself and answers RoleSet."""

    role: str
    epoch: int


class KVEvents(msgspec.Struct, tag=True):
    """What the worker's prefix cache stored (True, hash) and evicted (False, hash) since its
    last batch, in order (router/prefix_index.py). `seq` numbers the batches from 0, which is
    a snapshot (its whole cache: sent after every registration, and on KVResync)."""

    seq: int
    events: list[tuple[bool, bytes]]
    snapshot: bool = False
    epoch: int = 0
    # the tiers below the pool (kv/tiers.py): (tier, stored, hash), in order
    tier_events: list[tuple[str, bool, bytes]] = msgspec.field(default_factory=list)


class KVResync(msgspec.Struct, tag=True):
    """The router lost track of this worker's cache (a batch out of sequence): send a
    snapshot."""


class RoleSet(msgspec.Struct, tag=True):
    """The answer to SetRole: `ok` under the new epoch (sent with it), or refused (`reason`)
    under the old one."""

    role: str
    new_epoch: int
    ok: bool
    reason: str = ""
    epoch: int = 0


class Handover(msgspec.Struct):
    """How one request's KV hand-over went (sent with its first output by the decode worker)."""

    bytes: int
    write_seconds: float  # prefill side: time inside write_layer (inline with the forward)
    notify_seconds: float  # KVDone sent by the prefill worker -> request admitted at decode
    transport: str
    reserve_seconds: float = 0.0  # router: Reserve sent -> Prefill sent (filled by the router)


class Delta(msgspec.Struct):
    """One request's new tokens from one engine step (the engine's RequestOutput, as deltas)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # per new token: [sampled logprob, [[token, logprob], ...top]]
    new_logprobs: list[Any] = []
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    handover: Handover | None = None


class Outputs(msgspec.Struct, tag=True):
    items: list[Delta]
    epoch: int = 0


class Failed(msgspec.Struct, tag=True):
    request_id: str
    message: str
    epoch: int = 0


# -- data plane -----------------------------------------------------------------------------
class Hello(msgspec.Struct, tag=True):
    sender_id: str
    kv: KVSpec
    transport: str


class HelloAck(msgspec.Struct, tag=True):
    ok: bool
    reason: str = ""


class KVLayer(msgspec.Struct, tag=True):
    """Followed by one raw frame: K and V of `block_ids`, [2, len(block_ids), block, heads, dim]."""

    request_id: str
    layer: int
    block_ids: list[int]


class KVDone(msgspec.Struct, tag=True):
    """Every layer of the prompt is in the decode worker's blocks; `first_token` was sampled."""

    request_id: str
    first_token: int
    first_logprobs: list[Any] | None
    bytes: int
    write_seconds: float
    t_sent: float  # monotonic, prefill worker's clock (same host: comparable)
    transport: str
    cached_tokens: int = 0  # of the prompt, found in the prefill worker's prefix cache


class KVProgress(msgspec.Struct, tag=True):
    """The prefill worker is computing (and writing) the next chunk of `request_id`: the decode
    worker's transfer deadline restarts. Until the first one, the request is only queued."""

    request_id: str


class KVFence(msgspec.Struct, tag=True):
    """The prefill worker will write no more of `request_id`'s blocks (it was aborted)."""

    request_id: str


ToWorker = (Welcome | Ping | Rejoin | Generate | Reserve | Prefill | Abort | PeerGone | Shutdown
            | SetRole | KVResync)
ToRouter = Register | Heartbeat | Reserved | Outputs | Failed | RoleSet | KVEvents
DataMsg = Hello | HelloAck | KVLayer | KVDone | KVFence | KVProgress

_enc = msgspec.msgpack.Encoder()
_dec_worker = msgspec.msgpack.Decoder(ToWorker)
_dec_router = msgspec.msgpack.Decoder(ToRouter)
_dec_data = msgspec.msgpack.Decoder(DataMsg)


def encode(msg) -> bytes:
    return _enc.encode(msg)


def decode_to_worker(b: bytes):
    return _dec_worker.decode(b)


def decode_to_router(b: bytes):
    return _dec_router.decode(b)


def decode_data(b: bytes):
    return _dec_data.decode(b)

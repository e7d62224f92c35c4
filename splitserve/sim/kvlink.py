"""The KV hand-over's cost: bytes over a link, written layer by layer as the prefill runs.

For each prompt chunk of a P/D request, the prefill worker writes the blocks the real worker
writes (handover.Target.chunk_blocks: from block 0 on the first chunk, a partial block again
on the next), `bytes_per_token` per slot. Three ways the bytes cost time:

    inline      the prefill worker copies them itself inside the step (shared memory on one
                host: the real shm sender): the step is longer by bytes / bandwidth
    overlapped  a link carries each layer while the next one computes (tcp, RDMA): the chunk's
                bytes start after the step's first layer and the last layer's share leaves
                after the step; one link per prefill worker, busy while it sends
    after       the same link, but nothing leaves before the step ends (no layer-wise overlap)

A request's KVDone reaches the decode worker once its last write has landed, plus the data
plane's notice latency.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.sim.worker import KVProgress

MODES = ("inline", "overlapped", "after")


@dataclass(frozen=True)
class KVLink:
    bytes_per_token: float  # K and V of every layer this worker holds
    bandwidth: float  # bytes/s
    mode: str = "inline"
    num_layers: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"KV link mode must be one of {MODES}, got {self.mode!r}")
        if not self.bandwidth > 0:
            raise ValueError(f"KV link bandwidth must be positive, got {self.bandwidth}")

    def write(self, worker, sched_out, dt: float) -> float:
        """Account the KV writes of one prefill step that starts now and computes for dt
        seconds; returns the time it adds to the step (inline copies)."""
        side, sim = worker.prefill_side, worker.sim
        now, bs = sim.loop.now, side.block_size
        extra = 0.0
        for ch in sched_out.chunks:
            rid = ch.request.request_id
            t = side.get(rid)
            if t is None or ch.num_new_tokens == 0:
                continue
            sim.send_data(t.peer_id, KVProgress(rid, worker.worker_id), 0.0)
            b0, b1 = t.chunk_blocks(ch.start, ch.num_new_tokens, bs)
            nbytes = int((b1 - b0) * bs * self.bytes_per_token)
            t.bytes += nbytes
            t.chunk_written(ch.start, ch.num_new_tokens, bs)
            worker.counters.kv_bytes_sent += nbytes
            secs = nbytes / self.bandwidth
            if self.mode == "inline":
                extra += secs
                continue
            if self.mode == "overlapped":
                start = max(now + dt / self.num_layers, worker.link_free_at)
                end = max(start + secs, now + dt + secs / self.num_layers)
            else:
                end = max(now + dt, worker.link_free_at) + secs
            worker.link_free_at = end
            worker.kv_lands[rid] = max(worker.kv_lands.get(rid, 0.0), end)
        if extra:
            for ch in sched_out.chunks:  # inline copies land when the longer step ends
                rid = ch.request.request_id
                if side.get(rid) is not None:
                    worker.kv_lands[rid] = now + dt + extra
        return extra

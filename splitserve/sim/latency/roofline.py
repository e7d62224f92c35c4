"""An operator-level roofline: the least time a step can take on given GPUs, from its shape.

Each operator group of a step costs max(FLOPs / achievable FLOP/s, bytes / achievable HBM
bandwidth) per GPU, the groups run one after another, and communication never overlaps them:

    linears    FLOPs 2·(matmul params)·T              bytes: every layer's weights, once a step
    attention  FLOPs 4·q·Σ attended (query, key) pairs  bytes: KV read (a chunk reads its s + l
               (chunk of l after s: l·s + l(l+1)/2;       tokens once, a decode ctx + 1) and KV
               decode: ctx + 1)                           written (T new tokens)
    LM head    FLOPs 2·h·V per sampling row            bytes: the V × h matrix
               (rows: one per chunk and per decode: an over-count for a chunk that does not end
               its prompt, by 2·h·V FLOPs, negligible beside the layers)

with T = the step's new tokens. Activations are left out: beside the weights they are small in
a decode, and a prefill is compute-bound. Tensor parallelism divides FLOPs and bytes by tp (KV
heads by min(tp, num_kv_heads): they are replicated beyond that) and adds 2 all-reduces per
layer, ring: 2(tp-1)/tp · T·h·dtype / link + latency. Pipeline parallelism adds pp - 1 hops of
T·h·dtype (+ latency); a step is its latency through all stages, one after another (no
micro-batching), so pp changes a step's compute time not at all. Links within a node are the
GPU's NVLink/PCIe figure, across nodes its network figure. The GPU's per-step overhead is added
once.

`kv_capacity_tokens` answers the other question asked of a deployment: how many tokens of KV fit
beside the weights, or why the model does not fit at all (a RooflineLatency is refused at
construction then).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.sim.hardware import GPUSpec, get_gpu
from splitserve.sim.latency.base import Batch, LatencyModel
from splitserve.sim.models import ModelShape, attended_pairs, get_model


@dataclass(frozen=True, slots=True)
class StepCost:
    """Seconds of one step by part, each summed over layers and pipeline stages."""

    linear_s: float
    attention_s: float
    lm_head_s: float
    allreduce_s: float
    pipeline_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return (
            self.linear_s
            + self.attention_s
            + self.lm_head_s
            + self.allreduce_s
            + self.pipeline_s
            + self.overhead_s
        )


class RooflineLatency(LatencyModel):
    name = "roofline"

    def __init__(
        self,
        gpu: GPUSpec | str,
        model: ModelShape | str,
        tp: int = 1,
        pp: int = 1,
        dtype_bytes: int = 2,
        gpus_per_node: int = 8,
        reserve_fraction: float = 0.1,
    ):
        self.gpu: GPUSpec = get_gpu(gpu) if isinstance(gpu, str) else gpu
        self.model: ModelShape = get_model(model) if isinstance(model, str) else model
        _check_layout(self.model, tp, pp)
        if dtype_bytes <= 0 or gpus_per_node <= 0:
            raise ValueError(
                f"dtype_bytes and gpus_per_node must be positive, got {dtype_bytes}, "
                f"{gpus_per_node}"
            )
        self.tp, self.pp = tp, pp
        self.dtype_bytes = dtype_bytes
        self.gpus_per_node = gpus_per_node
        self.reserve_fraction = reserve_fraction
        self.kv_capacity_tokens()  # a layout whose weights do not fit is refused here
        # per-step constants (cost() runs once per simulated step)
        m, g = self.model, self.gpu
        self._flops_s, self._bytes_s = g.flops_s, g.hbm_bytes_s
        self._linear_flops = m.linear_flops_per_token / tp  # per new token
        self._linear_bytes = m.num_layers * m.layer_matmul_params * dtype_bytes / tp
        self._attention_flops = 4 * m.q_size * m.num_layers / tp  # per attended pair
        self._kv_token_bytes = kv_bytes_per_token_per_gpu(m, tp, 1, dtype_bytes)
        self._lm_flops = m.lm_head_flops_per_token / tp  # per sampling row
        self._lm_bytes = m.lm_head_params * dtype_bytes / tp
        self._activation_bytes = m.hidden_size * dtype_bytes  # per new token
        self._allreduce_link = self._link(tp > gpus_per_node)
        # Hop k goes from stage k-1 to stage k, whose first GPU is number k·tp: a hop whose
        # receiver starts a node crosses the network.
        self._hop_links = [self._link(k * tp % gpus_per_node == 0) for k in range(1, pp)]

    def _op(self, flops: float, nbytes: float) -> float:
        return max(flops / self._flops_s, nbytes / self._bytes_s)

    def _link(self, crosses_nodes: bool) -> float:
        return self.gpu.network_bytes_s if crosses_nodes else self.gpu.link_bytes_s

    def cost(self, batch: Batch) -> StepCost:
        tp = self.tp
        pt, pc, dc = batch.prefill_tokens, batch.prefill_context, batch.decode_context
        new_tokens = sum(pt) + len(dc)
        linear = self._op(new_tokens * self._linear_flops, self._linear_bytes)

        decode_attended = sum(dc) + len(dc)  # Σ (ctx + 1)
        pairs = sum(attended_pairs(n, s) for n, s in zip(pt, pc)) + decode_attended
        kv_read = sum(pc) + sum(pt) + decode_attended
        attention = self._op(self._attention_flops * pairs,
                             self._kv_token_bytes * (kv_read + new_tokens))

        rows = len(pt) + len(dc)
        lm_head = self._op(rows * self._lm_flops, self._lm_bytes)

        activation_bytes = new_tokens * self._activation_bytes
        allreduce = 0.0
        if tp > 1:
            per_call = 2 * (tp - 1) / tp * activation_bytes / self._allreduce_link
            allreduce = 2 * self.model.num_layers * (per_call + self.gpu.allreduce_latency_s)
        pipeline = sum(activation_bytes / link + self.gpu.allreduce_latency_s
                       for link in self._hop_links)
        return StepCost(linear, attention, lm_head, allreduce, pipeline, self.gpu.step_overhead_s)

    def step_time(self, batch: Batch) -> float:
        return self.cost(batch).total_s

    def kv_capacity_tokens(self, reserve_fraction: float | None = None) -> int:
        """KV tokens this deployment holds (the reserve it was built with by default)."""
        if reserve_fraction is None:
            reserve_fraction = self.reserve_fraction
        return kv_capacity_tokens(
            self.model, self.gpu, self.tp, self.pp, self.dtype_bytes, reserve_fraction
        )

    def describe(self) -> str:
        g = self.gpu
        return (
            f"roofline: {self.model.name} on {g.name} tp{self.tp} pp{self.pp}, "
            f"{self.dtype_bytes}-byte weights ({g.compute_efficiency:.0%} of "
            f"{g.bf16_tflops:g} TFLOPS, {g.memory_efficiency:.0%} of {g.hbm_gb_s:g} GB/s, "
            f"{g.step_overhead_s * 1e3:g} ms per step)"
        )


def _check_layout(model: ModelShape, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")
    if model.num_heads % tp:
        raise ValueError(
            f"tp={tp} does not divide {model.name}'s {model.num_heads} attention heads"
        )
    if pp > model.num_layers:
        raise ValueError(f"pp={pp} exceeds {model.name}'s {model.num_layers} layers")


def kv_bytes_per_token_per_gpu(model: ModelShape, tp: int, pp: int, dtype_bytes: int = 2) -> float:
    """One token's K and V on one GPU: layers split over pp, KV heads over tp (replicated
    once tp exceeds them, as vLLM does)."""
    heads_per_gpu = -(-model.num_kv_heads // tp)
    return 2 * model.num_layers / pp * heads_per_gpu * model.head_dim * dtype_bytes


def kv_capacity_tokens(
    model: ModelShape,
    gpu: GPUSpec,
    tp: int = 1,
    pp: int = 1,
    dtype_bytes: int = 2,
    reserve_fraction: float = 0.1,
) -> int:
    """Tokens of KV a tp × pp deployment holds: per GPU, memory less a reserve (activations,
    CUDA context, framework) less weights/(tp·pp), divided by a token's KV on that GPU.
    Raises ValueError when the weights and the reserve alone exceed a GPU's memory."""
    _check_layout(model, tp, pp)
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    weights = model.weight_bytes(dtype_bytes) / (tp * pp)
    reserve = reserve_fraction * gpu.memory_bytes
    free = gpu.memory_bytes - reserve - weights
    if free <= 0:
        need = -(-model.weight_bytes(dtype_bytes) // int(gpu.memory_bytes - reserve))
        raise ValueError(
            f"{model.name} does not fit on {gpu.name} with tp={tp}, pp={pp}: "
            f"{weights / 2**30:.1f} GiB of weights per GPU and a {reserve / 2**30:.1f} GiB "
            f"reserve ({reserve_fraction:.0%}) exceed its {gpu.memory_gb:g} GiB; "
            f"use at least {need} GPUs (tp·pp)"
        )
    return int(free // kv_bytes_per_token_per_gpu(model, tp, pp, dtype_bytes))

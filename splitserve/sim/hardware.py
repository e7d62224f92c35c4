"""GPUs the roofline latency model and the KV-capacity check are built from.

Peak figures are the vendors' datasheet numbers (dense, i.e. without 2:4 sparsity; a link's
bandwidth one direction per GPU). The efficiency factors, the per-step overhead and the
all-reduce latency are not vendor numbers: they are this project's assumptions of what a
well-tuned engine reaches, kept generous so the roofline stays a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GPUSpec:
    name: str
    memory_gb: float  # GiB: HBM comes in powers of two (an A100-80GB has 81,920 MiB)
    bf16_tflops: float  # dense tensor-core peak
    hbm_gb_s: float  # memory bandwidth, 1e9 B/s
    link_gb_s: float  # intra-node GPU-to-GPU link, one direction per GPU, 1e9 B/s
    network_gb_s: float  # inter-node network per GPU, one direction, 1e9 B/s
    compute_efficiency: float = 0.8  # fraction of peak FLOPs a large GEMM reaches
    memory_efficiency: float = 0.85  # fraction of peak bandwidth a streaming kernel reaches
    step_overhead_s: float = 1e-3  # per engine step: kernel launches, scheduler, sampling
    allreduce_latency_s: float = 10e-6  # per collective call (also used per pipeline hop)

    def __post_init__(self):
        for f in ("compute_efficiency", "memory_efficiency"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"{self.name}: {f} must be in (0, 1], got {getattr(self, f)}")
        for f in ("memory_gb", "bf16_tflops", "hbm_gb_s", "link_gb_s", "network_gb_s"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{self.name}: {f} must be positive, got {getattr(self, f)}")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 2**30)

    @property
    def flops_s(self) -> float:
        """Achievable dense BF16 FLOP/s (peak × compute efficiency)."""
        return self.bf16_tflops * 1e12 * self.compute_efficiency

    @property
    def hbm_bytes_s(self) -> float:
        """Achievable memory bandwidth (peak × memory efficiency)."""
        return self.hbm_gb_s * 1e9 * self.memory_efficiency

    @property
    def link_bytes_s(self) -> float:
        return self.link_gb_s * 1e9

    @property
    def network_bytes_s(self) -> float:
        return self.network_gb_s * 1e9


GPUS: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        # NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): BF16 312 TFLOPS dense (624 sparse),
        # HBM2e 2,039 GB/s, NVLink 600 GB/s (bidirectional) -> 300 one way. DGX A100: one
        # 200 Gb/s HDR InfiniBand port per GPU -> 25 GB/s.
        GPUSpec("A100-80GB", 80, 312, 2039, 300, 25),
        # NVIDIA H100 datasheet (SXM): BF16 1,979 TFLOPS with sparsity -> 989.5 dense, HBM3
        # 3.35 TB/s, NVLink 900 GB/s -> 450 one way. DGX H100: one 400 Gb/s ConnectX-7 per GPU.
        GPUSpec("H100-80GB", 80, 989.5, 3350, 450, 50),
        # NVIDIA H200 datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, BF16 as H100 (1,979 sparse),
        # NVLink 900 GB/s; DGX H200: 400 Gb/s per GPU.
        GPUSpec("H200", 141, 989.5, 4800, 450, 50),
        # NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, BF16 362.05 TFLOPS dense (733 sparse),
        # no NVLink: PCIe Gen4 x16, 64 GB/s bidirectional -> 32 one way. The network figure is
        # an assumption (one 200 Gb/s NIC per GPU); PCIe collectives are slower to start.
        GPUSpec("L40S", 48, 362.05, 864, 32, 25, allreduce_latency_s=30e-6),
    )
}


def get_gpu(name: str) -> GPUSpec:
    """A GPU by name, case-insensitive ("a100-80gb", "H200"), or by its family alone when
    the table has one of it ("a100", "h100")."""
    key = name.strip().lower()
    for gpu in GPUS.values():
        if gpu.name.lower() == key:
            return gpu
    family = [g for g in GPUS.values() if g.name.lower().split("-")[0] == key]
    if len(family) == 1:
        return family[0]
    raise ValueError(f"unknown GPU {name!r}; known GPUs: {', '.join(GPUS)}")

"""Building blocks: RMSNorm, rotary embeddings (with Llama-3 scaling) and a Linear with fast
CPU paths (the hand-written kernels of splitserve.kernels, oneDNN's prepacked weights, int8
weight-only) beside its plain twin."""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as transformers' LlamaRMSNorm: normalise in fp32, scale in x's dtype.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.1: stretch low frequencies by `factor`, keep high ones, blend in between.
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) RoPE, as in transformers. cos/sin tables are built once
    for max_positions and indexed by each token's absolute position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [T, 1, D] for the step's positions; looked up once per step, not per layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # q: [T, Hq, D], k: [T, Hkv, D]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


LINEAR_MODES = ("plain", "packed", "int8")


def kernel_max_m() -> int | None:
    """Largest M (tokens per call) that "packed" sends to the hand-written kernel; None: all.

    Measured with `python -m splitserve.bench.kernels` on Zen 4 (AVX512-BF16, no AMX), one
    thread, a 30-layer SmolLM2-135M stack: the kernel is ahead of oneDNN's prepacked linear at
    every M from 1 (29 vs 14 GB/s) to 512 (compute-bound there, both ~1 vdpbf16ps per cycle),
    so no oneDNN copy is kept and the kernel serves prefill too. With AMX, oneDNN's tile
    kernels should win prefill by a wide margin (not measured here): keep oneDNN above 16.
    """
    from splitserve.kernels.cpu import cpu_flags

    return 16 if "amx_bf16" in cpu_flags().split() else None


class Linear(nn.Module):
    """y = x W^T (+ b). `prepare(mode)` picks the kernel once weights are final:

    plain   F.linear (the twin every fast mode is tested against)
    packed  bf16 weights. The hand-written CPU kernel (splitserve/kernels, a copy of W in its
            16-row blocks) for M <= kernel_max_m(), oneDNN's linear on a prepacked weight above
            it; oneDNN only when the kernel cannot be built (no gcc, SPLITSERVE_KERNELS=0)
    int8    weight-only int8, one scale per output row. The kernel's int8 path for every M
            (it beats `aten._weight_int8pack_mm` and dequantise + F.linear from M=1 to 512);
            `_weight_int8pack_mm` when the kernel cannot be built

    Memory: plain and packed keep `weight` row-major (the plain twin and the model's
    weight_bytes_per_token_step read it). packed adds one fast copy, the kernel's or (without
    the kernel) oneDNN's; both only where a finite kernel_max_m() leaves prefill to oneDNN.
    int8 keeps only the int8 weight, in the layout its path reads.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.mode = "plain"
        self._packed: torch.Tensor | None = None  # oneDNN's weight, or the int8 weight
        self._scales: torch.Tensor | None = None  # int8: [N] scales
        self._kernel = None  # kernels.PackedBf16 / PackedInt8, or None
        self._kernel_max_m = 0  # M <= this goes to self._kernel
        self._kernel_dtype = None  # x dtype of the kernel's fast path (others: _forward_general)
        self._dtype = None  # int8: dtype of the float weight it replaced

    def prepare(self, mode: str) -> None:
        if mode not in LINEAR_MODES:
            raise ValueError(f"linear mode must be one of {LINEAR_MODES}, got {mode!r}")
        if self.mode == "int8":
            if mode == "int8":
                return
            raise RuntimeError("prepare('int8') dropped the float weight: reload the model to "
                               "change mode")
        from splitserve import kernels

        w = self.weight.data
        use_kernel = w.device.type == "cpu" and kernels.available()
        self._packed = self._scales = self._kernel = self._kernel_dtype = None
        self._kernel_max_m = 0
        if mode == "int8":
            q, scales = kernels.quantize_int8(w)
            self._dtype = w.dtype
            if use_kernel:
                self._kernel = kernels.PackedInt8.pack(q, scales, self.bias)
                self._packed, self._scales = self._kernel.weight, self._kernel.scale
                self._kernel_max_m = sys.maxsize
                self._kernel_dtype = w.dtype if w.dtype in _INT8_X else None
            else:
                self._packed, self._scales = q, scales.to(w.dtype)
            # The float weight is not needed any more; keep a 0-size placeholder.
            self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
        elif mode == "packed":
            max_m = kernel_max_m() if use_kernel and w.dtype == torch.bfloat16 else 0
            if max_m != 0:
                self._kernel = kernels.PackedBf16.pack(w, self.bias)
                self._kernel_max_m = sys.maxsize if max_m is None else max_m
                self._kernel_dtype = torch.bfloat16
            if max_m is not None:
                try:
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
                except RuntimeError:
                    # oneDNN's bf16 linear needs AVX-512 (or AVX-NE-CONVERT): on an AVX2-only
                    # CPU without the kernel this layer stays on F.linear
                    self._packed = None
        self.mode = mode

    def dequantized_weight(self) -> torch.Tensor:
        if self.mode == "int8":
            q = self._kernel.unpack() if self._kernel is not None else self._packed
            return (q.float() * self._scales.float()[:, None]).to(self._dtype)
        return self.weight.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode's hot path first (~120 calls per token): [M, K] in the kernel's dtype.
        kern = self._kernel
        if kern is not None and x.dim() == 2 and x.shape[0] <= self._kernel_max_m \
                and x.dtype is self._kernel_dtype:
            return kern(x if x.is_contiguous() else x.contiguous())
        return self._forward_general(x)

    def _forward_general(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self._kernel is not None:
            x2 = x.reshape(-1, shape[-1])
            kernel_dtype = self.mode == "int8" or x.dtype == torch.bfloat16
            if x2.shape[0] <= self._kernel_max_m and kernel_dtype:
                x2 = x2.contiguous()
                if self.mode == "int8" and x.dtype not in _INT8_X:
                    y = self._kernel(x2.float()).to(x.dtype)
                else:
                    y = self._kernel(x2)
                return y.view(*shape[:-1], self.out_features)
        if self.mode == "packed":
            if self._packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
            # no kernel and no oneDNN bf16 (see prepare): F.linear, on one layout of x so that
            # a strided x gives the same bits as its contiguous copy
            return F.linear(x.contiguous(), self.weight, self.bias)
        if self.mode == "int8":
            x2 = x.reshape(-1, shape[-1]).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(x2, self._packed, self._scales)
            y = y.view(*shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)


_INT8_X = (torch.bfloat16, torch.float32)


def pick_linear_mode(fast: bool, quantization: str | None, dtype: torch.dtype, device: torch.device) -> str:
    if quantization == "int8":
        return "int8"
    if fast and device.type == "cpu" and dtype == torch.bfloat16:
        from splitserve import kernels

        if kernels.available() or torch.backends.mkldnn.is_available():
            return "packed"
    return "plain"

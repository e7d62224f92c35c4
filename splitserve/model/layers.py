"""Building blocks: RMSNorm, rotary embeddings (with Llama-3 scaling) and a Linear with a
fast CPU path (prepacked oneDNN weights, or int8 weight-only) beside its plain twin."""

from __future__ import annotations

import math

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

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # q: [T, Hq, D], k: [T, Hkv, D]
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


LINEAR_MODES = ("plain", "packed", "int8")


class Linear(nn.Module):
    """y = x W^T (+ b). `prepare(mode)` picks the kernel once weights are final:

    plain   F.linear (the twin every fast mode is tested against)
    packed  oneDNN linear on a weight reordered once into its blocked layout (what inductor's
            freezing does); roughly doubles bf16 GEMV bandwidth on CPU
    int8    weight-only int8, one scale per output channel, `aten._weight_int8pack_mm`
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.mode = "plain"
        self._packed: torch.Tensor | None = None
        self._scales: torch.Tensor | None = None

    def prepare(self, mode: str) -> None:
        if mode not in LINEAR_MODES:
            raise ValueError(f"linear mode must be one of {LINEAR_MODES}, got {mode!r}")
        w = self.weight.data
        if mode == "int8":
            w32 = w.float()
            scales = w32.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            q = torch.clamp(torch.round(w32 / scales[:, None]), -127, 127).to(torch.int8)
            self._packed, self._scales = q.contiguous(), scales.to(w.dtype)
            # The float weight is not needed any more; keep a 0-size placeholder.
            self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
        elif mode == "packed":
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
        self.mode = mode

    def dequantized_weight(self) -> torch.Tensor:
        if self.mode == "int8":
            return self._packed.to(self._scales.dtype) * self._scales[:, None]
        return self.weight.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        if self.mode == "int8":
            shape = x.shape
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self._packed, self._scales)
            y = y.view(*shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)


def pick_linear_mode(fast: bool, quantization: str | None, dtype: torch.dtype, device: torch.device) -> str:
    if quantization == "int8":
        return "int8"
    if fast and device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
        return "packed"
    return "plain"

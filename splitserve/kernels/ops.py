"""The fused bf16 decode-step ops of ops.c (add+RMSNorm, RoPE+KV write, SiLU*up, paged decode
attention), built and loaded like gemv.c. `available()` False means: use the PyTorch twins."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from splitserve.kernels.cpu import CFLAGS, LazyLibrary, build_shared

SOURCE = Path(__file__).with_name("ops.c")


def _load_ops() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build_shared(SOURCE, CFLAGS)))
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.ss_add_rmsnorm.argtypes = [p, p, p, p, i64, i64, f32]
    lib.ss_rope_write_kv.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64]
    lib.ss_silu_mul.argtypes = [p, p, i64, i64]
    lib.ss_decode_attention.argtypes = [p, i64, p, p, p, i64, p, p, i64, i64, i64, i64,
                                        i64, f32, i32]
    for f in ("ss_add_rmsnorm", "ss_rope_write_kv", "ss_silu_mul", "ss_decode_attention"):
        getattr(lib, f).restype = None
    return lib


_OPS = LazyLibrary(_load_ops)
_lib: ctypes.CDLL | None = None  # set by available(); the op wrappers call it directly


def available() -> bool:
    global _lib
    _lib = _OPS.get()
    return _lib is not None


def unavailable_reason() -> str | None:
    available()
    return _OPS.error


def _check(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype is not torch.bfloat16 or not t.is_contiguous() or not t.is_cpu:
            raise ValueError(f"fused ops need contiguous CPU bf16 tensors, got {t.dtype} "
                             f"{tuple(t.shape)} strides {t.stride()} on {t.device}")


def _check_index(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype is not torch.int64 or not t.is_contiguous():
            raise ValueError(f"index tensors must be contiguous int64, got {t.dtype} {t.stride()}")


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                out: torch.Tensor, eps: float) -> None:
    """h += delta (in place, if given); out = weight * rmsnorm(h). All [T, H] bf16."""
    _check(h, weight, out, *(() if delta is None else (delta,)))
    T, H = h.shape
    _lib.ss_add_rmsnorm(h.data_ptr(), None if delta is None else delta.data_ptr(),
                        weight.data_ptr(), out.data_ptr(), T, H, eps)


def rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  hq: int, hkv: int, d: int) -> None:
    """RoPE on q and k inside qkv [T, (hq + 2 hkv) d] (in place); k, v -> cache slots."""
    _check(qkv, k_cache, v_cache)
    _check_index(positions, slot_mapping)
    if cos.dtype is not torch.float32 or not cos.is_contiguous() or not sin.is_contiguous():
        raise ValueError("rope_write_kv: cos/sin tables must be contiguous fp32")
    _lib.ss_rope_write_kv(qkv.data_ptr(), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                          k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
                          qkv.shape[0], hq, hkv, d)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    _check(gate_up)
    T, two_i = gate_up.shape
    out = torch.empty(T, two_i // 2, dtype=torch.bfloat16)
    _lib.ss_silu_mul(gate_up.data_ptr(), out.data_ptr(), T, two_i // 2)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D] (rows may be strided, heads contiguous); caches [N, bs, Hkv, D];
    block_tables [B, max_blocks] int64; context_lens [B] int64 -> [B, Hq * D]."""
    B, hq, d = q.shape
    if q.stride(2) != 1 or q.stride(1) != d or q.dtype is not torch.bfloat16:
        raise ValueError("decode_attention: q must be bf16 with contiguous heads")
    _check(k_cache, v_cache)
    _check_index(block_tables, context_lens)
    _, bs, hkv, _ = k_cache.shape
    out = torch.empty(B, hq * d, dtype=torch.bfloat16)
    _lib.ss_decode_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                             block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(),
                             out.data_ptr(), B, hq, hkv, d, bs, scale, torch.get_num_threads())
    return out

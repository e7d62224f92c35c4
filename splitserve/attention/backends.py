"""Paged attention over the block cache: a plain reference and a batched fast path.

Both take q [T, Hq, D] and the fresh k, v [T, Hkv, D] of the step (already written to the cache)
and return [T, Hq*D].

reference   one sequence at a time, explicit softmax(QK^T/sqrt(D)) over K/V gathered from the
            cache, GQA by repeating K/V heads. Slow and obvious: the test oracle.
sdpa        all decodes in one gather + one scaled_dot_product_attention call (padded to the
            longest context, masked); prefill chunks with no cached context attend to their fresh
            K/V with is_causal (no cache read); other chunks gather their context from the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from splitserve.attention.metadata import AttentionMetadata


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """cache [N, bs, Hkv, D] -> [length, Hkv, D] for one sequence."""
    nkv, d = cache.shape[-2:]
    return cache.index_select(0, block_ids).view(-1, nkv, d)[:length]


def reference_attention(q, k, v, meta: AttentionMetadata, k_cache, v_cache) -> torch.Tensor:
    T, hq, d = q.shape
    out = torch.empty(T, hq, d, dtype=q.dtype, device=q.device)
    seqs = []  # (q_start, q_len, ctx_len, block_ids)
    for i in range(meta.num_decode):
        ids = torch.tensor(meta.decode_block_ids_list[i], dtype=torch.long, device=q.device)
        seqs.append((i, 1, meta.decode_context_lens_list[i], ids))
    for p in meta.prefills:
        seqs.append((p.q_start, p.q_len, p.ctx_len, p.block_ids))
    for q_start, q_len, ctx_len, ids in seqs:
        kk = _gather(k_cache, ids, ctx_len).float()
        vv = _gather(v_cache, ids, ctx_len).float()
        rep = hq // kk.shape[1]
        kk, vv = kk.repeat_interleave(rep, dim=1), vv.repeat_interleave(rep, dim=1)
        qq = q[q_start : q_start + q_len].float()
        scores = torch.einsum("qhd,khd->hqk", qq, kk) / math.sqrt(d)
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
        allowed = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(-1)
        out[q_start : q_start + q_len] = torch.einsum("hqk,khd->qhd", probs, vv).to(q.dtype)
    return out.view(T, hq * d)


def sdpa_attention(q, k, v, meta: AttentionMetadata, k_cache, v_cache) -> torch.Tensor:
    B = meta.num_decode
    parts = [_decode_attention(q[:B], meta, k_cache, v_cache)] if B else []
    return _with_prefills(parts, q, k, v, meta, k_cache, v_cache)


def fused_attention(q, k, v, meta: AttentionMetadata, k_cache, v_cache) -> torch.Tensor:
    """Decodes by the C paged kernel (kernels/ops.c: reads K/V straight from the blocks, no
    gather copy; bf16 CPU only), prefill chunks as in sdpa_attention."""
    from splitserve.kernels import ops

    B = meta.num_decode
    parts = []
    if B:
        parts.append(ops.decode_attention(q[:B], k_cache, v_cache, meta.decode_block_tables,
                                          meta.decode_context_lens, 1.0 / math.sqrt(q.shape[-1])))
    return _with_prefills(parts, q, k, v, meta, k_cache, v_cache)


def _with_prefills(parts, q, k, v, meta: AttentionMetadata, k_cache, v_cache) -> torch.Tensor:
    """Append each prefill chunk's attention to `parts` (the decode rows) and concatenate."""
    hq, d = q.shape[1:]
    gqa = hq != k.shape[1]
    for p in meta.prefills:
        qq = q[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)
        if p.mask is None:
            kk = k[p.q_start : p.q_start + p.q_len]
            vv = v[p.q_start : p.q_start + p.q_len]
        else:
            kk = _gather(k_cache, p.block_ids, p.ctx_len)
            vv = _gather(v_cache, p.block_ids, p.ctx_len)
        kk = kk.transpose(0, 1).unsqueeze(0)
        vv = vv.transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qq, kk, vv, attn_mask=p.mask, is_causal=p.mask is None, enable_gqa=gqa
        )
        parts.append(o.squeeze(0).transpose(0, 1).reshape(p.q_len, hq * d))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def _decode_attention(q, meta: AttentionMetadata, k_cache, v_cache) -> torch.Tensor:
    """One new token per sequence: plain batched matmuls. (CPU flash-attention kernels cost
    ~300 us per call at q_len=1, more than the math.)

        q [B, Hkv, rep, D] @ K^T [B, Hkv, D, L] -> scores [B, Hkv, rep, L] -> softmax -> @ V
    """
    B, hq, d = q.shape
    nkv = k_cache.shape[-2]
    rep = hq // nkv
    bt = meta.decode_block_tables
    L = meta.decode_max_len
    if B == 1 and meta.decode_mask is None:
        L = meta.decode_context_lens_list[0]
    kk = k_cache.index_select(0, bt.view(-1)).view(B, -1, nkv, d)[:, :L]
    vv = v_cache.index_select(0, bt.view(-1)).view(B, -1, nkv, d)[:, :L]
    # fp32: oneDNN's bf16 bmm costs ~80 us per call at these tiny shapes, MKL's fp32 a few us
    qq = q.view(B, nkv, rep, d).float()
    kk, vv = kk.float(), vv.float()
    scores = torch.matmul(qq, kk.permute(0, 2, 3, 1)) * (1.0 / math.sqrt(d))
    if meta.decode_mask is not None:
        scores = scores.masked_fill(~meta.decode_mask[:, :, :, :L], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.matmul(probs, vv.transpose(1, 2))  # [B, Hkv, rep, D]
    return out.reshape(B, hq * d).to(q.dtype)


BACKENDS = {"reference": reference_attention, "sdpa": sdpa_attention, "fused": fused_attention}


def get_backend(name: str):
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"attention backend must be one of {sorted(BACKENDS)}, got {name!r}") from None

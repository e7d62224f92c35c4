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
    T, hq, d = q.shape
    nkv = k.shape[1]
    gqa = hq != nkv
    parts = []
    B = meta.num_decode
    if B:
        bt = meta.decode_block_tables
        kk = k_cache.index_select(0, bt.view(-1)).view(B, -1, nkv, d).transpose(1, 2)
        vv = v_cache.index_select(0, bt.view(-1)).view(B, -1, nkv, d).transpose(1, 2)
        if meta.decode_mask is None and B == 1:
            L = meta.decode_context_lens_list[0]
            kk, vv = kk[:, :, :L], vv[:, :, :L]
        qq = q[:B].view(B, 1, hq, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=meta.decode_mask, enable_gqa=gqa)
        parts.append(o.transpose(1, 2).reshape(B, hq * d))
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


BACKENDS = {"reference": reference_attention, "sdpa": sdpa_attention}


def get_backend(name: str):
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"attention backend must be one of {sorted(BACKENDS)}, got {name!r}") from None

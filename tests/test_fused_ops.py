"""The fused C decode-step ops (kernels/ops.c) against their PyTorch twins, in bf16."""

import math

import pytest
import torch
import torch.nn.functional as F

from splitserve.attention.backends import reference_attention
from splitserve.attention.metadata import AttentionMetadata
from splitserve.kernels import ops
from splitserve.model.layers import RMSNorm, RotaryEmbedding

pytestmark = pytest.mark.skipif(not ops.available(), reason=f"ops unavailable: {ops.unavailable_reason()}")
bf16 = torch.bfloat16


def close(a, b, tol=2e-2):
    """bf16 results: equal up to a couple of bf16 ulps of the largest magnitude."""
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def test_add_rmsnorm_matches_twin():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 96, generator=g).to(bf16)
    d = torch.randn(5, 96, generator=g).to(bf16)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = (torch.rand(96, generator=g) + 0.5).to(bf16)
    want_h = h + d
    want = norm(want_h)
    got_h, out = h.clone(), torch.empty_like(h)
    ops.add_rmsnorm(got_h, d, norm.weight.data, out, 1e-5)
    assert torch.equal(got_h, want_h)
    assert close(out, want)
    ops.add_rmsnorm(got_h, None, norm.weight.data, out, 1e-5)
    assert close(out, norm(want_h))


def test_rope_write_kv_matches_twin():
    g = torch.Generator().manual_seed(1)
    T, hq, hkv, D, bs, nblocks = 6, 4, 2, 32, 4, 8
    rope = RotaryEmbedding(D, 64, 10000.0, None)
    qkv = torch.randn(T, (hq + 2 * hkv) * D, generator=g).to(bf16)
    pos = torch.tensor([0, 1, 2, 17, 40, 63])
    slots = torch.tensor([5, 6, 7, 9, 30, 31])
    q, k, v = qkv.split([hq * D, hkv * D, hkv * D], -1)
    cos, sin = rope.tables(pos, bf16)
    wq, wk = RotaryEmbedding.apply(q.reshape(T, hq, D), k.reshape(T, hkv, D), cos, sin)
    kc = torch.zeros(nblocks * bs, hkv, D, dtype=bf16)
    vc = torch.zeros_like(kc)
    got = qkv.clone()
    ops.rope_write_kv(got, pos, rope.cos, rope.sin, kc, vc, slots, hq, hkv, D)
    gq, gk, gv = got.split([hq * D, hkv * D, hkv * D], -1)
    assert close(gq.reshape(T, hq, D), wq) and close(gk.reshape(T, hkv, D), wk)
    assert torch.equal(gv, v)
    assert torch.equal(kc[slots], gk.reshape(T, hkv, D)) and torch.equal(vc[slots], v.reshape(T, hkv, D))
    assert kc[0].abs().sum() == 0  # nothing else written


def test_silu_mul_matches_twin():
    gu = torch.randn(3, 2 * 40).to(bf16)
    gate, up = gu.split(40, -1)
    assert close(ops.silu_mul(gu), F.silu(gate) * up)


@pytest.mark.parametrize("D,hq,hkv", [(64, 9, 3), (32, 4, 4), (48, 4, 2)])
def test_decode_attention_matches_reference(D, hq, hkv):
    g = torch.Generator().manual_seed(2)
    bs, nblocks = 4, 32
    lens = [1, 5, 17, 33]
    B = len(lens)
    kc = torch.randn(nblocks, bs, hkv, D, generator=g).to(bf16)
    vc = torch.randn(nblocks, bs, hkv, D, generator=g).to(bf16)
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, start = [], 0
    for n in lens:
        nb = -(-n // bs)
        tables.append(perm[start : start + nb])
        start += nb
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    # q rows strided as inside the fused qkv projection
    qkv = torch.randn(B, (hq + 2 * hkv) * D, generator=g).to(bf16)
    q = qkv[:, : hq * D].view(B, hq, D)
    meta = AttentionMetadata(slot_mapping=None, num_decode=B, decode_context_lens_list=lens,
                             decode_block_ids_list=tables)
    want = reference_attention(q, None, None, meta, kc, vc)
    got = ops.decode_attention(q, kc, vc, bt, torch.tensor(lens), 1 / math.sqrt(D))
    assert close(got, want)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="bf16"):
        ops.silu_mul(torch.randn(2, 8))
    h = torch.randn(2, 8).to(bf16)
    with pytest.raises(ValueError, match="contiguous"):
        ops.add_rmsnorm(h.t(), None, torch.ones(2, dtype=bf16), torch.empty(8, 2, dtype=bf16), 1e-5)

"""The hand-written CPU kernels (splitserve/kernels) against their plain twin, F.linear in fp32,
and Linear's fast modes against mode "plain".

Tolerances, from what each kernel does:
- bf16: products of bf16 values are exact in fp32; each output lane sums its K products in fp32
  (error <= K 2^-24 sum|x w|), then rounds once to bf16 (<= 2^-9 relative; 2^-8 for margin).
- int8: x is split into 16-bit integers with a power-of-two step s = 2^(e-15), max|x| < 2^e,
  so each element moves by at most s/2 (and not at all for bf16 elements within 2^7 of the
  row's max); the integer dot product is exact, then two fp32 roundings (2^-23 relative) and
  the output's own rounding (bf16: 2^-8 with margin).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from splitserve import kernels
from splitserve.model.layers import Linear

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"CPU kernels cannot be built: {kernels.unavailable_reason()}"
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Results do not depend on the thread count (test_threads_split_rows_only checks that),
    # and one thread keeps these tests fast when other jobs hold the other cores: an OpenMP
    # region waits for every thread of its team.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MS = [1, 2, 3, 7, 8, 9, 16, 17]
# (N, K): N not a multiple of the 16-row block; K odd, not a multiple of 2, 4 or 32; real shapes
SHAPES = [(100, 37), (33, 99), (577, 64), (16, 1537), (768, 576), (576, 1536)]


def _data(m, n, k, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    return x, w, b


def _ref(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def _bf16_bound(x, w, ref):
    k = x.shape[1]
    return 2**-8 * ref.abs() + k * 2**-24 * (x.double().abs() @ w.double().abs().T) + 1e-30


def _int8_bound(x, q, scale, ref, out_rel):
    # per row of x: step s = 2^(e - 15) with max|x| < 2^e; each element moves by <= s/2
    amax = x.double().abs().amax(dim=1)
    e = torch.floor(torch.log2(amax)) + 1
    s = torch.pow(2.0, e - 15)
    dx = (s / 2)[:, None] * (q.double().abs().sum(dim=1) * scale.double())[None, :]
    return dx + out_rel * ref.abs() + 1e-6


@needs_kernels
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_kernel_matches_fp32_linear(n, k, bias):
    for m in MS:
        x, w, b = _data(m, n, k, bias, seed=m)
        p = kernels.PackedBf16.pack(w, b)
        y = p(x)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        ref = _ref(x, w, b)
        err = (y.double() - ref).abs()
        assert (err <= _bf16_bound(x, w, ref)).all(), f"M={m}: max err {err.max().item():.3g}"


@needs_kernels
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32])
def test_int8_kernel_matches_dequantized_linear(n, k, bias, xdtype):
    for m in MS:
        x, w, b = _data(m, n, k, bias, seed=m)
        if xdtype == torch.float32:  # fp32 x, not just bf16 values widened
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        q, scale = kernels.quantize_int8(w)
        y = kernels.PackedInt8.pack(q, scale, b)(x)
        assert y.dtype == xdtype and y.shape == (m, n)
        ref = _ref(x, q.double() * scale.double()[:, None], b)
        out_rel = 2**-8 if xdtype == torch.bfloat16 else 2**-21
        err = (y.double() - ref).abs()
        bound = _int8_bound(x, q, scale, ref, out_rel)
        assert (err <= bound).all(), f"M={m}: max err {err.max().item():.3g}"


@needs_kernels
def test_int8_kernel_is_exact_for_narrow_range_x():
    # Every bf16 element within 2^7 of its row's max splits into integers exactly: the only
    # error left is the final fp32 rounding.
    g = torch.Generator().manual_seed(3)
    m, n, k = 5, 70, 301
    sign = torch.randint(0, 2, (m, k), generator=g) * 2 - 1
    x = (sign * torch.pow(2.0, torch.randint(-6, 1, (m, k), generator=g).float())
         * (1 + torch.rand(m, k, generator=g))).bfloat16().float()
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) + 0.5
    y = kernels.PackedInt8.pack(q, scale)(x)
    ref = (x.double() @ q.double().T) * scale.double()
    assert torch.allclose(y.double(), ref, rtol=2**-22, atol=0)


@needs_kernels
def test_non_finite_and_zero_rows():
    x, w, b = _data(4, 40, 64, bias=True)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3] = 0
    q, scale = kernels.quantize_int8(w)
    for y in (kernels.PackedBf16.pack(w, b)(x), kernels.PackedInt8.pack(q, scale, b)(x)):
        assert torch.isfinite(y[0]).all()
        assert torch.isnan(y[1]).all()
        assert not torch.isfinite(y[2]).any()
        assert torch.equal(y[3], b)  # 0 @ W^T + b, exactly


@needs_kernels
def test_pack_unpack_roundtrip():
    _, w, _ = _data(1, 35, 37, bias=False)
    assert torch.equal(kernels.PackedBf16.pack(w).unpack(), w)
    q, scale = kernels.quantize_int8(w)
    assert torch.equal(kernels.PackedInt8.pack(q, scale).unpack(), q)


@needs_kernels
def test_threads_split_rows_only():
    # Threads split output rows; each row's arithmetic is the same, so results are bitwise equal.
    x, w, b = _data(9, 1000, 160, bias=True)  # big enough for 3 threads (2^17 MACs each)
    q, scale = kernels.quantize_int8(w)
    for p in (kernels.PackedBf16.pack(w, b), kernels.PackedInt8.pack(q, scale, b)):
        assert torch.equal(p(x, threads=1), p(x, threads=3))


@needs_kernels
def test_concurrent_callers():
    # ctypes drops the GIL, so several host threads may be inside the kernel at once (each
    # gets its own OpenMP team).
    x, w, b = _data(3, 1024, 256, bias=True)
    p = kernels.PackedBf16.pack(w, b)
    want = p(x, threads=1)
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda _: p(x, threads=2), range(64)))
    assert all(torch.equal(o, want) for o in outs)


@needs_kernels
def test_bad_inputs_raise_clear_errors():
    x, w, _ = _data(2, 32, 64, bias=False)
    p = kernels.PackedBf16.pack(w)
    with pytest.raises(TypeError, match="dtype"):
        p(x.float())
    with pytest.raises(ValueError, match=r"\[M, 64\]"):
        p(x[:, :32].contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        p(torch.cat([x, x], dim=1)[:, ::2])
    with pytest.raises(TypeError, match="int8"):
        kernels.PackedInt8.pack(w, torch.ones(32))


@needs_kernels
def test_scalar_fallback_matches():
    # The build for a CPU without AVX-512: same layouts, same integer algorithm for int8.
    flags = tuple(f for f in kernels.cpu.CFLAGS if not f.startswith("-march"))
    scalar = kernels.cpu.load_library(flags)
    assert kernels.simd(scalar) == {"bf16": False, "int8": False}
    for m, n, k in [(1, 100, 37), (9, 33, 99), (3, 40, 64)]:
        x, w, b = _data(m, n, k, bias=True, seed=m)
        y = kernels.PackedBf16.pack(w, b, lib=scalar)(x)
        ref = _ref(x, w, b)
        assert ((y.double() - ref).abs() <= _bf16_bound(x, w, ref)).all()
        q, scale = kernels.quantize_int8(w)
        for xx in (x, x.float()):
            assert torch.equal(kernels.PackedInt8.pack(q, scale, b, lib=scalar)(xx),
                               kernels.PackedInt8.pack(q, scale, b)(xx))


def test_hugepage_tensors_are_independent_and_aligned():
    from splitserve.kernels import hugepages

    ts = [hugepages.empty((n, 3), torch.bfloat16) for n in (1, 100, 5000)]
    ts.append(hugepages.empty((3 << 20,), torch.int8))  # its own mapping
    for i, t in enumerate(ts):
        assert t.data_ptr() % 64 == 0 and t.is_contiguous()
        t.fill_(i)
    assert all((t == i).all() for i, t in enumerate(ts))  # no overlaps
    assert hugepages.empty((0, 7), torch.float32).shape == (0, 7)


def test_missing_compiler_is_reported_not_raised(tmp_path):
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), SPLITSERVE_CACHE=str(tmp_path))
    code = "from splitserve import kernels as k; print(k.available(), k.unavailable_reason())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False") and "no-such-cc" in out.stdout


# ---------------------------------------------------------------- Linear's modes vs "plain"


def _linear(n, k, bias, seed=0):
    lin = Linear(k, n, bias=bias)
    _, w, b = _data(1, n, k, bias, seed)
    with torch.no_grad():
        lin.weight.copy_(w.float())
        if bias:
            lin.bias.copy_(b.float())
    return lin.to(torch.bfloat16)


@pytest.mark.parametrize("with_kernels", [True, False])
@pytest.mark.parametrize("mode", ["packed", "int8"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_modes_match_plain_twin(monkeypatch, with_kernels, mode, bias):
    if with_kernels and not kernels.available():
        pytest.skip(f"CPU kernels cannot be built: {kernels.unavailable_reason()}")
    if not with_kernels:
        monkeypatch.setattr(kernels, "available", lambda: False)
    n, k = 80, 96
    fast = _linear(n, k, bias)
    fast.prepare(mode)
    assert (fast._kernel is not None) == with_kernels
    plain = _linear(n, k, bias)
    plain.weight.data = fast.dequantized_weight().clone()
    for m in (1, 5, 8, 9, 40):
        x = torch.randn(m, k).bfloat16()
        ref = plain(x).double()
        y = fast(x)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        w = plain.weight.double()
        # both sides round to bf16; int8 adds the split of x (see the module docstring)
        tol = 2**-7 * ref.abs() + k * 2**-20 * (x.double().abs() @ w.abs().T) + 1e-6
        if mode == "int8":  # + the split of x, + plain's weight rounded to bf16 (2^-9)
            tol = tol + 2**-14 * x.double().abs().amax(1, keepdim=True) * w.abs().sum(1)
            tol = tol + 2**-8 * (x.double().abs() @ w.abs().T)
        assert ((y.double() - ref).abs() <= tol).all(), f"M={m}"
    # leading dims and non-contiguous x take the same path
    x3 = torch.randn(2, 3, 2 * k).bfloat16()[..., ::2]
    assert torch.equal(fast(x3), fast(x3.contiguous()))
    assert fast(x3).shape == (2, 3, n)


@needs_kernels
def test_int8_mode_keeps_one_copy_and_fp32_x_works():
    lin = _linear(48, 64, bias=True)
    lin.prepare("int8")
    assert lin.weight.numel() == 0 and lin._packed.numel() == 48 * 64
    x = torch.randn(3, 64)
    ref = F.linear(x, lin.dequantized_weight().float(), lin.bias.float())
    assert lin(x).dtype == torch.float32
    assert torch.allclose(lin(x), ref, rtol=1e-2, atol=1e-2)
    assert lin(x.half()).dtype == torch.float16
    with pytest.raises(RuntimeError, match="reload"):
        lin.prepare("packed")

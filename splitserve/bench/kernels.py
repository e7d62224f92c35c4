"""Decode GEMV bandwidth: a SmolLM2-135M-shaped stack of linears, every layer its own weights.

    python -m splitserve.bench.kernels [--m 1,4,8,32] [--threads 1,2] [--reps 10] [--layers 30]

Each timed pass runs the 4 linears of every layer (qkv 768x576, o 576x576, gate_up 3072x576,
down 576x1536) and the 49152x576 lm_head, so ~262 MB of bf16 weights come from DRAM, as in a
real decode step; a benchmark that reuses one layer's weights measures L2/L3, not DRAM. The
figure printed is weight bytes read / best time, next to the read bandwidth of a large fp32
sum measured in the same run: the roofline, read from huge pages like the kernels' weights
(the PyTorch paths' weights sit in 4 KiB pages, as in the engine; SPLITSERVE_HUGEPAGES=0 puts
everything there). Other processes may share the machine, so each figure is the best of
--reps passes (at most --budget seconds each), with the median beside it: a median far above
the best means the path stalls when a core is taken (the load average is printed with each
table).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from splitserve import kernels
from splitserve.kernels import hugepages

SHAPES = {"qkv": (768, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LM_HEAD = (49152, 576)


def read_bandwidth(reps: int, nbytes: int = 1 << 29) -> float:
    """Best fp32 `sum` bandwidth, over memory in huge pages as the kernels' weights are (on
    4 KiB pages the same sum reads ~25% slower: the prefetchers stop at each page)."""
    big = hugepages.empty((nbytes // 4,), torch.float32).fill_(1.0)
    best, _ = _time(big.sum, reps, budget=10.0)
    return nbytes / best / 1e9


def _time(fn, reps: int, budget: float) -> tuple[float, float]:
    """(best, median) seconds of up to `reps` calls, stopping early after `budget` seconds."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 2 or time.perf_counter() - start < budget):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def build(layers: int, seed: int):
    """Per-method lists of (callable on x, weight bytes, K)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [s for _ in range(layers) for s in SHAPES.values()] + [LM_HEAD]
    ws = [torch.randn(n, k, generator=g).mul_(0.02).bfloat16() for n, k in shapes]
    methods: dict[str, list] = {"F.linear": [], "oneDNN packed": [], "int8pack_mm": []}
    for w in ws:
        methods["F.linear"].append((lambda x, w=w: F.linear(x, w), w.numel() * 2, w.shape[1]))
        p = torch.ops.mkldnn._reorder_linear_weight(w, None)
        methods["oneDNN packed"].append(
            (lambda x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
             w.numel() * 2, w.shape[1]))
        q, s = kernels.quantize_int8(w)
        sb = s.bfloat16()
        methods["int8pack_mm"].append(
            (lambda x, q=q, sb=sb: torch.ops.aten._weight_int8pack_mm(x, q, sb),
             q.numel() + sb.numel() * 2, w.shape[1]))
    if kernels.available():
        methods["kernel bf16"], methods["kernel int8"] = [], []
        for w in ws:
            pb = kernels.PackedBf16.pack(w)
            methods["kernel bf16"].append((pb, w.numel() * 2, w.shape[1]))
            pi = kernels.PackedInt8.pack(*kernels.quantize_int8(w))
            nbytes = pi.weight.numel() + pi.scale.numel() * 4 + pi.wsum.numel() * 4
            methods["kernel int8"].append((pi, nbytes, w.shape[1]))
    return methods


def run(methods: dict, ms: list[int], reps: int, budget: float, threads: int) -> None:
    torch.set_num_threads(threads)
    bw = read_bandwidth(reps)
    bf16_bytes = sum(b for _, b, _ in methods["F.linear"])
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\n== {threads} thread(s); read roofline {bw:.1f} GB/s = "
          f"{bf16_bytes / bw / 1e6:.1f} ms for the {bf16_bytes / 1e6:.0f} MB of bf16 weights; "
          f"load average {load} ==")
    print(f"{'M':>3}  {'method':<14} {'best ms':>9} {'median':>9} {'GB/s':>6} {'roof':>5}  "
          f"{'vs M=1':>6}")
    at_m1: dict[str, float] = {}
    for m in ms:
        xs = {k: torch.randn(m, k).bfloat16() for k in (576, 1536)}
        for name, ops in methods.items():
            calls = [(f, xs[k]) for f, _, k in ops]

            def step(calls=calls):
                for f, x in calls:
                    f(x)

            step()  # warm-up: first-touch of outputs, oneDNN primitive caches
            t, med = _time(step, reps, budget)
            if m == 1:
                at_m1[name] = t
            gbs = sum(b for _, b, _ in ops) / t / 1e9
            rel = f"{t / at_m1[name]:5.2f}x" if name in at_m1 else ""
            print(f"{m:>3}  {name:<14} {t * 1e3:9.2f} {med * 1e3:9.2f} {gbs:6.1f} {gbs / bw:5.0%}  "
                  f"{rel:>6}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,4,8,32", help="rows of x (tokens) to time, comma separated")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget", type=float, default=3.0, help="seconds per figure, at most")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", default=None, help="thread counts, default 1 and all")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ms = [int(v) for v in args.m.split(",")]
    n_all = torch.get_num_threads()
    threads = [int(v) for v in args.threads.split(",")] if args.threads else sorted({1, n_all})
    if not kernels.available():
        print(f"kernels unavailable: {kernels.unavailable_reason()}")
    else:
        print(f"kernels: {kernels.simd()} (True = AVX-512 path)")
    methods = build(args.layers, args.seed)
    for t in threads:
        run(methods, ms, args.reps, args.budget, t)


if __name__ == "__main__":
    main()

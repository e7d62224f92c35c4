"""`splitserve bench handover`: what the KV hand-over costs a P/D request, per transport.

For each transport, one prefill and one decode worker (real processes, one core each) serve
`--requests` prompts of `--prompt-tokens` random tokens (no prefix-cache hits) one at a time,
`--output-tokens` tokens each. Per request, the hand-over is everything P/D adds on the
request's critical path:
    reserve   router sends Reserve -> decode reserves blocks -> router sends Prefill
    write     time the prefill worker spends inside write_layer (inline with its forward)
    notify    prefill sends KVDone -> decode admitted the request
and its share is hand-over / end-to-end latency. The shm write throughput (bytes handed over /
write time) is printed next to a plain memory copy of the same number of bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import time

import torch

from splitserve.request import SamplingParams


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transports", default="shm,tcp")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the results here")


def _worker_args(a, transport: str) -> argparse.Namespace:
    """The flags `serve` would pass its workers (defaults from the one parser that has them)."""
    from splitserve.cli import build_parser

    argv = ["serve", "--model", a.model, "--dtype", a.dtype, "--device", a.device,
            "--threads", str(a.threads or 1), "--kv-transport", transport, "--kv-timeout", "60",
            "--max-num-seqs", "16", "--kv-cache-gb", "0.25"]
    argv += ["--quantization", a.quantization] if a.quantization else []
    argv += ["--no-fast-linear"] if a.no_fast_linear else []
    return build_parser().parse_args(argv)


async def _run_transport(a, transport: str) -> dict:
    from splitserve.router.conductor import Conductor
    from splitserve.server.launch import spawn_workers, split_cores

    c = Conductor(a.model, local_prefill=False)  # every request goes through a hand-over
    await c.start()
    procs = []
    try:
        procs = spawn_workers(c, ["prefill", "decode"], split_cores(2), _worker_args(a, transport))
        while not c.is_ready():
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a worker exited during start-up")
            await asyncio.sleep(0.1)
        rng = random.Random(0)
        vocab = c.reference.vocab_size
        rows = []
        params = SamplingParams(temperature=0, max_tokens=a.output_tokens, ignore_eos=True)
        for i in range(a.requests + 1):  # the first request warms both workers up
            prompt = [rng.randrange(100, vocab) for _ in range(a.prompt_tokens)]
            t0 = time.perf_counter()
            ttft, ho, n = None, None, 0
            async for d in c.generate(f"bench-{transport}-{i}", prompt, params):
                if ttft is None and d.new_token_ids:
                    ttft = time.perf_counter() - t0
                ho = ho or d.handover
                n += len(d.new_token_ids)
            e2e = time.perf_counter() - t0
            if i == 0:
                continue
            total = ho.reserve_seconds + ho.write_seconds + ho.notify_seconds
            rows.append(dict(e2e_s=e2e, ttft_s=ttft, tokens=n, bytes=ho.bytes,
                             reserve_s=ho.reserve_seconds, write_s=ho.write_seconds,
                             notify_s=ho.notify_seconds, handover_s=total, share=total / e2e))
    finally:
        await c.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"transport": transport, "median": med, "requests": rows}


def _memcpy_gbps(nbytes: int, reps: int = 20) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def main(a) -> int:
    results = [asyncio.run(_run_transport(a, t)) for t in a.transports.split(",")]
    print(f"\nKV hand-over, {a.prompt_tokens}-token prompts, {a.output_tokens} output tokens, "
          f"{a.requests} requests one at a time, 1 prefill + 1 decode worker (1 core each)")
    print(f"{'transport':>9} {'e2e ms':>8} {'TTFT ms':>8} {'MB':>6} {'reserve':>8} {'write':>8} "
          f"{'notify':>8} {'hand-over':>10} {'share':>7}  target")
    for r in results:
        m = r["median"]
        target = " <= 1.0%  " + ("PASS" if m["share"] <= 0.01 else "MISS") if r["transport"] == "shm" else ""
        print(f"{r['transport']:>9} {m['e2e_s'] * 1e3:8.0f} {m['ttft_s'] * 1e3:8.0f} {m['bytes'] / 1e6:6.1f} "
              f"{m['reserve_s'] * 1e3:7.2f}ms {m['write_s'] * 1e3:7.2f}ms {m['notify_s'] * 1e3:7.2f}ms "
              f"{m['handover_s'] * 1e3:8.2f}ms {m['share'] * 100:6.2f}%{target}")
    print("(medians; hand-over = reserve round trip + prefill-side writes + done->admitted)")
    for r in results:
        if r["transport"] == "shm":
            m = r["median"]
            shm = m["bytes"] / m["write_s"] / 1e9
            cp = _memcpy_gbps(int(m["bytes"]))
            r["shm_write_gbps"], r["memcpy_gbps"] = shm, cp
            print(f"shm write throughput {shm:.1f} GB/s (gather from the paged pool + scatter into the "
                  f"peer's blocks) vs a plain copy of the same {m['bytes'] / 1e6:.1f} MB: "
                  f"{cp:.1f} GB/s ({shm / cp:.2f}x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "args": {k: v for k, v in vars(a).items() if k != "func"}, "results": results},
                      f, indent=1)
    return 0

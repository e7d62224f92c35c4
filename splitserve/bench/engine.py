"""`splitserve bench engine`: prefill and decode speed next to this machine's roofline.

Measured in one run, for each thread count:
  read bandwidth     best of a large fp32 `sum` (bytes / s), the decode roofline's denominator
  bf16 matmul peak   best of large bf16 GEMMs (FLOP / s), the prefill roofline
  splitserve         prefill tokens/s (logits for the sampled row only) and decode step time at
                     each batch, as bf16 and as weight-only int8
  transformers       the same model (from the same GGUF) in bf16, eager, with its own KV cache
  llama.cpp          llama-cpp-python on the same GGUF (Q4_1), single stream, when installed

Decode roofline = (bytes of weights + KV read per step) / read bandwidth.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass

import torch


def add_args(p) -> None:
    p.add_argument("--thread-counts", default="1,all", help="comma list; 'all' = every core")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill length")
    p.add_argument("--context", type=int, default=256, help="context length during decode")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--modes", default="bf16,int8", help="splitserve weight modes")
    p.add_argument("--peers", default="hf,llamacpp", help="comparisons to run when installed ('' = none)")
    p.add_argument("--ppl-data", default=os.path.join("..", "shared", "data", "HumanEval.jsonl.gz"),
                   help="HumanEval jsonl.gz for the int8-vs-bf16 perplexity check ('' = skip)")
    p.add_argument("--ppl-samples", type=int, default=40)
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--seed", type=int, default=0)


@dataclass
class Row:
    system: str
    threads: int
    phase: str  # "prefill" | "decode"
    batch: int
    seconds: float  # per prefill, or per decode step
    tokens_per_s: float
    achieved: float  # GB/s (decode) or GFLOP/s (prefill)
    roof: float  # read bandwidth GB/s or matmul peak GFLOP/s
    note: str = ""

    @property
    def roof_ratio(self) -> float:
        """decode: step time / roofline time; prefill: fraction of matmul peak."""
        return self.roof / self.achieved if self.phase == "decode" else self.achieved / self.roof


def _best(fn, repeat=5) -> float:
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth_gbs() -> float:
    a = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB: far beyond the caches
    a.sum()
    return a.numel() * 4 / _best(a.sum, 7) / 1e9


def bf16_matmul_peak_gflops() -> float:
    best = 0.0
    for m, k, n in ((1024, 1024, 1024), (512, 576, 1536), (2048, 2048, 2048)):
        a = torch.randn(m, k, dtype=torch.bfloat16)
        b = torch.randn(k, n, dtype=torch.bfloat16)
        torch.mm(a, b)
        best = max(best, 2 * m * k * n / _best(lambda a=a, b=b: torch.mm(a, b), 5) / 1e9)
    return best


def prefill_flops(mc, n: int) -> float:
    """Linears over n tokens, attention over the causal triangle, LM head for one row."""
    h, q, kv, i = mc.hidden_size, mc.q_size, mc.kv_size, mc.intermediate_size
    per_tok = mc.num_layers * 2 * (h * (q + 2 * kv) + q * h + 3 * h * i)
    attn = mc.num_layers * 2 * 2 * mc.num_heads * mc.head_dim * n * (n + 1) / 2
    return per_tok * n + attn + 2 * h * mc.vocab_size


def kv_read_bytes(mc, contexts, elem: int) -> int:
    return sum(contexts) * mc.num_layers * 2 * mc.kv_size * elem


# -- splitserve --------------------------------------------------------------------------------
def _random_prompt(rng, n, vocab):
    return [rng.randrange(100, vocab) for _ in range(n)]


def bench_splitserve(eng, name, threads, a, bw, peak, rng) -> list[Row]:
    from splitserve.request import SamplingParams

    torch.set_num_threads(threads)
    mc = eng.model_config
    rows = []
    # prefill: one whole prompt per step
    def one_prefill():
        eng.add_request(_random_prompt(rng, a.prompt_len, mc.vocab_size), SamplingParams(max_tokens=1))
        while eng.has_unfinished():
            eng.step()
    one_prefill()
    t = _best(one_prefill, 3)
    rows.append(Row(name, threads, "prefill", 1, t, a.prompt_len / t,
                    prefill_flops(mc, a.prompt_len) / t / 1e9, peak))
    # decode: B sequences at `context` tokens, timed over decode-only steps
    weight_bytes = eng.model.weight_bytes_per_token_step()
    elem = eng.kv_cache.kv.element_size()
    for B in a.batches:
        sp = SamplingParams(temperature=0, max_tokens=a.decode_steps + 4, ignore_eos=True)
        ids = [eng.add_request(_random_prompt(rng, a.context, mc.vocab_size), sp) for _ in range(B)]
        while any(r.in_prefill for r in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        eng.step()
        eng.step()
        ctx = [r.num_tokens for r in eng.scheduler.running]
        t0 = time.perf_counter()
        for _ in range(a.decode_steps):
            eng.step()
        dt = (time.perf_counter() - t0) / a.decode_steps
        for rid in ids:
            eng.abort_request(rid)
        nbytes = weight_bytes + kv_read_bytes(mc, [c + a.decode_steps / 2 for c in ctx], elem)
        rows.append(Row(name, threads, "decode", B, dt, B / dt, nbytes / dt / 1e9, bw,
                        f"{nbytes / 1e6:.0f} MB/step"))
    eng.check_integrity()
    return rows


# -- peers -------------------------------------------------------------------------------------
def bench_hf(path, threads, a, bw, peak, rng, mc) -> list[Row]:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.bfloat16).eval()
    rows = []
    with torch.inference_mode():
        def pre():
            ids = torch.tensor([_random_prompt(rng, a.prompt_len, mc.vocab_size)])
            model(ids, logits_to_keep=1)
        pre()
        t = _best(pre, 3)
        rows.append(Row("transformers bf16", threads, "prefill", 1, t, a.prompt_len / t,
                        prefill_flops(mc, a.prompt_len) / t / 1e9, peak))
        wbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)
        if mc.tie_word_embeddings:
            wbytes += mc.vocab_size * mc.hidden_size * 2
        for B in a.batches:
            ids = torch.tensor([_random_prompt(rng, a.context, mc.vocab_size) for _ in range(B)])
            out = model(ids, use_cache=True, logits_to_keep=1)
            pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(2):
                out = model(nxt, past_key_values=pkv, use_cache=True)
                pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(a.decode_steps):
                out = model(nxt, past_key_values=pkv, use_cache=True)
                pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            dt = (time.perf_counter() - t0) / a.decode_steps
            nbytes = wbytes + kv_read_bytes(mc, [a.context + 2 + a.decode_steps / 2] * B, 2)
            rows.append(Row("transformers bf16", threads, "decode", B, dt, B / dt, nbytes / dt / 1e9, bw))
    return rows


def bench_llamacpp(path, threads, a, bw, peak, rng, mc) -> list[Row]:
    import llama_cpp

    n_ctx = a.prompt_len + a.context + a.decode_steps + 64
    llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                          n_batch=max(512, a.prompt_len), verbose=False)
    rows = []
    def pre():
        llm.reset()
        llm.eval(_random_prompt(rng, a.prompt_len, mc.vocab_size))
    pre()
    t = _best(pre, 3)
    rows.append(Row("llama.cpp Q4_1", threads, "prefill", 1, t, a.prompt_len / t,
                    prefill_flops(mc, a.prompt_len) / t / 1e9, peak))
    llm.reset()
    llm.eval(_random_prompt(rng, a.context, mc.vocab_size))
    toks = _random_prompt(rng, a.decode_steps + 2, mc.vocab_size)
    llm.eval(toks[:1])
    llm.eval(toks[1:2])
    t0 = time.perf_counter()
    for tok in toks[2:]:
        llm.eval([tok])
    dt = (time.perf_counter() - t0) / a.decode_steps
    wbytes = os.path.getsize(path)  # quantised weights as stored (embedding rows excepted, roughly)
    nbytes = wbytes + kv_read_bytes(mc, [a.context + a.decode_steps / 2], 2)
    rows.append(Row("llama.cpp Q4_1", threads, "decode", 1, dt, 1 / dt, nbytes / dt / 1e9, bw,
                    "single stream"))
    return rows


# -- perplexity --------------------------------------------------------------------------------
def perplexity(eng, texts) -> float:
    total, n = 0.0, 0
    for t in texts:
        lps = eng.score(eng.encode(t))
        total += sum(lps)
        n += len(lps)
    return math.exp(-total / n)


# -- main --------------------------------------------------------------------------------------
def main(a) -> int:
    from splitserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from splitserve.engine.engine import LLMEngine
    from splitserve.model.loader import load_checkpoint

    ncores = os.cpu_count() or 1
    a.batches = [int(b) for b in a.batches.split(",")]
    threads = sorted({ncores if t == "all" else int(t) for t in a.thread_counts.split(",")})
    modes = [m for m in a.modes.split(",") if m]
    peers = [p for p in a.peers.split(",") if p]
    rng = random.Random(a.seed)
    ck = load_checkpoint(a.model, torch.bfloat16)
    mc = ck.config
    max_b = max(a.batches)
    blocks = max_b * ((a.context + a.decode_steps + 8) // 16 + 2) + a.prompt_len // 16 + 8
    engines = {}
    for m in modes:
        cfg = EngineConfig(model=a.model, dtype="bfloat16", quantization="int8" if m == "int8" else None,
                           fast_linear=not a.no_fast_linear,
                           cache=CacheConfig(num_blocks=blocks, enable_prefix_caching=False),
                           scheduler=SchedulerConfig(max_num_batched_tokens=max(a.prompt_len, 2048),
                                                     max_num_seqs=max(64, max_b)))
        engines[m] = LLMEngine(cfg, checkpoint=ck)
    path = engines[modes[0]].model_path if modes else ck.path

    rows: list[Row] = []
    machine = {"cpu_count": ncores, "machine": platform.machine(), "python": platform.python_version(),
               "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    roofs = {}
    for t in threads:
        torch.set_num_threads(t)
        bw, peak = read_bandwidth_gbs(), bf16_matmul_peak_gflops()
        roofs[t] = {"read_gbs": bw, "bf16_gflops": peak}
        print(f"[threads={t}] read bandwidth {bw:.1f} GB/s, bf16 matmul peak {peak:.0f} GFLOP/s", flush=True)
        for m, eng in engines.items():
            rows += bench_splitserve(eng, f"splitserve {m} ({eng.linear_mode})", t, a, bw, peak, rng)
            _print_rows(rows[-1 - len(a.batches):])
        for peer in peers:
            try:
                if peer == "hf":
                    new = bench_hf(path, t, a, bw, peak, rng, mc)
                elif peer == "llamacpp":
                    if not path.endswith(".gguf"):
                        continue
                    new = bench_llamacpp(path, t, a, bw, peak, rng, mc)
                else:
                    raise ValueError(f"unknown peer {peer!r}")
            except ImportError as e:
                print(f"[{peer}] skipped: {e}")
                continue
            rows += new
            _print_rows(new)
    torch.set_num_threads(ncores)

    ppl = {}
    if a.ppl_data and os.path.exists(a.ppl_data) and len(modes) > 1:
        with gzip.open(a.ppl_data, "rt") as f:
            texts = [(lambda d: d["prompt"] + d["canonical_solution"])(json.loads(line)) for line in f]
        texts = texts[: a.ppl_samples]
        for m, eng in engines.items():
            ppl[m] = perplexity(eng, texts)
        print("perplexity on", len(texts), "HumanEval prompt+solution texts:",
              ", ".join(f"{m} {v:.4f}" for m, v in ppl.items()))

    print()
    print(markdown_table(rows))
    print()
    for line in check_targets(rows, ppl, min(threads)):
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "roofs": roofs, "rows": [asdict(r) | {"roof_ratio": r.roof_ratio} for r in rows],
                       "perplexity": ppl, "args": {k: v for k, v in vars(a).items() if k != "func"}}, f, indent=1)
    return 0


def _print_rows(rows):
    for r in rows:
        unit = "GB/s" if r.phase == "decode" else "GFLOP/s"
        rel = f"{r.roof_ratio:.2f}x roofline" if r.phase == "decode" else f"{r.roof_ratio:.0%} of peak"
        print(f"  {r.system:38s} t={r.threads} {r.phase:7s} B={r.batch:<3d} {r.seconds * 1e3:8.2f} ms "
              f"{r.tokens_per_s:8.0f} tok/s {r.achieved:7.1f} {unit} ({rel})", flush=True)


def markdown_table(rows) -> str:
    out = ["| system | threads | phase | batch | ms | tok/s | achieved | roofline | vs roofline |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.phase == "decode":
            ach, roof, rel = f"{r.achieved:.1f} GB/s", f"{r.roof:.1f} GB/s", f"{r.roof_ratio:.2f}x"
        else:
            ach, roof, rel = f"{r.achieved:.0f} GFLOP/s", f"{r.roof:.0f} GFLOP/s", f"{r.roof_ratio:.0%}"
        out.append(f"| {r.system} | {r.threads} | {r.phase} | {r.batch} | {r.seconds * 1e3:.2f} | "
                   f"{r.tokens_per_s:.0f} | {ach} | {roof} | {rel} |")
    return "\n".join(out)


def check_targets(rows, ppl, t1) -> list[str]:
    def find(prefix, phase, batch, threads=t1):
        for r in rows:
            if r.system.startswith(prefix) and r.phase == phase and r.batch == batch and r.threads == threads:
                return r
        return None

    out = [f"targets ({t1} thread):"]

    def line(ok, text):
        out.append(f"  [{'PASS' if ok else 'MISS'}] {text}")

    bf = find("splitserve bf16", "decode", 1)
    if bf:
        line(bf.roof_ratio <= 1.5, f"bf16 decode B=1: {bf.seconds * 1e3:.2f} ms = {bf.roof_ratio:.2f}x its "
             f"memory roofline (target <= 1.5x)")
    lc = find("llama.cpp", "decode", 1)
    i8 = find("splitserve int8", "decode", 1)
    if lc and i8:
        line(i8.seconds < lc.seconds, f"int8 decode B=1 {i8.seconds * 1e3:.2f} ms vs llama.cpp Q4_1 "
             f"{lc.seconds * 1e3:.2f} ms ({lc.seconds / i8.seconds:.2f}x faster; target > 1x)")
    if "bf16" in ppl and "int8" in ppl:
        d = ppl["int8"] / ppl["bf16"] - 1
        line(abs(d) <= 0.02, f"int8 perplexity {ppl['int8']:.4f} vs bf16 {ppl['bf16']:.4f} ({d:+.2%}; target within 2%)")
    b32 = find("splitserve bf16", "decode", 32)
    if lc and b32:
        line(b32.tokens_per_s >= 5 * lc.tokens_per_s, f"bf16 decode B=32 {b32.tokens_per_s:.0f} tok/s vs "
             f"llama.cpp single stream {lc.tokens_per_s:.0f} tok/s ({b32.tokens_per_s / lc.tokens_per_s:.1f}x; target >= 5x)")
    pf = find("splitserve bf16", "prefill", 1)
    if pf:
        line(pf.roof_ratio >= 0.5, f"prefill {pf.achieved:.0f} GFLOP/s = {pf.roof_ratio:.0%} of bf16 matmul peak "
             f"{pf.roof:.0f} (target >= 50%)")
    lp = find("llama.cpp", "prefill", 1)
    if pf and lp:
        line(pf.tokens_per_s >= 2 * lp.tokens_per_s, f"prefill {pf.tokens_per_s:.0f} tok/s vs llama.cpp "
             f"{lp.tokens_per_s:.0f} tok/s ({pf.tokens_per_s / lp.tokens_per_s:.1f}x; target >= 2x)")
    return out

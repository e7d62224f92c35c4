"""The soak's oracle: the offline engine's greedy text for each prompt, with the server's
settings (bf16, the server's threads per worker, no prefix cache), computed after the load in
a few processes of their own so it never competes with a server for the cores.

Each prompt is prefilled whole in one chunk (prefill priority, a budget that holds it). The
server may have split it differently (its prefill worker packs several prompts into a 512-token
step; a decode worker's local prefill advances 8 tokens a step), and bf16 numerics follow the
chunk shapes, so a greedy text can differ without anything being wrong. `divergence` says
where a text departs from the oracle's; `forks` then looks for the server's text among the
engine's greedy generations forked at near-ties: a greedy server under other rounding takes,
at a few steps, a token within a rounding margin of the best (bf16 logits are ~0.125 apart
near |20|) and is greedy in between; wrong output (KV from another request's blocks, a stale
layer) leaves the engine's ranking. The margin where the texts part is not enough on its own:
in a 30-minute soak, chunk-8 prefills reproduced a server text that parted from the oracle's
where its margin was 0.75 nats (a fork at a later near-tie).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

_ENGINE = None


def _engine(threads: int, budget: int):
    global _ENGINE
    if _ENGINE is None:
        from splitserve.config import CacheConfig, EngineConfig, SchedulerConfig
        from splitserve.engine.engine import LLMEngine

        _ENGINE = LLMEngine(EngineConfig(
            num_threads=threads, cache=CacheConfig(enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_batched_tokens=budget, chunked_prefill=False)))
    return _ENGINE


def _pool_map(fn, items: list, procs: int, threads: int) -> dict:
    """fn over `procs` fresh processes (spawned: no torch state shared with this one)."""
    if not items:
        return {}
    parts = [items[i::procs] for i in range(procs) if items[i::procs]]
    ctx = multiprocessing.get_context("spawn")
    out: dict = {}
    with ProcessPoolExecutor(len(parts), mp_context=ctx) as pool:
        for r in pool.map(fn, parts, [threads] * len(parts)):
            out.update(r)
    return out


def run_batch(items: list[tuple[int, list[int], int]], threads: int = 1) -> dict[int, dict]:
    """{key: {"text", "gaps"}} for (key, prompt ids, max_tokens) items, greedy with ignore_eos;
    gaps[k]: the logprob margin of step k's token over the runner-up."""
    from splitserve.request import SamplingParams

    eng = _engine(threads, max(512, max(len(p) for _, p, _ in items)))
    out, ids = {}, {}
    for key, prompt, max_tokens in items:
        rid = f"o{key}"
        ids[rid] = key
        out[key] = {"text": "", "token_ids": [], "gaps": []}
        eng.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                               ignore_eos=True, logprobs=2), request_id=rid)
    while eng.has_unfinished():
        for o in eng.step():
            r = out[ids[o.request_id]]
            r["text"] += o.new_text
            r["token_ids"] += o.new_token_ids
            for _, top in o.new_logprobs:
                r["gaps"].append(top[0][1] - top[1][1] if len(top) > 1 else float("inf"))
    return out


def oracle_texts(items: list[tuple[int, list[int], int]], procs: int = 2,
                 threads: int = 1) -> dict[int, dict]:
    """run_batch over `procs` processes of their own."""
    return _pool_map(run_batch, items, procs, threads)


def fork_batch(items: list[tuple[int, list[int], int, str]], threads: int = 1,
               tie: float = 0.5, budget: int = 40) -> dict[int, list | None]:
    """{key: forks} for (key, prompt, max_tokens, server text): the offline engine's greedy
    generation, forked wherever the server's text takes a token the engine ranked within `tie`
    nats of its best, that reproduces the server's text; forks = [(step, margin)], or None
    when none does within `budget` generations (wrong output). The search works on the model's
    tokens, not on a re-tokenised text (special tokens leave no text; a run of '=' tokenises
    otherwise than it was generated)."""
    from splitserve.request import SamplingParams

    eng = _engine(threads, max(512, max(len(p) + n for _, p, n, _ in items)))

    def text(ids):
        return eng.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(prompt, n):
        eng.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                               logprobs=5))
        ids, tops = [], []
        while eng.has_unfinished():
            for o in eng.step():
                ids += o.new_token_ids
                tops += [top for _, top in o.new_logprobs]
        return ids, tops

    out = {}
    for key, prompt, n, want in items:
        stack, left, out[key] = [([], [])], budget, None
        while stack and left > 0:  # depth first: a fork, then the generation that follows it
            forced, forks = stack.pop()
            left -= 1
            ids, tops = generate(prompt + forced, n - len(forced)) if len(forced) < n else ([], [])
            full = forced + ids
            if text(full) == want:
                out[key] = forks
                break
            steps = range(len(forced), len(full))
            bad = next((k for k in steps if not want.startswith(text(full[:k + 1]))), len(full))
            for k in steps:  # every step up to the first that leaves the text: forks there
                if k > bad:
                    break
                best = tops[k - len(forced)][0][1]
                for t, lp in tops[k - len(forced)]:  # (the top may tie the one chosen)
                    if t != full[k] and best - lp <= tie and want.startswith(text(full[:k] + [t])):
                        stack.append((full[:k] + [t], forks + [(k, best - lp)]))
    return out


def forks(items: list[tuple[int, list[int], int, str]], procs: int = 2,
          threads: int = 1) -> dict[int, list | None]:
    """fork_batch over `procs` processes of their own."""
    return _pool_map(fork_batch, items, procs, threads)


def divergence(server_text: str, oracle: dict, decode) -> tuple[int, float]:
    """(step, gap): the first oracle step whose text the server's text does not continue, and
    the oracle's margin for its token there (`decode`: token ids -> text)."""
    ids = oracle["token_ids"]
    for k in range(len(ids)):
        if not server_text.startswith(decode(ids[:k + 1])):
            return k, oracle["gaps"][k] if k < len(oracle["gaps"]) else float("inf")
    return len(ids), 0.0  # the server's text is longer than the oracle's

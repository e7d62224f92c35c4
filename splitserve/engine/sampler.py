"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

All requests of a step are sampled with tensor ops over the [N, V] logits; the only per-request
Python work is drawing noise for requests that carry a seed (each has its own generator, so its
tokens do not depend on what else shares the batch).

Sampling uses the exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) draws i with
probability p_i, so greedy and random rows share one argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.request import SamplingParams


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: None, or (sampled logprob, [(token, logprob)] top-k) when requested
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self._generators: dict[str, torch.Generator] = {}
        self._global = torch.Generator(device=device)
        self._global.manual_seed(seed)

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: int) -> torch.Generator:
        g = self._generators.get(request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed)
            self._generators[request_id] = g
        return g

    @torch.inference_mode()
    def skip_draw(self, request_id: str, params: SamplingParams, vocab: int) -> None:
        """Advance a seeded request's generator by the draw of one sampled token (made in
        another process, e.g. the prefill worker's first token)."""
        if params.seed is not None and not params.greedy:
            torch.empty(vocab, dtype=torch.float32, device=self.device).exponential_(generator=self._generator(request_id, params.seed))

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> SampleResult:
        """logits: [N, V] fp32, one row per request to sample."""
        n, vocab = logits.shape
        greedy_all = all(p.greedy for p in params)
        want_lp = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None

        if greedy_all:
            tokens = logits.argmax(dim=-1)
        else:
            temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                                device=logits.device, dtype=logits.dtype)
            scaled = logits / temp[:, None]
            scaled = _apply_top_k_top_p(scaled, params)
            probs = scaled.softmax(dim=-1)
            noise = torch.empty_like(probs)
            noise.exponential_(generator=self._global)
            for i, (rid, p) in enumerate(zip(request_ids, params)):
                if p.seed is not None and not p.greedy:
                    noise[i].exponential_(generator=self._generator(rid, p.seed))
            sampled = (probs / noise).argmax(dim=-1)
            is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
            tokens = torch.where(is_greedy, logits.argmax(dim=-1), sampled)

        token_list = tokens.tolist()
        lps: list = [None] * n
        if want_lp:
            k_max = max(p.logprobs or 0 for p in params)
            chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
            top_v, top_i = (raw_logprobs.topk(k_max, dim=-1) if k_max else (None, None))
            for r, p in enumerate(params):
                if p.logprobs is None:
                    continue
                top = []
                if p.logprobs:
                    top = list(zip(top_i[r, : p.logprobs].tolist(), top_v[r, : p.logprobs].tolist()))
                lps[r] = (chosen[r], top)
        return SampleResult(token_list, lps)


def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab = logits.shape[-1]
    top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    if all(k >= vocab for k in top_k) and all(tp >= 1.0 for tp in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.tensor(top_k, device=logits.device)[:, None]
    drop = ranks >= k
    p = torch.tensor(top_p, device=logits.device, dtype=logits.dtype)[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # keep the smallest prefix whose mass reaches p (the token crossing p is kept)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= p) & (p < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)

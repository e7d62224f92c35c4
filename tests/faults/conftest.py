"""The oracle the fault tests compare served outputs with: the offline engine with the
servers' settings (bf16, 1 thread, 64-token chunks), computing each prompt from its first
token (no prefix cache). A server's outputs equal it bit for bit when the server's chunks
line up with its own: the tests give each prompt words of its own at the start, so no
prefix-cache hit on the server moves a chunk boundary (bf16 numerics follow chunk shapes)."""

from __future__ import annotations

import pytest


class Offline:
    def __init__(self):
        from splitserve.config import CacheConfig, EngineConfig, SchedulerConfig
        from splitserve.engine.engine import LLMEngine

        self.engine = LLMEngine(EngineConfig(
            num_threads=1, cache=CacheConfig(enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_batched_tokens=64)))
        self._memo: dict = {}

    def generate(self, prompt_ids: list[int], max_tokens: int) -> tuple[str, list[int], list[float]]:
        """Greedy (ignore_eos) text, token ids and the sampled tokens' logprobs."""
        from splitserve.request import SamplingParams

        key = (tuple(prompt_ids), max_tokens)
        if key not in self._memo:
            eng = self.engine
            eng.add_request(prompt_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                       ignore_eos=True, logprobs=0))
            text, ids, lps = "", [], []
            while eng.has_unfinished():
                for o in eng.step():
                    text += o.new_text
                    ids += o.new_token_ids
                    lps += [lp for lp, _ in o.new_logprobs]
            self._memo[key] = text, ids, lps
        return self._memo[key]

    def __call__(self, prompt_ids: list[int], max_tokens: int) -> str:
        return self.generate(prompt_ids, max_tokens)[0]

    def tokens(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        return self.generate(prompt_ids, max_tokens)[1]

    def logprobs(self, prompt_ids: list[int], max_tokens: int) -> list[float]:
        return self.generate(prompt_ids, max_tokens)[2]

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids)

    def ids(self, text: str, n: int) -> list[int]:
        """The first n token ids of `text` repeated."""
        out = self.encode(text * (1 + n // 16))[:n]
        assert len(out) == n
        return out


@pytest.fixture(scope="session")
def offline(real_model_path) -> Offline:
    return Offline()


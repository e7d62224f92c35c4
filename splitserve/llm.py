"""The offline interface: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.config import CacheConfig, EngineConfig, SchedulerConfig
from splitserve.engine.engine import LLMEngine
from splitserve.errors import InvalidRequestError
from splitserve.request import SamplingParams


@dataclass
class CompletionOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    stop_reason: int | str | None
    logprobs: list | None
    num_cached_tokens: int = 0


class LLM:
    """Batch generation on one co-located engine.

    LLM("default")                     the embedded SmolLM2-135M-Instruct GGUF
    LLM("/path/to/hf_dir")             config.json + *.safetensors + tokenizer
    LLM("/path/model.gguf", dtype="float32", quantization="int8", ...)
    """

    def __init__(self, model: str = "default", *, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_memory_gb: float = 1.0, enable_prefix_caching: bool = True,
                 max_num_batched_tokens: int = 512, max_num_seqs: int = 64,
                 chunked_prefill: bool = True, host_cache_gb: float = 0.0,
                 disk_cache_dir: str | None = None, disk_cache_gb: float = 0.0,
                 shared_cache: str | None = None, checkpoint=None,
                 **engine_kwargs):
        cfg = EngineConfig(
            model=model,
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                              kv_cache_memory_gb=kv_cache_memory_gb,
                              enable_prefix_caching=enable_prefix_caching,
                              host_cache_gb=host_cache_gb, disk_cache_dir=disk_cache_dir,
                              disk_cache_gb=disk_cache_gb, shared_cache=shared_cache),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                      max_num_seqs=max_num_seqs, chunked_prefill=chunked_prefill),
            **engine_kwargs,
        )
        self.engine = LLMEngine(cfg, checkpoint=checkpoint)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[CompletionOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        eng = self.engine
        # Validate everything before anything is queued, so a bad prompt loses nothing.
        encoded = [eng.encode(p) for p in prompts]
        ids = []
        try:
            for toks, sp in zip(encoded, params):
                ids.append(eng.add_request(toks, sp))
        except Exception:
            for rid in ids:
                eng.abort_request(rid)
            raise
        results: dict[str, CompletionOutput] = {}
        lps: dict[str, list] = {rid: [] for rid in ids}
        prompt_ids = dict(zip(ids, encoded))
        params_of = dict(zip(ids, params))
        while eng.has_unfinished():
            for o in eng.step():
                lps[o.request_id].extend(o.new_logprobs)
                if o.finished:
                    sp = params_of[o.request_id]
                    results[o.request_id] = CompletionOutput(
                        prompt_ids[o.request_id], o.token_ids, o.text, o.finish_reason, o.stop_reason,
                        lps[o.request_id] if sp.logprobs is not None else None, o.num_cached_tokens,
                    )
        return [results[rid] for rid in ids]

    def chat(self, conversations, params: SamplingParams | list[SamplingParams] | None = None) -> list[CompletionOutput]:
        """conversations: one list of {"role", "content"} messages, or a list of them."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.engine.apply_chat_template(c) for c in conversations], params)

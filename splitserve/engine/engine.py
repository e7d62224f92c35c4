"""LLMEngine: schedule -> run -> postprocess, one step at a time.

The deciding half is EngineCore (core.py: scheduler, KV manager, role operations, the forward
injected); this class gives it the real forward (ModelRunner), the sampler and the incremental
detokenizer. The same engine serves all three roles (SchedulerConfig.role); the disaggregated
runtime drives it through add_request / reserve / admit / release and reads the KV tensors
directly.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from splitserve.config import EngineConfig, ModelConfig
from splitserve.engine.core import EngineCore
from splitserve.engine.detokenizer import IncrementalDetokenizer
from splitserve.engine.runner import ModelRunner
from splitserve.engine.sampler import Sampler
from splitserve.engine.scheduler import ScheduledChunk
from splitserve.errors import IntegrityError, InvalidRequestError, StepFailed
from splitserve.kv.cache import KVCache, kv_bytes_per_block
from splitserve.kv.hashing import root_hash
from splitserve.model.layers import pick_linear_mode
from splitserve.model.loader import LoadedCheckpoint, build_model, load_checkpoint
from splitserve.request import Request, RequestStatus, SamplingParams
from splitserve.tokenization import PromptEncoder

# a forward of at least this many prompt tokens times what recomputing a block costs (smaller
# ones are mostly the fixed cost of a step)
PROMPT_TIMING_TOKENS = 64


@dataclass
class RequestOutput:
    """What one step produced for one request (deltas) plus the running totals."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "prefilled"
    stop_reason: int | str | None = None
    new_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None  # finish_reason "error": the step it was in failed (StepFailed)


@dataclass
class _ReqState:
    detok: IncrementalDetokenizer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' was asked for but CUDA is not available")
    return dev


class LLMEngine:
    """Not thread-safe: one thread drives it (add / abort between steps); a server queues
    requests and aborts and applies them before each step."""

    def __init__(self, config: EngineConfig | None = None, checkpoint: LoadedCheckpoint | None = None,
                 kv_allocator=None, **overrides):
        """`checkpoint`: weights already loaded by `load_checkpoint` (several engines in one
        process share one load); otherwise config.model is loaded. `kv_allocator(engine,
        num_blocks)`, when given, returns the KV pool tensor (e.g. in shared memory)."""
        config = config or EngineConfig(**overrides)
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = pick_device(config.device)
        self.dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
        ck = checkpoint or load_checkpoint(config.model, self.dtype)
        self.model_config: ModelConfig = ck.config
        self.tokenizer = ck.tokenizer
        self.prompts = PromptEncoder(ck.tokenizer, ck.config.vocab_size)
        self.model_path = ck.path
        mc = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise InvalidRequestError(
                f"max_model_len={self.max_model_len} exceeds the model's context of "
                f"{mc.max_position_embeddings} tokens"
            )
        self.model = build_model(ck, self.max_model_len, self.dtype, self.device)
        del ck
        self.linear_mode = pick_linear_mode(config.fast_linear, config.quantization, self.dtype, self.device)
        for lin in self.model.linears():
            lin.prepare(self.linear_mode)
        # The same switch turns on the fused C decode-step ops (bf16 CPU; a no-op elsewhere).
        self.fused_ops = self.model.enable_fused_ops(config.fast_linear)

        cc = config.cache
        per_block = kv_bytes_per_block(mc, cc.block_size, self.dtype)
        num_blocks = cc.num_blocks or max(1, int(cc.kv_cache_memory_gb * 2**30 // per_block))
        self.kv_cache = KVCache(mc, num_blocks, cc.block_size, self.dtype, self.device,
                                tensor=kv_allocator(self, num_blocks) if kv_allocator else None)
        eos = set(mc.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.core = EngineCore(config.scheduler, num_blocks, cc.block_size,
                               root_hash(self.model_id, cc.block_size, cc.hash_salt),
                               self.max_model_len, self.eos_token_ids, cc.enable_prefix_caching)
        self.kv_manager = self.core.kv
        self.kv_tiers = None
        # (tiers serve prefix hits only)
        if (cc.host_cache_gb > 0 or cc.shared_cache) and cc.enable_prefix_caching:
            from splitserve.kv.store_client import connect
            from splitserve.kv.tiers import KVTiers

            dram = max(1, int(cc.host_cache_gb * 2**30 // per_block)) if cc.host_cache_gb > 0 else 0
            self.kv_tiers = KVTiers(self.kv_cache, dram, cc.disk_cache_dir,
                                    int(cc.disk_cache_gb * 2**30 // per_block),
                                    connect(cc.shared_cache) if cc.shared_cache else None)
            self.kv_manager.attach_tiers(self.kv_tiers)
        self.scheduler = self.core.scheduler
        self.sampler = Sampler(self.device, config.seed)
        self.runner = ModelRunner(self.model, self.kv_cache, self.sampler, self.kv_manager.block_ids, self.device)
        self._states: dict[str, _ReqState] = {}
        self._ids = itertools.count()
        # Prefill role: called as (layer, chunks) once a layer's K/V of the step are in the cache.
        self.kv_layer_hook = None
        # called with each step's schedule before its forward (fault injection in tests); a
        # forward that raises fails that step's requests only (StepFailed), counted here
        self.before_forward = None
        self.step_errors = 0

    @property
    def model_id(self) -> str:
        """Identity of the weights for block hashes: file name, dtype and quantisation."""
        q = self.config.quantization or "none"
        return f"{self.model_config.name}|{self.config.dtype}|{q}"

    # -- prompts ---------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.prompts.encode(prompt)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.prompts.apply_chat_template(messages)

    # -- requests --------------------------------------------------------------------------
    def _new_request(self, prompt, params, request_id, arrival_time) -> Request:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        return Request(request_id, self.encode(prompt), params, arrival_time=arrival_time)

    def _track(self, req: Request) -> None:
        """Output state, created only once the scheduler has accepted the request (a refused
        duplicate id must not touch the live request's state)."""
        p = req.params
        self._states[req.request_id] = _ReqState(
            IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, p.stop,
                                   p.include_stop_str_in_output)
        )

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float = 0.0) -> str:
        req = self._new_request(prompt, params or SamplingParams(), request_id, arrival_time)
        self.core.add_request(req)
        self._track(req)
        return req.request_id

    def request_ids(self) -> list[str]:
        """The requests this engine holds (waiting, running, reserved or prefilled)."""
        return list(self._states)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.core.abort(request_id)
        self.sampler.forget(request_id)
        st = self._states.pop(request_id, None)
        if req is None or st is None:
            return None
        return RequestOutput(request_id, [], "", list(req.output_token_ids), st.detok.text, True, "abort")

    # decode role
    def reserve(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                arrival_time: float = 0.0) -> tuple[list[int], int] | None:
        """(block ids, leading blocks held already) or None: EngineCore.reserve."""
        req = self._new_request(prompt_token_ids, params, request_id, arrival_time)
        got = self.core.reserve(req)
        if got is not None:
            self._track(req)
        return got

    def admit(self, request_id: str, first_token: int, first_logprobs=None) -> RequestOutput:
        """The prompt's KV is in the reserved blocks; `first_token` (with its logprobs, when the
        request asked for them) was sampled by the prefill worker."""
        req = self.core.admit(request_id, first_token)
        # The prefill worker's generator drew the first token's noise: draw it here too, so a
        # seeded request samples the same tokens as it would in one engine.
        self.sampler.skip_draw(request_id, req.params, self.model_config.vocab_size)
        return self._postprocess(req, [first_logprobs] if first_logprobs is not None else [])

    # prefill role
    def release(self, request_id: str) -> None:
        self.core.release(request_id)

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        logprobs: dict = {}

        def forward(out) -> dict[str, int]:
            if self.before_forward is not None:
                self.before_forward(out)
            hook = self.kv_layer_hook
            t0 = time.perf_counter()
            res = self.runner.execute(out, None if hook is None else (lambda i: hook(i, out.chunks)))
            if self.kv_tiers is not None:  # (what recomputing a block costs, against loading it)
                prompt = sum(c.num_new_tokens for c in out.chunks
                             if c.start < c.request.num_prompt_tokens)
                if prompt >= PROMPT_TIMING_TOKENS:
                    self.kv_tiers.note_compute(prompt, time.perf_counter() - t0)
            logprobs.update(res.logprobs)
            return res.sampled

        try:
            now = time.monotonic() if self.scheduler.prefill_policy is not None else None
            out, stepped = self.core.step(forward, now)
        except StepFailed as e:  # the core aborted the step's requests; say so for each
            self.step_errors += 1
            return [self._output(r, [], []) for r in e.finished] + [
                o for r in e.requests if (o := self._failed_output(r, str(e))) is not None]
        # finished while scheduling (outgrew the KV pool): reported with no new token
        return [self._output(r, [], []) for r in out.finished] + [
            self._postprocess(r, [logprobs[r.request_id]] if r.request_id in logprobs else [])
            for r in stepped]

    def _failed_output(self, req: Request, error: str) -> RequestOutput | None:
        self.sampler.forget(req.request_id)
        st = self._states.pop(req.request_id, None)
        if st is None:
            return None
        return RequestOutput(req.request_id, [], "", list(req.output_token_ids), st.detok.text,
                             True, "error", error=error, num_prompt_tokens=req.num_prompt_tokens)

    def _postprocess(self, req: Request, logprobs: list) -> RequestOutput:
        """Detokenize the request's new token (finishing it on a stop string), then report."""
        tok = req.output_token_ids[-1]
        stop_str = self._states[req.request_id].detok.add(tok)
        if stop_str is not None and not req.is_finished:
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED,
                                          stop_reason=stop_str)
        return self._output(req, [tok], logprobs)

    def _output(self, req: Request, new_token_ids: list[int], logprobs: list) -> RequestOutput:
        """The request's output for this step; a finished request's state is dropped here."""
        rid = req.request_id
        st = self._states[rid]
        finished = req.is_finished
        o = RequestOutput(
            rid, new_token_ids, st.detok.take(finished), list(req.output_token_ids), st.detok.text,
            finished, req.status.value if finished else None, req.stop_reason, logprobs,
            req.num_prompt_tokens, req.num_cached_tokens,
        )
        if finished:
            self.sampler.forget(rid)
            del self._states[rid]
        return o

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> list[float]:
        """log p(token_i | tokens_<i) for i >= 1 (prompt logprobs), e.g. for perplexity.
        Runs outside the scheduler on blocks taken from (and returned to) the pool."""
        req = Request(f"score-{next(self._ids)}", self.encode(token_ids), SamplingParams(max_tokens=1))
        n = req.num_prompt_tokens
        if n < 2 or n > self.max_model_len:
            raise InvalidRequestError(f"score needs 2..{self.max_model_len} tokens, got {n}")
        if not self.kv_manager.allocate_slots(req, n):
            raise InvalidRequestError("not enough free KV blocks to score this sequence now")
        try:
            input_ids, positions, meta, _, _ = self.runner.build([ScheduledChunk(req, 0, n)])
            hidden = self.model(input_ids, positions, meta, self.kv_cache)
            out = []
            for start in range(0, n - 1, 256):  # bound the [rows, vocab] logits
                rows = hidden[start : min(n - 1, start + 256)]
                lp = torch.log_softmax(self.model.compute_logits(rows), dim=-1)
                nxt = input_ids[start + 1 : start + 1 + rows.shape[0]]
                out.extend(lp.gather(1, nxt[:, None]).squeeze(1).tolist())
            return out
        finally:
            self.kv_manager.free(req)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def check_integrity(self) -> None:
        self.core.check_integrity()
        lost = {r for r, req in self.scheduler.requests.items()
                if not req.is_finished and r not in self._states}
        if lost:
            raise IntegrityError(f"unfinished requests without output state: {sorted(lost)}")

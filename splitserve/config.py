"""The frozen configuration tree: model, cache, scheduler and engine configs.

Validated once, at construction; derived values are properties, never stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from splitserve.errors import InvalidRequestError, ModelLoadError

# HF `architectures[0]` / `model_type` values we implement, mapped to our feature flags.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

Role = Literal["colocated", "prefill", "decode"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder. Built from a Hugging Face config by `from_hf`."""

    architecture: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # bias on q/k/v (always for Qwen2; `attention_bias` for others)
    o_proj_bias: bool = False  # Llama and Qwen3 put `attention_bias` on o_proj too; Qwen2 not
    mlp_bias: bool = False  # Llama's `mlp_bias`: bias on gate, up and down
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head before RoPE
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # Llama-3 style, as sorted items
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    @classmethod
    def from_hf(cls, hf: Any, name: str = "model") -> ModelConfig:
        """From a transformers `PretrainedConfig` (or its dict)."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        archs = d.get("architectures") or []
        arch = None
        for a in archs:
            arch = SUPPORTED_ARCHITECTURES.get(a)
            if arch:
                break
        if arch is None:
            mt = d.get("model_type")
            arch = mt if mt in SUPPORTED_ARCHITECTURES.values() else None
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or d.get('model_type')!r}; splitserve supports "
                f"{sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"unsupported hidden_act {d['hidden_act']!r} (supported: silu)")
        window = _sliding_window(d, arch)
        if window:
            # A sliding window only changes attention past its length; we cap the context there.
            d = {**d, "max_position_embeddings": min(d.get("max_position_embeddings", window), window)}
        # What transformers' modules do, whatever the config says: Qwen2 always has q/k/v bias
        # and never o_proj bias; Mistral has none; Llama and Qwen3 follow `attention_bias` on all
        # four projections.
        attention_bias = {"qwen2": True, "mistral": False}.get(arch, bool(d.get("attention_bias")))
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        rope = d.get("rope_scaling") or None
        if rope is None and isinstance(d.get("rope_parameters"), dict):
            rp = d["rope_parameters"]
            if rp.get("rope_type", "default") != "default":
                rope = rp
        rope_theta = d.get("rope_theta")
        if rope_theta is None:
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        if rope is not None:
            rtype = rope.get("rope_type") or rope.get("type")
            if rtype in (None, "default"):
                rope = None
            elif rtype != "llama3":
                raise ModelLoadError(f"unsupported rope_scaling type {rtype!r} (supported: llama3)")
            else:
                rope = {k: v for k, v in rope.items() if k != "rope_theta"}
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=attention_bias and arch in ("llama", "qwen3"),
            mlp_bias=arch == "llama" and bool(d.get("mlp_bias")),
            qk_norm=arch == "qwen3",
            rope_scaling=tuple(sorted(rope.items())) if rope else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name,
        )


def _sliding_window(d: dict, arch: str) -> int | None:
    """The window if any layer attends through one, as transformers 5 decides it: `layer_types`
    when the config lists them; else Mistral always, Qwen2/3 only with `use_sliding_window` and
    only from layer `max_window_layers` on."""
    window = d.get("sliding_window")
    if not window:
        return None
    types = d.get("layer_types")
    if types:
        return window if "sliding_attention" in types else None
    if arch == "mistral":
        return window
    if d.get("use_sliding_window") and d.get("max_window_layers", 0) < d["num_hidden_layers"]:
        return window
    return None


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Number of KV blocks; None sizes the pool from `kv_cache_memory_gb`.
    num_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    enable_prefix_caching: bool = True
    # Mixed into the root of every block hash, so that two deployments that must not share
    # cache entries (other weights, other tenants) never collide.
    hash_salt: str = ""
    # Tiers below the pool (kv/tiers.py): blocks the pool evicts are kept in host DRAM (this
    # many GiB; 0 = none), and what DRAM evicts in files under `disk_cache_dir` (up to
    # `disk_cache_gb` GiB; the directory is this engine's own).
    host_cache_gb: float = 0.0
    disk_cache_dir: str | None = None
    disk_cache_gb: float = 0.0
    # The shared tier: "host:port" of a KV store (kv/store.py), or "mooncake://host:port"
    # of a Mooncake Store master (kv/store_mooncake.py), every worker puts the blocks it
    # computes into and loads blocks from (None: no shared tier).
    shared_cache: str | None = None

    def __post_init__(self):
        if self.shared_cache is not None:
            from splitserve.kv.store_client import check_addr

            try:
                check_addr(self.shared_cache)
            except ValueError as e:
                raise InvalidRequestError(f"shared_cache: {e}") from None
        if self.host_cache_gb < 0 or self.disk_cache_gb < 0:
            raise InvalidRequestError("host_cache_gb and disk_cache_gb must be >= 0")
        if self.disk_cache_gb > 0 and (not self.disk_cache_dir or self.host_cache_gb <= 0):
            raise InvalidRequestError("a disk KV tier needs disk_cache_dir and a DRAM tier "
                                      "(host_cache_gb > 0) above it")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise InvalidRequestError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise InvalidRequestError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # the per-step token budget
    max_num_seqs: int = 64
    # True: Sarathi-style (running decodes first, then prompt chunks that fill the budget).
    # False: vLLM-v0-style prefill priority: whole prompts first, decodes wait for them.
    chunked_prefill: bool = True
    role: Role = "colocated"
    # Chunked mode: a step that also decodes prefills at most this many prompt tokens (None:
    # the whole budget). A decode worker's own prefills use it to keep its decode steps short.
    # A tuple: the cap when 0, 1, 2, ... requests decode (the last entry for more; the first
    # applies with nothing decoding too), as serve --local-prefill slo sizes it to the TPOT SLO.
    prefill_chunk_while_decoding: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.role not in ("colocated", "prefill", "decode"):
            raise InvalidRequestError(f"role must be colocated, prefill or decode, got {self.role!r}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_batched_tokens and max_num_seqs must be >= 1")
        cap = self.prefill_chunk_while_decoding
        if isinstance(cap, tuple):
            # >= 1: a 0 would stop a prompt already under way for as long as decodes last
            if not cap or any(not isinstance(c, int) or c < 1 for c in cap):
                raise InvalidRequestError("prefill_chunk_while_decoding: a tuple of token counts "
                                          f">= 1, one per number of decodes, got {cap!r}")
        elif cap is not None and cap < 1:
            raise InvalidRequestError("prefill_chunk_while_decoding must be >= 1 (or None)")

    def prefill_cap(self, decoding: int) -> int | None:
        """The prompt tokens a step with `decoding` decodes may add (None: the whole budget)."""
        cap = self.prefill_chunk_while_decoding
        if isinstance(cap, tuple):
            return cap[min(decoding, len(cap) - 1)]
        return cap if decoding else None


@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"  # "default", a HF model directory, or a .gguf file
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    device: str = "auto"  # "auto" picks cuda when present
    quantization: Literal[None, "int8"] = None
    # The fast CPU path: prepacked oneDNN linears (and the int8 kernel). Off = plain F.linear.
    fast_linear: bool = True
    num_threads: int | None = None
    max_model_len: int | None = None  # None: the model's context length
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float32"):
            raise InvalidRequestError(f"dtype must be bfloat16 or float32, got {self.dtype!r}")
        if self.quantization not in (None, "int8"):
            raise InvalidRequestError(f"quantization must be None or 'int8', got {self.quantization!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise InvalidRequestError(f"num_threads must be >= 1, got {self.num_threads}")

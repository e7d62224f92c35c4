"""Transformer shapes the simulator sizes KV pools, weights and FLOPs from.

Each entry is transcribed from the model's Hugging Face `config.json` (named beside it), not
estimated; `tests/test_sim_latency.py` checks the derived parameter counts against the sizes
the model cards publish.

Counted per decoder layer (T tokens through the layer, q = num_heads·head_dim,
kv = num_kv_heads·head_dim, h = hidden_size, i = intermediate_size):

    attention   q/k/v/o projections   h·(q + 2kv) + q·h        weights
    MLP         gated (SwiGLU): gate, up, down = 3·h·i; OPT (ReLU): fc1, fc2 = 2·h·i
    attention   causal: new token t (position p) attends to p + 1 tokens, 4·q FLOPs per pair
                (2·head_dim for QK^T and 2·head_dim for PV, per head)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool  # Llama/Qwen SwiGLU: 3 MLP matrices; OPT: 2 (ReLU)
    tie_word_embeddings: bool  # the LM head is the embedding matrix (stored once)
    max_context: int
    # Only for exact parameter counts (they add no matmul FLOPs worth counting):
    qkv_bias: bool = False  # Qwen2, OPT
    dense_bias: bool = False  # OPT: out_proj, fc1 and fc2 biases too
    norm_bias: bool = False  # OPT's LayerNorm has a bias; RMSNorm does not
    position_embeddings: int = 0  # OPT's learned table: max_context + 2 rows

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one decoder layer's matrices (what a token's linears multiply by)."""
        h = self.hidden_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return attn + mlp

    @property
    def layer_params(self) -> int:
        h = self.hidden_size
        bias = (self.q_size + 2 * self.kv_size) if self.qkv_bias else 0
        if self.dense_bias:
            bias += h + self.intermediate_size + h  # out_proj, fc1, fc2
        norms = 2 * h * (2 if self.norm_bias else 1)
        return self.layer_matmul_params + bias + norms

    @property
    def lm_head_params(self) -> int:
        """The vocab × hidden matrix the last hidden state is multiplied by (shared or not)."""
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        h = self.hidden_size
        embeddings = (self.vocab_size + self.position_embeddings) * h
        final_norm = h * (2 if self.norm_bias else 1)
        lm_head = 0 if self.tie_word_embeddings else self.lm_head_params
        return self.num_layers * self.layer_params + embeddings + final_norm + lm_head

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.num_params * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of one token, all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    @property
    def linear_flops_per_token(self) -> int:
        """Matmul FLOPs of one token through all decoder layers (the LM head apart: it runs
        only for the rows that sample, see `lm_head_flops_per_token`)."""
        return 2 * self.num_layers * self.layer_matmul_params

    @property
    def lm_head_flops_per_token(self) -> int:
        return 2 * self.lm_head_params

    def attention_flops(self, new_tokens: int, context: int = 0) -> int:
        """Causal attention FLOPs, all layers, for `new_tokens` tokens after `context` cached
        ones: token k (0-based) of the chunk attends to context + k + 1 tokens.
        A decode is attention_flops(1, ctx): ctx + 1 attended tokens."""
        return 4 * self.q_size * self.num_layers * attended_pairs(new_tokens, context)


def attended_pairs(new_tokens: int, context: int = 0) -> int:
    """(query, key) pairs of a causal chunk: Σ_{k<l} (s + k + 1) = l·s + l·(l + 1)/2."""
    return new_tokens * context + new_tokens * (new_tokens + 1) // 2


def _llama(name: str, **shape) -> ModelShape:
    # Llama-style: SwiGLU MLP, RMSNorm, rotary positions, untied LM head unless stated.
    return ModelShape(name, gated_mlp=True, **{"tie_word_embeddings": False, **shape})


def _opt(name: str, num_layers: int, hidden_size: int, num_heads: int) -> ModelShape:
    # OPT: MHA, FFN 4h, ReLU, vocab 50272, 2048 positions (a learned table of 2048 + 2 rows),
    # LM head tied to the embeddings, biases on every linear and LayerNorm.
    return ModelShape(
        name,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden_size // num_heads,
        intermediate_size=4 * hidden_size,
        vocab_size=50272,
        gated_mlp=False,
        tie_word_embeddings=True,
        max_context=2048,
        qkv_bias=True,
        dense_bias=True,
        norm_bias=True,
        position_embeddings=2050,
    )


# Each from the model's Hugging Face config.json (the repository named in the comment).
MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        # HuggingFaceTB/SmolLM2-135M
        _llama(
            "SmolLM2-135M",
            num_layers=30,
            hidden_size=576,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
            intermediate_size=1536,
            vocab_size=49152,
            tie_word_embeddings=True,
            max_context=8192,
        ),
        # facebook/opt-13b, facebook/opt-66b (ffn_dim = 4 · hidden_size)
        _opt("OPT-13B", num_layers=40, hidden_size=5120, num_heads=40),
        _opt("OPT-66B", num_layers=64, hidden_size=9216, num_heads=72),
        # meta-llama/Llama-3.1-8B
        _llama(
            "Llama-3.1-8B",
            num_layers=32,
            hidden_size=4096,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            intermediate_size=14336,
            vocab_size=128256,
            max_context=131072,
        ),
        # meta-llama/Llama-3.1-70B
        _llama(
            "Llama-3.1-70B",
            num_layers=80,
            hidden_size=8192,
            num_heads=64,
            num_kv_heads=8,
            head_dim=128,
            intermediate_size=28672,
            vocab_size=128256,
            max_context=131072,
        ),
        # Qwen/Qwen2.5-7B (base; the -Instruct config says 32768 positions, YaRN to 128K)
        _llama(
            "Qwen2.5-7B",
            num_layers=28,
            hidden_size=3584,
            num_heads=28,
            num_kv_heads=4,
            head_dim=128,
            intermediate_size=18944,
            vocab_size=152064,
            max_context=131072,
            qkv_bias=True,
        ),
    )
}


def get_model(name: str) -> ModelShape:
    """A model by name, case-insensitive; an organisation prefix ("facebook/opt-13b") is
    accepted."""
    key = name.strip().rsplit("/", 1)[-1].lower()
    for model in MODELS.values():
        if model.name.lower() == key:
            return model
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")

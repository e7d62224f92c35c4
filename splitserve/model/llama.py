"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) over a paged KV cache.

Inputs are one flat batch of T tokens (see attention/metadata.py for the layout):
input_ids [T], positions [T]. Q/K/V and gate/up projections are fused into one matmul each.
Logits are computed only for the rows that are sampled (`compute_logits`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.attention.backends import get_backend
from splitserve.attention.metadata import AttentionMetadata
from splitserve.config import ModelConfig
from splitserve.kv.cache import KVCache
from splitserve.model.layers import Linear, RMSNorm, RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, mc: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hd = mc.num_heads, mc.num_kv_heads, mc.head_dim
        self.qkv_proj = Linear(mc.hidden_size, mc.q_size + 2 * mc.kv_size, bias=mc.attention_bias)
        self.o_proj = Linear(mc.q_size, mc.hidden_size, bias=mc.o_proj_bias)
        if mc.qk_norm:
            self.q_norm = RMSNorm(mc.head_dim, mc.rms_norm_eps)
            self.k_norm = RMSNorm(mc.head_dim, mc.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, rope_cs, meta: AttentionMetadata, cache: KVCache, attn_fn):
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = q.view(T, self.nh, self.hd)
        k = k.view(T, self.nkv, self.hd)
        v = v.view(T, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = RotaryEmbedding.apply(q, k, *rope_cs)
        # Write every token's K/V before any sequence attends: a chunk reads its own K/V back.
        cache.write(self.layer_idx, k, v, meta.slot_mapping)
        k_cache, v_cache = cache.layer(self.layer_idx)
        o = attn_fn(q, k, v, meta, k_cache, v_cache)
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, mc: ModelConfig):
        super().__init__()
        self.inter = mc.intermediate_size
        self.gate_up_proj = Linear(mc.hidden_size, 2 * mc.intermediate_size, bias=mc.mlp_bias)
        self.down_proj = Linear(mc.intermediate_size, mc.hidden_size, bias=mc.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, mc: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(mc.hidden_size, mc.rms_norm_eps)
        self.self_attn = Attention(mc, layer_idx)
        self.post_attention_layernorm = RMSNorm(mc.hidden_size, mc.rms_norm_eps)
        self.mlp = MLP(mc)

    def forward(self, h, rope_cs, meta, cache, attn_fn):
        h = h + self.self_attn(self.input_layernorm(h), rope_cs, meta, cache, attn_fn)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, mc: ModelConfig, max_positions: int, attention_backend: str = "sdpa"):
        super().__init__()
        self.config = mc
        self.embed_tokens = nn.Embedding(mc.vocab_size, mc.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(mc, i) for i in range(mc.num_layers))
        self.norm = RMSNorm(mc.hidden_size, mc.rms_norm_eps)
        self.lm_head = Linear(mc.hidden_size, mc.vocab_size)
        self.rope = RotaryEmbedding(mc.head_dim, max_positions, mc.rope_theta, mc.rope_scaling_dict)
        self.attn_fn = get_backend(attention_backend)

        self.fused = False  # the C decode-step ops (kernels/ops.c); see enable_fused_ops

    def set_attention_backend(self, name: str) -> None:
        self.attn_fn = get_backend(name)

    def enable_fused_ops(self, enable: bool = True) -> bool:
        """Run each layer through the fused C ops (add+RMSNorm, RoPE+KV write, SiLU*up, paged
        decode attention) instead of ~50 small PyTorch ops: on CPU in bf16, for models without
        q/k norms, when the ops compile. Returns whether they are on."""
        from splitserve.kernels import ops

        w = self.embed_tokens.weight
        self.fused = bool(enable and w.device.type == "cpu" and w.dtype == torch.bfloat16
                          and not self.config.qk_norm and ops.available())
        self.set_attention_backend("fused" if self.fused else "sdpa")
        self.__dict__.pop("_plan", None)  # rebuilt from the current weights on the next step
        return self.fused

    @torch.inference_mode()
    def forward(self, input_ids, positions, meta: AttentionMetadata, cache: KVCache,
                on_layer=None) -> torch.Tensor:
        """on_layer(i), when given, is called as soon as layer i's K/V are in the cache (the
        prefill worker hands them to the decode worker while the next layers compute)."""
        if self.fused:
            return self._forward_fused(input_ids, positions, meta, cache, on_layer)
        h = self.embed_tokens(input_ids)
        rope_cs = self.rope.tables(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope_cs, meta, cache, self.attn_fn)
            if on_layer is not None:
                on_layer(i)
        return self.norm(h)

    def _forward_fused(self, input_ids, positions, meta: AttentionMetadata, cache: KVCache,
                       on_layer=None):
        """The same arithmetic as forward(), in bf16, with the residual stream h updated in
        place: each norm call first adds the previous sub-layer's output (delta) to h."""
        from splitserve.kernels import ops

        mc = self.config
        nh, nkv, hd = mc.num_heads, mc.num_kv_heads, mc.head_dim
        eps = mc.rms_norm_eps
        attn_fn, cos, sin, slots = self.attn_fn, self.rope.cos, self.rope.sin, meta.slot_mapping
        h = self.embed_tokens(input_ids)
        T = h.shape[0]
        x = torch.empty_like(h)
        delta = None
        # Linear.forward is called directly: nn.Module's __call__ and attribute lookups cost
        # ~2 us each, ~0.3 ms of a ~13 ms batch-1 step
        for i, (ln1, qkv_proj, o_proj, ln2, gate_up, down) in enumerate(self._fused_plan()):
            ops.add_rmsnorm(h, delta, ln1, x, eps)
            qkv = qkv_proj(x)
            k_cache, v_cache = cache.layer(i)
            ops.rope_write_kv(qkv, positions, cos, sin, k_cache, v_cache, slots, nh, nkv, hd)
            if on_layer is not None:
                on_layer(i)
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            o = attn_fn(q.view(T, nh, hd), k.view(T, nkv, hd), v.view(T, nkv, hd), meta,
                        k_cache, v_cache)
            delta = o_proj(o)
            ops.add_rmsnorm(h, delta, ln2, x, eps)
            delta = down(ops.silu_mul(gate_up(x)))
        ops.add_rmsnorm(h, delta, self.norm.weight, x, eps)
        return x

    def _fused_plan(self):
        plan = self.__dict__.get("_plan")
        if plan is None:
            plan = [(layer.input_layernorm.weight.data, layer.self_attn.qkv_proj.forward,
                     layer.self_attn.o_proj.forward, layer.post_attention_layernorm.weight.data,
                     layer.mlp.gate_up_proj.forward, layer.mlp.down_proj.forward)
                    for layer in self.layers]
            self.__dict__["_plan"] = plan
        return plan

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] (only the rows to sample) -> fp32 logits [N, V]."""
        return self.lm_head(hidden).float()

    def linears(self):
        return [m for m in self.modules() if isinstance(m, Linear)]

    def weight_bytes_per_token_step(self) -> int:
        """Bytes of weights one forward step reads (all linears incl. lm_head; embeddings are
        a row lookup)."""
        total = 0
        for m in self.linears():
            if m.mode == "int8":
                total += m._packed.numel() + m._scales.numel() * m._scales.element_size()
            else:
                total += m.weight.numel() * m.weight.element_size()
        return total

"""What attention needs to know about one step's flat batch of tokens.

The step's T tokens are laid out decodes first, then prefill chunks:

    [ d_0 d_1 ... d_{B-1} | p_0 chunk ......... | p_1 chunk ...... ]
      one token per seq     tokens [ctx-q, ctx) of seq p_i (q = q_len, ctx = context length)

A "decode" is any sequence with one new token (also the last token of a prompt); its context
is every token up to and including it. Built once per step by the runner and shared by all
layers, so per-layer work is only tensor ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSeq:
    q_start: int  # offset of the chunk in the flat batch
    q_len: int
    ctx_len: int  # tokens of context including this chunk (= position of last token + 1)
    block_ids: torch.Tensor  # [ceil(ctx_len / block_size)] int64
    # [q_len, ctx_len] bool, True = may attend; None when the chunk is the whole context
    # (plain causal attention on the fresh K/V, no cache read).
    mask: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each token
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] int64 (padded with 0)
    decode_context_lens: torch.Tensor | None = None  # [B] int64
    decode_max_len: int = 0  # max_blocks * block_size
    # [B, 1, 1, max_len] bool, True = valid key; None when every row is full length
    decode_mask: torch.Tensor | None = None
    prefills: list[PrefillSeq] = field(default_factory=list)
    # context lengths as plain ints, for the reference backend
    decode_context_lens_list: list[int] = field(default_factory=list)
    decode_block_ids_list: list[list[int]] = field(default_factory=list)

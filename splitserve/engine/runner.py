"""Turns a SchedulerOutput into tensors, runs the model, samples.

Flat batch layout (see attention/metadata.py): chunks with one new token (decodes) first, then
prompt chunks. Only rows whose chunk reaches the request's last token are sent through the LM
head and sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.attention.metadata import AttentionMetadata, PrefillSeq
from splitserve.engine.sampler import Sampler, SampleResult
from splitserve.engine.scheduler import ScheduledChunk, SchedulerOutput
from splitserve.kv.cache import KVCache
from splitserve.model.llama import LlamaModel


@dataclass
class StepResult:
    sampled: dict[str, int]
    logprobs: dict[str, tuple]
    num_tokens: int


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache, sampler: Sampler, block_ids_of, device):
        self.model = model
        self.cache = cache
        self.sampler = sampler
        self.block_ids_of = block_ids_of  # request_id -> list[int]
        self.device = device
        self.block_size = cache.block_size

    def build(self, chunks: list[ScheduledChunk]):
        bs = self.block_size
        decodes = [c for c in chunks if c.num_new_tokens == 1]
        prefills = [c for c in chunks if c.num_new_tokens > 1]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_chunks: list[ScheduledChunk] = []
        meta = AttentionMetadata(slot_mapping=None)  # filled below
        dev = self.device

        tables = []
        for c in decodes:
            req, p = c.request, c.start
            blocks = self.block_ids_of(req.request_id)
            ids.append(req.token_at(p))
            pos.append(p)
            slots.append(blocks[p // bs] * bs + p % bs)
            if c.sample:
                sample_rows.append(len(ids) - 1)
                sample_chunks.append(c)
            n_blocks = (p + 1 + bs - 1) // bs
            tables.append(blocks[:n_blocks])
            meta.decode_context_lens_list.append(p + 1)
        if decodes:
            B = len(decodes)
            max_blocks = max(len(t) for t in tables)
            meta.num_decode = B
            meta.decode_block_ids_list = tables
            meta.decode_block_tables = torch.tensor(
                [t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.long, device=dev
            )
            lens = meta.decode_context_lens_list
            meta.decode_max_len = max_blocks * bs
            if not (B == 1 or all(n == meta.decode_max_len for n in lens)):
                lens_t = torch.tensor(lens, device=dev)
                meta.decode_mask = (
                    torch.arange(meta.decode_max_len, device=dev)[None, :] < lens_t[:, None]
                ).view(B, 1, 1, -1)
            meta.decode_context_lens = torch.tensor(lens, device=dev)

        for c in prefills:
            req, start, n = c.request, c.start, c.num_new_tokens
            blocks = self.block_ids_of(req.request_id)
            q_start = len(ids)
            toks = req.all_token_ids[start : start + n]
            ids.extend(toks)
            pos.extend(range(start, start + n))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            ctx = start + n
            n_blocks = (ctx + bs - 1) // bs
            mask = None
            if start > 0:
                q_pos = torch.arange(start, ctx, device=dev)
                mask = torch.arange(ctx, device=dev)[None, :] <= q_pos[:, None]
            meta.prefills.append(
                PrefillSeq(q_start, n, ctx, torch.tensor(blocks[:n_blocks], dtype=torch.long, device=dev), mask)
            )
            if c.sample:
                sample_rows.append(len(ids) - 1)
                sample_chunks.append(c)

        meta.slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        return input_ids, positions, meta, sample_rows, sample_chunks

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, on_layer=None) -> StepResult:
        input_ids, positions, meta, rows, sample_chunks = self.build(out.chunks)
        hidden = self.model(input_ids, positions, meta, self.cache, on_layer)
        sampled: dict[str, int] = {}
        logprobs: dict[str, tuple] = {}
        if rows:
            if len(rows) == hidden.shape[0]:
                h = hidden
            else:
                h = hidden.index_select(0, torch.tensor(rows, device=hidden.device))
            logits = self.model.compute_logits(h)
            rids = [c.request.request_id for c in sample_chunks]
            res: SampleResult = self.sampler.sample(logits, rids, [c.request.params for c in sample_chunks])
            for rid, tok, lp in zip(rids, res.token_ids, res.logprobs):
                sampled[rid] = tok
                if lp is not None:
                    logprobs[rid] = lp
        return StepResult(sampled, logprobs, int(input_ids.shape[0]))

"""The KV tensors behind the block pool.

One tensor holds every layer:   kv[layer, 0|1 (k|v), block, slot in block, kv head, head dim]

A token's slot is block_id * block_size + offset; writing a layer's new K/V is one index_copy_.
The whole pool is one contiguous allocation so that a later transfer backend can put it in
shared memory (or register it with an RDMA engine) and write a layer's blocks in place.
"""

from __future__ import annotations

import torch

from splitserve.config import ModelConfig


def kv_bytes_per_block(mc: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return mc.num_layers * 2 * block_size * mc.num_kv_heads * mc.head_dim * elem


class KVCache:
    def __init__(self, mc: ModelConfig, num_blocks: int, block_size: int, dtype, device, tensor=None):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (mc.num_layers, 2, num_blocks, block_size, mc.num_kv_heads, mc.head_dim)
        if tensor is None:
            tensor = torch.zeros(shape, dtype=dtype, device=device)
        elif tuple(tensor.shape) != shape:
            raise ValueError(f"KV tensor has shape {tuple(tensor.shape)}, expected {shape}")
        self.kv = tensor

    def adopt(self, tensor: torch.Tensor) -> None:
        """Move the pool into `tensor` (e.g. shared memory) before any KV is written."""
        if tensor.shape != self.kv.shape or tensor.dtype != self.kv.dtype:
            raise ValueError(f"KV tensor {tuple(tensor.shape)} {tensor.dtype} does not match "
                             f"{tuple(self.kv.shape)} {self.kv.dtype}")
        self.kv = tensor

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """k, v: [T, Hkv, D] for the step's T tokens; slot_mapping: [T]."""
        nkv, d = k.shape[-2:]
        self.kv[layer, 0].view(-1, nkv, d).index_copy_(0, slot_mapping, k)
        self.kv[layer, 1].view(-1, nkv, d).index_copy_(0, slot_mapping, v)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer: [num_blocks, block_size, Hkv, D] each."""
        return self.kv[layer, 0], self.kv[layer, 1]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

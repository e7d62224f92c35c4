"""Chained block hashes, identical in every process and on every machine.

    hash(block i) = blake2b-128( hash(block i-1) || tokens of block i as little-endian uint32 )
    hash(block -1) = root = blake2b-128( "splitserve/v1" | model id | block size | salt )

Same tokens, same block size, same model (and salt) give the same bytes everywhere: Python's
`hash()` is salted per process and is never used. The router's prefix index, the prefill cache and
the decode cache compare these hashes directly. Only full blocks are hashed.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

DIGEST_SIZE = 16


def root_hash(model_id: str, block_size: int, salt: str = "") -> bytes:
    key = f"splitserve/v1|{model_id}|{block_size}|{salt}".encode()
    return hashlib.blake2b(key, digest_size=DIGEST_SIZE).digest()


def hash_block(parent: bytes, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=DIGEST_SIZE)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.digest()


def extend_block_hashes(
    hashes: list[bytes], tokens: Sequence[int], block_size: int, root: bytes
) -> list[bytes]:
    """Append to `hashes` (the chain of `tokens`' first len(hashes) blocks) the hashes of the
    remaining full blocks of `tokens`; returns `hashes`."""
    parent = hashes[-1] if hashes else root
    start = len(hashes) * block_size
    end = start + (len(tokens) - start) // block_size * block_size
    if end <= start:
        return hashes
    # one pack for every new block (hash_block's bytes, block by block)
    buf = memoryview(struct.pack(f"<{end - start}I", *tokens[start:end]))
    step = 4 * block_size
    blake2b = hashlib.blake2b
    for i in range(0, len(buf), step):
        h = blake2b(parent, digest_size=DIGEST_SIZE)
        h.update(buf[i : i + step])
        parent = h.digest()
        hashes.append(parent)
    return hashes


def block_hashes(tokens: Sequence[int], block_size: int, root: bytes) -> list[bytes]:
    return extend_block_hashes([], tokens, block_size, root)

"""Weights the kernels stream, placed in transparent huge pages.

The CPU's hardware prefetchers stop at every 4 KiB page boundary, so a weight stream over
4 KiB pages keeps restarting: the bf16 decode kernel reads ~25 GB/s from 4 KiB pages and ~31
GB/s from 2 MiB pages (Zen 4, one thread, 262 MB of weights). With THP in "madvise" mode (the
common default) memory gets huge pages only when asked, before it is first touched, in
2 MiB-aligned runs; most of a model's matrices are smaller than 2 MiB, so they are packed one
after another into shared 64 MiB mappings (a bump allocator; a mapping is freed when the last
tensor in it is). SPLITSERVE_HUGEPAGES=0 turns this off (plain torch.empty).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading

import torch

HUGE = 2 << 20
CHUNK = 64 << 20
ALIGN = 64

_lock = threading.Lock()
_chunk: mmap.mmap | None = None
_next = _end = 0


def enabled() -> bool:
    return os.environ.get("SPLITSERVE_HUGEPAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")


def _mapping(nbytes: int) -> tuple[mmap.mmap, int]:
    """An anonymous mapping advised for huge pages, and the offset of its first 2 MiB line."""
    # private: a shared anonymous mapping is shmem, whose THP setting is usually "never"
    mm = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    return mm, -addr % HUGE


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Like torch.empty(shape, dtype=dtype) on the CPU, 64-byte aligned, in huge pages when
    enabled(); the tensor keeps its mapping alive."""
    global _chunk, _next, _end
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    if not enabled() or nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    size = -(-nbytes // ALIGN) * ALIGN
    with _lock:
        if size > CHUNK // 4:
            mm, off = _mapping(size)
        else:
            if _chunk is None or _next + size > _end:
                _chunk, _next = _mapping(CHUNK)
                _end = _next + CHUNK
            mm, off = _chunk, _next
            _next += size
    raw = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=off)
    return raw.view(dtype).view(shape)

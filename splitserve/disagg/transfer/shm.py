"""shm: the decode worker's whole KV pool lives in a shared-memory file; a prefill worker on the
same host maps it and copies each computed layer straight into the reserved blocks (no staging,
no socket for the bytes; only the small Done/Fence notices go over the data channel).

The file starts with a header (magic, header length, JSON of the KV spec and pool shape) so that
a prefill worker that maps it checks it agrees with what the decode worker announced.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import time
import uuid

import msgspec
import torch
import zmq

from splitserve.disagg import messages as M
from splitserve.disagg.transfer.base import TransferError
from splitserve.disagg.transfer.channel import ChannelSender, SenderChannel
from splitserve.kv.cache import KVCache

MAGIC = b"SPLITSERVE-KV\0\0\0"
HEADER = 4096  # the tensor starts page-aligned after the header
SHM_DIR = "/dev/shm"

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _pool_shape(spec: M.KVSpec, num_blocks: int) -> tuple[int, ...]:
    return (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)


def _file_bytes(spec: M.KVSpec, num_blocks: int) -> int:
    """Header + pool."""
    elem = torch.empty(0, dtype=_DTYPES[spec.dtype]).element_size()
    return HEADER + torch.Size(_pool_shape(spec, num_blocks)).numel() * elem


def _map(path: str, spec: M.KVSpec, num_blocks: int) -> torch.Tensor:
    """Map the pool with every page populated up front: a first touch costs a page fault
    (~2-5 us per 4 KiB), which on a fresh pool made the hand-over of a 1k-token prompt 3-4x
    slower than the copy itself."""
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, _file_bytes(spec, num_blocks), flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)
    whole = torch.frombuffer(mm, dtype=torch.uint8)  # keeps `mm` alive as long as the tensor
    return whole[HEADER:].view(_DTYPES[spec.dtype]).view(_pool_shape(spec, num_blocks))


MAX_RUNS = 4  # more runs than this: one gather + one scatter instead of slice copies


def copy_blocks(dst: torch.Tensor, dst_ids: list[int], src: torch.Tensor, src_ids: list[int]) -> None:
    """dst[:, d] = src[:, s] for each pair, over [2, blocks, ...] views of one layer. Runs
    that are consecutive on both sides (the block pool mostly hands out runs) go as slice
    copies; a scattered list as one gather + one scatter (a Python loop of small copies
    would cost ~8 us per block)."""
    runs, i, n = [], 0, len(src_ids)
    while i < n and len(runs) <= MAX_RUNS:
        j = i + 1
        while j < n and src_ids[j] == src_ids[j - 1] + 1 and dst_ids[j] == dst_ids[j - 1] + 1:
            j += 1
        runs.append((src_ids[i], dst_ids[i], j - i))
        i = j
    if len(runs) > MAX_RUNS:
        s = torch.tensor(src_ids, dtype=torch.long, device=src.device)
        dst.index_copy_(1, torch.tensor(dst_ids, dtype=torch.long), src.index_select(1, s).cpu())
        return
    for s0, d0, k in runs:
        dst[:, d0:d0 + k].copy_(src[:, s0:s0 + k])


def remove_stale_pools(directory: str = SHM_DIR) -> None:
    """Unlink pool files whose decode worker (the pid in the name) is gone: a worker that was
    killed cannot unlink its own."""
    import glob

    for path in glob.glob(os.path.join(directory, "splitserve-kv-*")):
        try:
            pid = int(os.path.basename(path).split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(path)
        except (ValueError, IndexError, PermissionError):
            pass


def create_pool(spec: M.KVSpec, num_blocks: int, directory: str = SHM_DIR) -> tuple[str, torch.Tensor]:
    """Decode worker: a new zero-filled pool file; returns its path and the mapped tensor."""
    if not os.path.isdir(directory):
        raise TransferError(f"shared-memory directory {directory} does not exist (use --kv-transport tcp)")
    remove_stale_pools(directory)
    path = os.path.join(directory, f"splitserve-kv-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    header = json.dumps({"kv": msgspec.structs.asdict(spec), "num_blocks": num_blocks}).encode()
    if len(MAGIC) + 4 + len(header) > HEADER:
        raise TransferError("KV spec too long for the shared-memory header")
    nbytes = _file_bytes(spec, num_blocks)
    try:
        # 0600: the pool holds every prompt's KV; only this user's workers may map it
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(MAGIC + len(header).to_bytes(4, "little") + header)
            f.truncate(nbytes)
    except OSError as e:
        raise TransferError(f"cannot create a {nbytes / 2**30:.2f} GiB KV pool in {directory}: {e} "
                            "(too small a /dev/shm? use --kv-transport tcp)") from e
    return path, _map(path, spec, num_blocks)


def attach_pool(path: str, spec: M.KVSpec, num_blocks: int) -> torch.Tensor:
    """Prefill worker: map a decode worker's pool after checking its header."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
    except OSError as e:
        raise TransferError(f"cannot open the decode worker's KV pool {path}: {e} "
                            "(is it on another host? use --kv-transport tcp)") from e
    if not head.startswith(MAGIC):
        raise TransferError(f"{path} is not a splitserve KV pool")
    n = int.from_bytes(head[len(MAGIC):len(MAGIC) + 4], "little")
    meta = json.loads(head[len(MAGIC) + 4:len(MAGIC) + 4 + n])
    theirs = M.KVSpec(**meta["kv"])
    mismatch = spec.mismatch(theirs)
    if mismatch or meta["num_blocks"] != num_blocks:
        raise TransferError(f"KV pool {path} does not match: {mismatch or 'num_blocks differs'}")
    return _map(path, spec, num_blocks)


class ShmSender(ChannelSender):
    transport = "shm"

    def __init__(self, ctx: zmq.Context, sender_id: str, peer: M.DecodePeer, spec: M.KVSpec,
                 cache: KVCache):
        super().__init__()
        if not peer.shm_path:
            raise TransferError(f"decode worker {peer.worker_id} has no shared-memory KV pool")
        self.cache = cache
        self.channel = SenderChannel(ctx, sender_id, peer, spec, self.transport)
        try:
            self.remote = attach_pool(peer.shm_path, spec, peer.num_blocks)
        except TransferError:
            self.channel.close()
            raise

    def write_layer(self, request_id, layer, src_block_ids, dst_block_ids) -> int:
        t0 = time.perf_counter()
        # [2, blocks, block, heads, dim] on both sides: straight from our pool into theirs
        src = self.cache.kv[layer]
        copy_blocks(self.remote[layer], dst_block_ids, src, src_block_ids)
        n = len(src_block_ids) * src[:, 0].numel() * src.element_size()
        self.bytes_sent += n
        self.seconds += time.perf_counter() - t0
        return n

    def close(self) -> None:
        super().close()
        self.remote = None

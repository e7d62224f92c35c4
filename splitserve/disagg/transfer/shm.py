"""shm: the decode worker's whole KV pool lives in a shared-memory file; a prefill worker on the
same host maps it and copies each computed layer straight into the reserved blocks (no staging,
no socket for the bytes; only the small Done/Fence notices go over the data channel).

The file starts with a header (magic, header length, JSON of the KV spec and pool shape) so that
a prefill worker that maps it checks it agrees with what the decode worker announced.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import torch
import zmq

from splitserve.disagg import protocol as P
from splitserve.disagg.transfer.base import KVSender, TransferError
from splitserve.disagg.transfer.channel import SenderChannel
from splitserve.kv.cache import KVCache

MAGIC = b"SPLITSERVE-KV\0\0\0"
HEADER = 4096  # the tensor starts page-aligned after the header
SHM_DIR = "/dev/shm"

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _pool_shape(spec: P.KVSpec, num_blocks: int) -> tuple[int, ...]:
    return (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)


def _map(path: str, spec: P.KVSpec, num_blocks: int) -> torch.Tensor:
    shape = _pool_shape(spec, num_blocks)
    dtype = _DTYPES[spec.dtype]
    numel = 1
    for d in shape:
        numel *= d
    elem = torch.empty(0, dtype=dtype).element_size()
    whole = torch.from_file(path, shared=True, size=HEADER + numel * elem, dtype=torch.uint8)
    return whole[HEADER:].view(dtype).view(shape)


def create_pool(spec: P.KVSpec, num_blocks: int, directory: str = SHM_DIR) -> tuple[str, torch.Tensor]:
    """Decode worker: a new zero-filled pool file; returns its path and the mapped tensor."""
    if not os.path.isdir(directory):
        raise TransferError(f"shared-memory directory {directory} does not exist (use --kv-transport tcp)")
    path = os.path.join(directory, f"splitserve-kv-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    header = json.dumps({"kv": {f: getattr(spec, f) for f in spec.__struct_fields__},
                         "num_blocks": num_blocks}).encode()
    if len(MAGIC) + 4 + len(header) > HEADER:
        raise TransferError("KV spec too long for the shared-memory header")
    shape = _pool_shape(spec, num_blocks)
    nbytes = HEADER + torch.Size(shape).numel() * torch.empty(0, dtype=_DTYPES[spec.dtype]).element_size()
    try:
        with open(path, "xb") as f:
            f.write(MAGIC + len(header).to_bytes(4, "little") + header)
            f.truncate(nbytes)
    except OSError as e:
        raise TransferError(f"cannot create a {nbytes / 2**30:.2f} GiB KV pool in {directory}: {e} "
                            "(too small a /dev/shm? use --kv-transport tcp)") from e
    return path, _map(path, spec, num_blocks)


def attach_pool(path: str, spec: P.KVSpec, num_blocks: int) -> torch.Tensor:
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
    theirs = P.KVSpec(**meta["kv"])
    mismatch = spec.mismatch(theirs)
    if mismatch or meta["num_blocks"] != num_blocks:
        raise TransferError(f"KV pool {path} does not match: {mismatch or 'num_blocks differs'}")
    return _map(path, spec, num_blocks)


class ShmSender(KVSender):
    transport = "shm"

    def __init__(self, ctx: zmq.Context, sender_id: str, peer: P.DecodePeer, spec: P.KVSpec,
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
        dev = self.cache.kv.device
        src = torch.tensor(src_block_ids, dtype=torch.long, device=dev)
        dst = torch.tensor(dst_block_ids, dtype=torch.long)
        # remote[layer]: [2, blocks, block, heads, dim]; one gather, one scatter into the pool
        data = self.cache.kv[layer].index_select(1, src)
        self.remote[layer].index_copy_(1, dst, data.cpu())
        n = data.numel() * data.element_size()
        self.bytes_sent += n
        self.seconds += time.perf_counter() - t0
        return n

    def done(self, msg: P.KVDone) -> None:
        self.channel.send(msg)
        self.transfers += 1

    def fence(self, request_id: str) -> None:
        self.channel.send(P.KVFence(request_id))

    def close(self) -> None:
        self.channel.close()
        self.remote = None

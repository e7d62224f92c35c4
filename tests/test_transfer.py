"""KV hand-over backends and the wire protocol, on tiny pools (no model, no processes)."""

from __future__ import annotations

import msgspec
import pytest
import torch
import zmq

from splitserve.config import ModelConfig
from splitserve.disagg import messages as M
from splitserve.disagg.transfer.base import TransferError
from splitserve.disagg.transfer.local import LocalSender
from splitserve.disagg.transfer.receiver import KVReceiver
from splitserve.disagg.transfer.shm import ShmSender, attach_pool, create_pool
from splitserve.disagg.transfer.tcp import TcpSender
from splitserve.kv.cache import KVCache
from splitserve.request import SamplingParams
from splitserve.router.policies import LeastLoaded, WorkerLoad
from splitserve.server.launch import parse_core_lists, split_cores

MC = ModelConfig(architecture="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                 num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4, rms_norm_eps=1e-6,
                 rope_theta=1e4, max_position_embeddings=64, tie_word_embeddings=True)
SPEC = M.KVSpec("tiny|bfloat16|none", "bfloat16", 4, MC.num_layers, MC.num_kv_heads, MC.head_dim)
NUM_BLOCKS = 10


def _filled_cache(seed=0) -> KVCache:
    c = KVCache(MC, NUM_BLOCKS, 4, torch.bfloat16, "cpu")
    c.kv.copy_(torch.randn(c.kv.shape, generator=torch.Generator().manual_seed(seed)))
    return c


class _Decode:
    """A decode side: a pool, a receiver, and the blocks it holds per request."""

    def __init__(self, ctx, tensor=None, shm_path=None):
        self.cache = KVCache(MC, NUM_BLOCKS, 4, torch.bfloat16, "cpu")
        if tensor is not None:
            self.cache.adopt(tensor)
        self.held: dict[str, list[int]] = {}
        self.rx = KVReceiver(ctx, self.cache, SPEC, "127.0.0.1",
                             lambda rid, sender: self.held.get(rid) if sender == "prefill-0" else None)
        self.peer = M.DecodePeer("decode-0", self.rx.addr, "h", SPEC, NUM_BLOCKS, shm_path)

    def pump(self, want: int, timeout_s: float = 5.0):
        """Poll until `want` notices (KVDone / KVFence) arrived."""
        got = []
        poller = zmq.Poller()
        poller.register(self.rx.sock, zmq.POLLIN)
        while len(got) < want:
            assert poller.poll(int(timeout_s * 1000)), "nothing arrived"
            got += [m for _, m in self.rx.poll()]
        return got


class _Handshaking:
    """Runs the receiver's side of the handshake while a sender is being constructed."""

    def __init__(self, dec: _Decode):
        import threading

        self.dec, self.stop = dec, threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            if self.dec.rx.sock.poll(20):
                self.dec.rx.poll()

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


def _send_request(sender, src: KVCache, src_blocks, dst_blocks):
    for layer in range(MC.num_layers):
        sender.write_layer("r1", layer, src_blocks, dst_blocks)
    sender.done(M.KVDone("r1", 7, None, 0, 0.0, 0.0, sender.transport))


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def _expected(src: KVCache, dst_shape, src_blocks, dst_blocks):
    want = torch.zeros(dst_shape, dtype=torch.bfloat16)
    for s, d in zip(src_blocks, dst_blocks):
        want[:, :, d] = src.kv[:, :, s]
    return want


@pytest.mark.parametrize("transport", ["local", "tcp", "shm"])
def test_backends_deliver_the_same_bytes(ctx, transport, tmp_path):
    src = _filled_cache()
    src_blocks, dst_blocks = [1, 4, 2], [7, 0, 3]
    path = None
    if transport == "shm":
        path, tensor = create_pool(SPEC, NUM_BLOCKS, str(tmp_path))
        dec = _Decode(ctx, tensor, path)
    else:
        dec = _Decode(ctx)
    dec.held["r1"] = dst_blocks
    notices = []
    if transport == "local":
        sender = LocalSender(src, dec.cache, notices.append)
    else:
        cls = TcpSender if transport == "tcp" else ShmSender
        with _Handshaking(dec):
            sender = cls(ctx, "prefill-0", dec.peer, SPEC, src)
    _send_request(sender, src, src_blocks, dst_blocks)
    if transport != "local":
        notices = dec.pump(1)
    assert isinstance(notices[0], M.KVDone) and notices[0].first_token == 7
    assert torch.equal(dec.cache.kv, _expected(src, dec.cache.kv.shape, src_blocks, dst_blocks))
    assert sender.bytes_sent == 3 * MC.num_layers * src.kv[0, :, 0].numel() * 2
    if transport == "shm":  # the bytes are in the file: a second mapping sees them
        again = attach_pool(path, SPEC, NUM_BLOCKS)
        assert torch.equal(again, dec.cache.kv)
    sender.close()
    dec.rx.close()


def test_tcp_layers_for_blocks_not_held_are_dropped(ctx):
    """A late layer of an aborted request must never land in blocks someone else owns now."""
    src = _filled_cache()
    dec = _Decode(ctx)
    with _Handshaking(dec):
        sender = TcpSender(ctx, "prefill-0", dec.peer, SPEC, src)
    dec.held["r1"] = [5]  # holds 5 only: writing 6 or another request's blocks is refused
    sender.write_layer("r1", 0, [1, 2], [5, 6])
    sender.write_layer("other", 0, [1], [5])
    sender.fence("r1")
    notices = dec.pump(1)
    assert isinstance(notices[0], M.KVFence)
    assert dec.rx.dropped_layers == 2 and not dec.cache.kv.any()
    assert dec.rx.bad == {"r1"}  # r1's hand-over is broken: its KVDone must not admit it
    # a sender that is not the request's writer, or skipped the handshake, is not heard
    with _Handshaking(dec):
        intruder = TcpSender(ctx, "prefill-9", dec.peer, SPEC, src)
    intruder.write_layer("r1", 0, [1], [5])
    raw = ctx.socket(zmq.DEALER)
    raw.connect(dec.rx.addr)
    raw.send(M.encode(M.KVFence("r1")))
    intruder.fence("r1")
    got = dec.pump(1)
    assert [type(m) for m in got] == [M.KVFence]  # only the intruder's (it did say Hello)
    assert dec.rx.dropped_layers == 3 and not dec.cache.kv.any()
    raw.close(0)
    intruder.close()
    sender.close()
    dec.rx.close()


def test_handshake_refuses_a_different_kv_layout(ctx):
    dec = _Decode(ctx)
    other = M.KVSpec("tiny|float32|none", "float32", 4, 3, 2, 4)
    # the announced spec is checked before connecting ...
    with pytest.raises(TransferError, match="dtype: 'float32' vs 'bfloat16'"):
        TcpSender(ctx, "p", dec.peer, other, _filled_cache())
    # ... and the decode worker checks what the sender says it holds
    lying_peer = M.DecodePeer("decode-0", dec.rx.addr, "h", other, NUM_BLOCKS)
    with _Handshaking(dec), pytest.raises(TransferError, match="refused the KV connection.*mismatch"):
        TcpSender(ctx, "p", lying_peer, other, _filled_cache())
    dec.rx.close()


def test_handshake_times_out_when_nobody_answers(ctx):
    peer = M.DecodePeer("decode-9", "tcp://127.0.0.1:9", "h", SPEC, NUM_BLOCKS)
    from splitserve.disagg.transfer.channel import SenderChannel

    with pytest.raises(TransferError, match="did not answer"):
        SenderChannel(ctx, "p", peer, SPEC, "tcp", timeout_s=0.2)


def test_shm_pool_refuses_a_mismatched_mapping(tmp_path):
    path, _ = create_pool(SPEC, NUM_BLOCKS, str(tmp_path))
    with pytest.raises(TransferError, match="block_size"):
        attach_pool(path, M.KVSpec(SPEC.model_id, "bfloat16", 8, 3, 2, 4), NUM_BLOCKS)
    with pytest.raises(TransferError, match="num_blocks"):
        attach_pool(path, SPEC, NUM_BLOCKS + 1)
    with pytest.raises(TransferError, match="cannot open"):
        attach_pool(str(tmp_path / "missing"), SPEC, NUM_BLOCKS)


def test_messages_round_trip_and_foreign_frames_are_refused():
    p = M.Params.of(SamplingParams(max_tokens=5, temperature=0.5, stop=["x"], seed=3, logprobs=2))
    msg = M.Reserve("r", [1, 2, 3], p, "prefill-0")
    back = M.decode_to_worker(M.encode(msg))
    assert back == msg and back.params.to_sampling_params() == SamplingParams(
        max_tokens=5, temperature=0.5, stop=("x",), seed=3, logprobs=2)
    import pickle

    for junk in (pickle.dumps({"a": 1}), b"\x00\x01", M.encode(M.Heartbeat(M.WorkerStats()))):
        with pytest.raises(msgspec.DecodeError):  # ValidationError is a DecodeError
            M.decode_to_worker(junk)
    # a typed field with the wrong type is refused, not coerced
    bad = msgspec.msgpack.encode({"type": "Abort", "request_id": 5})
    with pytest.raises(msgspec.ValidationError):
        M.decode_to_worker(bad)


def test_core_split_and_policy():
    assert split_cores(2, [0, 1]) == [[0], [1]]
    assert split_cores(3, [0, 1, 2, 3, 4, 5, 6]) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_cores(3, [0, 1]) == [[0], [1], [0]]
    assert parse_core_lists("0-2;5,7") == [[0, 1, 2], [5, 7]]
    pol = LeastLoaded()
    loads = [WorkerLoad("a", 2, 0), WorkerLoad("b", 1, 0), WorkerLoad("c", 1, 0)]
    assert {pol.pick(loads) for _ in range(4)} == {"b", "c"}
    assert pol.pick([]) is None

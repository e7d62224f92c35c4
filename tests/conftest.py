"""Shared fixtures: tiny random-weight Hugging Face checkpoints (built locally, never downloaded)
and the Hugging Face reference for the embedded SmolLM2-135M-Instruct GGUF."""

from __future__ import annotations

import os

import pytest
import torch

TINY_VOCAB = 320
# Special tokens of the tiny word-level tokenizer; every other id is a word "w<id>".
TINY_SPECIALS = ["<unk>", "<s>", "</s>"]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(TINY_SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(TINY_SPECIALS), TINY_VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# name -> (config class, weight seed, config kwargs). hidden 64 / 4 heads / 2 KV heads unless the
# case is about something else. Each seed is one whose reference output has no near-ties for the
# prompts of test_parity.py (test_tiny_reference_is_not_flat checks it).
_COMMON = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2,
)
TINY_CASES = {
    "llama": ("LlamaConfig", 0, dict(num_hidden_layers=3, rope_theta=10000.0)),
    # Llama 3.1 rope: head_dim 16 with theta 1e4 puts one frequency above 4x, several between
    # and the rest below the 32-token original context, so all three branches are exercised.
    "llama3_rope": ("LlamaConfig", 2, dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, rope_theta=10000.0)),
    # Llama's optional biases: attention_bias puts one on q, k, v and o; mlp_bias on the MLP.
    "llama_bias": ("LlamaConfig", 0, dict(attention_bias=True, mlp_bias=True, rope_theta=10000.0)),
    # SmolLM2's shape in small: tied embeddings, 3 query heads per KV head, theta 1e5.
    "smollm2": ("LlamaConfig", 1, dict(hidden_size=96, num_attention_heads=6,
                                       num_key_value_heads=2, tie_word_embeddings=True,
                                       num_hidden_layers=4, rope_theta=100000.0)),
    # The window is shorter than the context: splitserve caps max_model_len there.
    "mistral": ("MistralConfig", 5, dict(sliding_window=160, rope_theta=10000.0)),
    "qwen2": ("Qwen2Config", 5, dict(rope_theta=1000000.0)),
    # head_dim set explicitly and != hidden / heads, as in the real Qwen3 checkpoints.
    "qwen3": ("Qwen3Config", 1, dict(head_dim=32, rope_theta=1000000.0)),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits are far from flat (so greedy is not decided by ties),
    with non-trivial norm weights and non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name == "lm_head.weight":
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:  # projections: a bit above the variance-preserving scale
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[1] ** 0.5)


def make_tiny_checkpoint(directory: str, case: str, seed: int | None = None):
    """Write config.json + model.safetensors + tokenizer into `directory`; return the HF model."""
    import transformers

    cls_name, case_seed, extra = TINY_CASES[case]
    seed = case_seed if seed is None else seed
    cfg = getattr(transformers, cls_name)(**{**_COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomise(model, seed)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    _tiny_tokenizer().save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def make_tiny():
    """make_tiny(directory, case): a tiny checkpoint written where a test wants it."""
    return make_tiny_checkpoint


@pytest.fixture(scope="session", params=list(TINY_CASES))
def tiny_checkpoint(request, tmp_path_factory):
    """(case name, directory, the transformers model that wrote it)."""
    d = str(tmp_path_factory.mktemp(f"tiny_{request.param}"))
    return request.param, d, make_tiny_checkpoint(d, request.param)


# -- the embedded real model -------------------------------------------------------------------
@pytest.fixture(scope="session")
def real_model_path() -> str:
    from splitserve.errors import ModelLoadError
    from splitserve.model.loader import default_model_path

    try:
        return default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def real_checkpoint(real_model_path):
    """The GGUF dequantised once, in fp32; engines of either dtype build from it
    (`LLM(path, checkpoint=...)`), so a session pays the load once."""
    from splitserve.model.loader import load_checkpoint

    return load_checkpoint(real_model_path, torch.float32)


@pytest.fixture(scope="session")
def hf_real(real_model_path):
    """transformers' own GGUF loader: the fp32 reference model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(real_model_path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    return model, tok

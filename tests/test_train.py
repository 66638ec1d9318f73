"""The training loop: resume after SIGKILL, data parallelism, LoRA + routers, bad input.

A small Llama with the real SmolLM2 tokenizer is saved as a local Hugging Face folder, so the real CLI runs
end to end in subprocesses in seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import build_tiny, padded_batch
from routertune import RoutedModel, RouterConfig
from routertune.base_model import load_tokenizer
from routertune.cli import main

# the gradient-trained objectives (the default, importance, is a single closed-form pass: tests/test_tradeoff.py)
ARGS = [
    "--objective",
    "lm",
    "--samples",
    "96",
    "--heldout-samples",
    "8",
    "--max-length",
    "96",
    "--batch-size",
    "8",
    "--learning-rate",
    "1e-2",
    "--warmup-ratio",
    "0.1",
]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> str:
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("small-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _cli(*args, env=None, launcher=None) -> subprocess.Popen:
    command = (launcher or [sys.executable, "-m", "routertune.cli"]) + list(args)
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
    )


def _routers(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "routers.safetensors")


def test_sigkilled_run_resumes_to_the_same_routers(small_model, tmp_path):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    proc = _cli("train", "--model", small_model, "--output", str(unbroken), *ARGS)
    assert proc.wait() == 0, proc.stdout.read()

    proc = _cli("train", "--model", small_model, "--output", str(broken), *ARGS, "--checkpoint-every", "1")
    pointer = broken / "checkpoints" / "latest"
    while not (pointer.exists() and pointer.read_text().strip() >= "step-000003"):
        assert proc.poll() is None, "training ended before it could be killed: " + proc.stdout.read()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = pointer.read_text().strip()
    assert not (broken / "routers.safetensors").exists()

    # an output folder holding a run is never silently reused
    assert main(["train", "--model", small_model, "--output", str(broken), *ARGS]) == 2

    proc = _cli("train", "--model", small_model, "--output", str(broken), *ARGS, "--checkpoint-every", "1", "--resume")
    out = proc.communicate()[0]
    assert proc.returncode == 0, out
    expected, got = _routers(unbroken), _routers(broken)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0, msg=f"{key} after {killed_at}")


def test_two_processes_equal_one_process_with_accumulation(small_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = _cli("train", "--model", small_model, "--output", str(one), *ARGS, "--grad-accum", "2")
    assert proc.wait() == 0, proc.stdout.read()
    # torchrun-style launch of two CPU processes (accelerate picks MULTI_CPU with gloo when no GPU is present)
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29533",
        "-m",
        "routertune.cli",
    ]
    proc = _cli("train", "--model", small_model, "--output", str(two), *ARGS, launcher=launcher)
    out = proc.communicate()[0]
    assert proc.returncode == 0, out
    expected, got = _routers(one), _routers(two)
    assert any(v.abs().sum() > 0 for v in expected.values()), "routers did not train"
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4)


def test_lora_and_routers_train_save_and_load_together(tmp_path):
    from routertune.train import lora
    from routertune.train.loop import TrainConfig, micro_batch_loss

    base = build_tiny("llama")
    lora.add_lora(base, rank=4)
    routed = RoutedModel(base, RouterConfig())
    names = {n for n, p in routed.named_parameters() if p.requires_grad}
    assert names and all(".router." in n or "lora_" in n for n in names)
    assert any("lora_" in n for n in names)
    ids, mask, _ = padded_batch([9, 7, 8], "right")
    labels = ids.masked_fill(mask == 0, -100)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    optimizer = torch.optim.AdamW(routed.trainable_parameters(), lr=0.05)
    routed.train()
    for _ in range(3):
        loss, *_ = micro_batch_loss(routed, routed, batch, TrainConfig(), int((labels[:, 1:] != -100).sum()), 3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    routed.eval()
    with torch.no_grad():
        expected = routed(input_ids=ids, attention_mask=mask).logits
    routed.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "lora.safetensors",
        "router_config.json",
        "routers.safetensors",
    ]
    loaded = RoutedModel.from_pretrained(build_tiny("llama"), tmp_path)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    with torch.no_grad(), loaded.forced("run"):
        plain = build_tiny("llama")(input_ids=ids, attention_mask=mask).logits
        assert (loaded(input_ids=ids, attention_mask=mask).logits - plain).abs().max() > 1e-4  # LoRA is active


def test_resume_without_checkpoint_and_bad_settings_are_clear(small_model, tmp_path, capsys):
    assert main(["train", "--model", small_model, "--output", str(tmp_path / "x"), *ARGS, "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--output", str(tmp_path / "y"), "--target-capacity", "1.5"]) == 2
    assert "target_capacity=1.5 must lie in [0, 1]" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["train", "--model", small_model, "--output", str(tmp_path / "z"), "--data", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err

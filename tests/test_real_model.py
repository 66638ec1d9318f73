"""Slow tests on the real default model (SmolLM2-135M-Instruct, converted once into the routertune cache)."""

from __future__ import annotations

import json

import pytest
import torch

from routertune import RoutedModel
from routertune.base_model import load_model_and_tokenizer
from routertune.cli import main

pytestmark = pytest.mark.slow

# held-out response loss of the tuned routers may exceed the dense model's by at most this factor
LOSS_BOUND = 1.25


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("routers")
    code = main(
        [
            "train",
            "--output",
            str(out),
            "--objective",
            "lm",
            "--samples",
            "64",
            "--heldout-samples",
            "32",
            "--max-length",
            "256",
            "--batch-size",
            "4",
            "--target-capacity",
            "0.5",
            "--no-calibrate",
        ]
    )
    assert code == 0
    return out


def test_short_train_moves_capacity_toward_target_within_loss_bound(trained):
    metrics = json.loads((trained / "train_metrics.json").read_text())["result"]
    dense, before, after = metrics["dense"], metrics["before"], metrics["after"]
    assert before["capacity"] == 1.0  # zero-initialised routers start fully dense...
    assert before["loss"] == pytest.approx(dense["loss"], abs=1e-6)  # ...and reproduce the base model
    assert abs(after["capacity"] - 0.5) < abs(before["capacity"] - 0.5) - 0.1  # moved toward the target
    assert after["loss"] <= LOSS_BOUND * dense["loss"], (after["loss"], dense["loss"])


def test_generate_cli_reports_per_layer_decisions(trained, capsys):
    assert main(["generate", "--routers", str(trained), "--max-new-tokens", "8", "What is 2 + 2?"]) == 0
    out = capsys.readouterr().out
    assert "[layers] 14:" in out and "28:" in out


def test_real_model_mixed_batch_cache_and_kv(trained):
    model, tokenizer = load_model_and_tokenizer()
    routed = RoutedModel.from_pretrained(model, trained)
    tokenizer.padding_side = "left"
    prompts = [
        "What is the capital of France?",
        "List three prime numbers.",
        "Summarise the plot of Hamlet in one sentence, please, for a child.",
    ]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        cache = routed.new_cache()
        batched = routed.generate(**inputs, max_new_tokens=8, do_sample=False, cache=cache)
        dense_cache = routed.new_cache()
        with routed.forced("run"):
            routed.generate(**inputs, max_new_tokens=8, do_sample=False, cache=dense_cache)
        for row, prompt in enumerate(prompts):
            single = tokenizer([prompt], return_tensors="pt")
            alone = routed.generate(**single, max_new_tokens=8, do_sample=False)[0, single["input_ids"].shape[1] :]
            new = batched[row, inputs["input_ids"].shape[1] :].tolist()
            # generation may stop early at EOS; the batch then pads that row
            assert new[: len(alone)] == alone.tolist()
            assert set(new[len(alone) :]) <= {tokenizer.pad_token_id}
    n_layers = model.config.num_hidden_layers
    executed = (
        sum(float(cache.decisions[i].float().mean()) if i in cache.decisions else 1.0 for i in range(n_layers))
        / n_layers
    )
    assert cache.kv_elements() == pytest.approx(dense_cache.kv_elements() * executed, rel=0, abs=0.5)


def test_demo_runs_every_stage_and_summarises(tmp_path, capsys):
    """The README's main job, shrunk: every stage runs on the real model, reports its progress with counts (every
    part of the trade-off too), and the summary reads its results."""
    from routertune import progress
    from test_demo import assert_every_part_reports

    out = tmp_path / "demo"
    events = []
    with progress.listening(events.append):
        code = main(
            [
                "demo",
                "--output",
                str(out),
                "--samples",
                "24",
                "--heldout-samples",
                "4",
                "--tasks",
                "arc_easy",
                "--limit",
                "6",
                "--texts",
                "2",
                "--fidelity-prompts",
                "1",
                "--calibration-samples",
                "8",
                "--sweep-points",
                "4",
                "--random-seeds",
                "1",
                "--skip-targets",
                "0.1",
                "--bench-repeats",
                "2",
                "--bench-lengths",
                "16",
                "--decode-prompt",
                "16",
                "--decode-tokens",
                "2",
                "--no-searched-static",
            ]
        )
    assert code == 0
    assert_every_part_reports(events, tasks=["arc_easy"])
    printed = capsys.readouterr().out
    for stage in ("[1/5] train", "[2/5] generate", "[3/5] tradeoff", "[4/5] bench", "[5/5] report"):
        assert stage in printed
    summary = (out / "summary.md").read_text()
    assert summary.splitlines()[0] in printed
    assert "| lambada (KL/token) | 10% |" in summary and "| arc_easy (acc, %) | 10%" in summary
    assert "distinct skip patterns" in summary and "prefill 16 tokens" in summary
    assert "searched static order" in summary and "was not traced" in summary  # off at demo size, and said so
    curve = json.loads((out / "tradeoff" / "tradeoff.json").read_text())
    assert {v["kind"] for v in curve["variants"]} == {"dense", "static", "random", "routers"}
    bench = json.loads((out / "bench.json").read_text())
    assert bench["checks"]["kv_equal_all"] is True
    assert (out / "report" / "report.md").exists() and (out / "report" / "tradeoff.png").exists()
    config = json.loads((out / "router_config.json").read_text())
    assert config["layers"] == list(range(1, 29))  # the default recipe routes static drop's candidates
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["train"]["objective"] == "importance"

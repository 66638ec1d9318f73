"""The main job's guards (the full job runs on the real model in test_real_model.py)."""

from __future__ import annotations

import pytest

from routertune.demo import DemoJob, run_demo


def test_demo_refuses_a_folder_holding_another_run(tmp_path):
    (tmp_path / "router_config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="did not write"):
        run_demo(DemoJob(output=str(tmp_path)), announce=lambda line: None)
    assert (tmp_path / "router_config.json").read_text() == "{}"


@pytest.mark.parametrize("field, value, message", [
    ("capacity", 1.0, "strictly between 0 and 1"),
    ("capacity", -0.1, "capacity"),
    ("limit", 0, "limit=0 must be >= 1"),
    ("tasks", ["arc_easy", "nosuchtask"], "nosuchtask"),
])
def test_demo_job_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        DemoJob(**{field: value})


def test_demo_runs_every_stage_on_a_tiny_model(tmp_path, capsys):
    """The main job's plumbing end to end in seconds (the real model runs it in test_real_model.py)."""
    import json

    from routertune.cli import main
    from tiny_lm import tiny_llama, tiny_tokenizer

    model = tmp_path / "byte-llama"
    tiny_llama(layers=6).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    out = tmp_path / "demo"
    code = main(["demo", "--model", str(model), "--output", str(out), "--samples", "24", "--limit", "6",
                 "--texts", "3", "--fidelity-prompts", "2", "--calibration-samples", "4", "--bench-repeats", "2",
                 "--bench-lengths", "16", "--decode-prompt", "8", "--decode-tokens", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    for stage in ("[1/5] train", "[2/5] generate", "[3/5] tradeoff", "[4/5] bench", "[5/5] report"):
        assert stage in printed
    summary = (out / "summary.md").read_text()
    assert "| lambada (KL/token) | 10% |" in summary and "distinct skip patterns" in summary
    assert "prefill 16 tokens" in summary
    assert json.loads((out / "train_metrics.json").read_text())["train"]["objective"] == "importance"
    assert (out / "report" / "tradeoff.png").exists()
    # static drop is traced one layer past the largest target (20%) of this model's own 6 layers, not of 30
    assert json.loads((out / "tradeoff" / "tradeoff.json").read_text())["job"]["max_drop"] == round(0.2 * 6) + 1

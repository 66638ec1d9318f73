"""`routertune compare` end to end on a tiny model saved to disk (model folder + routers folder)."""

from __future__ import annotations

import json

import pytest
import torch

from routertune import RoutedModel, RouterConfig
from routertune.cli import main
from routertune.eval.compare import CompareJob, compare, plan
from tiny_lm import randomize_routers, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(3)
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    routed = RoutedModel(model, RouterConfig())  # the paper's layers: 2, 3, 4 of 6
    randomize_routers(routed, 3, scale=0.3)
    routed.save_pretrained(root / "routers")
    return root


def test_plan_matches_skip_ratios_of_all_attention_sublayers():
    job = CompareJob(routers="r", skip_ratios=[0.1, 0.25])
    settings = plan(job, num_layers=30, routed_layers=15)
    assert [(r, s.kind, s.drop, s.capacity) for r, s in settings] == [
        (0.0, "dense", 0, None),
        (0.1, "static", 3, None),
        (0.1, "random", 3, None),
        (0.1, "routers", 0, 0.8),
        (0.25, "static", 8, None),
        (0.25, "random", 8, None),
        (0.25, "routers", 0, 0.5),
    ]
    with pytest.raises(ValueError, match="largest reachable is 0.500"):
        plan(CompareJob(routers="r", skip_ratios=[0.6]), num_layers=30, routed_layers=15)


def test_compare_end_to_end(saved, tmp_path):
    job = CompareJob(
        routers=str(saved / "routers"),
        model=str(saved / "model"),
        tasks=["arc_easy", "winogrande"],
        skip_ratios=[1 / 3],
        limit=6,
        ppl_texts=3,
        fidelity_prompts=3,
        fidelity_tokens=4,
        calibration_samples=12,
        output=str(tmp_path / "out"),
    )
    report = compare(job, progress=False)
    by_kind = {s.kind: s for s in report.settings}
    assert [s.kind for s in report.settings] == ["dense", "static", "random", "routers"]
    assert by_kind["dense"].skip_ratio == 0 and by_kind["dense"].fidelity["exact_match"] == 1.0
    for kind in ("static", "random"):  # round(6 / 3) = 2 of 6 attention sublayers, for every input
        assert len(by_kind[kind].dropped) == 2 and by_kind[kind].skip_ratio == pytest.approx(1 / 3)
    routers = by_kind["routers"]
    assert routers.capacity == pytest.approx(1 - 2 / 3)  # 2 of the 3 routed layers skipped on average
    assert routers.calibration_capacity == pytest.approx(1 / 3, abs=0.05)
    assert report.samples == {"arc_easy": 6, "winogrande": 6}
    written = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert len(written["settings"]) == 4
    per_task = written["settings"][3]["task_layer_skip_rate"]  # the routers' rates, one row per task
    assert set(per_task) == {"arc_easy", "winogrande"} and all(len(r) == 3 for r in per_task.values())
    table = (tmp_path / "out" / "compare.md").read_text()
    assert (
        sum(line.startswith("| ") for line in table.splitlines()) == 5
        and "ppl lambada" in table
        and "ARC-E (acc)" in table
    )


def test_eval_job_with_routers_capacity_perplexity_and_fidelity(saved, tmp_path):
    from routertune.eval.evaluate import EvalJob, evaluate_job

    out = tmp_path / "eval.json"
    job = EvalJob(
        tasks=["openbookqa"],
        routers=str(saved / "routers"),
        model=str(saved / "model"),
        limit=4,
        capacity=0.5,
        perplexity=["boolq"],
        ppl_texts=2,
        fidelity_prompts=2,
        fidelity_tokens=3,
        calibration_samples=8,
        output=str(out),
    )
    report = evaluate_job(job, progress=False)
    assert report.calibration["target"] == 0.5 and report.harness.tasks["openbookqa"].samples == 4
    assert report.perplexity["boolq"].texts == 2 and report.fidelity.prompts == 2
    written = json.loads(out.read_text())
    assert written["harness"]["tasks"]["openbookqa"]["metrics"].keys() == {"acc", "acc_norm"}
    assert set(written["harness"]["layer_skip_rate"]) == {"2", "3", "4"}


def test_routers_of_another_base_model_are_refused(saved, tmp_path, capsys):
    other = tiny_llama(4)
    other.save_pretrained(tmp_path / "other")
    tiny_tokenizer().save_pretrained(tmp_path / "other")
    code = main(
        [
            "compare",
            "--routers",
            str(saved / "routers"),
            "--model",
            str(tmp_path / "other"),
            "--tasks",
            "arc_easy",
            "--limit",
            "2",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "belong to another base model" in capsys.readouterr().err


def test_bad_compare_flags(capsys):
    assert main(["compare", "--tasks", "arc_easy", "bogus", "--skip-ratios", "1.2", "--perplexity", "wiki"]) == 2
    err = capsys.readouterr().err
    assert "--routers FOLDER" in err and "unknown task 'bogus'" in err and "1.2" in err and "wiki" in err

"""The main job's guards (the full job runs on the real model in test_real_model.py)."""

from __future__ import annotations

import pytest

from routertune.demo import DemoJob, run_demo


def test_demo_refuses_a_folder_holding_another_run(tmp_path):
    (tmp_path / "router_config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="did not write"):
        run_demo(DemoJob(output=str(tmp_path)), announce=lambda line: None)
    assert (tmp_path / "router_config.json").read_text() == "{}"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("capacity", 1.0, "strictly between 0 and 1"),
        ("capacity", -0.1, "capacity"),
        ("limit", 0, "limit=0 must be >= 1"),
        ("tasks", ["arc_easy", "nosuchtask"], "nosuchtask"),
    ],
)
def test_demo_job_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        DemoJob(**{field: value})


# Every part of the demo that can run for minutes at full size, by stage: each must report a count as it goes
# (routertune.progress events; the terminal shows the same counts as bars). Accuracy parts only when tasks run.
def expected_parts(tasks=(), searched: bool = False) -> dict[str, set[str]]:
    return {
        "train": {"importance fit"},
        "generate": {"generate"},
        "tradeoff": {"importance and sweep", "KL lambada", "KL wikipedia", "KL code", "agreement"}
        | {f"{kind} {task}" for task in tasks for kind in ("placement", "accuracy")}
        | ({"static order search"} if searched else set()),
        "bench": {"bench"},
        "report": {"report"},
    }


def assert_every_part_reports(events, tasks=(), searched: bool = False) -> None:
    """Each expected part of each stage sent at least one event with a count of finished units (done >= 1),
    and the counts of a part never run backwards nor past a known total."""
    counted: dict[str, set[str]] = {}
    by_part: dict[tuple[str, str], list] = {}
    for e in events:
        by_part.setdefault((e.stage, e.part), []).append(e)
        if e.done >= 1:
            counted.setdefault(e.stage, set()).add(e.part)
    for stage, parts in expected_parts(tasks, searched).items():
        silent = parts - counted.get(stage, set())
        assert not silent, (
            f"stage {stage}: no progress count from {sorted(silent)} (got {sorted(counted.get(stage, ()))})"
        )
    for (stage, part), seq in by_part.items():
        done = [e.done for e in seq]
        assert done == sorted(done), (stage, part, done)
        assert all(e.total is None or e.done <= e.total for e in seq), (stage, part, [(e.done, e.total) for e in seq])
        # a part with a known total counts all of it: work done outside its count (e.g. the importance fit's
        # dense pass while only its held-out loss passes report) leaves the count short
        last = seq[-1]
        assert last.total is None or last.done == last.total, (stage, part, last.done, last.total)


def test_demo_defaults_fit_a_coffee_break_and_full_restores_the_full_settings():
    from routertune.demo import FULL, QUICK

    quick, full = DemoJob(), DemoJob(full=True)
    assert quick.tasks == [] and quick.samples == QUICK["samples"] and quick.bench_lengths == [512]
    assert quick.searched_static is False and full.searched_static is False  # the search takes minutes a layer
    assert full.tasks == ["arc_easy", "piqa"] and full.samples == 1000 and full.bench_lengths == [128, 512, 2048]
    assert {name: getattr(full, name) for name in FULL} == FULL
    assert DemoJob(full=True, samples=50).samples == 50  # an explicit flag wins over either size


def test_demo_runs_every_stage_on_a_tiny_model(tmp_path, capsys):
    """The main job's plumbing end to end in seconds (the real model runs it in test_real_model.py), and every
    stage and every part of the trade-off reports its progress with a count."""
    import json

    from routertune import progress
    from routertune.cli import main
    from tiny_lm import tiny_llama, tiny_tokenizer

    model = tmp_path / "byte-llama"
    tiny_llama(layers=6).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    out = tmp_path / "demo"
    events = []
    with progress.listening(events.append):
        code = main(
            [
                "demo",
                "--model",
                str(model),
                "--output",
                str(out),
                "--samples",
                "24",
                "--tasks",
                "arc_easy",
                "--limit",
                "6",
                "--texts",
                "3",
                "--fidelity-prompts",
                "2",
                "--calibration-samples",
                "4",
                "--bench-repeats",
                "2",
                "--bench-lengths",
                "16",
                "--decode-prompt",
                "8",
                "--decode-tokens",
                "2",
                "--searched-static",
                "--searched-records",
                "8",
            ]
        )
    assert code == 0
    assert_every_part_reports(events, tasks=["arc_easy"], searched=True)
    printed = capsys.readouterr().out
    for stage in ("[1/5] train", "[2/5] generate", "[3/5] tradeoff", "[4/5] bench", "[5/5] report"):
        assert stage in printed
    summary = (out / "summary.md").read_text()
    assert "| lambada (KL/token) | 10% |" in summary and "distinct skip patterns" in summary
    assert "| arc_easy (acc, %) | 10%" in summary
    # the searched static order is a third baseline: its curve, and routers minus it with an interval per row
    assert "routers - searched static [95% CI]" in summary and "searched static order" in summary
    curve = json.loads((out / "tradeoff" / "tradeoff.json").read_text())
    assert {"static", "searched", "random", "routers"} <= {v["kind"] for v in curve["variants"]}
    for where in ("lambada", "arc_easy"):
        routers = curve["matched"][where]["0.10"]["routers"]
        assert routers["reached"] and len(routers["interval_searched"]) == 2
        low, high = routers["interval_searched"]
        assert low <= routers["minus_searched"] <= high
    assert "docs/evaluation.md and docs/demo.md" in summary and "routertune demo --full" in summary
    assert "about 15 minutes" in printed.splitlines()[0]  # the banner states the expected time
    assert "prefill 16 tokens" in summary
    assert json.loads((out / "train_metrics.json").read_text())["train"]["objective"] == "importance"
    assert (out / "report" / "tradeoff.png").exists()
    # static drop is traced one layer past the largest target (20%) of this model's own 6 layers, not of 30
    assert json.loads((out / "tradeoff" / "tradeoff.json").read_text())["job"]["max_drop"] == round(0.2 * 6) + 1


def test_tradeoff_refuses_a_searched_order_of_another_model(tmp_path):
    """--searched-order is read as it is, so it must belong to this model's weights: another model's order
    would be a baseline of layers chosen for other weights."""
    import json

    from routertune.eval.tradeoff import TradeoffJob, run_tradeoff
    from routertune.train import static_order
    from tiny_lm import tiny_llama, tiny_tokenizer

    model = tmp_path / "byte-llama"
    tiny_llama(layers=6).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    from routertune import RouterConfig
    from routertune.base_model import load_model_and_tokenizer
    from routertune.model import RoutedModel

    loaded, _ = load_model_and_tokenizer(str(model))
    RoutedModel(loaded, RouterConfig(layers=[1, 2, 3, 4])).save_pretrained(tmp_path / "routers")
    stored = static_order.StaticOrder(order=[2, 3], kl=[0.1, 0.2], model={"name": "other", "sha256": "0" * 64})
    (tmp_path / "order").mkdir()
    (tmp_path / "order" / static_order.RESULT_NAME).write_text(json.dumps(stored.to_json()))
    job = TradeoffJob(
        routers=str(tmp_path / "routers"),
        output=str(tmp_path / "out"),
        model=str(model),
        texts=2,
        tasks=[],
        fidelity_prompts=0,
        searched_order=str(tmp_path / "order"),
    )
    with pytest.raises(ValueError, match="searched on another model"):
        run_tradeoff(job, progress=False)


def test_the_summary_quotes_the_committed_reachable_oracle_and_nothing_without_it(tmp_path):
    import json

    from routertune.demo import headroom_lines

    assert headroom_lines(str(tmp_path / "missing.json")) == []
    gap = {"relative": -0.12, "relative_interval": [-0.3, 0.05]}
    path = tmp_path / "headroom.json"
    path.write_text(json.dumps({"pooled": {"texts": 48, "summary": {"6": {"minus_best_static": {"reachable": gap}}}}}))
    (line,) = headroom_lines(str(path))
    assert "6 layers: -12% [-30%, +5%]" in line and "48 texts" in line

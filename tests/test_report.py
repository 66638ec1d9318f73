"""The report renders from the JSON a quick bench writes (no hand-written speed numbers), reads evaluation
results of the shapes `routertune compare` / `routertune eval` write, and says what it could not draw."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from conftest import build_tiny
from routertune import cli
from routertune.bench.config import BenchConfig
from routertune.bench.runner import bench_model
from routertune.files import write_json
from routertune.report import ReportConfig, build_report, extract_eval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    result = bench_model(build_tiny("llama"), BenchConfig(quick=True, threads=1, lengths=[16, 32, 48]))
    path = tmp_path_factory.mktemp("results") / "bench_tiny.json"
    write_json(path, result.to_dict())
    return path


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image.std() > 0.01  # not a blank canvas


def test_report_from_bench_json(bench_json, tmp_path):
    out = tmp_path / "report"
    report = build_report(ReportConfig(inputs=[str(bench_json)], output=str(out)))
    assert report.bench_files == [str(bench_json)] and report.eval_files == []
    names = sorted(p.rsplit("/", 1)[-1] for p in report.plots)
    assert names == ["memory.png", "speedup.png"]
    for name in names:
        _assert_png(out / name)
    text = (out / "report.md").read_text()
    for expected in (
        "### Prefill",
        "### Decode",
        "### Routing overhead",
        "### Targets",
        "![speedup](speedup.png)",
        "![memory](memory.png)",
        "| 48 | 1 | routed_static_set |",
        "No accuracy data",
    ):
        assert expected in text
    assert any("accuracy" in note for note in report.notes)
    assert any("heatmap" in note for note in report.notes)


def test_target_verdicts_say_when_an_interval_spans_the_limit(bench_json):
    """A verdict read off the median of a few noisy pairs is qualified when the interval reaches across the
    limit (the full demo: overhead 1.026 [1.006, 1.059] against < 1.02 read plainly "NOT met"), and left plain
    when the whole interval is on one side."""
    from routertune.report import bench_tables

    bench = json.loads(bench_json.read_text())

    def overhead_row(ratio, ci, other=None):  # other: a second pair (ratio, ci) below the worst one
        rows = [(ratio, ci)] + ([other] if other else [])
        bench["overhead"] = [{**bench["overhead"][0], "ratio": r, "ci": c} for r, c in rows]
        bench["checks"]["overhead_max"], bench["checks"]["met"]["overhead"] = ratio, ratio < 1.02
        return next(line for line in bench_tables(bench) if line.startswith("| routing overhead"))

    assert overhead_row(1.026, [1.006, 1.059, 0.95]).endswith(
        "| NOT met on the median; not resolved: no interval lies wholly past the limit |"
    )
    # settled by the worst pair even though another pair's interval spans the limit
    assert overhead_row(1.05, [1.03, 1.07, 0.95], (1.01, [0.99, 1.03, 0.95])).endswith("| NOT met |")
    assert overhead_row(1.026, [1.021, 1.059, 0.95]).endswith("| NOT met |")
    assert overhead_row(1.010, [0.990, 1.019, 0.95]).endswith("| met |")
    assert overhead_row(1.010, [0.990, 1.030, 0.95]).endswith(
        "| met on the median; not resolved: an interval spans the limit |"
    )
    assert overhead_row(1.010, [None, None, False]).endswith("| met |")  # no interval from too few pairs
    bench["checks"]["forced_vs_static_ci"] = {k: [0.95, 1.05, 0.95] for k in bench["checks"]["forced_vs_static"]}
    met = bench["checks"]["met"]["forced_vs_static"]
    forced = next(line for line in bench_tables(bench) if line.startswith("| routers forced"))
    assert "not resolved" in forced and forced.split(" | ")[-1].startswith("met" if met else "NOT met")
    bench["checks"]["forced_vs_static_ci"] = {k: [0.90, 0.96, 0.95] for k in bench["checks"]["forced_vs_static"]}
    bench["checks"]["met"]["forced_vs_static"] = False
    forced = next(line for line in bench_tables(bench) if line.startswith("| routers forced"))
    assert forced.endswith("| NOT met |")  # every interval below the 0.97 target


def _compare_json(bench: dict) -> dict:
    """compare.json's shape (routertune compare), with the quick bench's routed layers."""
    layers = bench["routed_layers"]
    settings = [
        {
            "name": "dense",
            "kind": "dense",
            "skip_ratio": 0.0,
            "scores": {"arc_easy": 0.6, "piqa": 0.7},
            "average": 0.65,
            "layer_skip_rate": {},
        }
    ]
    for i, ratio in enumerate((0.2, 0.4)):
        settings += [
            {
                "name": "static",
                "kind": "static",
                "skip_ratio": ratio,
                "scores": {"arc_easy": 0.5, "piqa": 0.6},
                "average": 0.55,
            },
            {
                "name": "random",
                "kind": "random",
                "skip_ratio": ratio,
                "scores": {"arc_easy": 0.4, "piqa": 0.5},
                "average": 0.45,
            },
            {
                "name": f"routers @ capacity {1 - ratio:.3f}",
                "kind": "routers",
                "skip_ratio": ratio,
                "scores": {"arc_easy": 0.58, "piqa": 0.66},
                "average": 0.62,
                "layer_skip_rate": {str(layer): (i + layer) % 3 / 2 for layer in layers},
            },
        ]
    return {"job": {"tasks": ["arc_easy", "piqa"]}, "settings": settings, "headline": {}, "seconds": 1.0}


def _eval_json(bench: dict) -> dict:
    """`routertune eval --output` shape: one setting, per-task skip statistics."""
    layers = bench["routed_layers"]
    return {
        "job": {},
        "setting": {"name": "routers", "kind": "routers"},
        "harness": {
            "skip_ratio": 0.3,
            "layer_skip_rate": {str(layer): 0.3 for layer in layers},
            "tasks": {
                task: {
                    "metrics": {"acc": 0.5, "acc_norm": 0.6},
                    "headline": "acc_norm",
                    "samples": 10,
                    "skip": {
                        "skip_ratio": 0.25 + 0.1 * i,
                        "layer_skip_rate": {str(layer): (layer + i) % 4 / 3 for layer in layers},
                    },
                }
                for i, task in enumerate(["arc_easy", "piqa", "boolq"])
            },
        },
    }


def test_extract_eval_reads_compare_eval_and_free_shapes(bench_json):
    bench = json.loads(bench_json.read_text())
    points, rows = extract_eval(_compare_json(bench))
    assert {p["family"] for p in points} == {"dense", "static", "random", "routers"}
    assert {p["task"] for p in points} == {"arc_easy", "piqa", "average"}
    assert len(rows) == 2 and all(r["task"] == "all tasks" for r in rows)
    with_tasks = _compare_json(bench)  # compare.json now also keeps per-task rates: one heatmap row each
    routers = with_tasks["settings"][3]
    routers["task_layer_skip_rate"] = {"arc_easy": {"14": 0.25}, "piqa": {"14": 0.5}}
    _, rows = extract_eval(with_tasks)
    assert [(r["task"], r["rates"]) for r in rows][:3] == [
        ("arc_easy", {14: 0.25}),
        ("piqa", {14: 0.5}),
        ("all tasks", rows[2]["rates"]),
    ]

    points, rows = extract_eval(_eval_json(bench))
    assert {p["task"] for p in points} == {"arc_easy", "piqa", "boolq", "average"}
    assert [p["accuracy"] for p in points if p["task"] == "piqa"] == [0.6]  # the headline metric
    assert [r["task"] for r in rows] == ["arc_easy", "piqa", "boolq"]

    free = {
        "results": [
            {"method": "MindSkip routers", "task": "hellaswag", "attention_skip_ratio": 0.3, "acc": 0.4},
            {"variant": "static drop", "skip_ratio": 0.3, "accuracy": 0.35},
        ],
        "per_task": {"hellaswag": {"layer_run_rates": {"5": 0.25, "6": 1.0}}},
    }
    points, rows = extract_eval(free)
    assert [(p["family"], p["task"]) for p in points] == [("routers", "hellaswag"), ("static", "all")]
    assert rows == [{"task": "hellaswag", "method": "routers", "rates": {5: 0.75, 6: 0.0}}]
    assert extract_eval({"unrelated": [1, 2, 3]}) == ([], [])


def test_report_with_accuracy_draws_pareto_and_heatmap(bench_json, tmp_path):
    bench = json.loads(bench_json.read_text())
    results = tmp_path / "results"
    write_json(results / "bench.json", bench)
    write_json(results / "compare" / "compare.json", _compare_json(bench))
    write_json(results / "eval_routers.json", _eval_json(bench))
    (results / "broken.json").write_text("{not json")
    out = results / "report"  # inside the inputs: its own files are not read back
    report = build_report(ReportConfig(inputs=[str(results)], output=str(out)))
    names = sorted(p.rsplit("/", 1)[-1] for p in report.plots)
    assert names == ["accuracy_vs_skip.png", "layer_skip_heatmap.png", "memory.png", "speedup.png"]
    for name in names:
        _assert_png(out / name)
    text = (out / "report.md").read_text()
    assert "![accuracy vs skip ratio](accuracy_vs_skip.png)" in text and "No accuracy data" not in text
    assert [n for n in report.notes if "broken.json" in n]
    # a second run over the same folder does not pick up the report's own output
    again = build_report(ReportConfig(inputs=[str(results)], output=str(out)))
    assert again.bench_files == report.bench_files


def test_report_without_results_is_a_clear_error(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(ValueError, match="routertune bench"):
        build_report(ReportConfig(inputs=[str(tmp_path)], output=str(tmp_path / "out")))
    with pytest.raises(FileNotFoundError):
        build_report(ReportConfig(inputs=[str(tmp_path / "missing.json")], output=str(tmp_path / "out")))


def test_cli_report(bench_json, tmp_path, capsys):
    assert cli.main(["report", "--inputs", str(bench_json), "--output", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "report written to" in printed and "speedup.png" in printed
    assert (tmp_path / "r" / "report.md").is_file()

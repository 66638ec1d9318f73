"""The served benchmark's statistics (benchmarks/serve_bench.py), on constructed runs with known answers. The
script's measuring part needs vLLM and minutes; these parts are plain arithmetic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("serve_bench", Path(__file__).parent.parent / "benchmarks" / "serve_bench.py")
serve_bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(serve_bench)


def _entry(dense, static, forced, own, all_run, rounds, ideal=1.1):
    variants = {name: {"cpu_s_all": list(cpu), "ideal_throughput": ideal if name == "routed" else 1.0}
                for name, cpu in (("dense", dense), ("static", static), ("routed_static_set", forced),
                                  ("routed", own), ("routed_all_run", all_run))}
    return {"variants": variants, "repeats": len(dense), "round_of_repeat": list(rounds)}


def test_paired_figures_have_the_known_answer():
    entry = _entry(dense=[10, 20, 10, 20], static=[8, 16, 8, 16], forced=[8.5, 17, 8.5, 17], own=[9, 18, 9, 18],
                   all_run=[10, 20, 11, 22], rounds=[0, 0, 1, 1])
    out = serve_bench.paired_throughput(entry)
    # every repeat: static 1.25x, forced 10/8.5, so a gain ratio of (10/8.5 - 1) / 0.25 (the machine's 2x drift
    # between repeats cancels, as pairing should make it)
    assert out["static_speedup"]["median"] == pytest.approx(1.25)
    assert out["forced_vs_static_gain"]["median"] == pytest.approx((10 / 8.5 - 1) / 0.25)
    assert out["forced_vs_static_gain"]["median_ci95"] == pytest.approx([(10 / 8.5 - 1) / 0.25] * 2)
    assert out["routed_static_set_cpu_over_static"]["median"] == pytest.approx(8.5 / 8)
    # the target in CPU time: gain >= 0.9 of 0.25 <=> forced CPU <= 1.25 / 1.225 of static's
    assert out["routed_static_set_cpu_over_static"]["allowed_by_target"] == pytest.approx(1.25 / 1.225)
    assert out["own_vs_ideal"]["median"] == pytest.approx((10 / 9) / 1.1)
    assert [r["routed_all_run_speedup"] for r in out["per_round"]] == pytest.approx([1.0, 10 / 11])


def test_pooled_runs_keep_every_repeat_and_their_rounds_apart():
    a = _entry([10] * 2, [8] * 2, [8] * 2, [9] * 2, [10] * 2, rounds=[0, 1])
    b = _entry([10] * 3, [8] * 3, [9] * 3, [9] * 3, [10] * 3, rounds=[0, 0, 0])
    pooled = serve_bench.pooled_entry([a, b])
    assert pooled["round_of_repeat"] == [0, 1, 2, 2, 2]
    assert pooled["variants"]["routed_static_set"]["cpu_s_all"] == [8, 8, 9, 9, 9]
    out = serve_bench.paired_throughput(pooled)
    assert [r["round"] for r in out["per_round"]] == [0, 1, 2]
    assert out["routed_static_set_cpu_over_static"]["median"] == pytest.approx(9 / 8)


def test_median_interval_brackets_the_median():
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 0.8]
    low, high = serve_bench.median_interval(values)
    assert min(values) <= low <= sorted(values)[3] <= high <= max(values)
    assert serve_bench.median_interval([2.0] * 5) == [2.0, 2.0]

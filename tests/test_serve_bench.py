"""The served benchmark's statistics (routertune.serve.bench and routertune.stats; benchmarks/serve_bench.py
measures), on constructed runs with known answers. The measuring part needs vLLM and minutes; these parts are
plain arithmetic."""

from __future__ import annotations

import pytest

from routertune import stats
from routertune.serve import bench as serve_bench


def _entry(dense, static, forced, own, all_run, rounds, ideal=1.1):
    variants = {
        name: {"cpu_s_all": list(cpu), "ideal_throughput": ideal if name == "routed" else 1.0}
        for name, cpu in (
            ("dense", dense),
            ("static", static),
            ("routed_static_set", forced),
            ("routed", own),
            ("routed_all_run", all_run),
        )
    }
    return {"variants": variants, "repeats": len(dense), "round_of_repeat": list(rounds)}


def test_paired_figures_have_the_known_answer():
    entry = _entry(
        dense=[10, 20, 10, 20],
        static=[8, 16, 8, 16],
        forced=[8.5, 17, 8.5, 17],
        own=[9, 18, 9, 18],
        all_run=[10, 20, 11, 22],
        rounds=[0, 0, 1, 1],
    )
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
    low, high = stats.median_interval(values)
    assert min(values) <= low <= sorted(values)[3] <= high <= max(values)
    assert stats.median_interval([2.0] * 5) == [2.0, 2.0]


def _draws(gains, repeats, static=1.25, jitter=0.0):
    """One entry whose engine draws (rounds) have the given forced-vs-static gain ratios, static's paired speed-up
    `static` in every repeat, `repeats` repeats per draw; `jitter` spreads forced's CPU time within a draw. The
    machine's drift (dense's CPU time changing between repeats) cancels in every paired figure."""
    dense, stat, forced, rounds = [], [], [], []
    for r, (gain, n) in enumerate(zip(gains, repeats)):
        for k in range(n):
            d = 10.0 + 0.5 * ((r + k) % 3)  # drift, cancelled by pairing
            up = 1 + gain * (static - 1)  # forced's speed-up over dense
            dense.append(d)
            stat.append(d / static)
            forced.append(d / up * (1 + jitter * ((k % 5) - 2)))
            rounds.append(r)
    return _entry(dense, stat, forced, own=dense, all_run=dense, rounds=rounds)


def test_by_process_resamples_draws_not_repeats():
    # three draws, 30 repeats each, tight within a draw (+-0.2%) but far apart between draws (gains 0.5, 1.0,
    # 1.5 of static's): repeats treated as independent give a narrow interval above the 0.9 target, draws as the
    # unit give the spread of the draws, which spans it
    out = serve_bench.by_process(_draws([0.5, 1.0, 1.5], [30, 30, 30], jitter=0.001))
    gain = out["forced_vs_static_gain"]
    assert out["processes"] == 3 and out["repeats"] == 90
    assert [d["forced_vs_static_gain"] for d in out["per_process"]] == pytest.approx([0.5, 1.0, 1.5], abs=0.02)
    assert gain["value"] == pytest.approx(1.0, abs=0.01)
    # all three resampled draws equal to the lowest (or highest) has probability 1/27 > 2.5%: the interval's ends
    # are the extreme draws
    assert gain["ci"] == pytest.approx([0.5, 1.5], abs=0.02)
    assert gain["verdict"].startswith("not shown")
    rep_low, rep_high = out["repeat_level"]["ci"]
    assert 0.9 < rep_low < rep_high < 1.1  # what the repeat-level pooling would have called "met"


def test_by_process_weighs_draws_equally_and_decides_only_on_the_interval():
    # a draw with 16 repeats (gain 0.5) and one with 2 (gain 1.5): each draw weighs the same
    out = serve_bench.by_process(_draws([0.5, 1.5], [16, 2]))
    assert out["forced_vs_static_gain"]["value"] == pytest.approx(1.0)
    assert out["repeat_level"]["forced_vs_static_gain"] == pytest.approx((16 * 0.5 + 2 * 1.5) / 18)
    # the ratio of the mean gains, not the mean of per-draw ratios: static's gain differs between draws
    a, b = _draws([1.0], [3], static=1.2), _draws([0.5], [3], static=1.4)
    out = serve_bench.by_process(serve_bench.pooled_entry([a, b]))
    assert out["forced_vs_static_gain"]["value"] == pytest.approx((0.2 + 0.2) / (0.2 + 0.4))
    met = serve_bench.by_process(_draws([0.95, 1.0, 1.05, 0.97], [3] * 4))["forced_vs_static_gain"]
    assert met["ci"][0] >= 0.9 and met["verdict"] == "met"
    missed = serve_bench.by_process(_draws([0.5, 0.6, 0.55], [3] * 3))["forced_vs_static_gain"]
    assert missed["ci"][1] < 0.9 and missed["verdict"] == "NOT met"
    one = serve_bench.by_process(_draws([1.0], [16]))
    assert one["forced_vs_static_gain"]["ci"] == [None, None]
    assert one["forced_vs_static_gain"]["verdict"].startswith("not shown: one engine draw")


def test_pooling_keeps_every_draw_including_single_round_runs():
    # two 2-round runs and a run without rounds (one draw of 16 repeats, as single_draw_16.json): 5 draws
    a, b = _draws([1.0, 1.0], [3, 3]), _draws([1.0, 1.0], [3, 3])
    single = _draws([0.5], [16])
    del single["round_of_repeat"]
    out = serve_bench.by_process(serve_bench.pooled_entry([a, b, single]))
    assert out["processes"] == 5 and out["repeats"] == 28
    assert out["per_process"][-1]["repeats"] == 16
    assert out["forced_vs_static_gain"]["value"] == pytest.approx((4 * 1.0 + 0.5) / 5)


def test_against_the_vllm_default_weighs_draws_equally_and_pairs_by_repeat():
    # draw 0: two repeats, the default engine 12 s and 24 s (the machine drifting 2x), routed 10 and 20: 1.2x in
    # both; draw 1: one repeat, default 9, routed 10: 0.9x. Equal weight per draw: (1.2 + 0.9) / 2, not the
    # repeat mean (1.2 + 1.2 + 0.9) / 3, and not a ratio of medians over unpaired runs.
    entry = _entry([10, 20, 10], [8, 16, 8], [8, 16, 8], [10, 20, 10], [10, 20, 10], rounds=[0, 0, 1])
    entry["variants"]["dense_default"] = {"cpu_s_all": [12, 24, 9], "ideal_throughput": 1.0}
    out = serve_bench.against_vllm_default(entry)
    routed = out["speedup_over_vllm_default"]["routed"]
    assert routed["per_process"] == pytest.approx([1.2, 0.9])
    assert routed["mean"] == pytest.approx(1.05)
    assert routed["ci"][0] == pytest.approx(0.9) and routed["ci"][1] == pytest.approx(1.2)
    assert out["speedup_over_vllm_default"]["static"]["per_process"] == pytest.approx([1.5, 9 / 8])
    assert "dense_default" not in out["speedup_over_vllm_default"] and out["processes"] == 2
    # one draw: no interval across draws
    single = _entry([10], [8], [8], [10], [10], rounds=[0])
    single["variants"]["dense_default"] = {"cpu_s_all": [12], "ideal_throughput": 1.0}
    assert serve_bench.against_vllm_default(single)["speedup_over_vllm_default"]["routed"]["ci"] is None
    with pytest.raises(ValueError, match="dense_default"):
        serve_bench.against_vllm_default(_entry([10], [8], [8], [10], [10], rounds=[0]))

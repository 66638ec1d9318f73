"""The trade-off curve (routertune.eval.tradeoff) and the importance objective (routertune.train.importance).

References are independent of the code under test: per-text forwards of the plain model for NLL, routers
forced to a skip set (the routing code path) for static drop's KL, closed-form statistics for the bootstrap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from routertune import RoutedModel, RouterConfig, stats
from routertune.cli import main
from routertune.eval import tradeoff
from routertune.train import importance
from tiny_lm import tiny_llama, tiny_tokenizer

LAYERS = [1, 2, 3, 4]


def _texts(n: int = 6, max_tokens: int = 48) -> list[list[int]]:
    tok = tiny_tokenizer()
    texts = tradeoff.domain_texts("lambada", n // 2) + tradeoff.domain_texts("code", n - n // 2)
    return [tok(t)["input_ids"][:max_tokens] for t in texts]


def _fitted(seed: int = 0) -> RoutedModel:
    """The default recipe's core on a tiny model: routers fitted to per-input attention importance."""
    routed = RoutedModel(tiny_llama(seed), RouterConfig(layers=LAYERS))
    tok = tiny_tokenizer()
    texts = tradeoff.domain_texts("wikipedia", 24) + tradeoff.domain_texts("code", 24)
    lists = [tok(t)["input_ids"][:40] for t in texts]
    batches = [
        {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "prompt_mask": b.route_mask}
        for b in tradeoff.text_batches(lists, 0, batch_size=8)
    ]
    fit = importance.fit_routers(routed, batches[:4], batches[4:], target_capacity=0.5)
    assert fit.records == 32
    return routed


def test_static_k0_and_all_running_routers_equal_dense_and_static_kl_matches_forced_skip():
    routed = RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS))
    lists = _texts()
    batches = tradeoff.text_batches(lists, 0, batch_size=4)
    static0 = tradeoff.Variant("static", (), 0)
    all_run = tradeoff.Variant("routers", threshold=1e-9)
    static1 = tradeoff.Variant("static", (3,), 1)
    scores = tradeoff.score_texts(routed, batches, [tradeoff.Variant("dense"), static0, all_run, static1], len(lists))
    np.testing.assert_allclose(scores[static0].kl, 0, atol=1e-5)
    np.testing.assert_allclose(scores[all_run].kl, 0, atol=1e-5)
    assert scores[all_run].skipped.sum() == 0
    assert (scores[static1].kl > 1e-4).all()
    # independent reference: each text alone, the plain model (dense NLL) and routers forced to skip layer 3
    with torch.no_grad():
        for i, ids in enumerate(lists):
            x = torch.tensor([ids])
            half = len(ids) // 2
            with routed.forced("run"):
                dense = F.log_softmax(routed(input_ids=x).logits[0, half - 1 : -1].float(), -1)
            with routed.forced("skip_set", {3}):
                dropped = F.log_softmax(routed(input_ids=x).logits[0, half - 1 : -1].float(), -1)
            target = x[0, half:]
            nll = -dense.gather(-1, target.unsqueeze(-1)).sum()
            assert scores[static0].nll[i] == pytest.approx(float(nll), rel=1e-4)
            assert scores[static0].tokens[i] == len(ids) - half
            kl = (dense.exp() * (dense - dropped)).sum()
            assert scores[static1].kl[i] == pytest.approx(float(kl), rel=1e-3, abs=1e-5)


def test_sweep_measured_skip_rises_with_the_threshold():
    routed = _fitted()
    lists = _texts(8)
    batches = tradeoff.text_batches(lists, 0, batch_size=4)
    calibration = [{"input_ids": b.input_ids, "attention_mask": b.route_mask} for b in batches]
    thresholds = tradeoff.sweep_thresholds(routed, calibration, [0.1, 0.2, 0.3], 6, num_layers=6)
    assert thresholds == sorted(thresholds) and len(thresholds) >= 4
    variants = [tradeoff.Variant("routers", threshold=t) for t in thresholds]
    scores = tradeoff.score_texts(routed, batches, variants, len(lists))
    skips = [scores[v].skipped.mean() for v in variants]
    assert all(a <= b for a, b in zip(skips, skips[1:])), skips
    assert skips[-1] > skips[0]


def test_paired_bootstrap_known_answers():
    a = np.arange(50, dtype=float)
    diff, low, high = stats.paired_bootstrap(a + 0.5, a)  # a constant shift has no sampling spread
    assert (diff, low, high) == (0.5, 0.5, 0.5)
    rng = np.random.default_rng(1)
    d = rng.normal(0.3, 1.0, size=400)
    diff, low, high = stats.paired_bootstrap(d, np.zeros(400), iterations=4000)
    assert diff == pytest.approx(d.mean())
    half_width = 1.96 * d.std(ddof=1) / math.sqrt(400)  # the normal-theory interval of a mean
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)
    assert low < d.mean() < high
    # weighted: a ratio of sums (per-token means from per-text sums)
    w = np.array([1.0, 3.0])
    diff, _, _ = stats.paired_bootstrap(np.array([2.0, 6.0]), np.zeros(2), weights=w)
    assert diff == pytest.approx((2.0 + 18.0) / 4.0)
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_bootstrap(np.zeros(3), np.zeros(4))


def test_interpolation_is_linear_per_item_and_never_extrapolates():
    points = [(0.0, np.array([0.0, 1.0])), (0.2, np.array([1.0, 1.0])), (0.1, np.array([0.5, 0.0]))]
    values, between = stats.interpolate(points, 0.15)
    np.testing.assert_allclose(values, [0.75, 0.5])
    assert between == (0.1, 0.2)
    assert stats.interpolate(points, 0.25) is None
    values, _ = stats.interpolate(points, 0.2)
    np.testing.assert_allclose(values, [1.0, 1.0])


def test_importance_fit_meets_the_capacity_and_orders_layers_by_importance():
    routed = _fitted()
    lists = _texts(8, 40)
    batches = tradeoff.text_batches(lists, 0, batch_size=8)
    feats, targets = importance.collect(
        routed,
        [{"input_ids": b.input_ids, "attention_mask": b.attention_mask, "prompt_mask": b.route_mask} for b in batches],
    )
    # with zero weights the routers are a static drop: the biases follow the mean log importance
    biases = {i: float(routed.routers[i].bias.detach()) for i in LAYERS}
    means = {i: float(targets[i].mean()) for i in LAYERS}
    assert sorted(LAYERS, key=biases.get) == sorted(LAYERS, key=means.get)
    # per input, the fitted logits track each layer's own importance on texts never fitted
    corr = []
    for i in LAYERS:
        logits = (
            feats[i].float() @ routed.routers[i].weight.detach().double().float().squeeze(0) + routed.routers[i].bias
        )
        corr.append(np.corrcoef(logits.detach().numpy(), targets[i].numpy())[0, 1])
    assert np.mean(corr) > 0.3, corr
    with pytest.raises(ValueError, match="attention routers"):
        importance.collect(RoutedModel(tiny_llama(), RouterConfig(granularity="mlp", layers=LAYERS)), [])


def test_legacy_router_files_without_bias_load_with_zero_bias(tmp_path):
    from safetensors.torch import load_file, save_file

    routed = RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS))
    with torch.no_grad():
        for r in routed.routers.values():
            r.weight.normal_()
            r.bias.fill_(3.0)
    routed.save_pretrained(tmp_path)
    state = load_file(tmp_path / "routers.safetensors")
    save_file({k: v for k, v in state.items() if k.endswith(".weight")}, tmp_path / "routers.safetensors")
    loaded = RoutedModel.from_pretrained(tiny_llama(), tmp_path)
    for i, r in loaded.routers.items():
        assert float(r.bias.detach()) == 0.0
        torch.testing.assert_close(r.weight, state[f"layers.{i}.router.weight"])


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> str:
    """A tiny Llama with the byte tokenizer, saved as a local Hugging Face folder for the CLI."""
    folder = tmp_path_factory.mktemp("byte-llama")
    tiny_llama(layers=6).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def test_default_recipe_and_tradeoff_end_to_end(byte_model, tmp_path, capsys):
    routers, out = tmp_path / "routers", tmp_path / "tradeoff"
    assert (
        main(
            [
                "train",
                "--model",
                byte_model,
                "--output",
                str(routers),
                "--samples",
                "48",
                "--heldout-samples",
                "16",
                "--max-length",
                "64",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    metrics = json.loads((routers / "train_metrics.json").read_text())
    assert metrics["train"]["objective"] == "importance"
    # the default trust region piles a layer's inputs with upward parts onto its prior, so the share that runs
    # moves in steps (of up to 1/8 here: 48 records, 4 layers, half of a layer's inputs on one pile)
    assert metrics["result"]["fit"]["train_capacity"] == pytest.approx(0.75, abs=0.05)
    config = json.loads((routers / "router_config.json").read_text())
    assert config["layers"] == [1, 2, 3, 4]  # every layer but the first and the last, as static drop
    assert (
        main(
            [
                "tradeoff",
                "--routers",
                str(routers),
                "--model",
                byte_model,
                "--output",
                str(out),
                "--texts",
                "6",
                "--max-tokens",
                "40",
                "--tasks",
                "arc_easy",
                "--limit",
                "12",
                "--fidelity-prompts",
                "3",
                "--fidelity-tokens",
                "4",
                "--max-drop",
                "3",
                "--random-seeds",
                "2",
                "--sweep-points",
                "6",
                "--skip-targets",
                "0.2",
                "--bootstrap",
                "200",
                "--calibration-samples",
                "8",
            ]
        )
        == 0
    )
    result = json.loads((out / "tradeoff.json").read_text())
    assert set(result["domains"]) == set(tradeoff.DOMAINS)
    dense = result["domains"]["code"]["settings"]["dense"]
    assert dense["kl"] == 0 and dense["skip"] == 0
    static1 = result["domains"]["code"]["settings"]["static 1"]
    assert static1["skip"] == pytest.approx(1 / 6) and static1["kl"] > 0
    assert result["tasks"]["arc_easy"]["items"] == 12
    assert "0.20" in result["matched"]["arc_easy"] and "0.20" in result["matched"]["lambada"]
    assert result["matched"]["lambada"]["0.20"]["static"]["reached"]
    task_row = result["matched"]["arc_easy"]["0.20"]
    assert task_row["routers"]["reached"] and task_row["static"]["reached"], task_row
    static_ks = {int(name.split()[1]) for name in result["tasks"]["arc_easy"]["settings"] if name.startswith("static")}
    assert math.floor(task_row["at"] * 6 + 1e-9) in static_ks | {0} and math.ceil(
        task_row["at"] * 6 - 1e-9
    ) in static_ks | {0}
    assert (out / "tradeoff.md").read_text().startswith("| where |")
    assert "routers - static" in capsys.readouterr().out


def test_default_mix_renders_an_even_share_as_plain_text():
    from routertune.train import data
    from routertune.train import data as pipeline

    records = data.default_records("train", n=10)
    mixed = pipeline.mix_forms(records, 0.5)
    forms = ["text" in r for r in mixed]
    assert forms == [False, True] * 5
    user, answer = records[1]["messages"][0]["content"], records[1]["messages"][-1]["content"]
    assert user in mixed[1]["text"] and answer in mixed[1]["text"] and "<|im_start|>" not in mixed[1]["text"]
    assert not any("text" in r for r in pipeline.mix_forms(records, 0.0))
    assert all("text" in r for r in pipeline.mix_forms(records, 1.0))


def test_refined_sweep_brackets_each_target_tightly():
    calls = []

    def skip_of(t):  # a convex, monotone response like a real sweep
        calls.append(t)
        return t**3

    known = {t: t**3 for t in (0.1, 0.5, 0.9)}
    tradeoff.refine_sweep(skip_of, known, [0.1, 0.3], max_gap=0.02)
    for target in (0.1, 0.3):
        below = max(s for s in known.values() if s <= target)
        above = min(s for s in known.values() if s > target)
        assert above - below <= 0.02
    assert calls and len(calls) <= 12 and all(known[t] == t**3 for t in known)


def test_shrink_scales_the_per_input_part_around_the_training_mean():
    """shrink 0 leaves the static prior (zero weights, the same prediction at the mean input); shrink s scales
    every router's weights by s relative to the full fit."""
    tok = tiny_tokenizer()
    lists = [
        tok(t)["input_ids"][:40] for t in tradeoff.domain_texts("wikipedia", 16) + tradeoff.domain_texts("code", 16)
    ]
    batches = [
        {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "prompt_mask": b.route_mask}
        for b in tradeoff.text_batches(lists, 0, batch_size=8)
    ]
    fitted = {}
    for shrink in (1.0, 0.5, 0.0):
        routed = RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS))
        importance.fit_routers(routed, batches[:3], batches[3:], target_capacity=0.5, shrink=shrink)
        fitted[shrink] = {i: (r.weight.detach().clone(), float(r.bias.detach())) for i, r in routed.routers.items()}
    for i in LAYERS:
        assert torch.count_nonzero(fitted[0.0][i][0]) == 0
        torch.testing.assert_close(fitted[0.5][i][0], 0.5 * fitted[1.0][i][0])
    with pytest.raises(ValueError, match="shrink"):
        importance.fit_routers(RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS)), batches[:1], [], 0.5, shrink=2.0)


def test_relative_target_removes_each_inputs_level_and_keeps_each_layers_mean():
    """The relative target: per record, the mean over layers is the same constant for every record (no input
    is 'easier overall'), each layer keeps its mean over records, and within a record the layers keep their
    differences. Checked against a direct computation on random values."""
    gen = torch.Generator().manual_seed(0)
    y = {i: torch.randn(50, generator=gen, dtype=torch.float64) + i for i in (1, 2, 5)}
    rel = importance.relative_to_input(y)
    levels = torch.stack([rel[i] for i in (1, 2, 5)]).mean(0)
    overall = torch.stack([y[i] for i in (1, 2, 5)]).mean()
    torch.testing.assert_close(levels, torch.full_like(levels, float(overall)))
    for i in y:
        torch.testing.assert_close(rel[i].mean(), y[i].mean())
    torch.testing.assert_close(rel[5] - rel[1], y[5] - y[1])


def test_relative_fit_skips_a_steadier_number_of_layers_per_input():
    """Fitted to the relative target, the routers' summed logit over layers varies less from input to input
    than when fitted to the absolute one (the per-input level is what the relative target removes)."""
    tok = tiny_tokenizer()
    lists = [
        tok(t)["input_ids"][:40] for t in tradeoff.domain_texts("wikipedia", 16) + tradeoff.domain_texts("code", 16)
    ]
    batches = [
        {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "prompt_mask": b.route_mask}
        for b in tradeoff.text_batches(lists, 0, batch_size=8)
    ]
    spread = {}
    for target in ("absolute", "relative"):
        routed = RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS))
        fit = importance.fit_routers(routed, batches, [], target_capacity=0.5, shrink=1.0, target=target)
        assert fit.target == target
        x, _ = importance.collect(routed, batches)
        logits = torch.stack(
            [x[i] @ routed.routers[i].weight.detach().double().view(-1) for i in LAYERS]
        )  # (layers, N)
        spread[target] = float(logits.sum(0).std())
    assert spread["relative"] < 0.5 * spread["absolute"]
    with pytest.raises(ValueError, match="target"):
        importance.fit_routers(
            RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS)), batches[:1], [], 0.5, target="levels"
        )


def test_mixed_workload_pools_texts_and_interpolates_at_the_pooled_skip():
    """routertune.eval.mixed_workload against a hand computation: two domains, static drop (k=0, 3 of 30) and two
    router thresholds whose skips differ by domain; at pooled skip 0.1 the routers' per-text KL is the
    per-text linear interpolation between the two router points (pooled skips 0.05 and 0.25)."""
    from routertune.eval import mixed_workload as mixed

    def setting(skip, kl):
        return {"skip": skip, "per_text_kl": kl, "per_text_tokens": [10.0, 20.0]}

    domains = {
        "a": {
            "dense": setting(0.0, [0.0, 0.0]),
            "static 3": setting(0.1, [3.0, 6.0]),
            "searched static 3": setting(0.1, [1.0, 2.0]),
            "routers @ 0.4": setting(0.0, [0.0, 0.0]),
            "routers @ 0.5": setting(0.2, [2.0, 4.0]),
        },
        "b": {
            "dense": setting(0.0, [0.0, 0.0]),
            "static 3": setting(0.1, [1.0, 2.0]),
            "searched static 3": setting(0.1, [0.5, 4.0]),
            "routers @ 0.4": setting(0.1, [1.0, 1.0]),
            "routers @ 0.5": setting(0.3, [3.0, 5.0]),
            "routers @ 0.45": setting(0.1, [9.0, 9.0]),
        },  # not measured on domain a: left out
    }
    result = {
        "domains": {d: {"settings": s} for d, s in domains.items()},
        "job": {"skip_targets": [0.1], "bootstrap": 200},
    }
    out = mixed.mixed_workload(result)
    m = out["matched"]["0.10"]
    tokens = np.array([10.0, 20.0, 10.0, 20.0])
    routers = 0.75 * np.array([0, 0, 1, 1]) / tokens + 0.25 * np.array([2, 4, 3, 5]) / tokens  # pooled 0.05 .. 0.25
    static = np.array([3, 6, 1, 2]) / tokens  # static 3 is exactly at 0.1
    assert m["routers"] == pytest.approx((routers * tokens).sum() / tokens.sum())
    assert m["static"] == pytest.approx((static * tokens).sum() / tokens.sum())
    assert m["minus_static"] == pytest.approx(m["routers"] - m["static"])
    assert m["routers_between"] == [pytest.approx(0.05), pytest.approx(0.25)]
    # the searched static order is a second baseline, compared on the same texts
    searched = np.array([1.0, 2.0, 0.5, 4.0]) / tokens
    assert out["baselines"] == ["static", "searched"]
    assert m["searched"] == pytest.approx((searched * tokens).sum() / tokens.sum())
    assert m["minus_searched"] == pytest.approx(m["routers"] - m["searched"])
    low, high = m["searched_interval"]
    assert low <= m["minus_searched"] <= high
    assert "routers - searched static" in mixed.markdown(out)


def _token_routed(threshold: float = 0.5, **config) -> tuple[RoutedModel, dict]:
    """Token-level routers with seeded random weights (tokens both run and skip at every layer)."""
    routed = RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS, unit="token", threshold=threshold, **config))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for router in routed.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 2)
            router.bias.copy_(torch.randn(router.bias.shape, generator=gen) * 0.5)
    weights = {layer: (r.weight.detach().clone(), r.bias.detach().clone()) for layer, r in routed.routers.items()}
    return routed, weights


def test_token_routers_skip_is_measured_on_the_scored_tokens_and_kl_matches_the_reference():
    """Token routers on the curve: per text, KL and skip equal those of the independent reference (the plain
    model with per-layer masks, each text alone); the skip counts (scored token, layer) pairs skipped."""
    from token_reference import reference_logits

    routed, weights = _token_routed()
    plain = tiny_llama()
    lists = _texts()
    batches = tradeoff.text_batches(lists, 0, batch_size=4)  # right-padded batches of mixed lengths
    variant = tradeoff.Variant("routers", threshold=0.5)
    scores = tradeoff.score_texts(routed, batches, [tradeoff.Variant("dense"), variant], len(lists))[variant]
    differs = 0
    with torch.no_grad():
        for i, ids in enumerate(lists):
            x, n, half = torch.tensor([ids]), len(ids), len(ids) // 2
            dense = F.log_softmax(plain(input_ids=x).logits[0, half - 1 : -1].float(), -1)
            logits, decisions = reference_logits(
                plain, "attention", weights, {layer: 0.5 for layer in LAYERS}, x, torch.ones_like(x)
            )
            routed_lp = F.log_softmax(logits[0, half - 1 : -1].float(), -1)
            kl = (dense.exp() * (dense - routed_lp)).sum()
            assert scores.kl[i] == pytest.approx(float(kl), rel=1e-3, abs=1e-5)
            skipped = torch.stack([~decisions[layer][0] for layer in LAYERS]).sum(0).double()  # (T,) per token
            assert 0 < skipped.sum() < len(LAYERS) * n  # decisions are mixed
            assert scores.skipped[i] == pytest.approx(float(skipped[half - 1 : n - 1].mean()))
            assert scores.skipped_all[i] == pytest.approx(float(skipped.mean()))
            differs += abs(float(skipped[half - 1 : n - 1].mean()) - float(skipped.mean())) > 1e-6
    assert differs  # the scored tokens' skip is not the all-token one here, so the test tells them apart
    summary = scores.summary(6)
    assert summary["skip"] == pytest.approx(scores.skipped.mean() / 6)
    assert summary["skip_all_tokens"] == pytest.approx(scores.skipped_all.mean() / 6)


def test_sweep_spans_the_targets_for_token_routers():
    routed, _ = _token_routed()
    lists = _texts(8)
    batches = tradeoff.text_batches(lists, 0, batch_size=4)
    placement = [{"input_ids": b.input_ids, "attention_mask": b.route_mask} for b in batches]
    targets = [0.1, 0.2, 0.3]
    thresholds = tradeoff.sweep_thresholds(routed, placement, targets, 6, num_layers=6)
    assert thresholds == sorted(thresholds) and len(thresholds) >= 4
    variants = [tradeoff.Variant("routers", threshold=t) for t in thresholds]
    scores = tradeoff.score_texts(routed, batches, variants, len(lists))
    skips = [float(scores[v].skipped.mean() / 6) for v in variants]
    assert all(a <= b + 1e-9 for a, b in zip(skips, skips[1:])), skips
    # the sweep's points bracket every target (the threshold of a token router is per token, so the measured
    # (token, layer) skip follows the score quantiles)
    assert skips[0] < min(targets) and skips[-1] > max(targets), skips


def test_tradeoff_cli_domains_only_and_top_k_token_routers_swept_by_threshold(byte_model, tmp_path):
    """`--tasks` with no names runs no task; token routers saved in top-k mode are traced with thresholds
    (top-k would ignore the threshold and put every point at one skip)."""
    from transformers import AutoModelForCausalLM

    routers, out = tmp_path / "routers", tmp_path / "tradeoff"
    routed = RoutedModel(
        AutoModelForCausalLM.from_pretrained(byte_model), RouterConfig(layers=LAYERS, unit="token", token_top_k=0.5)
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for router in routed.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 2)
    routed.save_pretrained(routers)
    assert (
        main(
            [
                "tradeoff",
                "--routers",
                str(routers),
                "--model",
                byte_model,
                "--output",
                str(out),
                "--domains",
                "code",
                "--texts",
                "6",
                "--max-tokens",
                "40",
                "--tasks",
                "--fidelity-prompts",
                "0",
                "--max-drop",
                "2",
                "--random-seeds",
                "0",
                "--sweep-points",
                "5",
                "--skip-targets",
                "0.2",
                "--bootstrap",
                "100",
                "--calibration-samples",
                "8",
            ]
        )
        == 0
    )
    result = json.loads((out / "tradeoff.json").read_text())
    assert result["tasks"] == {} and result["job"]["tasks"] == [] and set(result["domains"]) == {"code"}
    assert result["unit"] == "token" and result["token_top_k_swept_as_thresholds"] == 0.5
    skips = [s["skip"] for name, s in result["domains"]["code"]["settings"].items() if name.startswith("routers")]
    assert len(set(round(s, 6) for s in skips)) >= 3, skips  # the threshold moves the skip
    assert all(
        "skip_all_tokens" in s
        for name, s in result["domains"]["code"]["settings"].items()
        if name.startswith("routers")
    )


def test_accuracy_settings_bracket_a_router_point_outside_the_targets_span():
    """When the only router points lie outside [lowest, highest target] (9.7% and 20.3% of 30 layers for targets
    10% and 20%), static drop must also run at the layer counts around those points (2 and 3; 6 and 7), so
    that it can be interpolated where the routers were measured."""
    statics = [tradeoff.Variant("static", k=k) for k in range(0, 11)]
    job = tradeoff.TradeoffJob(routers="x", skip_targets=[0.1, 0.2])
    chosen = tradeoff._accuracy_settings(statics, {0.4: 0.097, 0.5: 0.203}, job, 30)
    ks = {v.k for v in chosen if v.kind == "static"}
    assert {2, 3, 6, 7} <= ks
    assert [v.threshold for v in chosen if v.kind == "routers"] == [0.4, 0.5]


def test_accuracy_against_the_searched_order_alone():
    """--accuracy-settings searched runs the searched order (no 1 - cos static drop) around each target, and
    compares the routers with it where they measured their skip: the searched order interpolated between its
    counts, paired per item, computed here by hand."""
    variants = [tradeoff.Variant("static", k=k) for k in range(0, 4)]
    variants += [tradeoff.Variant("searched", k=k, drop=tuple(range(k))) for k in range(1, 4)]
    job = tradeoff.TradeoffJob(routers="x", skip_targets=[0.1], accuracy_settings="searched", searched_order="o")
    chosen = tradeoff._accuracy_settings(variants, {0.4: 0.1, 0.5: 0.2}, job, 30)
    assert {v.kind for v in chosen} == {"searched", "routers"} and [v.k for v in chosen if v.kind != "routers"] == [3]

    rng = np.random.default_rng(0)
    two, three, routers = (rng.integers(0, 2, 400).astype(float) for _ in range(3))
    scores = {
        tradeoff.Variant("searched", k=2, drop=(0, 1)): tradeoff.TaskScores(two, 2 / 30),
        tradeoff.Variant("searched", k=3, drop=(0, 1, 2)): tradeoff.TaskScores(three, 3 / 30),
        tradeoff.Variant("routers", threshold=0.5): tradeoff.TaskScores(routers, 2.5 / 30),
    }
    entry = tradeoff.task_matched(scores, [2.5 / 30], [0.1], iterations=200)["0.10"]
    assert "static" not in entry and entry["at"] == pytest.approx(2.5 / 30)
    expected = routers.mean() - (two.mean() + three.mean()) / 2  # halfway between searched 2 and 3
    assert entry["routers"]["minus_searched"] == pytest.approx(expected)
    low, high = entry["routers"]["interval_searched"]
    assert low <= expected <= high
    assert "| - |" in tradeoff.markdown_table({"matched": {"arc_easy": {"0.10": entry}}, "tasks": {"arc_easy": {}}})
    with pytest.raises(ValueError, match="searched static order"):
        tradeoff.TradeoffJob(routers="x", accuracy_settings="searched", searched_static=False)


def test_static_counts_are_added_around_the_router_points_measured_skip():
    """The accuracy run's router points measure their skip on all the items, which can leave static drop's
    estimated counts on one side of it (the full demo: PIQA at 9.7% and 20.3% with static 3 and 6 run, both
    rows 'not reached'): the counts on either side of each measured skip are added, and only those missing."""
    assert tradeoff.static_counts_to_add([0.097, 0.203], {3, 6}, [0.1, 0.2], 30) == [2, 7]
    assert tradeoff.static_counts_to_add([0.1, 0.2], {3, 6}, [0.1, 0.2], 30) == []  # exactly on a count
    assert tradeoff.static_counts_to_add([0.02], {3}, [0.1], 30) == [0, 1]  # 0: the dense model
    assert tradeoff.static_counts_to_add([0.097, 0.5], {2, 3}, [0.1], 30) == []  # only the nearest point counts
    assert tradeoff.static_counts_to_add([], set(), [0.1], 30) == []


def test_accuracy_comparison_is_reached_where_the_router_point_lands_off_the_estimate(
    byte_model, tmp_path, monkeypatch
):
    """The accuracy settings are chosen on an estimate of each router point's skip; here the choice is made
    wrong on purpose (static 1 only, beside the routers' deepest threshold) and the run must still add the
    static counts around the skip the router point measures on the items, so the row is reached."""
    routers, out = tmp_path / "routers", tmp_path / "tradeoff"
    assert (
        main(
            [
                "train",
                "--model",
                byte_model,
                "--output",
                str(routers),
                "--samples",
                "32",
                "--heldout-samples",
                "8",
                "--max-length",
                "48",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )

    def misplaced(variants, skips, job, num_layers):
        return [v for v in variants if v.kind == "static" and v.k == 1] + [
            tradeoff.Variant("routers", threshold=max(skips, key=lambda t: skips[t]))
        ]

    monkeypatch.setattr(tradeoff, "_accuracy_settings", misplaced)
    assert (
        main(
            [
                "tradeoff",
                "--routers",
                str(routers),
                "--model",
                byte_model,
                "--output",
                str(out),
                "--domains",
                "--tasks",
                "arc_easy",
                "--limit",
                "8",
                "--fidelity-prompts",
                "0",
                "--max-drop",
                "1",
                "--random-seeds",
                "0",
                "--sweep-points",
                "4",
                "--skip-targets",
                "0.2",
                "--bootstrap",
                "100",
                "--calibration-samples",
                "8",
            ]
        )
        == 0
    )
    result = json.loads((out / "tradeoff.json").read_text())
    row = result["matched"]["arc_easy"]["0.20"]
    assert row["at"] > 1 / 6, row  # off static 1's side: the comparison needs counts that were not chosen
    assert row["routers"]["reached"] and row["static"]["reached"], row
    settings = result["tasks"]["arc_easy"]["settings"]
    assert (
        f"static {math.floor(row['at'] * 6 + 1e-9)}" in settings
        and f"static {math.ceil(row['at'] * 6 - 1e-9)}" in settings
    )


def test_resume_keeps_what_finished_measures_the_rest_and_equals_a_full_run(byte_model, tmp_path, monkeypatch, capsys):
    """An interrupted run is continued with --resume: the finished domains, fidelity and task settings are taken
    from tradeoff.json, only the missing task settings are scored, and the result equals an uninterrupted run.
    A run of another job, or one whose settings no longer match the routers, is refused."""
    routers, out = tmp_path / "routers", tmp_path / "tradeoff"
    assert (
        main(
            [
                "train",
                "--model",
                byte_model,
                "--output",
                str(routers),
                "--samples",
                "32",
                "--heldout-samples",
                "8",
                "--max-length",
                "48",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    flags = [
        "tradeoff",
        "--routers",
        str(routers),
        "--model",
        byte_model,
        "--output",
        str(out),
        "--domains",
        "code",
        "--texts",
        "4",
        "--max-tokens",
        "32",
        "--tasks",
        "arc_easy",
        "--limit",
        "8",
        "--fidelity-prompts",
        "2",
        "--fidelity-tokens",
        "3",
        "--max-drop",
        "2",
        "--random-seeds",
        "1",
        "--sweep-points",
        "4",
        "--skip-targets",
        "0.2",
        "--bootstrap",
        "100",
        "--calibration-samples",
        "8",
    ]
    assert main(flags) == 0
    full = json.loads((out / "tradeoff.json").read_text())
    settings = list(full["tasks"]["arc_easy"]["settings"])
    assert len(settings) >= 2
    cut = json.loads(json.dumps(full))  # as if stopped after the first task setting
    cut["tasks"]["arc_easy"]["settings"] = {settings[0]: full["tasks"]["arc_easy"]["settings"][settings[0]]}
    del cut["matched"]["arc_easy"]
    cut["seconds"] = 1000.0  # the stopped run's elapsed time, saved with its last write
    (out / "tradeoff.json").write_text(json.dumps(cut))

    scored = []
    real_score_tasks = tradeoff.score_tasks
    monkeypatch.setattr(tradeoff, "score_tasks", lambda *a, **k: scored.append(a[3].name) or real_score_tasks(*a, **k))
    real_score_texts = tradeoff.score_texts
    monkeypatch.setattr(tradeoff, "score_texts", lambda *a, **k: pytest.fail("a finished domain was measured again"))
    real_fidelity = tradeoff._fidelity
    monkeypatch.setattr(tradeoff, "_fidelity", lambda *a, **k: pytest.fail("finished fidelity was measured again"))
    assert main(flags + ["--resume"]) == 0
    resumed = json.loads((out / "tradeoff.json").read_text())
    assert scored == settings[1:]
    assert resumed["resumed"] == {
        "domains": ["code"],
        "fidelity": True,
        "task_settings": {"arc_easy": settings[:1]},
        "seconds_before": 1000.0,
    }
    assert 1000 < resumed["seconds"] < 1000 + full["seconds"] + 60  # the time of both sessions
    for key in ("domains", "fidelity", "tasks", "variants"):
        assert resumed[key] == full[key], key
    for key in ("code", "arc_easy"):
        assert resumed["matched"][key] == full["matched"][key]

    assert main(flags[: flags.index("--limit") + 1] + ["6"] + flags[flags.index("--limit") + 2 :] + ["--resume"]) == 2
    assert "different job (limit differ: limit 8 there, 6 here)" in capsys.readouterr().err
    monkeypatch.setattr(tradeoff, "score_texts", real_score_texts)
    monkeypatch.setattr(tradeoff, "_fidelity", real_fidelity)
    stored = json.loads((out / "tradeoff.json").read_text())

    def resume_with(**changes) -> str:
        (out / "tradeoff.json").write_text(json.dumps({**stored, **changes}))
        assert main(flags + ["--resume"]) == 2
        return capsys.readouterr().err

    variants = json.loads(json.dumps(stored["variants"]))
    variants[1]["drop"] = [9]  # static drop's layers no longer what the importance gives
    assert "started from other settings" in resume_with(variants=variants)
    task = {**stored["tasks"]["arc_easy"], "items": 7}  # the task data changed: its items no longer pair up
    assert "scored arc_easy on 7 items" in resume_with(tasks={"arc_easy": task})

    # routers retrained into the same folder: with fixed thresholds every setting looks the same, only the
    # routers' fingerprint tells the runs apart
    fixed = flags + ["--thresholds", "0.5", "--output", str(tmp_path / "fixed")]
    assert main(fixed) == 0
    from safetensors.torch import load_file, save_file

    weights = load_file(routers / "routers.safetensors")
    name = next(k for k in weights if k.endswith("bias"))
    weights[name] = weights[name] + 0.5
    save_file(weights, routers / "routers.safetensors")
    assert main(fixed + ["--resume"]) == 2
    assert "routers_sha256" in capsys.readouterr().err


def test_router_sets_compares_two_runs_at_the_same_measured_skip():
    """routertune.eval.router_sets against a hand computation: run A's routers reach skip 0.1 halfway between
    two points, run B's exactly at one point; the mixed stream pools both domains; other texts are refused."""
    from routertune.eval import router_sets

    def setting(skip, kl, tokens=(10.0, 20.0)):
        return {"skip": skip, "per_text_kl": kl, "per_text_tokens": list(tokens)}

    def run(domains):
        return {"domains": {d: {"settings": s} for d, s in domains.items()}}

    a = run(
        {
            "x": {
                "dense": setting(0, [0, 0]),
                "routers @ 0.4": setting(0.0, [0, 0]),
                "routers @ 0.5": setting(0.2, [2, 4]),
            },
            "y": {
                "dense": setting(0, [0, 0]),
                "routers @ 0.4": setting(0.0, [0, 0]),
                "routers @ 0.5": setting(0.2, [4, 8]),
            },
        }
    )
    b = run(
        {
            "x": {"dense": setting(0, [0, 0]), "routers @ 0.6": setting(0.1, [2, 2]), "static 3": setting(0.1, [9, 9])},
            "y": {"dense": setting(0, [0, 0]), "routers @ 0.6": setting(0.1, [1, 1]), "static 3": setting(0.1, [9, 9])},
        }
    )
    out = router_sets.compare(a, b, [0.1, 0.5], iterations=500)
    x = out["matched"]["x"]["rows"]["0.10"]
    assert x["a"] == pytest.approx((1 + 2) / 30) and x["b"] == pytest.approx((2 + 2) / 30)
    assert x["a_minus_b"] == pytest.approx(-1 / 30)
    assert x["relative"] == pytest.approx(3 / 4 - 1)
    assert x["relative_interval"][0] <= x["relative"] <= x["relative_interval"][1]
    mixed = out["matched"]["mixed"]["rows"]["0.10"]
    assert mixed["a"] == pytest.approx((1 + 2 + 2 + 4) / 60) and mixed["b"] == pytest.approx(6 / 60)
    assert out["matched"]["x"]["rows"]["0.50"] == {"reached": False}  # no extrapolation
    static = router_sets.compare(a, b, [0.1], b_prefix="static", iterations=100)
    assert static["matched"]["y"]["rows"]["0.10"]["b"] == pytest.approx(18 / 30)
    b["domains"]["y"]["settings"]["dense"]["per_text_tokens"] = [10.0, 21.0]
    with pytest.raises(ValueError, match="different texts"):
        router_sets.compare(a, b, [0.1])


def test_router_sets_compares_runs_of_different_text_counts_on_their_common_texts():
    """A run on 3 texts against one on the first 2: compared on those 2, a router point's skip taken as its mean
    over them (per_text_skip); a run without per-text skips is refused rather than given the wrong skip."""
    from routertune.eval import router_sets

    def setting(skip, kl, tokens, per_text_skip=None):
        out = {"skip": skip, "per_text_kl": kl, "per_text_tokens": tokens}
        if per_text_skip is not None:
            out["per_text_skip"] = per_text_skip
        return out

    three, two = [10.0, 20.0, 30.0], [10.0, 20.0]
    a = {
        "domains": {
            "x": {
                "settings": {
                    "dense": setting(0, [0, 0, 0], three),
                    # over all 3 texts skip 0.2; over the first two 0.1
                    "routers @ 0.5": setting(0.2, [1, 2, 9], three, per_text_skip=[0.1, 0.1, 0.4]),
                }
            }
        }
    }
    b = {"domains": {"x": {"settings": {"dense": setting(0, [0, 0], two), "static 3": setting(0.1, [3, 3], two)}}}}
    row = router_sets.compare(a, b, [0.1], b_prefix="static", iterations=100)["matched"]["x"]["rows"]["0.10"]
    assert row["a"] == pytest.approx(3 / 30) and row["b"] == pytest.approx(6 / 30)
    del a["domains"]["x"]["settings"]["routers @ 0.5"]["per_text_skip"]
    with pytest.raises(ValueError, match="no per-text skips"):
        router_sets.compare(a, b, [0.1], b_prefix="static")

"""Capacity calibration on a tiny model with random routers."""

from __future__ import annotations

import json

import pytest
import torch

from routertune import RoutedModel, RouterConfig
from routertune.calibrate import (
    CalibrateJob,
    calibrate,
    measure_capacity,
    next_threshold,
    prompt_batches,
    quantile_threshold,
)
from routertune.cli import main
from tiny_lm import randomize_routers, tiny_llama


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompts(n, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 24, (n,), generator=gen)
    return [torch.randint(3, 250, (int(k),), generator=gen).tolist() for k in lengths]


def _routed(seed=0):
    routed = RoutedModel(tiny_llama(seed), RouterConfig(layers=[1, 2, 3, 4]))
    randomize_routers(routed, seed, scale=0.3)
    return routed


CAL = prompt_batches(_prompts(60, 1), 0, batch_tokens=256)
HELD = prompt_batches(_prompts(60, 2), 0, batch_tokens=256)


@pytest.mark.parametrize("per_layer", [False, True])
def test_calibration_hits_the_target_on_its_prompts(per_layer):
    routed = _routed()
    for target in (0.25, 0.5, 0.9):
        result = calibrate(routed, CAL, target, per_layer=per_layer)
        assert abs(result.capacity - target) <= 0.02, (target, result.history)
        assert measure_capacity(routed, CAL)[0] == pytest.approx(result.capacity)
        if per_layer:  # every layer runs the target fraction of prompts
            assert all(abs(c - target) <= 0.05 for c in result.layer_capacity.values())
            assert result.layer_thresholds is not None
        else:
            assert result.layer_thresholds is None


def test_calibration_is_monotone_in_the_target():
    routed = _routed()
    thresholds, heldout = [], []
    for target in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        result = calibrate(routed, CAL, target)
        thresholds.append(result.threshold)
        heldout.append(measure_capacity(routed, HELD)[0])
    assert thresholds == sorted(thresholds, reverse=True)  # more capacity, lower threshold
    assert heldout == sorted(heldout)  # and more executed sublayers on unseen prompts too
    assert heldout[-1] == 1.0  # capacity 1 is dense


def test_quantile_threshold_edges():
    scores = torch.tensor([0.1, 0.4, 0.6, 0.9])
    assert (scores >= quantile_threshold(scores, 0.5)).float().mean() == 0.5
    assert (scores >= quantile_threshold(scores, 1.0)).all()
    assert not (scores >= quantile_threshold(scores, 0.0)).any()
    assert 0 < quantile_threshold(torch.tensor([1.0, 1.0]), 0.0) < 1  # stays a valid threshold


def _nearest_share_by_brute_force(values: torch.Tensor, target: float) -> float:
    """The distance to `target` of the nearest share any threshold gives: every cut between two distinct
    values, above all of them and below all of them, tried one by one."""
    distinct = sorted(set(values.double().tolist()))
    cuts = [distinct[0] - 1] + [(a + b) / 2 for a, b in zip(distinct, distinct[1:])] + [distinct[-1] + 1]
    return min(abs(float((values.double() >= c).double().mean()) - target) for c in cuts)


def _tied_cases():
    yield torch.tensor([0.9] + [0.6] * 8 + [0.1]), 0.2  # the review's case: 0.1 is reachable, not only 0.9
    gen = torch.Generator().manual_seed(0)
    for n in (7, 40, 200):  # few distinct values, so most thresholds land on a pile
        values = (torch.randint(1, 8, (n,), generator=gen).double() / 10).float()
        for target in torch.linspace(0, 1, 21).tolist():
            yield values, target


def test_quantile_threshold_takes_the_reachable_share_nearest_the_target_with_ties():
    for values, target in _tied_cases():
        t = quantile_threshold(values, target)
        assert 0 < t < 1
        share = float((values >= t).double().mean())
        assert abs(share - target) == pytest.approx(_nearest_share_by_brute_force(values, target), abs=1e-12), (
            values.tolist(),
            target,
            share,
        )
        assert t not in values.tolist()  # no score sits on the boundary


def test_importance_offset_follows_the_same_rule():
    """The importance fit's capacity offset (logits, unbounded) picks its share by the same rule."""
    from routertune.train import importance

    for values, target in _tied_cases():
        logits = values.double() * 10 - 5
        offset = importance._capacity_offset(logits, target)
        share = float((logits >= offset).double().mean())
        assert abs(share - target) == pytest.approx(_nearest_share_by_brute_force(logits, target), abs=1e-12)


@pytest.fixture(scope="module")
def piled_routers(tmp_path_factory):
    """A tiny model folder and routers whose every score is 0.5 (zero weights and bias): one pile per layer,
    so only capacities 0 and 1 are reachable."""
    from tiny_lm import tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama(0)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    routers = tmp_path_factory.mktemp("piled-routers")
    from routertune.base_model import load_model_and_tokenizer

    routed = RoutedModel(load_model_and_tokenizer(str(folder))[0], RouterConfig(layers=[1, 2, 3, 4]))
    with torch.no_grad():
        for router in routed.routers.values():
            router.weight.zero_()
            router.bias.zero_()
    routed.save_pretrained(routers)
    return str(folder), routers


@pytest.mark.parametrize("per_layer", [False, True])
def test_calibrate_refuses_to_save_an_unreachable_target(piled_routers, tmp_path, capsys, per_layer):
    """Capacity 0.3 among piles that allow only 0 or 1: the nearest (0) is far outside the tolerance, so
    nothing is saved unless the user accepts it explicitly."""
    model, routers = piled_routers
    before = (routers / "router_config.json").read_text()
    out = tmp_path / "calibrated"
    args = [
        "calibrate",
        "--model",
        model,
        "--routers",
        str(routers),
        "--output",
        str(out),
        "--capacity",
        "0.3",
        "--samples",
        "8",
        "--heldout-samples",
        "0",
    ] + (["--per-layer"] if per_layer else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "capacity 0.3 is not reachable" in err and "realised 0.0000" in err and "--accept-off-target" in err
    assert not out.exists() and (routers / "router_config.json").read_text() == before
    assert main(args + ["--accept-off-target"]) == 0
    capsys.readouterr()
    reloaded = RoutedModel.from_pretrained(tiny_llama(0), out)
    prompts = prompt_batches(_prompts(8, 3), 0, batch_tokens=256)
    assert measure_capacity(reloaded, prompts)[0] == 0.0  # the nearest reachable capacity, not the pile (1.0)


def test_calibrated_thresholds_are_saved_in_the_router_config(tmp_path):
    routed = _routed()
    calibrate(routed, CAL, 0.4, per_layer=True)
    routed.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "router_config.json").read_text())
    assert set(saved["layer_thresholds"]) == {"1", "2", "3", "4"}
    reloaded = RoutedModel.from_pretrained(_routed().unwrap(), tmp_path)
    assert measure_capacity(reloaded, CAL)[0] == pytest.approx(measure_capacity(routed, CAL)[0])


@pytest.mark.parametrize("capacity", [-0.1, 1.5])
def test_capacity_out_of_range(capacity):
    with pytest.raises(ValueError, match="capacity"):
        calibrate(_routed(), CAL, capacity)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        CalibrateJob(routers="somewhere", capacity=capacity)


def test_calibrate_cli_bad_input(capsys, tmp_path):
    assert main(["calibrate", "--capacity", "2"]) == 2
    err = capsys.readouterr().err
    assert "--routers FOLDER" in err and "capacity=2.0" in err
    assert main(["calibrate", "--routers", str(tmp_path), "--capacity", "0.5"]) == 2
    assert "router_config.json not found" in capsys.readouterr().err


def test_next_threshold_follows_the_line_through_the_passes():
    q = 0.42  # the quantile step's proposal
    assert next_threshold([(0.5, 0.8)], 0.5, q) == q  # one pass: nothing to fit
    # two passes above the target: extrapolate the line (capacity falls by 0.2 per 0.1 of threshold)
    assert next_threshold([(0.5, 0.8), (0.6, 0.6)], 0.5, q) == pytest.approx(0.65)
    # a pass on each side: interpolate between the two closest ones
    assert next_threshold([(0.5, 0.8), (0.7, 0.4), (0.6, 0.6)], 0.5, q) == pytest.approx(0.65)
    # capacity rising with the threshold, a flat line, or a step out of (0, 1): keep the quantile step
    assert next_threshold([(0.5, 0.4), (0.6, 0.6)], 0.5, q) == q
    assert next_threshold([(0.5, 0.6), (0.6, 0.6)], 0.5, q) == q
    assert next_threshold([(0.1, 0.9), (0.2, 0.899)], 0.1, q) == q

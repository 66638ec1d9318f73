"""Capacity calibration on a tiny model with random routers."""

from __future__ import annotations

import json

import pytest
import torch

from routertune import RoutedModel, RouterConfig
from routertune.calibrate import (CalibrateJob, calibrate, measure_capacity, next_threshold, prompt_batches,
                                  quantile_threshold)
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

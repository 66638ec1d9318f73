"""The routers' trust region: the per-input part of a router's logit (logit - prior) kept within bounds.

References are independent of the code under test: the router's own linear map clipped by hand in float64,
and routers fitted without a region, whose logits the bounded ones must equal after clipping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from routertune import RoutedModel, RouterConfig
from routertune.cli import main
from routertune.eval import tradeoff
from routertune.routing.router import Router
from routertune.train import importance
from tiny_lm import tiny_llama, tiny_tokenizer

LAYERS = [1, 2, 3, 4]


@torch.no_grad()
def test_router_clips_only_the_part_outside_its_region_and_nothing_without_one():
    torch.manual_seed(0)
    router = Router(16)
    with torch.no_grad():
        router.weight.normal_()
        router.bias.fill_(0.3)
    x = torch.randn(256, 16)
    logit = F.linear(x, router.weight, router.bias).squeeze(-1)
    assert torch.equal(router(x), torch.sigmoid(logit))  # no region: bit for bit the plain router
    prior, low, high = 0.1, -0.5, 0.25
    router.set_trust_region(prior, low, high)
    part = logit.double().numpy() - prior
    expected = 1 / (1 + np.exp(-(prior + np.clip(part, low, high))))
    np.testing.assert_allclose(router(x).double().numpy(), expected, rtol=0, atol=1e-6)
    inside = (part >= low) & (part <= high)
    assert inside.any() and (part < low).any() and (part > high).any()
    assert torch.equal(router(x)[torch.from_numpy(inside)], torch.sigmoid(logit)[torch.from_numpy(inside)])
    with pytest.raises(ValueError, match="must hold 0"):
        router.set_trust_region(0.0, 0.1, 1.0)


def _batches():
    tok = tiny_tokenizer()
    texts = tradeoff.domain_texts("wikipedia", 16) + tradeoff.domain_texts("code", 16)
    lists = [tok(t)["input_ids"][:40] for t in texts]
    return [
        {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "prompt_mask": b.route_mask}
        for b in tradeoff.text_batches(lists, 0, batch_size=8)
    ]


def _logits(routed, features) -> dict[int, torch.Tensor]:
    """Each router's logit on pooled features, through its plain linear map and its region (scores -> logit)."""
    return {i: torch.logit(routed.routers[i](features[i].float()).double()) for i in LAYERS}


@torch.no_grad()
def test_fit_bounds_the_part_it_would_have_fitted_and_still_meets_the_capacity():
    """A fit with trust (down, up) equals the unbounded fit with each logit's part, around the logit at the
    training mean input, clipped to [-down sd, up sd] of that part over the training records."""
    batches = _batches()
    plain = RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS))
    importance.fit_routers(plain, batches[:3], batches[3:], target_capacity=0.625)
    features, _ = importance.collect(plain, batches[:3])
    unbounded = _logits(plain, features)
    for down, up in ((0.5, None), (None, 0.25), (0.3, 0.3), (None, 0.0)):
        routed = RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS))
        # 0.625: the capacity's threshold falls among one layer's inputs, where the region moves it
        fit = importance.fit_routers(routed, batches[:3], batches[3:], target_capacity=0.625, trust=(down, up))
        assert fit.trust == (down, up)
        bounded = _logits(routed, features)
        # the capacity the bounded routers really run on the training prompts at threshold 0.5 (logit 0)
        runs = torch.stack([bounded[i] >= 0 for i in LAYERS]).double().mean()
        assert float(runs) == pytest.approx(0.625, abs=0.05) == fit.train_capacity, (down, up, float(runs))
        clipped_any = False
        for i in LAYERS:
            mean_input = features[i].mean(0, keepdim=True)
            prior0 = float(torch.logit(plain.routers[i](mean_input.float()).double()))
            part0 = unbounded[i] - prior0
            sd = float(part0.std())
            low = -np.inf if down is None else -down * sd
            high = np.inf if up is None else up * sd
            prior = float(
                torch.logit(
                    torch.sigmoid(
                        F.linear(mean_input.float(), routed.routers[i].weight, routed.routers[i].bias)
                    ).double()
                )
            )
            np.testing.assert_allclose((bounded[i] - prior).numpy(), part0.clamp(low, high).numpy(), atol=2e-4)
            clipped_any |= bool(((part0 < low) | (part0 > high)).any())
        assert clipped_any


@torch.no_grad()
def test_zero_trust_routes_every_input_alike_and_the_region_survives_save_and_load(tmp_path):
    """trust (0, 0) leaves only the prior: every input gets the same decisions. Saved routers keep their
    region; files written before routers had one load without it."""
    batches = _batches()
    routed = RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS))
    importance.fit_routers(routed, batches[:3], batches[3:], target_capacity=0.5, trust=(0.0, 0.0))
    features, _ = importance.collect(routed, batches)
    for i, logit in _logits(routed, features).items():
        assert float(logit.max() - logit.min()) < 1e-5, i
    routed.save_pretrained(tmp_path)
    state = load_file(tmp_path / "routers.safetensors")
    loaded = RoutedModel.from_pretrained(tiny_llama(), tmp_path)
    for i in LAYERS:
        assert torch.equal(loaded.routers[i].trust_region, routed.routers[i].trust_region)
        assert torch.equal(state[f"layers.{i}.router.trust_region"], routed.routers[i].trust_region)
    save_file({k: v for k, v in state.items() if not k.endswith(".trust_region")}, tmp_path / "routers.safetensors")
    legacy = RoutedModel.from_pretrained(tiny_llama(), tmp_path)
    for i in LAYERS:
        assert torch.equal(legacy.routers[i].trust_region, torch.tensor([0.0, -np.inf, np.inf]))
        assert torch.equal(legacy.routers[i].weight, routed.routers[i].weight)


def test_train_cli_fits_the_region_and_refuses_bad_bounds(tmp_path, capsys):
    folder = tmp_path / "byte-llama"
    tiny_llama(layers=6).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "routers"
    assert (
        main(
            [
                "train",
                "--model",
                str(folder),
                "--output",
                str(out),
                "--samples",
                "32",
                "--heldout-samples",
                "8",
                "--max-length",
                "48",
                "--trust-down",
                "0.5",
            ]
        )
        == 0
    )
    fit = json.loads((out / "train_metrics.json").read_text())["result"]["fit"]
    assert fit["trust"] == [0.5, 0.0]  # up: the default, no upward move
    regions = load_file(out / "routers.safetensors")
    assert all(float(v[1]) < 0 and float(v[2]) == 0 for k, v in regions.items() if k.endswith("trust_region"))
    assert (
        main(
            [
                "train",
                "--model",
                str(folder),
                "--output",
                str(out),
                "--samples",
                "32",
                "--heldout-samples",
                "8",
                "--max-length",
                "48",
                "--trust-up",
                "inf",
                "--overwrite",
            ]
        )
        == 0
    )
    assert json.loads((out / "train_metrics.json").read_text())["result"]["fit"]["trust"] == [None, None]
    regions = load_file(out / "routers.safetensors")
    assert all(
        torch.equal(v, torch.tensor([0.0, -np.inf, np.inf])) for k, v in regions.items() if k.endswith("trust_region")
    )  # unbounded both ways: no region at all, as before
    capsys.readouterr()
    assert main(["train", "--model", str(folder), "--output", str(tmp_path / "x"), "--trust-down", "-1"]) != 0
    assert "trust_down=-1.0 must be >= 0" in capsys.readouterr().err
    assert (
        main(["train", "--model", str(folder), "--output", str(tmp_path / "y"), "--objective", "lm", "--trust-up", "1"])
        != 0
    )
    assert "use --objective importance" in capsys.readouterr().err


def test_capacity_offset_lies_between_values_at_the_share_nearest_the_target():
    """A pile of equal values (a bound of the region) is counted whole or not at all, whichever share is
    nearer the target, and the offset lies halfway to the next lower value, on no record."""
    values = torch.tensor([0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    # shares of values >= 3: 2/8, >= 2 (the pile): 6/8, >= 1: 7/8
    assert importance._capacity_offset(values, 0.7) == 1.5  # 6/8 (the pile runs) is nearest 0.7
    assert importance._capacity_offset(values, 0.4) == 2.5  # 2/8 beats 6/8 for 0.4
    assert importance._capacity_offset(values, 0.9) == 0.5  # 7/8
    assert importance._capacity_offset(values, 1.0) == -0.5  # every value
    distinct = torch.arange(100, dtype=torch.float64)
    offset = importance._capacity_offset(distinct, 0.75)
    assert float((distinct >= offset).double().mean()) == 0.75 and offset not in distinct.tolist()


def test_token_routers_default_to_no_region():
    """`--trust-up` defaults to 0 for sequence routers only: the one-sided region was measured for them."""
    from routertune.train.loop import TrainConfig, trust_bounds

    cfg = TrainConfig()
    assert trust_bounds(cfg, "sequence") == (np.inf, 0.0) and trust_bounds(cfg, "token") == (np.inf, np.inf)
    assert trust_bounds(TrainConfig(trust_up=0.5), "token") == (np.inf, 0.5)

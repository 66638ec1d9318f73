"""The importance fit with a searched static order as its prior (fit_routers(prior_order=...), --prior searched).

The reference is the same fit without the order, on the same data: the order may move each layer's prior (the
logit at the training mean input) and nothing else, and the priors must then rank the layers as the order says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from routertune import RoutedModel, RouterConfig
from routertune.cli import main
from routertune.train import importance
from test_trust_region import _batches, _logits
from tiny_lm import tiny_llama

LAYERS = [1, 2, 3, 4]


def _priors(routed, features) -> dict[int, float]:
    """Each router's logit at the training mean input, through its own map (no region: it holds 0 there)."""
    return {
        i: float(torch.logit(routed.routers[i](features[i].mean(0, keepdim=True).float()).double())) for i in LAYERS
    }


@torch.no_grad()
@pytest.mark.parametrize("order", [[4, 2], [3, 1, 4, 2], [2]])
def test_the_order_moves_only_the_priors_and_they_rank_the_layers_as_it_says(order):
    batches = _batches()
    plain = RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS))
    importance.fit_routers(plain, batches[:3], batches[3:], target_capacity=0.5)
    features, _ = importance.collect(plain, batches[:3])
    ordered = RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS))
    fit = importance.fit_routers(ordered, batches[:3], batches[3:], target_capacity=0.5, prior_order=order)
    assert fit.prior_order == order
    before, after = _priors(plain, features), _priors(ordered, features)
    # the per-input part of every router is the plain fit's, to the float32 of the router's weights
    for i in LAYERS:
        part_plain = _logits(plain, features)[i] - before[i]
        part_ordered = _logits(ordered, features)[i] - after[i]
        np.testing.assert_allclose(part_ordered.numpy(), part_plain.numpy(), atol=2e-4)
    # the order's layers first, then the others in the plain fit's own ranking
    expected = [*order, *sorted((i for i in LAYERS if i not in order), key=before.get)]
    assert sorted(LAYERS, key=after.get) == expected
    # the same prior values, handed out again: their spacing (and so the threshold's scale) is the plain fit's
    np.testing.assert_allclose(np.diff(sorted(after.values())), np.diff(sorted(before.values())), atol=2e-4)
    # the capacity target still met on the training prompts at the default threshold
    runs = torch.stack([_logits(ordered, features)[i] >= 0 for i in LAYERS]).double().mean()
    assert float(runs) == pytest.approx(0.5, abs=0.05)


@torch.no_grad()
def test_with_no_per_input_part_the_routers_are_the_static_order():
    """shrink 0: every input skips the same layers, and sweeping the threshold walks the order's prefixes."""
    batches = _batches()
    order = [3, 1, 4, 2]
    routed = RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS))
    importance.fit_routers(routed, batches[:3], batches[3:], target_capacity=0.5, shrink=0.0, prior_order=order)
    features, _ = importance.collect(routed, batches)
    logits = _logits(routed, features)
    for i in LAYERS:
        assert float(logits[i].max() - logits[i].min()) < 1e-5
    skipped_in_turn = sorted(LAYERS, key=lambda i: float(logits[i][0]))
    assert skipped_in_turn == order


def test_an_order_outside_the_routed_layers_is_refused():
    batches = _batches()
    routed = RoutedModel(tiny_llama(), RouterConfig(layers=LAYERS))
    with pytest.raises(ValueError, match=r"\[7\] is not among them"):
        importance.fit_routers(routed, batches[:3], batches[3:], target_capacity=0.5, prior_order=[2, 7])
    with pytest.raises(ValueError, match="repeats"):
        importance.fit_routers(routed, batches[:3], batches[3:], target_capacity=0.5, prior_order=[2, 2])


def test_train_cli_reads_the_order_file_and_refuses_another_models(tmp_path, capsys):
    """`routertune train --prior searched --static-order FILE` fits on the file's order (recorded in the
    metrics); a file searched on other weights is refused before any fit."""
    from routertune.base_model import load_model_and_tokenizer
    from routertune.train import static_order
    from tiny_lm import tiny_tokenizer

    folder = tmp_path / "byte-llama"
    tiny_llama(layers=6).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    identity = static_order.model_identity(load_model_and_tokenizer(str(folder))[0])
    order_file = tmp_path / "static_order.json"
    stored = static_order.StaticOrder(order=[3, 1], kl=[0.1, 0.2], model=identity)
    order_file.write_text(json.dumps(stored.to_json()))
    common = ["train", "--model", str(folder), "--samples", "24", "--heldout-samples", "8", "--max-length", "32"]
    code = main([*common, "--output", str(tmp_path / "r"), "--prior", "searched", "--static-order", str(order_file)])
    assert code == 0, capsys.readouterr()
    metrics = json.loads((tmp_path / "r" / "train_metrics.json").read_text())
    assert metrics["result"]["fit"]["prior_order"] == [3, 1]
    assert metrics["train"]["prior"] == "searched"
    other = static_order.StaticOrder(order=[3, 1], kl=[0.1, 0.2], model={**identity, "sha256": "0" * 64})
    order_file.write_text(json.dumps(other.to_json()))
    code = main([*common, "--output", str(tmp_path / "s"), "--prior", "searched", "--static-order", str(order_file)])
    assert code != 0
    assert "searched on another model" in capsys.readouterr().err

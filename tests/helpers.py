"""Shared helpers for tests (kept out of conftest so tests can import them by name)."""

from __future__ import annotations

import torch

from routertune import RoutedModel


def mix_decisions(routed: RoutedModel, ids, mask, seed: int = 0) -> dict[int, torch.Tensor]:
    """Give the routers random weights and set per-layer thresholds between the batch's scores so that in
    every routed layer some sequences run and some skip. Returns the decisions of the batch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in routed.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
    layers = routed.routed_layers
    thresholds = {layer: 1e-6 for layer in layers}  # everything runs while we look at the scores
    for position, layer in enumerate(layers):
        routed.set_threshold(0.5, thresholds)
        with routed.recording() as calls, torch.no_grad():
            routed(input_ids=ids, attention_mask=mask, use_cache=False)
        scores = calls[-1].scores[layer].sort().values
        gap = 0 if position % 2 == 0 or len(scores) < 3 else 1
        thresholds[layer] = float(scores[gap] + scores[gap + 1]) / 2
    routed.set_threshold(0.5, thresholds)
    with routed.recording() as calls, torch.no_grad():
        routed(input_ids=ids, attention_mask=mask, use_cache=False)
    decisions = calls[-1].decisions
    for layer, runs in decisions.items():
        assert 0 < int(runs.sum()) < len(runs), f"layer {layer} did not mix decisions: {runs}"
    return decisions


def zero_sublayer_hooks(model, granularity: str, layers):
    """Hooks making the plain base model behave as if `layers` were skipped: the sublayer's output is zeroed
    (a whole block passes its input through)."""
    handles = []
    for idx in layers:
        block = model.model.layers[idx]
        if granularity == "attention":
            handles.append(
                block.self_attn.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]))
            )
        elif granularity == "mlp":
            handles.append(block.mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
        else:
            handles.append(
                block.register_forward_hook(lambda m, a, kw, out: a[0] if a else kw["hidden_states"], with_kwargs=True)
            )
    return handles

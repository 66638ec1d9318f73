"""How much of the routers' per-input part to trust on a held-out domain: transforms of one set of routers,
compared with static drop on all the texts of a stored `routertune tradeoff` run, at matched measured skip.

Each importance-fitted router's logit is prior + part: the prior is its logit at the mean pooled input of the
training records (a static drop ordered by mean importance), the part w.(x - mean) is what this input adds. On
code, the held-out domain farthest from the tuning mix, the default routers lose to static drop at 30% skip,
while the prior alone ties it. The transforms measured here change only the part:

    none        the routers as fitted
    scale:A     part x A (A = 0.5 on the default shrink-0.5 routers is the fit at shrink 0.25)
    clip:K      part clipped to +-K of its standard deviation on the training records: a trust region around
                the prior, where a router may reorder layers near the threshold but never overturns a large
                prior gap on an input unlike its training data
    floor:K     part kept above -K sd only: an input may raise a layer's importance freely (run it), but lower
                it (skip it sooner than the prior would) by at most K sd
    cap:K       part kept below +K sd only: the reverse
    fallback    part set to 0 where it lies outside its range on the training records (an out-of-distribution
                guard; clipping to that range instead would change no decision at a threshold inside it)

For each compared skip, the threshold is searched on the texts' own measured skip (routing decides on the
first half, so the search runs the first halves only) until two thresholds bracket it within `--bracket`; KL to
dense is then measured at those thresholds on every text, the routers' curve interpolated between them and
static drop's from the stored run (same texts: checked by their scored token counts), paired bootstrap over
texts weighted by scored tokens, as in `routertune tradeoff`.

The driver is benchmarks/per_input_ablation.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from routertune.eval import tradeoff
from routertune.model import RoutedModel
from routertune.train import data, importance


def part_statistics(routed: RoutedModel, tokenizer, records: int, cache: str | None = None) -> dict[int, dict]:
    """Per router: the training records' mean pooled input (dense model, as the fit sees them), its prior logit
    there, and the spread and range of its per-input part over those records. The pooled inputs depend on the
    model and records only (every layer runs), so `cache` can keep them for later runs on other routers."""
    if cache and Path(cache).is_file():
        features = torch.load(cache)
    else:
        examples, _ = data.encode_records(data.mix_forms(data.default_records("train", n=records), 0.5), tokenizer, 256)
        batches = [data.collate(b, tokenizer.pad_token_id) for b in data.length_batches(examples, 8, 0)]
        features, _ = importance.collect(routed, batches)
        if cache:
            torch.save(features, cache)
    stats = {}
    for idx, router in routed.routers.items():
        w, b = router.weight.detach().double().view(-1), float(router.bias.detach())
        mean = features[idx].mean(0)
        part = (features[idx] - mean) @ w
        stats[idx] = {
            "mean": mean.float(),
            "prior": float(mean @ w) + b,
            "sd": float(part.std()),
            "low": float(part.min()),
            "high": float(part.max()),
        }
    return stats


def transform_part(part: torch.Tensor, s: dict, transform: str) -> torch.Tensor:
    """`part` under `transform` (see the module docstring), with `s` one router's part statistics."""
    name, _, arg = transform.partition(":")
    if name == "none":
        return part
    if name == "scale":
        return part * float(arg)
    if name == "clip":
        bound = float(arg) * s["sd"]
        return part.clamp(-bound, bound)
    if name == "floor":
        return part.clamp(min=-float(arg) * s["sd"])
    if name == "cap":
        return part.clamp(max=float(arg) * s["sd"])
    if name == "fallback":
        return torch.where((part < s["low"]) | (part > s["high"]), torch.zeros_like(part), part)
    raise ValueError(f"unknown transform {transform!r}: use none, scale:A, clip:K, floor:K, cap:K or fallback")


@contextlib.contextmanager
def transformed(routed: RoutedModel, stats: dict[int, dict], transform: str):
    """The routers with their per-input part transformed (each router's forward wrapped, restored on exit)."""
    routers = routed.routers

    def forward_of(idx, router):
        s = stats[idx]

        def forward(pooled: torch.Tensor) -> torch.Tensor:
            logit = router.proj(pooled.float()).squeeze(-1)
            return torch.sigmoid(s["prior"] + transform_part(logit - s["prior"], s, transform))

        return forward

    wrapped = []
    try:
        for idx, router in routers.items():
            router.forward = forward_of(idx, router)  # an instance attribute, shadowing Router.forward
            wrapped.append(router)
        yield
    finally:
        for router in wrapped:
            del router.forward


@torch.inference_mode()
def measured_skip(routed: RoutedModel, batches, threshold: float, num_layers: int) -> float:
    """Fraction of all attention sublayers skipped over the texts, routing on their first halves only."""
    routed.set_threshold(threshold)
    skipped = rows = 0
    for batch in batches:
        width = int(batch.route_mask.sum(1).max())
        with routed.recording() as calls:
            routed(
                input_ids=batch.input_ids[:, :width],
                attention_mask=batch.route_mask[:, :width],
                routing_mask=batch.route_mask[:, :width],
                use_cache=False,
                logits_to_keep=1,
            )
        decisions = calls[-1].decisions
        runs = torch.stack([decisions[i].cpu() for i in sorted(decisions)])
        skipped += int((~runs).sum())
        rows += runs.shape[1]
    return skipped / rows / num_layers


def bracketing_thresholds(
    skip_of, targets, width: float, max_new: int, low: float = 0.3, high: float = 0.7
) -> list[float]:
    """For each target, the two thresholds whose measured skips lie on either side of it, refined (by
    routertune.eval.tradeoff.refine_sweep, as the trade-off command does) until they are within `width` of each
    other or `max_new` more thresholds have been measured."""
    known = {low: skip_of(low), high: skip_of(high)}
    for target in targets:
        if not known[low] <= target < known[high]:
            raise ValueError(
                f"thresholds {low}-{high} skip {known[low]:.3f}-{known[high]:.3f}, which does not hold {target}"
            )
    tradeoff.refine_sweep(skip_of, known, targets, width, max_new)
    found = set()
    for target in targets:
        found.add(max((s, t) for t, s in known.items() if s <= target)[1])
        found.add(min((s, t) for t, s in known.items() if s > target)[1])
    return sorted(found)

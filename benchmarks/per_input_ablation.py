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

    python benchmarks/per_input_ablation.py --reference benchmarks/results/tradeoff-code164/tradeoff.json \\
        --domain code --transforms none scale:0.5 clip:0.5 --output benchmarks/results/per_input_ablation/code164.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from routertune.stats import interpolate, paired_bootstrap
from routertune.train import data
from routertune.train import importance
from routertune.eval import tradeoff
from routertune.files import write_json
from routertune.model import RoutedModel
from routertune.base_model import load_model_and_tokenizer
from routertune.train.tune import mix_forms


def part_statistics(routed: RoutedModel, tokenizer, records: int, cache: str | None = None) -> dict[int, dict]:
    """Per router: the training records' mean pooled input (dense model, as the fit sees them), its prior logit
    there, and the spread and range of its per-input part over those records. The pooled inputs depend on the
    model and records only (every layer runs), so `cache` can keep them for later runs on other routers."""
    if cache and Path(cache).is_file():
        features = torch.load(cache)
    else:
        examples, _ = data.encode_records(mix_forms(data.default_records("train", n=records), 0.5), tokenizer, 256)
        batches = [data.collate(b, tokenizer.pad_token_id) for b in data.length_batches(examples, 8, 0)]
        features, _ = importance.collect(routed, batches)
        if cache:
            torch.save(features, cache)
    stats = {}
    for idx, router in routed.routers.items():
        w, b = router.weight.detach().double().view(-1), float(router.bias.detach())
        mean = features[idx].mean(0)
        part = (features[idx] - mean) @ w
        stats[idx] = {"mean": mean.float(), "prior": float(mean @ w) + b, "sd": float(part.std()),
                      "low": float(part.min()), "high": float(part.max())}
    return stats


def transform_part(part: torch.Tensor, s: dict, transform: str) -> torch.Tensor:
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
            routed(input_ids=batch.input_ids[:, :width], attention_mask=batch.route_mask[:, :width],
                   routing_mask=batch.route_mask[:, :width], use_cache=False, logits_to_keep=1)
        decisions = calls[-1].decisions
        runs = torch.stack([decisions[i].cpu() for i in sorted(decisions)])
        skipped += int((~runs).sum())
        rows += runs.shape[1]
    return skipped / rows / num_layers


def bracketing_thresholds(skip_of, targets, width: float, max_new: int, low: float = 0.3,
                           high: float = 0.7) -> list[float]:
    """For each target, the two thresholds whose measured skips lie on either side of it, refined (by
    routertune.eval.tradeoff.refine_sweep, as the trade-off command does) until they are within `width` of each
    other or `max_new` more thresholds have been measured."""
    known = {low: skip_of(low), high: skip_of(high)}
    for target in targets:
        if not known[low] <= target < known[high]:
            raise ValueError(f"thresholds {low}-{high} skip {known[low]:.3f}-{known[high]:.3f}, "
                             f"which does not hold {target}")
    tradeoff.refine_sweep(skip_of, known, targets, width, max_new)
    found = set()
    for target in targets:
        found.add(max((s, t) for t, s in known.items() if s <= target)[1])
        found.add(min((s, t) for t, s in known.items() if s > target)[1])
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="tradeoff.json of a run on the same routers")
    parser.add_argument("--domain", default="code")
    parser.add_argument("--transforms", nargs="+", default=["none", "scale:0.5", "clip:0.5"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.2, 0.3])
    parser.add_argument("--records", type=int, default=400, help="training records for the part's statistics")
    parser.add_argument("--statistics-cache", help="file keeping the training records' pooled inputs between runs")
    parser.add_argument("--bracket", type=float, default=0.015, help="widest measured-skip bracket accepted")
    parser.add_argument("--iterations", type=int, default=8, help="most thresholds added per target")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    reference = json.loads(Path(args.reference).read_text())
    job = reference["job"]
    settings = reference["domains"][args.domain]["settings"]
    model, tokenizer = load_model_and_tokenizer()
    routed = RoutedModel.from_pretrained(model, job["routers"])
    routed.eval()
    if any(torch.isfinite(r.trust_region[1:]).any() for r in routed.routers.values()):
        raise SystemExit(f"{job['routers']} were fitted with a trust region, which the transforms here would "
                         "replace, not stack on: measure routers fitted with --trust-up inf")
    num_layers = int(reference["num_layers"])
    texts = tradeoff.domain_texts(args.domain, job["texts"])
    lists = [ids for ids in (tokenizer(t)["input_ids"][: job["max_tokens"]] for t in texts) if len(ids) >= 8]
    batches = tradeoff.text_batches(lists, tokenizer.pad_token_id)
    tokens = np.array(settings["dense"]["per_text_tokens"], dtype=np.float64)
    static = [(0.0, np.zeros(len(lists)))] + [(s["skip"], np.array(s["per_text_kl"])) for n, s in settings.items()
                                              if n.startswith("static ")]
    stats = part_statistics(routed, tokenizer, args.records, args.statistics_cache)
    out = {"reference": args.reference, "domain": args.domain, "texts": len(lists), "routers": job["routers"],
           "records_for_statistics": args.records, "transforms": {}}
    for transform in args.transforms:
        started = time.perf_counter()
        with transformed(routed, stats, transform):
            def skip_of(threshold: float) -> float:
                return measured_skip(routed, batches, threshold, num_layers)

            thresholds = bracketing_thresholds(skip_of, args.targets, args.bracket,
                                               args.iterations * len(args.targets))
            variants = [tradeoff.Variant("routers", threshold=t) for t in thresholds]
            scores = tradeoff.score_texts(routed, batches, variants, len(lists))
        routed.set_threshold(0.5)
        if not np.allclose(scores[variants[0]].tokens, tokens):
            raise ValueError(f"the texts differ from those of {args.reference}: compare it with the same texts")
        points = [(float(scores[v].skipped.mean() / num_layers), scores[v].kl) for v in variants]
        entry = {"points": [{"threshold": t, "skip": x, "kl": float(k.sum() / tokens.sum())}
                            for t, (x, k) in zip(thresholds, points)], "matched": {},
                 "seconds": time.perf_counter() - started}
        for target in args.targets:
            routers, static_at = interpolate(points, target), interpolate(static, target)
            if routers is None or static_at is None:
                entry["matched"][f"{target:.2f}"] = {"reached": False}
                continue
            diff, low, high = paired_bootstrap(routers[0] / tokens, static_at[0] / tokens, weights=tokens)
            entry["matched"][f"{target:.2f}"] = {
                "reached": True, "routers": float(routers[0].sum() / tokens.sum()),
                "static": float(static_at[0].sum() / tokens.sum()), "minus_static": diff, "interval": [low, high],
                "routers_between": list(routers[1])}
        out["transforms"][transform] = entry
        out["seconds"] = time.perf_counter() - began
        write_json(Path(args.output), out)
        print(transform, {t: (round(m["minus_static"], 4), [round(v, 4) for v in m["interval"]], m["routers_between"])
                          if m["reached"] else None for t, m in entry["matched"].items()}, flush=True)


if __name__ == "__main__":
    main()

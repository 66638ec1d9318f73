"""How much of the routers' per-input part to trust on a held-out domain: transforms of one set of routers,
compared with static drop on all the texts of a stored `routertune tradeoff` run, at matched measured skip.
The transforms, the wrapped routers and the threshold search are routertune.eval.per_input_ablation (its
docstring says what each transform does); this driver measures them.

    python benchmarks/per_input_ablation.py --reference benchmarks/results/tradeoff-code164/tradeoff.json \\
        --domain code --transforms none scale:0.5 clip:0.5 --output benchmarks/results/per_input_ablation/code164.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from routertune.base_model import load_model_and_tokenizer
from routertune.eval import tradeoff
from routertune.eval.per_input_ablation import bracketing_thresholds, measured_skip, part_statistics, transformed
from routertune.files import write_json
from routertune.model import RoutedModel
from routertune.stats import interpolate, paired_bootstrap


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
        raise SystemExit(
            f"{job['routers']} were fitted with a trust region, which the transforms here would "
            "replace, not stack on: measure routers fitted with --trust-up inf"
        )
    num_layers = int(reference["num_layers"])
    texts = tradeoff.domain_texts(args.domain, job["texts"])
    lists = [ids for ids in (tokenizer(t)["input_ids"][: job["max_tokens"]] for t in texts) if len(ids) >= 8]
    batches = tradeoff.text_batches(lists, tokenizer.pad_token_id)
    tokens = np.array(settings["dense"]["per_text_tokens"], dtype=np.float64)
    static = [(0.0, np.zeros(len(lists)))] + [
        (s["skip"], np.array(s["per_text_kl"])) for n, s in settings.items() if n.startswith("static ")
    ]
    stats = part_statistics(routed, tokenizer, args.records, args.statistics_cache)
    out = {
        "reference": args.reference,
        "domain": args.domain,
        "texts": len(lists),
        "routers": job["routers"],
        "records_for_statistics": args.records,
        "transforms": {},
    }
    for transform in args.transforms:
        started = time.perf_counter()
        with transformed(routed, stats, transform):

            def skip_of(threshold: float) -> float:
                return measured_skip(routed, batches, threshold, num_layers)

            thresholds = bracketing_thresholds(skip_of, args.targets, args.bracket, args.iterations * len(args.targets))
            variants = [tradeoff.Variant("routers", threshold=t) for t in thresholds]
            scores = tradeoff.score_texts(routed, batches, variants, len(lists))
        routed.set_threshold(0.5)
        if not np.allclose(scores[variants[0]].tokens, tokens):
            raise ValueError(f"the texts differ from those of {args.reference}: compare it with the same texts")
        points = [(float(scores[v].skipped.mean() / num_layers), scores[v].kl) for v in variants]
        entry = {
            "points": [
                {"threshold": t, "skip": x, "kl": float(k.sum() / tokens.sum())}
                for t, (x, k) in zip(thresholds, points)
            ],
            "matched": {},
            "seconds": time.perf_counter() - started,
        }
        for target in args.targets:
            routers, static_at = interpolate(points, target), interpolate(static, target)
            if routers is None or static_at is None:
                entry["matched"][f"{target:.2f}"] = {"reached": False}
                continue
            diff, low, high = paired_bootstrap(routers[0] / tokens, static_at[0] / tokens, weights=tokens)
            entry["matched"][f"{target:.2f}"] = {
                "reached": True,
                "routers": float(routers[0].sum() / tokens.sum()),
                "static": float(static_at[0].sum() / tokens.sum()),
                "minus_static": diff,
                "interval": [low, high],
                "routers_between": list(routers[1]),
            }
        out["transforms"][transform] = entry
        out["seconds"] = time.perf_counter() - began
        write_json(Path(args.output), out)
        print(
            transform,
            {
                t: (round(m["minus_static"], 4), [round(v, 4) for v in m["interval"]], m["routers_between"])
                if m["reached"]
                else None
                for t, m in entry["matched"].items()
            },
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Ablation of the router recipe on the trade-off curve: several sets of routers against the same static and
random drop, on the same held-out texts (KL to dense per token; the cheap, resolving signal).

    python benchmarks/ablation.py --routers NAME=DIR [NAME=DIR ...] --output benchmarks/results/ablation/ablation.json

Each set of routers gets its own threshold sweep (placed on the evaluated texts), and is compared with static
drop at 10/20/30% measured attention skip through routertune.eval.tradeoff (interpolation along each curve, paired
bootstrap over texts). Writes JSON and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from routertune.base_model import load_model_and_tokenizer
from routertune.calibrate import prompt_batches
from routertune.eval import tradeoff
from routertune.files import write_json
from routertune.model import RoutedModel
from routertune.routing import state as routing
from routertune.routing import static_drop as baselines
from routertune.train.prompts import chat_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routers", nargs="+", required=True, help="NAME=FOLDER of routers to compare")
    parser.add_argument("--output", default="benchmarks/results/ablation/ablation.json")
    parser.add_argument("--texts", type=int, default=16, help="texts per domain")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--sweep-points", type=int, default=10)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--domains", nargs="+", default=list(tradeoff.DOMAINS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sets = dict(item.split("=", 1) for item in args.routers)
    job = tradeoff.TradeoffJob(
        routers=next(iter(sets.values())),
        texts=args.texts,
        max_tokens=args.max_tokens,
        tasks=[],
        random_seeds=args.random_seeds,
    )
    model, tokenizer = load_model_and_tokenizer()
    pad = tokenizer.pad_token_id
    num_layers = int(model.config.num_hidden_layers)
    calibration = prompt_batches(chat_prompts(tokenizer, split="train", n=job.calibration_samples, max_tokens=256), pad)
    with routing.forced("run"):
        importance = baselines.attention_importance(model, calibration)
    candidates = baselines.droppable_layers(num_layers)
    fixed = [tradeoff.Variant("dense")]
    fixed += [tradeoff.Variant("static", tuple(importance.least_important(k, candidates)), k) for k in range(1, 11)]
    fixed += [
        tradeoff.Variant("random", tuple(baselines.random_drop(k, candidates, s)), k, s)
        for k in (3, 6, 9)
        for s in range(args.random_seeds)
    ]
    texts = {
        d: [
            ids
            for ids in (tokenizer(t)["input_ids"][: args.max_tokens] for t in tradeoff.domain_texts(d, args.texts))
            if len(ids) >= 8
        ]
        for d in args.domains
    }
    batches = {d: tradeoff.text_batches(lists, pad) for d, lists in texts.items()}
    placement = calibration + [
        {"input_ids": b.input_ids, "attention_mask": b.route_mask} for bs in batches.values() for b in bs
    ]
    result = {"texts": {d: len(v) for d, v in texts.items()}, "sets": {}, "static": {}}
    baseline_scores = None
    for name, folder in sets.items():
        routed = RoutedModel.from_pretrained(model, folder)
        if baseline_scores is None:
            baseline_scores = {d: tradeoff.score_texts(routed, batches[d], fixed, len(texts[d])) for d in texts}
            result["static"] = {
                d: {v.name: s.summary(num_layers) for v, s in scores.items()} for d, scores in baseline_scores.items()
            }
        thresholds = tradeoff.sweep_thresholds(routed, placement, job.skip_targets, args.sweep_points, num_layers)
        sweep = [tradeoff.Variant("routers", threshold=t) for t in thresholds]
        entry = {"folder": folder, "layers": routed.routed_layers, "domains": {}}
        for d in texts:
            scores = {**baseline_scores[d], **tradeoff.score_texts(routed, batches[d], sweep, len(texts[d]))}
            entry["domains"][d] = {
                "sweep": {v.name: scores[v].summary(num_layers) for v in sweep},
                "matched": tradeoff.match_kl(scores, fixed + sweep, job, num_layers),
            }
        routed.unwrap()
        result["sets"][name] = entry
        result["seconds"] = time.perf_counter() - started
        write_json(Path(args.output), result)
        print(f"{name}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    Path(args.output).with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    domains = list(result["texts"])
    lines = [
        "| routers | " + " | ".join(f"{d} KL at {t}" for d in domains for t in ("10%", "20%", "30%")) + " |",
        "|---|" + "---|" * (3 * len(domains)),
    ]
    first = next(iter(result["sets"].values()))
    static = []
    for d in domains:
        for t in ("0.10", "0.20", "0.30"):
            row = first["domains"][d]["matched"][t]
            static.append(f"{row['static']['value']:.3f}" if row["static"].get("reached") else "-")
    lines.append("| static drop | " + " | ".join(static) + " |")
    for name, entry in result["sets"].items():
        cells = []
        for d in domains:
            for t in ("0.10", "0.20", "0.30"):
                r = entry["domains"][d]["matched"][t]["routers"]
                if not r.get("reached"):
                    cells.append("not reached")
                else:
                    low, high = r["interval"]
                    mark = "**" if high < 0 else ""
                    cells.append(f"{mark}{r['value']:.3f}{mark} ({r['minus_static']:+.3f} [{low:+.3f}, {high:+.3f}])")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

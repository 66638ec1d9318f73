"""How many distinct skip patterns sequence routers give held-out chat prompts, at thresholds set to skip
10/20/30% of all attention sublayers on those prompts.

The trade-off measures adaptivity on plain text (`distinct_patterns` in tradeoff.json); chat prompts are what a
server sees, and short ones may all land on one pattern. For each routers folder and target this sets the
threshold at the quantile of the routers' scores on the prompts with every layer running, then measures the
decisions the routers actually take (scores move once earlier layers skip): measured skip, distinct patterns,
and the share of prompts on the most common pattern, with its layers.

    python benchmarks/chat_patterns.py benchmarks/results/routers/default \
        benchmarks/results/routers/previous-default --output benchmarks/results/chat_patterns/chat_patterns
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from routertune import RoutedModel
from routertune.base_model import load_model_and_tokenizer
from routertune.calibrate import prompt_batches, prompt_scores, quantile_threshold
from routertune.files import write_json
from routertune.train.prompts import chat_prompts


def patterns(
    routed: RoutedModel, prompts: list[list[int]], pad: int, num_layers: int, targets: list[float]
) -> list[dict]:
    batches = prompt_batches(prompts, pad)
    routed_n = len(routed.routed_layers)
    routed.set_threshold(1e-9)  # every layer runs: the scores the thresholds are placed on
    scores, _ = prompt_scores(routed, batches)
    pooled = torch.cat(list(scores.values()))
    rows = []
    for target in targets:
        threshold = quantile_threshold(pooled, max(0.0, 1 - target * num_layers / routed_n))
        routed.set_threshold(threshold)
        _, decisions = prompt_scores(routed, batches)  # layer -> (N,) run decisions, prompts in batch order
        layers = sorted(decisions)
        per_prompt = [
            tuple(layer for layer in layers if not bool(decisions[layer][i])) for i in range(len(decisions[layers[0]]))
        ]
        counts = Counter(per_prompt)
        common, n_common = counts.most_common(1)[0]
        rows.append(
            {
                "target": target,
                "threshold": threshold,
                "measured_skip": sum(map(len, per_prompt)) / (len(per_prompt) * num_layers),
                "prompts": len(per_prompt),
                "distinct_patterns": len(counts),
                "most_common_share": n_common / len(per_prompt),
                "most_common_pattern": list(common),
                "layers_skipped_min_max": [min(map(len, per_prompt)), max(map(len, per_prompt))],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("routers", nargs="+", help="folders written by `routertune train` (sequence routers)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out chat prompts of the default mix")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--output", required=True, help="prefix of the .json and .md written")
    args = parser.parse_args(argv)

    model, tokenizer = load_model_and_tokenizer(None)
    num_layers = int(model.config.num_hidden_layers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = chat_prompts(tokenizer, split="heldout", n=args.prompts, max_tokens=256)
    result = {"prompts": len(prompts), "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))], "routers": {}}
    for folder in args.routers:
        routed = RoutedModel.from_pretrained(model, folder)
        if routed.router_config.unit != "sequence":
            raise SystemExit(f"{folder}: token routers have no per-prompt pattern; pass sequence routers")
        result["routers"][folder] = patterns(routed, prompts, pad, num_layers, args.targets)
        routed.unwrap()
    lines = [
        f"{len(prompts)} held-out chat prompts ({result['prompt_tokens'][0]}-{result['prompt_tokens'][1]} "
        "tokens, chat template included)",
        "",
        "| routers | target | measured skip | distinct patterns | prompts on the most common | its skipped layers |",
        "|---|---|---|---|---|---|",
    ]
    for folder, rows in result["routers"].items():
        for r in rows:
            lines.append(
                f"| {folder} | {r['target']:.0%} | {r['measured_skip']:.1%} | {r['distinct_patterns']} | "
                f"{r['most_common_share']:.0%} | {r['most_common_pattern']} |"
            )
    write_json(Path(args.output + ".json"), result)
    Path(args.output + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

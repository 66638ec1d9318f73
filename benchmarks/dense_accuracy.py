"""Dense accuracy beside a `routertune tradeoff` run's matched accuracy settings, on the same items.

The trade-off's accuracy runs ('matched') score static drop and the routers only. This scores the dense model on
the same items (same tasks, same --limit, so the same documents in the same order, checked by count) and
reports each setting's accuracy against dense (paired difference per item, bootstrap 95% interval) and the
average over tasks as a share of dense's average: the issue's "at least 99% of dense at 10%" aim.

    python benchmarks/dense_accuracy.py benchmarks/results/tradeoff/tradeoff.json \
        --output benchmarks/results/tradeoff/dense_accuracy [--dense-cache dense_items.json]

Dense does not depend on the routers: `--dense-cache` keeps its per-item results (per task, checked by item
count on reuse), so a second trade-off run on the same tasks and --limit is compared in seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from routertune import RoutedModel, stats
from routertune.base_model import load_model_and_tokenizer
from routertune.eval import tradeoff
from routertune.files import atomic_write, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tradeoff_json")
    parser.add_argument("--output", required=True, help="path prefix: writes PREFIX.json and PREFIX.md")
    parser.add_argument("--dense-cache", help="JSON of dense per-item results: read if it exists, else written")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = json.loads(Path(args.tradeoff_json).read_text())
    job = result["job"]
    names = list(result["tasks"])
    cache = Path(args.dense_cache) if args.dense_cache else None
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        if (stored["limit"], stored["model"]) != (job["limit"], job["model"]) or not set(names) <= set(stored["tasks"]):
            raise SystemExit(
                f"{cache} holds tasks {sorted(stored['tasks'])} at limit {stored['limit']} of model "
                f"{stored['model']}, not {names} at limit {job['limit']} of {job['model']}: pass "
                "another --dense-cache"
            )
        dense = {name: tradeoff.TaskScores(np.asarray(stored["tasks"][name], dtype=float), 0.0) for name in names}
    else:
        model, tokenizer = load_model_and_tokenizer(job["model"], cache_dir=job["cache_dir"])
        routed = RoutedModel.from_pretrained(model, job["routers"])
        items = tradeoff.task_items(names, job["limit"] or None)
        dense = tradeoff.score_tasks(
            routed, tokenizer, items, tradeoff.Variant("dense"), result["num_layers"], batch_tokens=job["batch_tokens"]
        )
        if cache is not None:
            write_json(
                cache,
                {"model": job["model"], "limit": job["limit"], "tasks": {n: dense[n].correct.tolist() for n in names}},
            )
    out = {"tradeoff": args.tradeoff_json, "tasks": {}, "average": {}}
    rows = []
    by_setting: dict[str, list[tuple[float, float]]] = {}
    for name in names:
        correct = dense[name].correct
        settings = result["tasks"][name]["settings"]
        if any(len(s["per_item"]) != len(correct) for s in settings.values()):
            raise SystemExit(f"{name}: the trade-off scored other items than these {len(correct)}")
        task = {"dense": float(correct.mean()), "items": len(correct), "settings": {}}
        for label, setting in settings.items():
            per_item = np.asarray(setting["per_item"], dtype=float)
            accuracy = float(per_item.mean())
            diff, low, high = stats.paired_bootstrap(per_item, correct)
            task["settings"][label] = {
                "accuracy": accuracy,
                "skip": setting["skip"],
                "of_dense": accuracy / float(correct.mean()),
                "minus_dense": diff,
                "interval": [low, high],
            }
            rows.append((name, label, setting["skip"], accuracy, float(correct.mean()), diff, low, high))
        out["tasks"][name] = task
        # averaged over tasks: static drop of the same k everywhere; the routers' point nearest each target
        # on each task (their thresholds differ by task), within 5 points of it
        for target in (0.1, 0.2, 0.3):
            k = round(target * result["num_layers"])
            if f"static {k}" in settings:
                by_setting.setdefault(f"static near {round(100 * target)}%", []).append(
                    (float(np.mean(settings[f"static {k}"]["per_item"])), float(correct.mean()))
                )
            routers = [s for label, s in settings.items() if label.startswith("routers")]
            near = min(routers, key=lambda s: abs(s["skip"] - target), default=None)
            if near is not None and abs(near["skip"] - target) <= 0.05:
                by_setting.setdefault(f"routers near {round(100 * target)}%", []).append(
                    (float(np.mean(near["per_item"])), float(correct.mean()))
                )
    for label, pairs in sorted(by_setting.items()):
        if len(pairs) == len(names):  # one per task
            mean_acc = float(np.mean([a for a, _ in pairs]))
            mean_dense = float(np.mean([d for _, d in pairs]))
            out["average"][label] = {"accuracy": mean_acc, "dense": mean_dense, "of_dense": mean_acc / mean_dense}
    out["seconds"] = time.perf_counter() - started
    prefix = Path(args.output)
    write_json(prefix.with_suffix(".json"), out)
    lines = [
        "| task | setting | measured skip | accuracy | dense | minus dense (pts) [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for name, label, skip, acc, dense_acc, diff, low, high in rows:
        lines.append(
            f"| {name} | {label} | {skip:.3f} | {acc:.3f} | {dense_acc:.3f} | "
            f"{100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] |"
        )
    lines += ["", "| average over tasks | accuracy | dense | share of dense |", "|---|---|---|---|"]
    for label, avg in out["average"].items():
        lines.append(f"| {label} | {avg['accuracy']:.4f} | {avg['dense']:.4f} | {avg['of_dense']:.4f} |")
    text = "\n".join(lines) + "\n"
    atomic_write(prefix.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

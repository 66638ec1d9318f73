"""Compare the two Router-Tuning objectives at two target capacities on the default model.

    python benchmarks/objectives.py [--samples 1000] [--out benchmarks/results/objectives/objectives.json]
                                    [--reuse lm:0.5=DIR]   # routers already trained with these settings

For each (objective, target) it trains routers with `routertune train` settings and measures held-out
perplexity on (a) responses of the held-out split of the default mix and (b) LAMBADA passages (plain text,
never used in training; second half scored given the first), beside the dense model. Writes JSON and a
markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from routertune import RoutedModel
from routertune.base_model import load_model_and_tokenizer
from routertune.files import atomic_write, write_json
from routertune.train import data
from routertune.train.loop import TrainConfig, evaluate_loss
from routertune.train.tune import TuneJob, tune

CONFIGS = [("lm", 0.75), ("lm", 0.5), ("distill", 0.75), ("distill", 0.5)]


def lambada_batches(tokenizer, n: int, max_length: int, batch_size: int = 8):
    examples, _ = data.encode_records([{"text": p} for p in data.lambada_passages(n)], tokenizer, max_length)
    return [data.collate(b, tokenizer.pad_token_id) for b in data.length_batches(examples, batch_size, 0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--heldout-samples", type=int, default=64)
    parser.add_argument("--lambada", type=int, default=128, help="LAMBADA passages for perplexity")
    parser.add_argument("--capacity-weight", type=float, default=TrainConfig.capacity_weight)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/objectives/objectives.json"))
    parser.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="OBJECTIVE:TARGET=DIR",
        help="use routers already trained with the same settings (e.g. by train_default.py --keep)",
    )
    args = parser.parse_args()
    reuse = {}
    for item in args.reuse:
        key, _, folder = item.partition("=")
        objective, _, target = key.partition(":")
        reuse[(objective, float(target))] = Path(folder)

    model, tokenizer = load_model_and_tokenizer()
    lambada = lambada_batches(tokenizer, args.lambada, 256)
    rows = []
    dense_row = None
    for objective, target in CONFIGS:
        cfg = TrainConfig(objective=objective, target_capacity=target, capacity_weight=args.capacity_weight)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            if (objective, target) in reuse:
                folder = reuse[(objective, target)]
                res = _check_reused(folder, cfg, args)
                seconds = res["seconds"]
            else:
                folder = tmp
                res = asdict(
                    tune(TuneJob(output=tmp, samples=args.samples, heldout_samples=args.heldout_samples), cfg).result
                )
                seconds = time.perf_counter() - started
            routed = RoutedModel.from_pretrained(model, folder)
            lam = evaluate_loss(routed, lambada)
            if dense_row is None:
                lam_dense = evaluate_loss(routed, lambada, dense=True)
                dense_row = {
                    "setting": "dense",
                    "capacity": 1.0,
                    "heldout_ppl": res["dense"]["perplexity"],
                    "lambada_ppl": lam_dense.perplexity,
                }
            routed.unwrap()
        rows.append(
            {
                "setting": f"{objective}, target {target}",
                "objective": objective,
                "target": target,
                "capacity": res["after"]["capacity"],
                "heldout_ppl": res["after"]["perplexity"],
                "lambada_ppl": lam.perplexity,
                "lambada_capacity": lam.capacity,
                "seconds": seconds,
                "steps": res["steps"],
                "train": asdict(cfg),
                "reused": str(reuse.get((objective, target), "")),
            }
        )
        print(rows[-1])
    table = [
        "| setting | held-out capacity | held-out response ppl | LAMBADA ppl (capacity) |",
        "|---|---|---|---|",
        f"| dense | 1.00 | {dense_row['heldout_ppl']:.2f} | {dense_row['lambada_ppl']:.2f} (1.00) |",
    ]
    table += [
        f"| {r['setting']} | {r['capacity']:.2f} | {r['heldout_ppl']:.2f} | "
        f"{r['lambada_ppl']:.2f} ({r['lambada_capacity']:.2f}) |"
        for r in rows
    ]
    write_json(args.out, {"samples": args.samples, "dense": dense_row, "rows": rows})
    atomic_write(args.out.with_suffix(".md"), lambda p: Path(p).write_text("\n".join(table) + "\n"))
    print("\n".join(table))


def _check_reused(folder: Path, cfg: TrainConfig, args) -> dict:
    """The training result of routers trained elsewhere, refused unless they were trained like this row."""
    metrics = json.loads((folder / "train_metrics.json").read_text())
    differs = {k: (v, metrics["train"].get(k)) for k, v in asdict(cfg).items() if metrics["train"].get(k) != v}
    job = metrics["job"]
    if job["samples"] != args.samples or job["heldout_samples"] != args.heldout_samples or job["data"] is not None:
        differs["job"] = (f"samples={args.samples}, heldout={args.heldout_samples}, default data", job)
    if differs:
        raise SystemExit(f"{folder} was trained with other settings (ours, theirs): {differs}")
    return metrics["result"]


if __name__ == "__main__":
    main()

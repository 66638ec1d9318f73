"""Time `routertune train` on the default model with the default data and record where capacity ends.

    python benchmarks/train_default.py [--out benchmarks/results/objectives/train_default.json] [--keep DIR] [-- extra train flags]

`--keep DIR` keeps the trained routers (benchmarks/objectives.py can reuse them as its "lm, 0.5" row).

Writes JSON: wall time (model load + tokenisation + training + held-out evaluation), steps, held-out
capacity and response loss/perplexity for the dense and the routed model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from routertune.cli import main as routertune
from routertune.files import write_json


def run(out: Path, extra: list[str], keep: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        tmp = str(keep) if keep else scratch
        start, cpu_start = time.perf_counter(), time.process_time()
        overwrite = ["--overwrite"] if keep else []
        code = routertune(["train", "--output", tmp, "--samples", "1000", *overwrite, *extra])
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if code != 0:
            raise SystemExit(code)
        metrics = json.loads((Path(tmp) / "train_metrics.json").read_text())
    result = metrics["result"]
    target = metrics["train"]["target_capacity"]
    summary = {
        "command": "routertune train --samples 1000 " + " ".join(extra),
        "machine": {"cpus": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "wall_seconds": wall,
        # process CPU time over all threads: on a shared machine it leaves out time spent waiting for a core
        "cpu_seconds": cpu,
        "load_average_at_end": os.getloadavg(),
        "training_seconds": result["seconds"],
        "steps": result["steps"],
        "samples": metrics["samples"],
        "truncated": metrics["truncated"],
        "target_capacity": target,
        "heldout_capacity": result["after"]["capacity"],
        "capacity_gap": abs(result["after"]["capacity"] - target),
        "last_step_capacity": result["history"][-1]["capacity"],
        "dense_loss": result["dense"]["loss"],
        "dense_perplexity": result["dense"]["perplexity"],
        "routed_loss": result["after"]["loss"],
        "routed_perplexity": result["after"]["perplexity"],
        "skip_rate": result["after"]["skip_rate"],
        "job": metrics["job"],
        "train": metrics["train"],
    }
    write_json(out, summary)
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/objectives/train_default.json"))
    parser.add_argument("--keep", type=Path, default=None, help="write the routers here instead of a temp dir")
    args, extra = parser.parse_known_args()
    summary = run(args.out, [a for a in extra if a != "--"], args.keep)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("job", "train", "skip_rate")}, indent=2))

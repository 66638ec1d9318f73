"""Assemble the committed trade-off of the default routers from the runs that measured it in parallel.

Why: one `routertune tradeoff` with its defaults (32 texts a domain, 1,000 items a task) needs about three
hours of one core here; this session had about one hour of two cores, shared. So the parts were measured in
separate processes with the same routers:

- the held-out domains (KL to dense and perplexity, 12 texts each, static and random drop, a 10-point
  sweep) by `benchmarks/ablation.py`, whose set "importance, shrink 0.5 (the default recipe)" holds router
  weights bit-identical to benchmarks/results/routers-default (checked here);
- each task by `routertune tradeoff --tasks TASK --thresholds ...` with the same thresholds.

    python benchmarks/assemble_tradeoff.py --ablation benchmarks/results/ablation.json \
        --set "importance, shrink 0.5 (the default recipe)" --set-routers /path/of/that/set \
        --routers benchmarks/results/routers-default --tasks RUN/tradeoff.json ... --output DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from merge_tradeoff import partial_matches  # noqa: E402

from routertune.files import write_json  # noqa: E402
from routertune.tradeoff import markdown_table  # noqa: E402


def _variant(name: str) -> dict:
    if name == "dense":
        return {"name": name, "kind": "dense"}
    if name.startswith("static "):
        return {"name": name, "kind": "static", "k": int(name.split()[1])}
    if name.startswith("random "):
        return {"name": name, "kind": "random", "k": int(name.split()[1])}
    return {"name": name, "kind": "routers", "threshold": float(name.split("@")[1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ablation", required=True)
    parser.add_argument("--set", required=True)
    parser.add_argument("--set-routers", required=True, help="the folder the ablation set was measured with")
    parser.add_argument("--routers", required=True)
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    a = load_file(str(Path(args.set_routers) / "routers.safetensors"))
    b = load_file(str(Path(args.routers) / "routers.safetensors"))
    same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    if not same:
        raise SystemExit(f"{args.set_routers} and {args.routers} hold different routers: not assembled")
    ablation = json.loads(Path(args.ablation).read_text())
    entry = ablation["sets"][args.set]
    result = {"job": {"routers": args.routers, "skip_targets": [0.1, 0.2, 0.3]}, "assembled": {
        "domains_from": f"{args.ablation} set {args.set!r} (router weights bit-identical to {args.routers})",
        "tasks_from": args.tasks}, "domains": {}, "tasks": {}, "matched": {}, "fidelity": {}, "variants": []}
    names = set()
    for domain, texts in ablation["texts"].items():
        settings = {**ablation["static"][domain], **entry["domains"][domain]["sweep"]}
        result["domains"][domain] = {"texts": texts, "settings": settings}
        result["matched"][domain] = entry["domains"][domain]["matched"]
        names |= set(settings)
    for path in args.tasks:
        run = json.loads(Path(path).read_text())
        for task, data in run.get("tasks", {}).items():
            result["tasks"][task] = data
            result["matched"][task] = run["matched"].get(task) or partial_matches(run, task)
            result["assembled"].setdefault("task_runs", {})[task] = {"file": path, "job": run["job"],
                                                                    "settings": list(data["settings"])}
            names |= set(data["settings"])
    result["variants"] = [_variant(n) for n in sorted(names)]
    out = Path(args.output)
    write_json(out / "tradeoff.json", result)
    (out / "tradeoff.md").write_text(markdown_table(result) + "\n")
    print(markdown_table(result))


if __name__ == "__main__":
    main()

"""Merge the task results of `routertune tradeoff` runs made in parallel processes into one tradeoff.json.

The committed trade-off was measured as three processes with the same routers and the same router
thresholds (`--thresholds`), one per task, to use both cores: the first also measured the held-out domains
and greedy agreement. This takes the first run's file and adds the other runs' tasks (their accuracy
results and matched comparisons), then rewrites tradeoff.md.

    python benchmarks/merge_tradeoff.py benchmarks/results/tradeoff/tradeoff.json OTHER/tradeoff.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from routertune.files import write_json
from routertune.tradeoff import compare_curves, markdown_table, paired_bootstrap


def main(paths: list[str]) -> None:
    first = Path(paths[0])
    merged = json.loads(first.read_text())
    merged.setdefault("merged_from", [])
    for other_path in paths[1:]:
        other = json.loads(Path(other_path).read_text())
        if other["job"]["thresholds"] != merged["job"]["thresholds"] or other["job"]["routers"] != merged["job"]["routers"]:
            raise SystemExit(f"{other_path} was run with other routers or thresholds; not merged")
        for task in other["job"]["tasks"]:
            if task not in other.get("tasks", {}):
                continue
            merged["tasks"][task] = other["tasks"][task]
            merged["matched"][task] = other["matched"].get(task) or partial_matches(other, task)
        names = {v["name"] for v in merged["variants"]}
        merged["variants"] += [v for v in other["variants"] if v["name"] not in names]
        merged["merged_from"].append({"file": other_path, "tasks": other["job"]["tasks"],
                                      "seconds": other.get("seconds")})
    write_json(first, merged)
    (first.parent / "tradeoff.md").write_text(markdown_table(merged) + "\n")
    print(markdown_table(merged))


def partial_matches(result: dict, task: str, near: float = 0.012) -> dict:
    """The comparisons a run cut short still supports, from its per-item results: at each target, the router
    point nearest it against static drop interpolated at the router's measured skip when static drop has
    points on both sides, else against static drop at the target's own layer count when the router point
    lies within `near` of it (marked "near")."""
    kinds = {v["name"]: v["kind"] for v in result["variants"]}
    settings = result["tasks"][task]["settings"]
    static = [(s["skip"], np.array(s["per_item"], dtype=float)) for n, s in settings.items() if kinds.get(n) == "static"]
    routers = [(s["skip"], np.array(s["per_item"], dtype=float)) for n, s in settings.items() if kinds.get(n) == "routers"]
    out = {}
    for t in result["job"]["skip_targets"]:
        key = f"{t:.2f}"
        if not routers or not static:
            continue
        at, values = min(routers, key=lambda p: abs(p[0] - t))
        entry = compare_curves({"static": static, "routers": [(at, values)]}, at)
        if not entry["routers"].get("reached"):
            exact = [p for p in static if abs(p[0] - t) < 1e-9]
            if not exact or abs(at - t) > near:
                continue
            diff, low, high = paired_bootstrap(values, exact[0][1])
            entry = {"static": {"reached": True, "value": float(exact[0][1].mean()), "between": [t, t]},
                     "routers": {"reached": True, "value": float(values.mean()), "between": [at, at],
                                 "minus_static": diff, "interval": [low, high]},
                     "near": True}
        entry["at"] = at
        out[key] = entry
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

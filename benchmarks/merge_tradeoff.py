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

from routertune.files import write_json
from routertune.tradeoff import markdown_table


def main(paths: list[str]) -> None:
    first = Path(paths[0])
    merged = json.loads(first.read_text())
    merged.setdefault("merged_from", [])
    for other_path in paths[1:]:
        other = json.loads(Path(other_path).read_text())
        if other["job"]["thresholds"] != merged["job"]["thresholds"] or other["job"]["routers"] != merged["job"]["routers"]:
            raise SystemExit(f"{other_path} was run with other routers or thresholds; not merged")
        for task in other["job"]["tasks"]:
            merged["tasks"][task] = other["tasks"][task]
            merged["matched"][task] = other["matched"][task]
        names = {v["name"] for v in merged["variants"]}
        merged["variants"] += [v for v in other["variants"] if v["name"] not in names]
        merged["merged_from"].append({"file": other_path, "tasks": other["job"]["tasks"],
                                      "seconds": other.get("seconds")})
    write_json(first, merged)
    (first.parent / "tradeoff.md").write_text(markdown_table(merged) + "\n")
    print(markdown_table(merged))


if __name__ == "__main__":
    main(sys.argv[1:])

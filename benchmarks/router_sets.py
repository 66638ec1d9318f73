"""Two `routertune tradeoff` runs on the same texts, compared at the same measured skip (routertune.eval.router_sets):
e.g. new routers against the committed default ones, or routers against the searched static order.

    python benchmarks/router_sets.py A/tradeoff.json B/tradeoff.json --output OUT [--a-prefix routers]
        [--b-prefix routers] [--names new old] [--targets 0.1 0.2 0.3]

Writes OUT.json and OUT.md. No model runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from routertune.eval.router_sets import compare, markdown
from routertune.files import write_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--output", required=True, help="path without suffix: OUT.json and OUT.md are written")
    parser.add_argument("--a-prefix", default="routers", help="settings of A compared (name prefix)")
    parser.add_argument("--b-prefix", default="routers", help="settings of B compared (name prefix)")
    parser.add_argument("--names", nargs=2, default=("A", "B"), help="what A and B are, for the table")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    out = compare(a, b, args.targets, args.a_prefix, args.b_prefix, args.bootstrap)
    out["sources"] = {"a": args.a, "b": args.b, "names": list(args.names)}
    write_json(Path(args.output + ".json"), out)
    text = markdown(out, *args.names)
    Path(args.output + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

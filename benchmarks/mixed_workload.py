"""The trade-off on a mixed workload (one router threshold for texts of every domain at once), from the per-text
results of a tradeoff.json: routertune.eval.mixed_workload compares, this writes mixed_workload.json/.md. No model
runs; the numbers are those of the file.

    python benchmarks/mixed_workload.py benchmarks/results/tradeoff/tradeoff.json   # -> mixed_workload.json/.md beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from routertune.eval.mixed_workload import markdown, mixed_workload
from routertune.files import write_json


def main(path: str) -> None:
    source = Path(path)
    out = mixed_workload(json.loads(source.read_text()))
    write_json(source.with_name("mixed_workload.json"), out)
    text = markdown(out)
    source.with_name("mixed_workload.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1])

"""Speed benchmark of routertune on a model (default: the embedded SmolLM2-135M-Instruct): dense, static
attention drop, routers forced to static drop's skip set, routers with their own decisions. Writes JSON.

    python benchmarks/bench.py                                   # -> benchmarks/results/speed/bench_default.json
    python benchmarks/bench.py --threads 1 --clock cpu           # what docs/speed.md's table used (shared CPU)
    python benchmarks/bench.py --quick --output quick.json      # smoke test
    routertune report --inputs benchmarks/results/speed --output benchmarks/results/speed/report

Every flag is a field of routertune.bench.runner.BenchConfig (`--help`); this script only changes the default
output path. The same measurement is `routertune bench --output FILE.json`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from routertune import report
from routertune.bench import runner as bench
from routertune.cli import _build, add_dataclass_flags

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "speed" / "bench_default.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, bench.BenchConfig)
    parser.set_defaults(output=str(DEFAULT_OUTPUT))
    cfg = _build(bench.BenchConfig, parser.parse_args(argv))
    result = bench.run_bench(cfg, progress=lambda message: print(f"[bench] {message}", flush=True))
    print("\n".join(report.bench_tables(result.to_dict())))
    for note in result.skipped:
        print(f"[not measured] {note}")
    print(f"\n`routed` decisions: {result.routers}")
    print(f"done in {result.seconds:.0f} s; results written to {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

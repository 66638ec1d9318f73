"""The comparison in the README: dense vs static attention drop vs random drop vs routers at ~10% and ~25% of
all attention sublayers skipped, on harness tasks with local data, plus held-out perplexity.

    .venv/bin/python benchmarks/compare.py                 # the README's table (about 25 min on 2 busy CPU cores)
    .venv/bin/python benchmarks/compare.py --full          # the full protocol: 8 tasks, full validation sets,
                                                           # both perplexity sources, fidelity (many hours on CPU)

Writes <output>/compare.json (everything, including per-layer skip rates and dropped layers) and
<output>/compare.md (the table), after every setting.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from routertune.eval.compare import DEFAULT_COMPARE_TASKS, CompareJob, compare

# what fits in about 25 minutes of a shared 2-core CPU (measured: ~50-60 tokens/s for SmolLM2-135M there)
README_JOB = dict(
    tasks=["arc_easy", "arc_challenge", "openbookqa", "winogrande"],  # the cheapest per item (short prompts)
    limit=100,
    perplexity=["lambada", "boolq"],
    ppl_texts=32,
    fidelity_prompts=16,
    fidelity_tokens=16,
    calibration_samples=32,
    max_prompt_tokens=128,
)
FULL_JOB = dict(tasks=list(DEFAULT_COMPARE_TASKS), limit=None, ppl_texts=200, fidelity_prompts=64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", default="runs/demo", help="routers folder (default: the demo's)")
    parser.add_argument("--output", default="runs/compare", help="folder for compare.json / compare.md")
    parser.add_argument("--full", action="store_true", help="the full protocol instead of the README's run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is fastest on a machine shared with other jobs (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("routertune").setLevel(logging.INFO)  # progress of the comparison, not the harness's chatter
    settings = FULL_JOB if args.full else README_JOB
    report = compare(CompareJob(routers=args.routers, output=args.output, **settings))
    print(report.markdown)
    print(f"{report.seconds:.0f} s; written to {args.output}/compare.md and compare.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Short token-routing benchmark for a starved shared machine: prefill at 2048 tokens (batch 1), then decode,
writing the JSON after every row, so whatever finishes is kept. Same measurement code as
`routertune bench --token-routing` (routertune.bench.token_rows), leaner warm-up: the runs that record decisions and
KV bytes are the warm-up. CPU process time, one thread.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 19 python benchmarks/token_bench_short.py OUT.json
"""

import json
import sys
import time
from dataclasses import asdict

import torch

from routertune.base_model import load_model_and_tokenizer
from routertune.bench.clocks import Clock
from routertune.bench.config import BenchConfig
from routertune.bench.flops import FlopCounter
from routertune.bench.runner import environment
from routertune.bench.token_rows import bench_token_decode, bench_token_prefill, token_variant
from routertune.bench.variants import build_variants


def main(out_path):
    torch.set_num_threads(1)
    started = time.perf_counter()
    cfg = BenchConfig(
        lengths=[2048],
        batch_sizes=[1],
        repeats=3,
        warmup=1,
        decode_prompt=512,
        decode_tokens=16,
        clock="cpu",
        memory=False,
    )
    model, tokenizer = load_model_and_tokenizer(None)
    model.eval()
    with torch.inference_mode():
        vs = build_variants(model, cfg, tokenizer)
        token, fraction, source = token_variant(model, vs, cfg)
        flops = FlopCounter.from_config(model.config)
        clock = Clock(torch.device("cpu"), "cpu")
        result = {
            "command": " ".join(sys.argv),
            "environment": environment(torch.device("cpu")),
            "config": asdict(cfg),
            "routed_layers": vs.routed_layers,
            "sequence_skip_set": vs.static_layers,
            "token_side": token.description,
            "fraction": fraction,
            "rows": [],
        }

        def save():
            result["seconds"] = time.perf_counter() - started
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1, default=str)

        # the runs that record decisions and KV bytes are the warm-up (lean, for a starved machine)
        result["rows"].append(
            asdict(
                bench_token_prefill(
                    vs, token, 2048, 1, cfg, flops, torch.device("cpu"), clock, cfg.seed, recorded_warm_up=True
                )
            )
        )
        save()
        result["rows"].append(
            asdict(bench_token_decode(vs, token, 1, cfg, flops, torch.device("cpu"), clock, cfg.seed + 401))
        )
        save()


if __name__ == "__main__":
    main(sys.argv[1])

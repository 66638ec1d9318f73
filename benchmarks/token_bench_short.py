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

from routertune.routing import state as routing
from routertune.bench.runner import BenchConfig, Clock, FlopCounter, _ids, _prefill, _rotated, build_variants, environment, kv_bytes
from routertune.base_model import load_model_and_tokenizer
from routertune.bench.token_rows import _collect, _row, bench_token_decode, token_flops, token_variant


def prefill_row(vs, token, length, cfg, flops, clock):
    dense, sequence = vs.variants[0], next(v for v in vs.variants if v.name == "routed_static_set")
    ids = _ids(flops.vocab_size, 1, length, cfg.seed, torch.device("cpu"))
    with routing.record() as calls:
        _, cache = _prefill(token, ids)  # warm-up of the token side; decisions and KV bytes
    runs = _collect(calls)
    token_kv = kv_bytes(cache)
    _, dense_cache = _prefill(dense, ids)  # warm-up of dense; KV bytes
    dense_kv = kv_bytes(dense_cache)
    del cache, dense_cache
    _prefill(sequence, ids)  # warm-up of the sequence side
    times = {v.name: [] for v in (dense, sequence, token)}
    for r in range(cfg.repeats):
        for v in _rotated([dense, sequence, token], r):
            _, seconds, _ = clock(lambda: _prefill(v, ids))
            times[v.name].append(seconds)
    n = flops.num_layers
    seq_exec = [0 if layer in sequence.skip_layers else 1 for layer in range(n)]
    zeros = {layer: torch.zeros(1, dtype=torch.long) for layer in runs}
    return _row("prefill", length, 0, 1, times, runs, vs, flops.forward(0, length, [1] * n, 1, 1),
                flops.forward(0, length, seq_exec, 1, 1), token_flops(flops, 0, length, 1, runs, zeros, 1),
                token_kv, dense_kv, n)


def main(out_path):
    torch.set_num_threads(1)
    started = time.perf_counter()
    cfg = BenchConfig(lengths=[2048], batch_sizes=[1], repeats=3, warmup=1, decode_prompt=512, decode_tokens=16,
                      clock="cpu", memory=False)
    model, tokenizer = load_model_and_tokenizer(None)
    model.eval()
    with torch.inference_mode():
        vs = build_variants(model, cfg, tokenizer)
        token, fraction, source = token_variant(model, vs, cfg)
        flops = FlopCounter.from_config(model.config)
        clock = Clock(torch.device("cpu"), "cpu")
        result = {"command": " ".join(sys.argv), "environment": environment(torch.device("cpu")),
                  "config": asdict(cfg), "routed_layers": vs.routed_layers, "sequence_skip_set": vs.static_layers,
                  "token_side": token.description, "fraction": fraction, "rows": []}

        def save():
            result["seconds"] = time.perf_counter() - started
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1, default=str)

        result["rows"].append(asdict(prefill_row(vs, token, 2048, cfg, flops, clock)))
        save()
        result["rows"].append(asdict(bench_token_decode(vs, token, 1, cfg, flops, torch.device("cpu"), clock,
                                                        cfg.seed + 401)))
        save()


if __name__ == "__main__":
    main(sys.argv[1])

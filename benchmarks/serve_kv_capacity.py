"""KV capacity of the served model at a fixed KV-cache size: how many tokens vLLM can hold for the dense model,
for native static drop (DeciLM no-op attention: the dropped layers get no KV cache), for the routed export
(every layer keeps its KV cache), and for the routed export made with `--free-kv` (the layers its routers can
never run at their thresholds get none); and what share of the layers' KV the routed requests actually skip.

Each engine runs in its own spawned process with the same `VLLM_CPU_KVCACHE_SPACE`; the capacity is vLLM's own
count (`cache_config.num_gpu_blocks * block_size`, in-process engine core so the count is visible). The
routed requests' KV skip share s is measured from the routing log of the routed engine on held-out chat
prompts at the routers' own threshold; the ideal capacity gain is 1 / (1 - s), and the issue's target is
at least 0.8 of that gain (0.8 * (1/(1 - s) - 1) + 1).

    routertune export --routers benchmarks/results/routers/searched-prior-shrink1 --output serve-default
    python benchmarks/serve_kv_capacity.py --routers benchmarks/results/routers/searched-prior-shrink1 \
        --output benchmarks/results/serve-kv/kv_capacity.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _capacity(conn, model: str, env: dict, prompts: list[list[int]] | None) -> None:
    os.environ.update(env)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from routertune.serve.engine import engine_kwargs

    llm = LLM(model, **engine_kwargs(max_model_len=2048))
    cache = llm.llm_engine.vllm_config.cache_config
    if prompts:
        llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            SamplingParams(temperature=0.0, max_tokens=1),
            use_tqdm=False,
        )
    conn.send({"num_blocks": int(cache.num_gpu_blocks), "block_size": int(cache.block_size)})


def measure(model: str, env: dict, prompts=None) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_capacity, args=(child, model, env, prompts), daemon=True)
    process.start()
    out = parent.recv()
    process.join(timeout=120)
    out["tokens"] = out["num_blocks"] * out["block_size"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", required=True)
    parser.add_argument("--static", type=int, default=6, help="layers native static drop removes (searched order)")
    parser.add_argument("--kv-space-gib", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=32, help="held-out chat prompts for the routed skip share")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/serve-kv/kv_capacity.json"))
    args = parser.parse_args(argv)

    from routertune.base_model import load_tokenizer, resolve_model_path
    from routertune.files import write_json
    from routertune.serve.export import ExportJob, export
    from routertune.serve.requests import LOG_ENV
    from routertune.train.prompts import chat_prompts

    work = Path(tempfile.mkdtemp(prefix="routertune-kv-"))
    routed_dir, static_dir = work / "routed", work / "static"
    routed_report = export(ExportJob(output=str(routed_dir), routers=args.routers, overwrite=True))
    free_dir = work / "routed-free-kv"
    free_report = export(ExportJob(output=str(free_dir), routers=args.routers, overwrite=True, free_kv=True))
    static_report = export(ExportJob(output=str(static_dir), routers=args.routers, static=args.static, overwrite=True))
    base = resolve_model_path(None)
    tokenizer = load_tokenizer(base)
    prompts = chat_prompts(tokenizer, split="heldout", n=args.prompts, max_tokens=512)
    log = work / "routing.jsonl"
    env = {
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(args.kv_space_gib),
    }
    dense = measure(base, env)
    static = measure(str(static_dir), env)
    routed = measure(str(routed_dir), {**env, LOG_ENV: str(log)}, prompts)
    free_log = work / "routing-free-kv.jsonl"
    routed_free = measure(str(free_dir), {**env, LOG_ENV: str(free_log)}, prompts)

    num_layers = json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"]

    def decided(path):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {e["prompt_sha1"]: e["decisions"] for e in lines if e.get("event") == "decided"}

    entries = decided(log)
    # the --free-kv export must take the same decisions (its never-run layers were skipped by every prompt)
    same_decisions = decided(free_log) == entries
    skipped = [sum(1 for runs in d.values() if not runs) for d in entries.values()]
    share = sum(skipped) / (len(skipped) * num_layers) if skipped else float("nan")
    ideal = 1 / (1 - share)

    def row(found: dict, ideal_gain: float) -> dict:
        gain = found["tokens"] / dense["tokens"]
        return {
            **found,
            "gain_over_dense": gain,
            "ideal_gain": ideal_gain,
            "share_of_ideal_gain": (gain - 1) / (ideal_gain - 1) if ideal_gain > 1 else float("nan"),
        }

    result = {
        "what": "tokens the KV cache holds at a fixed size: dense, native static drop, routed export",
        "command": "python benchmarks/serve_kv_capacity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "kv_cache_gib": args.kv_space_gib,
        "machine": platform.machine(),
        "routers": args.routers,
        "static_layers": static_report.dropped_layers,
        "routed_layers": routed_report.routed_layers,
        "routed_requests": len(skipped),
        "free_kv_layers": free_report.never_run,
        "free_kv_same_decisions": same_decisions,
        "routed_kv_skip_share": share,
        "target": "at least 0.8 of the ideal gain 1 / (1 - s)",
        "dense": row(dense, 1.0),
        "static": row(static, num_layers / (num_layers - len(static_report.dropped_layers))),
        "routed": row(routed, ideal),
        "routed_free_kv": row(routed_free, ideal),
    }
    result["met"] = bool(result["routed_free_kv"]["share_of_ideal_gain"] >= 0.8) if not math.isnan(share) else False
    write_json(args.output, result)
    print(
        json.dumps(
            {k: result[k] for k in ("dense", "static", "routed", "routed_free_kv", "routed_kv_skip_share", "met")},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

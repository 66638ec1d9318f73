"""Speed you can trust: prefill latency, decode throughput, KV-cache bytes, peak memory and analytic FLOPs for

* ``dense``              the plain model;
* ``static_drop``        static attention drop at its cheapest: a plain model whose dropped attention modules
                         return zeros (no routers, no routing state, no gather/scatter);
* ``routed_static_set``  our RoutedModel with routers forced to static drop's skip set, so
                         ``speed-up(routed_static_set) / speed-up(static_drop)`` is our routing overhead and
                         nothing else;
* ``routed``             routers making their own per-sequence decisions (trained routers from ``--routers``,
                         else seeded random "synthetic" routers, said so in the results).

Honest timing: warm-up runs first; within every repeat the variants run one after another in an order that
rotates between repeats, so drift in the machine's speed (other jobs, clocks) hits all of them alike;
medians over repeats. Decode advances all variants in lock-step, one token each in turn, and every step is a
repeat. ``time.perf_counter`` on CPU, CUDA events + synchronize on GPU. Prefill asks for the logits of the
last position only (``logits_to_keep=1``): nobody reads the others.

Ideal speed-up = analytic FLOPs of dense / FLOPs of the variant for the same work (matmul FLOPs of the
attention projections, attention scores over the causal context, MLP and the logits that are computed;
norms, RoPE and element-wise work are left out). ``achieved_over_ideal`` = measured speed-up / ideal.

Library code: `run_bench(BenchConfig)` and `bench_model(model, BenchConfig)` return a `BenchResult`
dataclass (``.to_dict()`` is the JSON); only the CLI prints. This module is the run loop and the checks;
the parts: config.py (BenchConfig), variants.py (what is compared), flops.py (analytic FLOPs), clocks.py (timing,
peak memory), measure.py (prefill, decode, overhead measurements), results.py (the result dataclasses),
token_rows.py (token routing rows, with --token-routing); paired ratios live in routertune.stats.
"""

from __future__ import annotations

import itertools
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from routertune.base_model import portable_name
from routertune.bench.clocks import Clock, steady_malloc
from routertune.bench.config import BenchConfig
from routertune.bench.flops import FlopCounter
from routertune.bench.measure import bench_decode, bench_overhead, bench_prefill
from routertune.bench.results import (
    FORCED_VS_STATIC_TARGET,
    OVERHEAD_LIMIT,
    PREFILL_IDEAL_TARGET,
    PREFILL_TARGET_LENGTH,
    SCHEMA,
    VARIANTS,
    BenchResult,
    Checks,
)
from routertune.bench.variants import build_variants
from routertune.stats import paired_ratio, paired_ratio_ci


def checks_of(result: BenchResult) -> Checks:
    # speed-up(routed_static_set) / speed-up(static_drop) = static time / forced time, paired per repeat
    forced, forced_ci = {}, {}
    groups = [(f"prefill L={p.length} B={p.batch}", p) for p in result.prefill]
    groups += [(f"decode B={d.batch}", d) for d in result.decode]
    for key, group in groups:
        static, routed = group.variants["static_drop"].times_s, group.variants["routed_static_set"].times_s
        forced[key] = paired_ratio(static, routed)
        forced_ci[key] = paired_ratio_ci(static, routed)
    lengths = sorted({p.length for p in result.prefill})
    target_len = PREFILL_TARGET_LENGTH if PREFILL_TARGET_LENGTH in lengths else (lengths[-1] if lengths else None)
    ideal: dict[str, dict[str, float]] = {}
    for p in result.prefill:
        if p.length != target_len:
            continue
        for name in VARIANTS[1:]:
            ideal.setdefault(name, {})[f"B={p.batch}"] = p.variants[name].achieved_over_ideal
    kv_equal = all(vr.kv_equal for group in result.prefill + result.decode for vr in group.variants.values())
    overhead_max = max((o.ratio for o in result.overhead), default=None)
    forced_min = min(forced.values()) if forced else None
    static_ideal = [x for name in ("static_drop", "routed_static_set") for x in ideal.get(name, {}).values()]
    met = {
        "forced_vs_static": None if forced_min is None else forced_min >= FORCED_VS_STATIC_TARGET,
        "prefill_ideal": None if not static_ideal else min(static_ideal) >= PREFILL_IDEAL_TARGET,
        "kv_equal": kv_equal,
        "overhead": None if overhead_max is None else overhead_max < OVERHEAD_LIMIT,
    }
    return Checks(
        forced,
        forced_ci,
        forced_min,
        FORCED_VS_STATIC_TARGET,
        ideal,
        target_len,
        PREFILL_IDEAL_TARGET,
        kv_equal,
        overhead_max,
        OVERHEAD_LIMIT,
        met,
    )


def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        env["load_average_start"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    return env


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor()


def model_facts(model: nn.Module) -> dict:
    cfg = model.config
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return {
        "name_or_path": portable_name(model),
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None),
        "vocab_size": cfg.vocab_size,
        "dtype": str(next(model.parameters()).dtype),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "weights_bytes": sum(weights.values()),
    }


@torch.inference_mode()
def bench_model(
    model: nn.Module, cfg: BenchConfig, tokenizer=None, progress: Callable[[str], None] | None = None
) -> BenchResult:
    """Benchmark the four variants on a plain (unrouted) causal LM; returns a BenchResult."""
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _bench_model(model, cfg, tokenizer, progress)
    finally:
        torch.set_num_threads(threads)


def _bench_model(model, cfg, tokenizer, progress) -> BenchResult:
    started = time.perf_counter()
    device = next(model.parameters()).device
    note = progress or (lambda message: None)
    malloc = steady_malloc() if cfg.steady_malloc else None
    model.eval()
    vs = build_variants(model, cfg, tokenizer)
    flops = FlopCounter.from_config(model.config)
    clock = Clock(device, cfg.clock)
    cap = cfg.prefill_token_cap()
    result = BenchResult(
        schema=SCHEMA,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        environment=environment(device),
        model=model_facts(model),
        config=asdict(cfg),
        routed_layers=vs.routed_layers,
        static_drop_layers=vs.static_layers,
        importance=vs.importance,
        variants={v.name: v.description for v in vs.variants + [vs.all_run]},
        routers=vs.routers,
        flops_model=asdict(flops),
        prefill=[],
        decode=[],
        overhead=[],
        skipped=[],
    )
    result.environment["malloc"] = malloc or "default"
    for seed_offset, (batch, length) in enumerate(itertools.product(cfg.batch_sizes, cfg.lengths)):
        if cap is not None and batch * length > cap:
            result.skipped.append(
                f"prefill L={length} B={batch}: {batch * length} tokens > max_prefill_tokens "
                f"{cap} (raise --max-prefill-tokens to include it)"
            )
            continue
        note(f"prefill L={length} B={batch}")
        result.prefill.append(bench_prefill(vs, length, batch, cfg, flops, device, clock, cfg.seed + seed_offset))
    for batch in cfg.batch_sizes:
        note(f"decode B={batch}: {cfg.decode_tokens} tokens after {cfg.decode_prompt}")
        result.decode.append(bench_decode(vs, batch, cfg, flops, device, clock, cfg.seed + 100 + batch))
    if cfg.token_routing:
        from routertune.bench.token_rows import run_token_bench

        result.token = asdict(run_token_bench(model, vs, cfg, flops, device, clock, note))
    note("routing overhead")
    result.overhead = bench_overhead(vs, cfg, flops.vocab_size, device, clock, cfg.seed + 200)
    result.checks = checks_of(result)
    try:
        result.environment["load_average_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    result.seconds = time.perf_counter() - started
    note("done")
    return result


def progress_bar(cfg: BenchConfig) -> Callable[[str], None]:
    """A `progress` callback for bench_model that drives a tqdm bar over its measurement steps: each message
    names the step starting, so the one before it is done; "done" closes the bar."""
    from tqdm.auto import tqdm

    cap = cfg.prefill_token_cap()
    prefill = sum(1 for b, n in itertools.product(cfg.batch_sizes, cfg.lengths) if cap is None or b * n <= cap)
    token = prefill + len(cfg.batch_sizes) if cfg.token_routing else 0
    bar = tqdm(total=prefill + len(cfg.batch_sizes) + 1 + token, desc="bench", unit="setting")
    started = []

    def advance(message: str) -> None:
        if started:
            bar.update()
        started.append(message)
        if message == "done":
            bar.close()
        else:
            bar.set_postfix_str(message)

    return advance


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Load the model named in `cfg` (float32, SDPA), benchmark it, and write the JSON if `cfg.output`."""
    from routertune.base_model import load_model_and_tokenizer
    from routertune.files import write_json

    model, tokenizer = load_model_and_tokenizer(cfg.model, cache_dir=cfg.cache_dir, device=cfg.device)
    result = bench_model(model, cfg, tokenizer=tokenizer, progress=progress)
    if cfg.output:
        write_json(cfg.output, result.to_dict())
    return result

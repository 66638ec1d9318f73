"""The measurements: prefill latency, decode steps in lock-step and the routing-overhead pair, each with
warm-up first and the variants interleaved in rotating order; KV bytes and executed attention per layer."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from routertune.bench.clocks import Clock, measure_peak, quiet_stderr
from routertune.bench.config import BenchConfig
from routertune.bench.flops import FlopCounter
from routertune.bench.results import DecodeResult, OverheadResult, PrefillResult, VariantResult
from routertune.bench.variants import Variant, VariantSet
from routertune.routing.cache import RoutedCache
from routertune.stats import median, paired_ratio, paired_ratio_ci


def kv_bytes(cache) -> int:
    """Bytes of cached keys and values over all layers of any DynamicCache."""
    total = 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if getattr(layer, "is_initialized", keys is not None) and keys is not None:
            total += keys.numel() * keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def executed_per_layer(variant: Variant, cache, batch: int, num_layers: int) -> list[int]:
    """How many of the batch's sequences ran each layer's attention."""
    if variant.skip_layers is not None:
        return [0 if layer in variant.skip_layers else batch for layer in range(num_layers)]
    decisions = getattr(cache, "decisions", {})
    return [int(decisions[layer].sum()) if layer in decisions else batch for layer in range(num_layers)]


def rotated(items: list, shift: int) -> list:
    """`items` rotated left by `shift`: the order variants run in at repeat `shift`, so none always runs first."""
    shift %= len(items)
    return items[shift:] + items[:shift]


@dataclass
class _Measured:
    times: list[float] = field(default_factory=list)  # primary clock
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    flops: int = 0
    executed: list[int] = field(default_factory=list)
    kv_bytes: int = 0
    peak: int | None = None
    layer_run_fraction: dict[int, float] | None = None
    first_call_s: float | None = None

    def add(self, seconds: float, both: dict) -> None:
        self.times.append(seconds)
        self.wall.append(both["wall"])
        if both["cpu"] is not None:
            self.cpu.append(both["cpu"])


def _finish(
    measured: dict[str, _Measured], batch: int, tokens: int, num_layers: int, decode: bool
) -> dict[str, VariantResult]:
    dense = measured["dense"]
    out = {}
    for name, m in measured.items():
        median_s = median(m.times)
        executed_pairs = sum(m.executed)
        total_pairs = num_layers * batch
        # exact integer arithmetic: every (layer, sequence) pair stores the same number of bytes
        expected = dense.kv_bytes * executed_pairs // total_pairs
        speedup = paired_ratio(dense.times, m.times)
        ideal = dense.flops / m.flops
        out[name] = VariantResult(
            times_s=[round(t, 6) for t in m.times],
            median_s=median_s,
            tokens_per_s=(batch if decode else batch * tokens) / median_s if median_s > 0 else float("nan"),
            speedup=speedup,
            speedup_ci=paired_ratio_ci(dense.times, m.times),
            flops=m.flops,
            flops_per_token=m.flops / (batch * tokens),
            ideal_speedup=ideal,
            achieved_over_ideal=speedup / ideal,
            executed_fraction=executed_pairs / total_pairs,
            kv_bytes=m.kv_bytes,
            kv_bytes_expected=expected,
            kv_equal=m.kv_bytes * total_pairs == dense.kv_bytes * executed_pairs,
            peak_memory_bytes=m.peak,
            layer_run_fraction=m.layer_run_fraction,
            total_s=sum(m.times) if decode else None,
            first_call_s=m.first_call_s,
            wall_median_s=median(m.wall),
            wall_speedup=paired_ratio(dense.wall, m.wall),
            cpu_median_s=median(m.cpu) if m.cpu else None,
            cpu_speedup=paired_ratio(dense.cpu, m.cpu) if m.cpu else None,
        )
    return out


def _run_fractions(variant: Variant, cache, routed_layers: list[int], batch: int) -> dict[int, float] | None:
    if not variant.name.startswith("routed"):
        return None
    decisions = getattr(cache, "decisions", {})
    return {layer: float(decisions[layer].float().mean()) for layer in routed_layers if layer in decisions}


def random_ids(vocab: int, batch: int, length: int, seed: int, device) -> torch.Tensor:
    """Seeded random token ids (batch, length): every variant of a setting reads the same input."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


def prefill(variant: Variant, ids: torch.Tensor):
    """One prefill of `ids` into a fresh cache, logits of the last position only; returns (output, cache)."""
    cache = variant.new_cache()
    out = variant(input_ids=ids, use_cache=True, logits_to_keep=1, **{variant.cache_key: cache})
    return out, cache


def bench_prefill(
    vs: VariantSet,
    length: int,
    batch: int,
    cfg: BenchConfig,
    flops: FlopCounter,
    device: torch.device,
    clock: Clock,
    seed: int,
) -> PrefillResult:
    ids = random_ids(flops.vocab_size, batch, length, seed, device)
    measured = {v.name: _Measured() for v in vs.variants}
    for v in vs.variants:
        m = measured[v.name]
        if cfg.compile:
            _, m.first_call_s, _ = clock(lambda: prefill(v, ids))  # compilation, apart from the timings
        # the first warm-up run is also the memory run: peak bytes, KV bytes and decisions
        (_, cache), peak = measure_peak(lambda: prefill(v, ids), device, cfg.memory)
        m.peak = peak
        m.kv_bytes = kv_bytes(cache)
        if isinstance(cache, RoutedCache) and cache.kv_bytes() != m.kv_bytes:
            raise AssertionError("RoutedCache.kv_bytes disagrees with the layer-by-layer count")
        m.executed = executed_per_layer(v, cache, batch, flops.num_layers)
        m.flops = flops.forward(0, length, m.executed, batch, logit_positions=1)
        m.layer_run_fraction = _run_fractions(v, cache, vs.routed_layers, batch)
        del cache
        for _ in range(cfg.warmup - 1):
            prefill(v, ids)
    for r in range(cfg.repeats):
        for v in rotated(vs.variants, r):
            _, seconds, both = clock(lambda: prefill(v, ids))
            measured[v.name].add(seconds, both)
    return PrefillResult(length, batch, _finish(measured, batch, length, flops.num_layers, decode=False))


def decode_step(variant: Variant, cache, next_ids: torch.Tensor) -> torch.Tensor:
    """One decode step on `cache`; returns the greedy next ids (B, 1)."""
    out = variant(input_ids=next_ids, use_cache=True, logits_to_keep=1, **{variant.cache_key: cache})
    return out.logits[:, -1:].argmax(-1)  # (B, 1) greedy


def bench_decode(
    vs: VariantSet, batch: int, cfg: BenchConfig, flops: FlopCounter, device: torch.device, clock: Clock, seed: int
) -> DecodeResult:
    prompt, steps = cfg.decode_prompt, cfg.decode_tokens
    ids = random_ids(flops.vocab_size, batch, prompt, seed, device)
    measured = {v.name: _Measured() for v in vs.variants}
    state = {}
    for v in vs.variants:
        (out, cache), peak = measure_peak(lambda: prefill(v, ids), device, cfg.memory)
        measured[v.name].peak = peak
        next_ids = out.logits[:, -1:].argmax(-1)
        warm = copy.deepcopy(cache)
        warm_ids = next_ids
        for _ in range(max(cfg.warmup, 1) * (4 if cfg.compile else 2)):  # compiled: until shapes go dynamic
            warm_ids = decode_step(v, warm, warm_ids)
        del warm
        state[v.name] = [cache, next_ids]
    # lock-step: every variant decodes token i before any decodes token i + 1; the order rotates per step
    for i in range(steps):
        for v in rotated(vs.variants, i):
            cache, next_ids = state[v.name]
            state[v.name][1], seconds, both = clock(lambda: decode_step(v, cache, next_ids))
            measured[v.name].add(seconds, both)
    for v in vs.variants:
        cache, next_ids = state[v.name]
        m = measured[v.name]
        m.kv_bytes = kv_bytes(cache)
        m.executed = executed_per_layer(v, cache, batch, flops.num_layers)
        m.flops = flops.forward(prompt, prompt + steps, m.executed, batch, logit_positions=steps)
        m.layer_run_fraction = _run_fractions(v, cache, vs.routed_layers, batch)
        if cfg.memory:
            # one more (untimed) step at the end: the live KV cache plus that step's allocations
            live = m.kv_bytes
            with quiet_stderr():  # the profiler warns (once) that pre-existing KV blocks are freed
                _, step_peak = measure_peak(lambda: decode_step(v, cache, next_ids), device, True)
            if m.peak is not None and step_peak is not None:
                m.peak = max(m.peak, live + step_peak)
        state[v.name] = None
    return DecodeResult(prompt, steps, batch, _finish(measured, batch, steps, flops.num_layers, decode=True))


def bench_overhead(
    vs: VariantSet, cfg: BenchConfig, vocab: int, device: torch.device, clock: Clock, seed: int
) -> list[OverheadResult]:
    """Routing overhead: the routed model with every row running against the plain model on the same
    inputs, interleaved (prefill of the shortest length; decode steps after the decode prompt)."""
    dense, routed = vs.variants[0], vs.all_run
    pair = [dense, routed]
    results = []
    length = min(cfg.lengths)
    ids = random_ids(vocab, 1, length, seed, device)
    times = {v.name: _Measured() for v in pair}
    for v in pair:
        for _ in range(max(cfg.warmup, 1)):
            prefill(v, ids)
    for r in range(cfg.overhead_repeats):
        for v in rotated(pair, r):
            _, seconds, both = clock(lambda: prefill(v, ids))
            times[v.name].add(seconds, both)
    results.append(_overhead("prefill", length, 1, times, dense.name, routed.name))

    ids = random_ids(vocab, 1, cfg.decode_prompt, seed + 1, device)
    state = {}
    for v in pair:
        out, cache = prefill(v, ids)
        state[v.name] = [cache, out.logits[:, -1:].argmax(-1)]
        for _ in range(max(cfg.warmup, 1) * 2):
            state[v.name][1] = decode_step(v, cache, state[v.name][1])
    times = {v.name: _Measured() for v in pair}
    for i in range(cfg.overhead_steps):
        for v in rotated(pair, i):
            cache, next_ids = state[v.name]
            state[v.name][1], seconds, both = clock(lambda: decode_step(v, cache, next_ids))
            times[v.name].add(seconds, both)
    results.append(_overhead("decode_step", cfg.decode_prompt, 1, times, dense.name, routed.name))
    return results


def _overhead(where, length, batch, times: dict[str, _Measured], dense_name, routed_name) -> OverheadResult:
    dense, routed = times[dense_name], times[routed_name]
    wall = paired_ratio(routed.wall, dense.wall)
    cpu = paired_ratio(routed.cpu, dense.cpu) if dense.cpu else None
    return OverheadResult(
        where,
        length,
        batch,
        median(dense.times),
        median(routed.times),
        paired_ratio(routed.times, dense.times),
        samples=len(dense.times),
        ci=paired_ratio_ci(routed.times, dense.times),
        wall_ratio=wall,
        cpu_ratio=cpu,
    )

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
dataclass (``.to_dict()`` is the JSON); only the CLI prints.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import inspect
import itertools
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache

from routertune.routing import arch
from routertune.routing import static_drop as baselines
from routertune.routing import inject
from routertune.routing import state as routing
from routertune.routing.cache import RoutedCache
from routertune.config import RouterConfig
from routertune.model import RoutedModel

SCHEMA = "routertune.bench/1"
VARIANTS = ("dense", "static_drop", "routed_static_set", "routed")
OVERHEAD_LIMIT = 1.02  # routed model with every row running / plain model
FORCED_VS_STATIC_TARGET = 0.97  # speed-up(routed_static_set) / speed-up(static_drop)
PREFILL_IDEAL_TARGET = 0.9  # achieved / ideal speed-up for prefill at the target length
PREFILL_TARGET_LENGTH = 2048


# ---------------------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """What `routertune bench` measures; every field is a CLI flag. Fields left at None take the defaults
    named in their help (smaller ones with --quick)."""

    model: str | None = field(default=None, metadata={"help": "local HF folder or hub id; default: embedded SmolLM2-135M-Instruct"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache folder of the converted default model"})
    routers: str | None = field(default=None, metadata={"help": "trained routers (folder from `routertune train`) for the `routed` variant; default: seeded random synthetic routers"})
    lengths: list[int] | None = field(default=None, metadata={"help": "prefill lengths in tokens; default 128 512 2048 4096 (16 32 with --quick)"})
    batch_sizes: list[int] | None = field(default=None, metadata={"help": "batch sizes for prefill and decode; default 1 8 (1 2 with --quick)"})
    max_prefill_tokens: int | None = field(default=None, metadata={"help": "skip (and list) prefill settings with more tokens (length x batch); default 2048 on CPU, no limit on CUDA"})
    decode_prompt: int | None = field(default=None, metadata={"help": "prompt tokens before decoding; default 512 (16 with --quick)"})
    decode_tokens: int | None = field(default=None, metadata={"help": "new tokens decoded; default 128 (4 with --quick)"})
    repeats: int | None = field(default=None, metadata={"help": "timed prefill repeats per setting (median); default 3 (1 with --quick)"})
    warmup: int | None = field(default=None, metadata={"help": "untimed warm-up runs per variant and setting; default 1"})
    overhead_repeats: int | None = field(default=None, metadata={"help": "repeats of the routing-overhead prefill pair; default 20 (2 with --quick)"})
    overhead_steps: int | None = field(default=None, metadata={"help": "decode steps of the routing-overhead pair; default 256 (4 with --quick)"})
    skip_fraction: float = field(default=0.5, metadata={"help": "static drop skips round(fraction x routed layers) attention layers"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    memory: bool = field(default=True, metadata={"help": "measure peak memory (profiled warm-up run on CPU, allocator peak on CUDA)"})
    seed: int = field(default=0, metadata={"help": "seed of the random token ids and synthetic routers"})
    quick: bool = field(default=False, metadata={"help": "tiny settings for a smoke test (seconds on a small model)"})
    clock: str = field(default="wall", metadata={"help": "CPU device: the clock medians and speed-ups use, wall (perf_counter) or cpu (process CPU time; with --threads 1 it leaves out time spent waiting for a core on a shared machine). Both are recorded. CUDA always uses events"})
    steady_malloc: bool = field(default=True, metadata={"help": "glibc: keep freed memory mapped (mallopt, process-wide) so a run pays no page faults that depend on what ran before it"})
    compile: str | None = field(default=None, metadata={"help": "torch.compile every variant with this backend (e.g. inductor); graph breaks at routing decisions are expected; the first call of each setting (compilation included) is reported apart as first_call_s. Default: eager"})
    output: str | None = field(default=None, metadata={"help": "write the results JSON here"})
    token_routing: bool = field(default=False, metadata={"help": "also measure token-level routing (prefill and decode rows against dense and against sequence routing at the same executed fraction; see routertune.bench.token_rows)"})
    token_routers: str | None = field(default=None, metadata={"help": "with --token-routing: trained token-level routers (run in top-k mode at the sequence side's fraction); default: seeded synthetic ones"})

    def __post_init__(self) -> None:
        q = self.quick
        defaults = dict(
            lengths=[16, 32] if q else [128, 512, 2048, 4096],
            batch_sizes=[1, 2] if q else [1, 8],
            decode_prompt=16 if q else 512,
            decode_tokens=4 if q else 128,
            repeats=1 if q else 3,
            warmup=1,
            overhead_repeats=2 if q else 20,
            overhead_steps=4 if q else 256,
        )
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        problems = []
        for name in ("decode_prompt", "decode_tokens", "repeats", "overhead_repeats", "overhead_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.warmup < 0:
            problems.append(f"warmup={self.warmup} must be >= 0")
        if not self.lengths or any(n < 1 for n in self.lengths):
            problems.append(f"lengths={self.lengths} must be positive token counts")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            problems.append(f"batch_sizes={self.batch_sizes} must be positive")
        if not 0.0 < self.skip_fraction < 1.0:
            problems.append(f"skip_fraction={self.skip_fraction} must lie strictly between 0 and 1")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"device={self.device!r} must be cpu or cuda")
        if self.clock not in ("wall", "cpu"):
            problems.append(f"clock={self.clock!r} must be wall or cpu")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads={self.threads} must be >= 1")
        if problems:
            raise ValueError("Invalid bench config: " + "; ".join(problems))

    def prefill_token_cap(self) -> int | None:
        if self.max_prefill_tokens is not None:
            return self.max_prefill_tokens
        return None if self.device.startswith("cuda") else 2048


# ---------------------------------------------------------------------------------------------------------
# analytic FLOPs
@dataclass(frozen=True)
class FlopCounter:
    """Matmul FLOPs (2 per multiply-add) of a decoder-only model with a gated MLP.

    Per token and layer: attention projections q, k, v, o; attention scores Q K^T and the weighted sum A V over
    the causal context (capped by a sliding window where the layer has one); MLP gate, up and down. Plus the
    LM head for every position whose logits are computed.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    windows: tuple[int | None, ...]  # per layer: attention window in tokens, None = full causal context

    @classmethod
    def from_config(cls, config) -> "FlopCounter":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        n_layers = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types[:n_layers])
        elif window is not None and getattr(config, "use_sliding_window", True):
            windows = (window,) * n_layers
        else:
            windows = (None,) * n_layers
        return cls(
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            windows=windows,
        )

    @property
    def num_layers(self) -> int:
        return len(self.windows)

    def attention_projections(self) -> int:
        """Per token per layer: q and o (heads x head_dim wide), k and v (kv_heads x head_dim wide)."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return 2 * self.hidden_size * (2 * q + 2 * kv)

    def attention_scores(self, layer: int, start: int, end: int) -> int:
        """Scores and weighted sum for query positions start..end-1 (0-based) of one sequence in one layer:
        position p attends to min(p + 1, window) keys, 2 x 2 x heads x head_dim FLOPs per (query, key)."""
        keys = _sum_min(start + 1, end, self.windows[layer])
        return 4 * self.num_heads * self.head_dim * keys

    def mlp(self) -> int:
        return 2 * 3 * self.hidden_size * self.intermediate_size

    def lm_head(self) -> int:
        return 2 * self.hidden_size * self.vocab_size

    def forward(self, start: int, end: int, executed: list[int], batch: int, logit_positions: int) -> int:
        """FLOPs of `batch` sequences processing positions start..end-1, where `executed[layer]` of them run
        that layer's attention, with `logit_positions` logits per sequence."""
        if len(executed) != self.num_layers:
            raise ValueError(f"executed has {len(executed)} layers, the model {self.num_layers}")
        tokens = end - start
        total = batch * tokens * self.num_layers * self.mlp()
        for layer, n_run in enumerate(executed):
            total += n_run * (tokens * self.attention_projections() + self.attention_scores(layer, start, end))
        return total + batch * logit_positions * self.lm_head()


def _sum_min(first: int, last: int, cap: int | None) -> int:
    """sum(min(n, cap) for n in first..last), in closed form."""
    if last < first:
        return 0
    if cap is None or last <= cap:
        return (first + last) * (last - first + 1) // 2
    if first > cap:
        return cap * (last - first + 1)
    return (first + cap) * (cap - first + 1) // 2 + cap * (last - cap)


# ---------------------------------------------------------------------------------------------------------
# results
@dataclass
class VariantResult:
    times_s: list[float]  # prefill: one per repeat; decode: one per step (all steps of the lock-step run)
    median_s: float
    tokens_per_s: float  # prefill: batch x length / median; decode: batch / median step
    speedup: float  # median over repeats (decode: steps) of dense time / this time, each pair run back to back
    speedup_ci: list[float]  # [low, high, coverage] of that median (order statistics)
    flops: int
    flops_per_token: float
    ideal_speedup: float  # dense FLOPs / these FLOPs
    achieved_over_ideal: float
    executed_fraction: float  # executed (layer, sequence) attention pairs / all of them
    kv_bytes: int
    kv_bytes_expected: int  # dense KV bytes x executed fraction
    kv_equal: bool
    peak_memory_bytes: int | None  # above the weights: activations, KV cache, logits (None: not measured)
    layer_run_fraction: dict[int, float] | None = None  # routed layers: share of sequences that ran them
    total_s: float | None = None  # decode: sum of the step times
    first_call_s: float | None = None  # with --compile: the first call of this setting, compilation included
    # both clocks, whichever is primary (CPU time: CPU device only)
    wall_median_s: float | None = None
    wall_speedup: float | None = None
    cpu_median_s: float | None = None
    cpu_speedup: float | None = None


@dataclass
class PrefillResult:
    length: int
    batch: int
    variants: dict[str, VariantResult]


@dataclass
class DecodeResult:
    prompt: int
    new_tokens: int
    batch: int
    variants: dict[str, VariantResult]


@dataclass
class OverheadResult:
    """Routed model with zero-initialised routers (scores computed, every row runs) against the plain model,
    interleaved; ratio = median over pairs of routed time / plain time."""

    where: str  # "prefill" or "decode_step"
    length: int  # prefill length, or the context length the decode steps start from
    batch: int
    dense_s: float
    routed_s: float
    ratio: float
    limit: float = OVERHEAD_LIMIT
    samples: int = 0
    ci: list[float] | None = None  # [low, high, coverage] of the paired median ratio
    wall_ratio: float | None = None
    cpu_ratio: float | None = None  # process CPU time (CPU device)


@dataclass
class Checks:
    forced_vs_static: dict[str, float]  # setting -> speed-up(routed_static_set) / speed-up(static_drop)
    forced_vs_static_ci: dict[str, list[float]]  # setting -> [low, high, coverage]
    forced_vs_static_min: float | None
    forced_vs_static_target: float
    prefill_ideal: dict[str, dict[str, float]]  # variant -> setting -> achieved/ideal at the target length
    prefill_ideal_length: int | None
    prefill_ideal_target: float
    kv_equal_all: bool
    overhead_max: float | None
    overhead_limit: float
    met: dict[str, bool | None]


@dataclass
class BenchResult:
    schema: str
    created: str
    environment: dict
    model: dict
    config: dict
    routed_layers: list[int]
    static_drop_layers: list[int]
    importance: dict[int, float]
    variants: dict[str, str]  # name -> what it is
    routers: str  # where the `routed` variant's decisions come from
    flops_model: dict
    prefill: list[PrefillResult]
    decode: list[DecodeResult]
    overhead: list[OverheadResult]
    skipped: list[str]
    checks: Checks | None = None
    seconds: float = 0.0
    token: dict | None = None  # token-routing rows (routertune.bench.token_rows), with --token-routing

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------------------
# variants
class DroppedAttention(nn.Module):
    """Static drop at its cheapest: no projections, no KV, output zero (the residual passes unchanged)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self._original = [original]  # not registered: attribute look-ups only, no weights

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"][0], name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of `model` that shares every parameter and buffer (no extra weight memory), so
    variants can be wrapped differently while reading the very same weights."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def static_drop_model(model: nn.Module, layers) -> nn.Module:
    """A weight-sharing copy of a plain model whose attention sublayers in `layers` return zeros.
    `model` itself is not changed."""
    dropped = shared_copy(model)
    name = arch.sublayer_name(dropped, "attention")
    blocks = arch.blocks_of(dropped)
    for idx in layers:
        setattr(blocks[idx], name, DroppedAttention(getattr(blocks[idx], name)))
    return dropped


@dataclass
class Variant:
    name: str
    model: Callable  # called like a Hugging Face causal LM
    new_cache: Callable[[], DynamicCache]
    skip_layers: frozenset[int] | None  # fixed skip set; None: read the decisions from the cache
    forcing: tuple | None = None  # arguments of routing.forced
    description: str = ""
    cache_key: str = "cache"  # the model's keyword for the KV cache (transformers 5: cache, older: past_key_values)

    def __call__(self, **kwargs):
        with routing.forced(*self.forcing) if self.forcing else contextlib.nullcontext():
            return self.model(**kwargs)


def synthetic_routers(routed: RoutedModel, seed: int) -> None:
    """Seeded random router weights: per-sequence decisions that differ between layers and sequences,
    taken by the real router code path (pooling, router, threshold, gather/scatter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for idx, router in sorted(routed.routers.items()):
            weight = torch.randn(router.weight.shape, generator=gen) / math.sqrt(router.weight.shape[-1])
            router.weight.copy_(weight.to(router.weight.device))


_CALIBRATION_TEXT = [
    "The river rose after three days of rain, and the village moved its market to the hill.",
    "To compute the area of a circle, square the radius and multiply by pi.",
    "She opened the letter slowly, already knowing what it would say.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The committee postponed the vote until the budget figures had been checked again.",
    "Question: How many legs does a spider have? Answer: Eight.",
    "In 1969, astronauts first walked on the Moon during the Apollo 11 mission.",
]


def calibration_batches(model: nn.Module, tokenizer=None, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A small calibration batch for static drop's importance scores: built-in sentences when a tokenizer is
    given, else seeded random token ids (tiny test models). Which layers are dropped does not change the
    speed of dropping them; the importance only makes the choice the baseline's own."""
    device = next(model.parameters()).device
    if tokenizer is not None:
        old_side = tokenizer.padding_side
        tokenizer.padding_side = "right"
        try:
            enc = tokenizer(_CALIBRATION_TEXT, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = old_side
        return [{"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=gen)
    return [{"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}]


@dataclass
class VariantSet:
    variants: list[Variant]
    all_run: Variant  # routed, zero-initialised routers: every row runs (routing overhead)
    routed_layers: list[int]
    static_layers: list[int]
    importance: dict[int, float]
    routers: str


def build_variants(model: nn.Module, cfg: BenchConfig, tokenizer=None) -> VariantSet:
    """The four variants (and the overhead pair's routed side) on weight-sharing copies of `model`;
    `model` itself stays plain."""
    if inject.is_routed(model):
        raise ValueError("bench takes the plain base model; unwrap the routers first (RoutedModel.unwrap())")
    cache_key = _cache_key(model)
    config = model.config

    if cfg.routers is not None:
        routed = RoutedModel.from_pretrained(shared_copy(model), cfg.routers)
        source = f"trained routers from {cfg.routers}"
    else:
        routed = RoutedModel(shared_copy(model), RouterConfig())
        synthetic_routers(routed, cfg.seed)
        source = (f"synthetic routers (no --routers given): seeded random weights (seed {cfg.seed}), threshold "
                  f"{routed.router_config.threshold}; decisions taken by the real router code path on the "
                  "benchmark's random token ids")
    if routed.router_config.granularity != "attention":
        raise ValueError(f"bench compares attention skipping; the routers in {cfg.routers} route "
                         f"{routed.router_config.granularity!r}")
    layers = routed.routed_layers
    importance = baselines.attention_importance(model, calibration_batches(model, tokenizer, cfg.seed))
    k = max(1, math.floor(cfg.skip_fraction * len(layers) + 0.5))
    static_layers = importance.least_important(min(k, len(layers)), layers)
    static_set = frozenset(static_layers)
    all_run = RoutedModel(shared_copy(model), RouterConfig(layers=layers))  # zero routers: score 0.5 runs

    def dynamic_cache():
        return DynamicCache(config=config)

    def routed_cache():
        return RoutedCache(config=config)

    # a plain DynamicCache measures its length on layer 0; if that layer is dropped, use the routed cache's
    # length logic (it has no other routing machinery)
    static_cache = routed_cache if 0 in static_set else dynamic_cache
    variants = [
        Variant("dense", model, dynamic_cache, frozenset(), description="plain model"),
        Variant("static_drop", static_drop_model(model, static_layers), static_cache, static_set,
                description=f"plain model, attention of layers {static_layers} replaced by zeros (least "
                            "important by 1 - cos on calibration text; no routing machinery)"),
        Variant("routed_static_set", routed, routed_cache, static_set, ("skip_set", static_set),
                description="RoutedModel, routers forced to static drop's skip set"),
        Variant("routed", routed, routed_cache, None,
                description=f"RoutedModel, routers take their own per-sequence decisions ({source})"),
    ]
    all_run_variant = Variant("routed_all_run", all_run, routed_cache, frozenset(),
                              description="RoutedModel with zero-initialised routers: scores computed, every row runs")
    compiled: dict[int, Callable] = {}
    for v in variants + [all_run_variant]:
        v.cache_key = cache_key  # one model family, one keyword
        if cfg.compile:
            # one compiled callable per model object (routed_static_set and routed share theirs)
            v.model = compiled.setdefault(id(v.model), torch.compile(v.model, backend=cfg.compile))
    return VariantSet(variants, all_run_variant, layers, static_layers, importance.scores, source)


def _cache_key(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ---------------------------------------------------------------------------------------------------------
# clocks and memory
class Clock:
    """Times one call. CUDA: events around the call, then synchronize. CPU: wall-clock (perf_counter) and the
    process's CPU time (process_time) together; with one thread the CPU time leaves out the time the process
    waited for a core, which on a shared machine is the other jobs' doing, not ours.

    Returns (output, primary seconds, {"wall": s, "cpu": s or None}); `primary` names the clock the
    medians and speed-ups use ("wall" or "cpu"; CUDA always uses its events)."""

    def __init__(self, device: torch.device, primary: str = "wall"):
        self.cuda = device.type == "cuda"
        self.device = device
        self.primary = "wall" if self.cuda else primary

    def __call__(self, fn: Callable):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
            return out, seconds, {"wall": seconds, "cpu": None}
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return out, (cpu if self.primary == "cpu" else wall), {"wall": wall, "cpu": cpu}


def measure_peak(fn: Callable, device: torch.device, enabled: bool = True):
    """(fn(), peak bytes allocated during the call above what was live before it; None if not measured).

    CUDA: the caching allocator's peak. CPU: every CPU allocation and free recorded by the PyTorch profiler,
    replayed in order (exact tensor bytes, including temporaries freed inside an op)."""
    if not enabled:
        return fn(), None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, int(torch.cuda.max_memory_allocated(device) - base)
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover - very old or stripped torch
        return fn(), None
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # Kineto logs a line on every start and stop
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    try:
        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
    except Exception:  # pragma: no cover - private profiler API changed
        return out, None
    running = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        running += size
        peak = max(peak, running)
    return out, int(peak)


def steady_malloc() -> str | None:
    """glibc only, process-wide: allocations up to 32 MiB come from the heap and freed memory is not handed
    back to the system, so after the warm-up a run touches no fresh pages. Without this, how many page faults a
    run pays (up to ~15% of a prefill here) depends on what the previous run freed, i.e. on the order of the
    variants. Returns what was set, or None where it does not apply."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt(m_mmap_threshold, 32 << 20) != 1 or mallopt(m_trim_threshold, 1 << 30) != 1:
        return None  # pragma: no cover
    return "glibc mallopt: mmap threshold 32 MiB, trim threshold 1 GiB"


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ logging) for a moment."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # pragma: no cover - no real stderr
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


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


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of numerator[i] / denominator[i]: the samples of one index ran back to back (interleaved), so
    a slow spell of the machine hits both sides of a pair and cancels in its ratio."""
    return _median([a / b for a, b in zip(numerator, denominator)])


def paired_ratio_ci(numerator: list[float], denominator: list[float], level: float = 0.95) -> list[float]:
    """[low, high, coverage]: distribution-free confidence interval of the median paired ratio, from order
    statistics (the sign-test interval). With few pairs the widest interval [min, max] covers less than
    `level` (5 pairs: 93.8%); `coverage` says how much."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    n = len(ratios)
    if n == 0:
        return [float("nan"), float("nan"), 0.0]

    def outside(k: int) -> float:  # P(the median lies outside [r_k, r_(n-k+1)]), 1-based k
        return 2 * sum(math.comb(n, j) for j in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and outside(k + 1) <= 1 - level:
        k += 1
    return [ratios[k - 1], ratios[n - k], 1 - outside(k)]


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


# ---------------------------------------------------------------------------------------------------------
# the measurements
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


def _finish(measured: dict[str, _Measured], batch: int, tokens: int, num_layers: int,
            decode: bool) -> dict[str, VariantResult]:
    dense = measured["dense"]
    out = {}
    for name, m in measured.items():
        median = _median(m.times)
        executed_pairs = sum(m.executed)
        total_pairs = num_layers * batch
        # exact integer arithmetic: every (layer, sequence) pair stores the same number of bytes
        expected = dense.kv_bytes * executed_pairs // total_pairs
        speedup = paired_ratio(dense.times, m.times)
        ideal = dense.flops / m.flops
        out[name] = VariantResult(
            times_s=[round(t, 6) for t in m.times],
            median_s=median,
            tokens_per_s=(batch if decode else batch * tokens) / median if median > 0 else float("nan"),
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
            wall_median_s=_median(m.wall),
            wall_speedup=paired_ratio(dense.wall, m.wall),
            cpu_median_s=_median(m.cpu) if m.cpu else None,
            cpu_speedup=paired_ratio(dense.cpu, m.cpu) if m.cpu else None,
        )
    return out


def _run_fractions(variant: Variant, cache, routed_layers: list[int], batch: int) -> dict[int, float] | None:
    if not variant.name.startswith("routed"):
        return None
    decisions = getattr(cache, "decisions", {})
    return {layer: float(decisions[layer].float().mean()) for layer in routed_layers if layer in decisions}


def _ids(vocab: int, batch: int, length: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


def _prefill(variant: Variant, ids: torch.Tensor):
    cache = variant.new_cache()
    out = variant(input_ids=ids, use_cache=True, logits_to_keep=1, **{variant.cache_key: cache})
    return out, cache


def bench_prefill(vs: VariantSet, length: int, batch: int, cfg: BenchConfig, flops: FlopCounter,
                  device: torch.device, clock: Clock, seed: int) -> PrefillResult:
    ids = _ids(flops.vocab_size, batch, length, seed, device)
    measured = {v.name: _Measured() for v in vs.variants}
    for v in vs.variants:
        m = measured[v.name]
        if cfg.compile:
            _, m.first_call_s, _ = clock(lambda: _prefill(v, ids))  # compilation, apart from the timings
        # the first warm-up run is also the memory run: peak bytes, KV bytes and decisions
        (_, cache), peak = measure_peak(lambda: _prefill(v, ids), device, cfg.memory)
        m.peak = peak
        m.kv_bytes = kv_bytes(cache)
        if isinstance(cache, RoutedCache) and cache.kv_bytes() != m.kv_bytes:
            raise AssertionError("RoutedCache.kv_bytes disagrees with the layer-by-layer count")
        m.executed = executed_per_layer(v, cache, batch, flops.num_layers)
        m.flops = flops.forward(0, length, m.executed, batch, logit_positions=1)
        m.layer_run_fraction = _run_fractions(v, cache, vs.routed_layers, batch)
        del cache
        for _ in range(cfg.warmup - 1):
            _prefill(v, ids)
    for r in range(cfg.repeats):
        for v in _rotated(vs.variants, r):
            _, seconds, both = clock(lambda: _prefill(v, ids))
            measured[v.name].add(seconds, both)
    return PrefillResult(length, batch, _finish(measured, batch, length, flops.num_layers, decode=False))


def _step(variant: Variant, cache, next_ids: torch.Tensor) -> torch.Tensor:
    out = variant(input_ids=next_ids, use_cache=True, logits_to_keep=1, **{variant.cache_key: cache})
    return out.logits[:, -1:].argmax(-1)  # (B, 1) greedy


def bench_decode(vs: VariantSet, batch: int, cfg: BenchConfig, flops: FlopCounter, device: torch.device,
                 clock: Clock, seed: int) -> DecodeResult:
    prompt, steps = cfg.decode_prompt, cfg.decode_tokens
    ids = _ids(flops.vocab_size, batch, prompt, seed, device)
    measured = {v.name: _Measured() for v in vs.variants}
    state = {}
    for v in vs.variants:
        (out, cache), peak = measure_peak(lambda: _prefill(v, ids), device, cfg.memory)
        measured[v.name].peak = peak
        next_ids = out.logits[:, -1:].argmax(-1)
        warm = copy.deepcopy(cache)
        warm_ids = next_ids
        for _ in range(max(cfg.warmup, 1) * (4 if cfg.compile else 2)):  # compiled: until shapes go dynamic
            warm_ids = _step(v, warm, warm_ids)
        del warm
        state[v.name] = [cache, next_ids]
    # lock-step: every variant decodes token i before any decodes token i + 1; the order rotates per step
    for i in range(steps):
        for v in _rotated(vs.variants, i):
            cache, next_ids = state[v.name]
            state[v.name][1], seconds, both = clock(lambda: _step(v, cache, next_ids))
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
            with _quiet_stderr():  # the profiler warns (once) that pre-existing KV blocks are freed
                _, step_peak = measure_peak(lambda: _step(v, cache, next_ids), device, True)
            if m.peak is not None and step_peak is not None:
                m.peak = max(m.peak, live + step_peak)
        state[v.name] = None
    return DecodeResult(prompt, steps, batch, _finish(measured, batch, steps, flops.num_layers, decode=True))


def bench_overhead(vs: VariantSet, cfg: BenchConfig, vocab: int, device: torch.device, clock: Clock,
                   seed: int) -> list[OverheadResult]:
    """Routing overhead: the routed model with every row running against the plain model on the same
    inputs, interleaved (prefill of the shortest length; decode steps after the decode prompt)."""
    dense, routed = vs.variants[0], vs.all_run
    pair = [dense, routed]
    results = []
    length = min(cfg.lengths)
    ids = _ids(vocab, 1, length, seed, device)
    times = {v.name: _Measured() for v in pair}
    for v in pair:
        for _ in range(max(cfg.warmup, 1)):
            _prefill(v, ids)
    for r in range(cfg.overhead_repeats):
        for v in _rotated(pair, r):
            _, seconds, both = clock(lambda: _prefill(v, ids))
            times[v.name].add(seconds, both)
    results.append(_overhead("prefill", length, 1, times, dense.name, routed.name))

    ids = _ids(vocab, 1, cfg.decode_prompt, seed + 1, device)
    state = {}
    for v in pair:
        out, cache = _prefill(v, ids)
        state[v.name] = [cache, out.logits[:, -1:].argmax(-1)]
        for _ in range(max(cfg.warmup, 1) * 2):
            state[v.name][1] = _step(v, cache, state[v.name][1])
    times = {v.name: _Measured() for v in pair}
    for i in range(cfg.overhead_steps):
        for v in _rotated(pair, i):
            cache, next_ids = state[v.name]
            state[v.name][1], seconds, both = clock(lambda: _step(v, cache, next_ids))
            times[v.name].add(seconds, both)
    results.append(_overhead("decode_step", cfg.decode_prompt, 1, times, dense.name, routed.name))
    return results


def _overhead(where, length, batch, times: dict[str, _Measured], dense_name, routed_name) -> OverheadResult:
    dense, routed = times[dense_name], times[routed_name]
    wall = paired_ratio(routed.wall, dense.wall)
    cpu = paired_ratio(routed.cpu, dense.cpu) if dense.cpu else None
    return OverheadResult(where, length, batch, _median(dense.times), _median(routed.times),
                          paired_ratio(routed.times, dense.times), samples=len(dense.times),
                          ci=paired_ratio_ci(routed.times, dense.times), wall_ratio=wall, cpu_ratio=cpu)


# ---------------------------------------------------------------------------------------------------------
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
    return Checks(forced, forced_ci, forced_min, FORCED_VS_STATIC_TARGET, ideal, target_len, PREFILL_IDEAL_TARGET,
                  kv_equal, overhead_max, OVERHEAD_LIMIT, met)


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
        "name_or_path": str(getattr(cfg, "_name_or_path", "") or ""),
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
def bench_model(model: nn.Module, cfg: BenchConfig, tokenizer=None,
                progress: Callable[[str], None] | None = None) -> BenchResult:
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
            result.skipped.append(f"prefill L={length} B={batch}: {batch * length} tokens > max_prefill_tokens "
                                  f"{cap} (raise --max-prefill-tokens to include it)")
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
    from routertune.files import write_json
    from routertune.base_model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.model, cache_dir=cfg.cache_dir, device=cfg.device)
    result = bench_model(model, cfg, tokenizer=tokenizer, progress=progress)
    if cfg.output:
        write_json(cfg.output, result.to_dict())
    return result

"""What a bench run returns: the result dataclasses (``BenchResult.to_dict()`` is the JSON, schema
``routertune.bench/1``), the variants' names and the targets its checks hold them to."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SCHEMA = "routertune.bench/1"
VARIANTS = ("dense", "static_drop", "routed_static_set", "routed")
OVERHEAD_LIMIT = 1.02  # routed model with every row running / plain model
FORCED_VS_STATIC_TARGET = 0.97  # speed-up(routed_static_set) / speed-up(static_drop)
PREFILL_IDEAL_TARGET = 0.9  # achieved / ideal speed-up for prefill at the target length
PREFILL_TARGET_LENGTH = 2048


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
        return jsonable(asdict(self))


def jsonable(value):
    """`value` with every dict key a string and every non-finite float None: what JSON can hold."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

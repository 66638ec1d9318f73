"""What bench compares: the four variants (dense, static drop, routers forced to static drop's set, routers
deciding) and the overhead pair's routed side, built on weight-sharing copies of one plain model."""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from routertune.bench.config import BenchConfig
from routertune.config import RouterConfig
from routertune.model import RoutedModel
from routertune.routing import arch, inject
from routertune.routing import state as routing
from routertune.routing import static_drop as baselines
from routertune.routing.cache import RoutedCache


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
        for _idx, router in sorted(routed.routers.items()):
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
        source = (
            f"synthetic routers (no --routers given): seeded random weights (seed {cfg.seed}), threshold "
            f"{routed.router_config.threshold}; decisions taken by the real router code path on the "
            "benchmark's random token ids"
        )
    if routed.router_config.granularity != "attention":
        raise ValueError(
            f"bench compares attention skipping; the routers in {cfg.routers} route "
            f"{routed.router_config.granularity!r}"
        )
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
        Variant(
            "static_drop",
            static_drop_model(model, static_layers),
            static_cache,
            static_set,
            description=f"plain model, attention of layers {static_layers} replaced by zeros (least "
            "important by 1 - cos on calibration text; no routing machinery)",
        ),
        Variant(
            "routed_static_set",
            routed,
            routed_cache,
            static_set,
            ("skip_set", static_set),
            description="RoutedModel, routers forced to static drop's skip set",
        ),
        Variant(
            "routed",
            routed,
            routed_cache,
            None,
            description=f"RoutedModel, routers take their own per-sequence decisions ({source})",
        ),
    ]
    all_run_variant = Variant(
        "routed_all_run",
        all_run,
        routed_cache,
        frozenset(),
        description="RoutedModel with zero-initialised routers: scores computed, every row runs",
    )
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

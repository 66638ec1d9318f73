"""Per-request routing state. It lives in a context variable scoped to one forward call (and, for cached
generation, in the request's RoutedCache), never on modules: two requests interleaved in one process, or
two threads, cannot read each other's decisions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Forcing:
    """Override the routers: run everything, skip everything, or skip an explicit set of routed layers."""

    mode: str  # "run" | "skip" | "skip_set"
    skip_layers: frozenset[int] = frozenset()

    def runs(self, layer: int) -> bool:
        return self.mode == "run" or (self.mode == "skip_set" and layer not in self.skip_layers)

    def decision(self, layer: int, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), self.runs(layer), dtype=torch.bool, device=device)


@dataclass
class RoutingCall:
    """Everything one forward call of a routed model needs and produces."""

    pool_mask: torch.Tensor | None  # (B, T) tokens a decision is pooled over (real prompt tokens)
    cache: object | None  # the request's RoutedCache, when caching
    past_length: int  # tokens already in the cache when this call started (0 = prefill)
    training: bool  # straight-through gating on every row instead of gather/scatter
    forcing: Forcing | None
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B,) float32
    decisions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B,) bool
    gates: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B,) STE gate (training)
    # token routing: the call's 2D attention mask (real tokens), and each layer's (B, T) decisions; its
    # scores/decisions/gates above then hold one entry per real token (flattened), so capacity, calibration
    # and evaluation read (token, layer) pairs without knowing the unit
    attention_mask: torch.Tensor | None = None
    custom_mask: bool = False  # the caller passed a 4D mask (or a per-layer-type dict) instead of a 2D one
    token_runs: dict[int, torch.Tensor] = field(default_factory=dict)
    token_gates: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T) STE gate (training)
    token_sinks: dict[int, torch.Tensor | None] = field(
        default_factory=dict
    )  # sink count -> (B, T) bool, once per call
    # decode-only routing (`decode_only`): the layers this prompt's prefill skips too (None: not decode-only)
    prefill_skip: frozenset[int] | None = None

    def capacity(self) -> torch.Tensor:
        """Mean executed fraction over routed sublayers and batch; differentiable in training."""
        if self.gates:
            return torch.stack(list(self.gates.values())).mean()
        return torch.stack([d.float() for d in self.decisions.values()]).mean()


_CURRENT_CALL: ContextVar[RoutingCall | None] = ContextVar("routertune_call", default=None)
_FORCING: ContextVar[Forcing | None] = ContextVar("routertune_forcing", default=None)
_POOL_MASK: ContextVar[torch.Tensor | None] = ContextVar("routertune_pool_mask", default=None)
_RECORDERS: ContextVar[tuple[list, ...]] = ContextVar("routertune_recorders", default=())
_DECODE_ONLY: ContextVar[frozenset[int] | None] = ContextVar("routertune_decode_only", default=None)


def current_call() -> RoutingCall:
    call = _CURRENT_CALL.get()
    if call is None:
        raise RuntimeError(
            "a routed sublayer was called outside a routed model's forward; call the model (or its decoder) "
            "rather than a single layer, or unwrap the routers first"
        )
    return call


@contextlib.contextmanager
def active_call(call: RoutingCall) -> Iterator[RoutingCall]:
    token = _CURRENT_CALL.set(call)
    try:
        yield call
    finally:
        _CURRENT_CALL.reset(token)
        for recorder in _RECORDERS.get():
            recorder.append(call)


@contextlib.contextmanager
def forced(mode: str = "run", skip_layers=()) -> Iterator[None]:
    """Force routing decisions inside the block: `forced("run")`, `forced("skip")`, or
    `forced("skip_set", skip_layers={20, 21})` for baselines and tests. Decisions already stored in a
    cache (decode steps) are kept: prefill decides, decode reuses."""
    if mode not in ("run", "skip", "skip_set"):
        raise ValueError(f"forcing mode {mode!r} is not one of run, skip, skip_set")
    token = _FORCING.set(Forcing(mode, frozenset(int(i) for i in skip_layers)))
    try:
        yield
    finally:
        _FORCING.reset(token)


def current_forcing() -> Forcing | None:
    return _FORCING.get()


@contextlib.contextmanager
def decode_only(prefill_skip=()) -> Iterator[None]:
    """Decode-only routing inside the block: the prompt is prefilled with every routed layer running (except
    `prefill_skip`, which nothing runs), the routers decide from that prefill, and the decisions apply to the
    generated tokens only. The semantics of `routertune export --decode-only` served in vLLM with prefix
    caching and chunked prefill (a prompt's K/V no longer depends on the request's decisions)."""
    token = _DECODE_ONLY.set(frozenset(int(i) for i in prefill_skip))
    try:
        yield
    finally:
        _DECODE_ONLY.reset(token)


def current_decode_only() -> frozenset[int] | None:
    return _DECODE_ONLY.get()


@contextlib.contextmanager
def pool_over(mask: torch.Tensor | int | None) -> Iterator[None]:
    """Pool decisions over `mask` (B, T) instead of the attention mask, e.g. the prompt part of a training
    sequence, so training decides from what generation will see. An int n pools over the first n columns of
    each call's own attention mask (all ones without one): the prompt of uncached generation, whose rows
    generate may expand (beams, returned sequences) and whose mask it may infer from the pad tokens."""
    token = _POOL_MASK.set(mask)
    try:
        yield
    finally:
        _POOL_MASK.reset(token)


def resolve_pool_mask(attention_mask, inputs: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, T) mask a forward pools its decisions over: the override of `pool_over`, else the call's 2-D
    attention mask, else None (every token). `inputs` (input ids or embeddings) give the batch size."""
    override = _POOL_MASK.get()
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:
        attention_mask = None  # a prepared 4-D mask: no per-token padding flags to read
    if isinstance(override, int) and not isinstance(override, bool):
        if attention_mask is not None:
            return attention_mask[:, :override]
        if inputs is None:
            raise ValueError("a routed forward needs input_ids or inputs_embeds")
        return torch.ones((inputs.shape[0], override), dtype=torch.long, device=inputs.device)
    return override if override is not None else attention_mask


@contextlib.contextmanager
def record() -> Iterator[list[RoutingCall]]:
    """Collect the RoutingCall of every forward that finishes inside the block (scores, decisions, gates)."""
    calls: list[RoutingCall] = []
    token = _RECORDERS.set(_RECORDERS.get() + (calls,))
    try:
        yield calls
    finally:
        _RECORDERS.reset(token)

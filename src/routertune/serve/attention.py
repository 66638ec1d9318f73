"""A routed attention sublayer inside vLLM: per-request decisions and compute only for the requests that run.

vLLM packs a step's requests as consecutive token segments (``query_start_loc``). At a routed layer:

* every request decides once, at its prefill (no tokens in the cache yet: context 0), from the mean of the
  layer's normed input over its prompt tokens (fp32, as ``routertune.routing.router``; without the chat
  template's fixed ends when the routers were trained so, ``routertune.routing.template``); the decision is stored on the
  request and reused by its decode steps and by the recompute after a preemption. A prefill that starts from
  cached context (chunked prefill, prefix-cache hit) is refused: the decision would see part of the prompt.
  Under decode-only routing (`export --decode-only`) prompt tokens always run, their router projections are
  stored per KV slot, and the decision is taken at the first generated token from the whole prompt's
  (``_decide_decode_only``, serve/decode_only.py): chunks and prefix-cache hits are fine;
* when some requests skip, the layer's attention metadata and slot mapping are swapped for those of the
  running requests only (``dataclasses.replace`` + a fresh CPU scheduler plan), q/k/v projections, RoPE,
  attention and o_proj run on their tokens alone, and the originals are put back. Skipped requests compute
  nothing there and write no K/V (the slots stay as vLLM zeroed them at allocation, so the kernel, which
  reads whole blocks, never sees garbage); their attention output is zero, so the residual passes unchanged.

The subset plan (token indices, metadata) is built once per step and decision pattern, and shared by every
routed layer with that pattern.

When every request of a step skips a layer and that is known before the layer runs (stored decisions at decode,
forced ones), ``RoutedLayer`` skips the layer's input norm as well, the way vLLM's native no-op attention
(Nemotron-NAS / DeciLM) does: the residual stream takes the pending update and goes straight to the MLP's norm.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch

from routertune.routing.router import bounded_logit
from routertune.routing.state import Forcing

from .decode_only import PromptProjections
from .requests import ServeBatch, current_batch

logger = logging.getLogger(__name__)

PROFILE_ENV = "ROUTERTUNE_SERVE_PROFILE"
# where a routed layer's time goes (benchmarks read it in the engine process; off unless PROFILE_ENV is set):
# seconds in the routing code itself (decisions, subset plans, gathers/scatters) and in vLLM's attention,
# and how many layer calls ran dense, subset, or skipped whole (of those, how many skipped the input norm too)
PROFILE = {
    "routing_s": 0.0,
    "attention_s": 0.0,
    "calls_dense": 0,
    "calls_subset": 0,
    "calls_skipped": 0,
    "layers_no_op": 0,
}
_PROFILING = bool(os.environ.get(PROFILE_ENV))


def reset_profile() -> dict:
    """The counters so far, then zeroed."""
    out = dict(PROFILE)
    for key in PROFILE:
        PROFILE[key] = type(PROFILE[key])(0)
    return out


class PartialPromptError(RuntimeError):
    pass


@dataclasses.dataclass
class RoutedAttention:
    """Replaces one attention module's forward (the module and its weights stay where vLLM put them)."""

    module: torch.nn.Module  # vLLM's attention sublayer (LlamaAttention, Qwen2Attention, ...)
    original_forward: object
    layer_idx: int
    router: torch.nn.Module  # routertune.routing.router.Router (fp32)
    threshold: float
    dtype: torch.dtype  # the model's dtype, as vLLM's CPU metadata builder uses
    # a static-drop export's fixed decision for every request (models.py): no router, no per-request setting,
    # whatever the prompt or the cached context (so chunked prefill and prefix caching are fine)
    static: Forcing | None = None
    # the chat template's fixed [head, tail] token ids, pooled without (RouterConfig.fixed_template)
    fixed_template: list[list[int]] | None = None
    # no request ever runs this layer (a static drop's set, or `export --free-kv`'s capped layers): it has no KV
    # cache and no attention metadata, so it is skipped before either is looked up
    never_runs: bool = False
    # `export --decode-only`: prompt tokens always run (their projections go to `projections`), generated
    # tokens follow the request's decision, taken from the whole prompt's projections (serve/decode_only.py)
    decode_only: bool = False
    projections: PromptProjections | None = None
    # the engine compiles the model (no enforce_eager): the routed layer is called through an opaque custom op
    # (`compiled_attention_op`), so the compiled graph holds a call to it and its per-request Python runs at
    # every step, instead of being traced once and baked in
    compiled: bool = False

    def __call__(self, positions: torch.Tensor, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.compiled and not kwargs:
            return getattr(torch.ops.vllm, OP_NAME)(positions, hidden_states, self.module.attn.layer_name)
        return self.forward_eager(positions, hidden_states, **kwargs)

    def forward_eager(self, positions: torch.Tensor, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if not _PROFILING:
            return self._forward(positions, hidden_states, **kwargs)
        started, attention_before = time.perf_counter(), PROFILE["attention_s"]
        try:
            return self._forward(positions, hidden_states, **kwargs)
        finally:
            PROFILE["routing_s"] += time.perf_counter() - started - (PROFILE["attention_s"] - attention_before)

    def _attention(self, **kwargs) -> torch.Tensor:
        if not _PROFILING:
            return self.original_forward(**kwargs)
        started = time.perf_counter()
        try:
            return self.original_forward(**kwargs)
        finally:
            PROFILE["attention_s"] += time.perf_counter() - started

    def _step(self, batch: ServeBatch):
        """(forward context, this layer's attention metadata, query starts, seq lens) of the running step."""
        from vllm.forward_context import get_forward_context

        context = get_forward_context()
        metadata = context.attn_metadata
        if not isinstance(metadata, dict):
            raise NotImplementedError(
                "routertune serving needs per-layer attention metadata (no speculative decoding, no micro-batching)"
            )
        metadata = metadata[self.module.attn.layer_name]
        starts, seq_lens = _layout(batch, metadata)
        return context, metadata, starts, seq_lens

    def _skip_never_run(self, batch: ServeBatch | None) -> None:
        """Record the skip of a never-run layer for the step's requests that have not decided it yet (the
        routing log lists it; a static drop's requests record no decisions)."""
        if batch is not None and self.static is None:
            for req in batch.requests:
                req.decisions.setdefault(self.layer_idx, False)

    def skipped_by_all(self) -> bool:
        """Whether every request of the running step skips this layer, known without its input (stored or
        forced decisions); False outside a served step or when some request decides here from its prompt."""
        batch = current_batch()
        if self.never_runs:
            self._skip_never_run(batch)
            return True
        if batch is None:
            return False
        _, _, starts, seq_lens = self._step(batch)
        if self.decode_only:
            runs, pending, prompt_here = self._known_decode_only(batch, starts, seq_lens)
            return not pending and not any(prompt_here) and not any(runs)
        runs, pending = self._known(batch, starts, seq_lens)
        return not pending and not any(runs)

    def _forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        batch = current_batch()
        if self.never_runs:
            self._skip_never_run(batch)
            PROFILE["calls_skipped"] += 1
            return hidden_states.new_zeros(hidden_states.shape)
        if batch is None:
            # vLLM's own warm-up and profiling runs (no requests): the dense path, the most memory
            return self.original_forward(positions=positions, hidden_states=hidden_states, **kwargs)
        context, metadata, starts, seq_lens = self._step(batch)
        layer_name = self.module.attn.layer_name
        queries = [starts[i + 1] - starts[i] for i in range(len(batch.requests))]
        if self.decode_only:
            counts = self._decide_decode_only(batch, starts, seq_lens, hidden_states, context, metadata)
        else:
            counts = [q if run else 0 for q, run in zip(queries, self._decide(batch, starts, seq_lens, hidden_states))]
        n_run = sum(counts)
        if counts == queries:
            PROFILE["calls_dense"] += 1
            return self._attention(positions=positions, hidden_states=hidden_states, **kwargs)
        out = hidden_states.new_zeros(hidden_states.shape)  # (T, H): skipped tokens add nothing
        if n_run == 0:
            PROFILE["calls_skipped"] += 1
            return out
        PROFILE["calls_subset"] += 1
        plan = _plan(batch, counts, starts, metadata, context.slot_mapping[layer_name], self.module.attn, self.dtype)
        if plan is None:  # a backend whose metadata we cannot subset: exact, but every request computes
            full = self._attention(positions=positions, hidden_states=hidden_states, **kwargs)
            return full * _token_mask(counts, starts, full)
        tokens, sub_metadata, sub_slots = plan
        if positions.dim() != 1:
            raise NotImplementedError("routertune serving supports 1-D positions (no M-RoPE)")
        saved_metadata, saved_slots = context.attn_metadata[layer_name], context.slot_mapping[layer_name]
        context.attn_metadata[layer_name], context.slot_mapping[layer_name] = sub_metadata, sub_slots
        try:
            sub_out = self._attention(
                positions=positions.index_select(0, tokens),
                hidden_states=hidden_states.index_select(0, tokens),
                **kwargs,
            )
        finally:
            context.attn_metadata[layer_name], context.slot_mapping[layer_name] = saved_metadata, saved_slots
        return out.index_copy_(0, tokens, sub_out)

    def _decide(
        self, batch: ServeBatch, starts: list[int], seq_lens: list[int], hidden_states: torch.Tensor
    ) -> list[bool]:
        """Per request: the stored decision, or (prefill from an empty cache) a new one from its prompt."""
        runs, pending = self._known(batch, starts, seq_lens)
        if pending:
            # mean over the prompt tokens of the normed input, fp32 (routertune.routing.router.masked_mean),
            # without the chat template's fixed ends if the routers were trained so (routing.template)
            spans = [batch.requests[i].pool_span(self.fixed_template) for i in pending]
            pooled = torch.stack(
                [hidden_states[starts[i] + a : starts[i] + b].float().mean(0) for i, (a, b) in zip(pending, spans)]
            )  # (P, H)
            scores = self.router(pooled).tolist()  # (P,)
            for i, score in zip(pending, scores):
                runs[i] = score >= batch.threshold_of(i, self.threshold)  # the request's own, if it set one
                batch.requests[i].scores[self.layer_idx] = float(score)
                batch.requests[i].decisions[self.layer_idx] = bool(runs[i])
        return [bool(r) for r in runs]

    def _known_decode_only(
        self, batch: ServeBatch, starts: list[int], seq_lens: list[int]
    ) -> tuple[list, list[int], list[int]]:
        """Decode-only: per request, the decision for its generated tokens when known (stored or forced; None
        for a request that must decide here, or one with no generated token in this step), the rows that must
        decide, and how many of the step's tokens are prompt tokens (a prefix of its segment; they always run).
        Memoised per step and layer."""
        memo = batch.known.get(self.layer_idx)
        if memo is not None:
            return list(memo[0]), memo[1], memo[2]
        runs: list[bool | None] = []
        pending: list[int] = []
        prompt_here: list[int] = []
        for i, req in enumerate(batch.requests):
            query = starts[i + 1] - starts[i]
            cached = seq_lens[i] - query
            prompt_here.append(max(0, min(query, req.prompt_len - cached)))
            stored = req.decisions.get(self.layer_idx)
            if stored is not None:
                if cached == 0 and query > req.prompt_len:
                    batch.recomputed.add(i)  # a preempted request recomputed over prompt + output
                runs.append(stored)
            elif cached + query <= req.prompt_len:
                runs.append(None)  # prompt tokens only: nothing to decide yet
            elif batch.forcing[i] is not None:
                runs.append(batch.forcing[i].runs(self.layer_idx))
                req.decisions[self.layer_idx] = runs[-1]
            else:
                runs.append(None)
                pending.append(i)
        batch.known[self.layer_idx] = (tuple(runs), pending, prompt_here)
        return runs, pending, prompt_here

    def _decide_decode_only(self, batch: ServeBatch, starts, seq_lens, hidden_states, context, metadata) -> list[int]:
        """Decode-only: store the projections of this step's prompt tokens, decide for requests reaching their
        first generated token, and return per request how many of its tokens run (a prefix of its segment: its
        prompt tokens, then its generated ones if it runs the layer)."""
        runs, pending, prompt_here = self._known_decode_only(batch, starts, seq_lens)
        store = self.projections
        store.bind(self.module.attn.kv_cache)
        slot_mapping = context.slot_mapping[self.module.attn.layer_name]
        prompt_rows = [i for i, n in enumerate(prompt_here) if n]
        if prompt_rows:
            tokens = torch.cat([torch.arange(starts[i], starts[i] + prompt_here[i]) for i in prompt_rows])
            weight = self.router.proj.weight[0]  # (H,) float32
            store.write(
                self.layer_idx,
                slot_mapping.index_select(0, tokens),
                hidden_states.index_select(0, tokens).float() @ weight,
            )
            if not store.layout_checked:
                i = prompt_rows[0]
                cached = seq_lens[i] - (starts[i + 1] - starts[i])
                store.check_layout(
                    metadata.block_table[i],
                    cached,
                    cached + prompt_here[i],
                    slot_mapping[starts[i] : starts[i] + prompt_here[i]],
                )
                store.layout_checked = True
        if pending:
            proj = self.router.proj
            for i in pending:
                req = batch.requests[i]
                a, b = req.pool_span(self.fixed_template)
                logit = store.mean(self.layer_idx, store.slots_of(metadata.block_table[i], a, b)) + proj.bias[0]
                score = float(torch.sigmoid(bounded_logit(logit, *self.router.trust_region)))
                runs[i] = score >= batch.threshold_of(i, self.threshold)
                req.scores[self.layer_idx] = score
                req.decisions[self.layer_idx] = bool(runs[i])
        counts = []
        for i, run in enumerate(runs):
            query = starts[i + 1] - starts[i]
            counts.append(query if run or run is None else prompt_here[i])
        return counts

    def _known(self, batch: ServeBatch, starts: list[int], seq_lens: list[int]) -> tuple[list, list[int]]:
        """Per request the decision known without this layer's input (stored, or forced at its prefill; None
        where the router must decide), and the rows that must decide. Idempotent within a step (the layer
        path and the attention path may both ask); memoised per step and layer."""
        if self.static is not None:
            return [self.static.runs(self.layer_idx)] * len(batch.requests), []
        memo = batch.known.get(self.layer_idx)
        if memo is not None:
            return list(memo[0]), memo[1]
        runs: list[bool | None] = []
        pending: list[int] = []
        for i, req in enumerate(batch.requests):
            query = starts[i + 1] - starts[i]
            context = seq_lens[i] - query
            stored = req.decisions.get(self.layer_idx)
            if stored is not None:
                if context == 0 and query > req.prompt_len:
                    batch.recomputed.add(i)  # a preempted request recomputed over prompt + output
                runs.append(stored)
                continue
            if context != 0 or query < req.prompt_len:
                raise PartialPromptError(
                    f"request {batch.req_ids[i]}: its first step at routed layer {self.layer_idx} covers "
                    f"{query} of {req.prompt_len} prompt tokens after {context} cached ones; routertune decides "
                    "from the whole prompt, so serve without chunked prefill and prefix caching "
                    "(enable_chunked_prefill=False, enable_prefix_caching=False, max_num_batched_tokens >= "
                    "max_model_len)"
                )
            forcing: Forcing | None = batch.forcing[i]
            if forcing is not None:
                runs.append(forcing.runs(self.layer_idx))
                req.decisions[self.layer_idx] = runs[-1]
            else:
                runs.append(None)
                pending.append(i)
        batch.known[self.layer_idx] = (tuple(runs), pending)
        return runs, pending


# the routed attention layers of this process's engine by vLLM attention layer name, for the custom op
_BY_NAME: dict[str, RoutedAttention] = {}
OP_NAME = "routertune_routed_attention"


def _routed_attention_op(positions: torch.Tensor, hidden_states: torch.Tensor, layer_name: str) -> torch.Tensor:
    return _BY_NAME[layer_name].forward_eager(positions, hidden_states)


def _routed_attention_fake(positions: torch.Tensor, hidden_states: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


def compiled_attention_op(routed: RoutedAttention) -> None:
    """Serve `routed` through the opaque custom op ``torch.ops.vllm.routertune_routed_attention`` (registered once
    per process, as vLLM registers its own attention op): under torch.compile the graph calls it like vLLM's
    attention op, and the routing inside it (per-request decisions, subset plans) runs eagerly at every step."""
    from vllm.utils.torch_utils import direct_register_custom_op

    if not hasattr(torch.ops.vllm, OP_NAME):
        direct_register_custom_op(OP_NAME, _routed_attention_op, mutates_args=[], fake_impl=_routed_attention_fake)
    _BY_NAME[routed.module.attn.layer_name] = routed
    routed.compiled = True


@dataclasses.dataclass
class RoutedLayer:
    """Replaces the forward of a decoder layer shaped like vLLM's LlamaDecoderLayer (input norm, attention,
    fused add + post-attention norm, MLP): when the whole step skips its attention, it runs as vLLM's native
    no-op attention layer does (``nemotron_nas.DeciLMDecoderLayer``), without the input norm. The residual
    stream is the same as the routed path's (adding a zero attention output changes nothing)."""

    layer: torch.nn.Module
    original_forward: object
    attention: RoutedAttention

    def __call__(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        started = time.perf_counter() if _PROFILING else 0.0
        no_op = residual is not None and self.attention.skipped_by_all()
        if _PROFILING:
            PROFILE["routing_s"] += time.perf_counter() - started
        if no_op:
            PROFILE["layers_no_op"] += 1
            hidden_states, residual = self.layer.post_attention_layernorm(hidden_states, residual)
            return self.layer.mlp(hidden_states), residual
        return self.original_forward(positions, hidden_states, residual)


# decoder layers whose forward is exactly llama's (input norm, attention, fused add + norm, MLP): RoutedLayer
# may take their no-op path. Matched by exact class, so a subclass that changes forward (Mistral's t_cond) is not.
NO_OP_LAYER_CLASSES = {
    ("vllm.model_executor.models.llama", "LlamaDecoderLayer"),
    ("vllm.model_executor.models.qwen2", "Qwen2DecoderLayer"),
    ("vllm.model_executor.models.qwen3", "Qwen3DecoderLayer"),
}


def has_llama_layer_forward(layer: torch.nn.Module) -> bool:
    return (type(layer).__module__, type(layer).__name__) in NO_OP_LAYER_CLASSES


def _layout(batch: ServeBatch, metadata) -> tuple[list[int], list[int]]:
    key = id(metadata)
    layout = batch.layouts.get(key)
    if layout is None:
        starts = metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens.tolist()
        n = len(batch.requests)
        if len(starts) < n + 1 or len(seq_lens) < n:
            raise RuntimeError(f"the step's attention metadata lists {len(starts) - 1} requests, the runner {n}")
        layout = batch.layouts[key] = (starts[: n + 1], seq_lens[:n])
    return layout


def _token_mask(counts: list[int], starts: list[int], like: torch.Tensor) -> torch.Tensor:
    """(T, 1): 1 on the first counts[i] tokens of each request's segment (those that run), 0 elsewhere."""
    mask = torch.zeros(like.shape[0], 1, dtype=like.dtype, device=like.device)
    for i, count in enumerate(counts):
        mask[starts[i] : starts[i] + count] = 1
    return mask


_WARNED: set[str] = set()


def _plan(
    batch: ServeBatch, counts: list[int], starts: list[int], metadata, slot_mapping, attn_layer, dtype: torch.dtype
):
    """(token indices, attention metadata, slot mapping) of the running tokens alone: the first counts[i] tokens
    of request i's segment (all of them, or none, unless decode-only routing runs a recompute's prompt part
    only); cached per step."""
    key = (tuple(counts), id(metadata), id(slot_mapping))
    if key in batch.plans:
        return batch.plans[key]
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    if not isinstance(metadata, CPUAttentionMetadata):
        name = type(metadata).__name__
        if name not in _WARNED:
            _WARNED.add(name)
            logger.warning(
                "routertune: %s cannot be subset yet; skipped requests' attention is zeroed (exact) but still computed",
                name,
            )
        batch.plans[key] = None
        return None
    from vllm import _custom_ops as ops
    from vllm import envs

    rows = [i for i, count in enumerate(counts) if count]
    tokens = torch.cat([torch.arange(starts[i], starts[i] + counts[i]) for i in rows])  # (n_tokens,)
    query_lens = [counts[i] for i in rows]
    sub_starts = torch.tensor([0] + list(_cumsum(query_lens)), dtype=metadata.query_start_loc.dtype)
    rows_t = torch.tensor(rows, dtype=torch.long)
    # a request's tokens past its running prefix are not in the cache at this layer: its length stops there
    dropped = torch.tensor([starts[i + 1] - starts[i] - counts[i] for i in rows], dtype=metadata.seq_lens.dtype)
    seq_lens = metadata.seq_lens.index_select(0, rows_t) - dropped
    impl = attn_layer.impl
    scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(rows),
        num_heads=impl.num_heads,
        num_kv_heads=impl.num_kv_heads,
        head_dim=impl.head_size,
        seq_lens=seq_lens,
        dtype=dtype,
        query_start_loc=sub_starts,
        causal=metadata.causal,
        sliding_window_size=impl.sliding_window,
        isa=attn_layer.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=metadata.dynamic_causal,
        kv_cache_dtype=impl.kv_cache_dtype,
    )
    sub_slots = slot_mapping.index_select(0, tokens)
    sub_metadata = dataclasses.replace(
        metadata,
        num_actual_tokens=int(tokens.numel()),
        max_query_len=max(query_lens),
        query_start_loc=sub_starts,
        max_seq_len=int(seq_lens.max()),
        seq_lens=seq_lens,
        block_table=metadata.block_table.index_select(0, rows_t),
        slot_mapping=metadata.slot_mapping.index_select(0, tokens)
        if metadata.slot_mapping is not slot_mapping
        else sub_slots,
        scheduler_metadata=scheduler_metadata,
    )
    plan = batch.plans[key] = (tokens, sub_metadata, sub_slots)
    return plan


def _cumsum(values):
    total = 0
    for v in values:
        total += v
        yield total

"""Routed model classes for vLLM: vLLM's own model class of the family (never a fork), with routers attached
to the routed attention sublayers after construction. ``RoutertuneLlamaForCausalLM`` and its siblings are
made on first access (``models.RoutertuneQwen2ForCausalLM``), so only the family served is imported."""

from __future__ import annotations

import functools
import importlib
import os

from safetensors.torch import load_file
from torch import nn

from routertune.routing.router import Router, load_router
from routertune.routing.state import Forcing

from .attention import RoutedAttention, RoutedLayer, compiled_attention_op, has_llama_layer_forward
from .config import ARCH_PREFIX, CONFIG_KEY, VLLM_ARCHITECTURES, ServeRouting
from .decode_only import PromptProjections

_ROUTERS_ATTR = "routertune_routers"


def check_engine_config(vllm_config, decode_only: bool = False) -> None:
    """Refuse engine settings under which a decision would not see the whole prompt, naming the fix. A
    decode-only export (prompts prefilled densely, decisions from stored projections) takes prefix caching and
    chunked prefill."""
    problems = []
    if not decode_only and getattr(vllm_config.cache_config, "enable_prefix_caching", False):
        problems.append(
            "prefix caching is on (pass enable_prefix_caching=False / --no-enable-prefix-caching, or export "
            "with --decode-only): a prefix-cache hit prefills only the prompt's tail"
        )
    scheduler = vllm_config.scheduler_config
    if not decode_only and getattr(scheduler, "enable_chunked_prefill", False):
        problems.append(
            "chunked prefill is on (pass enable_chunked_prefill=False / --no-enable-chunked-prefill, "
            "with max_num_batched_tokens >= max_model_len, or export with --decode-only): a chunk holds part of "
            "the prompt"
        )
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append("speculative decoding is on: not supported with routed layers")
    if problems:
        raise ValueError(
            "routertune serving decides each request's routed layers from its whole prompt, but " + "; ".join(problems)
        )


class RoutedServingMixin:
    """Put before a vLLM *ForCausalLM class: builds it, then routes the configured attention sublayers."""

    routertune_serving = True  # the runner hook publishes the step's requests only to such models

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        hf_config = vllm_config.model_config.hf_config
        section = getattr(hf_config, CONFIG_KEY, None)
        if section is None:
            raise ValueError(
                f"{vllm_config.model_config.model} has no {CONFIG_KEY!r} section in config.json; "
                "make the folder with `routertune export --routers DIR --output SERVE_DIR`"
            )
        self._routertune = ServeRouting.from_dict(section)
        self._routertune_dir = vllm_config.model_config.model
        static = self._routertune.static_skip
        decode_only = self._routertune.decode_only
        if static is None:
            check_engine_config(vllm_config, decode_only)  # a static drop decides nothing from the prompt
        router_config = self._routertune.router_config
        layers = self.model.layers
        routed = router_config.resolved_layers(len(layers))
        self.routertune_layers = list(routed)  # the runner hook reads how many decisions a request takes
        # a static-drop export (`routertune export --static K` of a family vLLM's DeciLM cannot serve exactly):
        # no routers, every request skips the static set
        routers = nn.ModuleDict({} if static is not None else {str(i): Router(hf_config.hidden_size) for i in routed})
        setattr(self, _ROUTERS_ATTR, routers)
        no_kv = set(self._routertune.no_kv_layers())
        compiled = _compiles(vllm_config)
        if compiled:
            # vLLM keys its on-disk cache of compiled graphs by the engine config and the model class's forward,
            # not by what this plugin changes (routed layers as custom ops, the routers): a cached graph of the
            # dense model (or of other routers) would be loaded and run as is. Read before the first forward.
            os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
        projections = PromptProjections([i for i in routed if i not in no_kv]) if decode_only else None
        for i in routed:
            attention = layers[i].self_attn
            attention.forward = RoutedAttention(
                module=attention,
                original_forward=attention.forward,
                layer_idx=i,
                router=routers[str(i)] if static is None else None,
                threshold=router_config.threshold_for(i),
                dtype=vllm_config.model_config.dtype,
                static=Forcing("skip_set", frozenset(static)) if static is not None else None,
                fixed_template=router_config.fixed_template,
                never_runs=i in no_kv,
                decode_only=decode_only,
                projections=projections,
            )
            if i in no_kv:
                # no request runs this layer: vLLM gives a layer whose KV spec is None no KV cache (its
                # get_kv_cache_spec skips it, as for encoder-only attention), so its blocks go to the others
                attention.attn.get_kv_cache_spec = _no_kv_cache_spec
            if compiled:
                compiled_attention_op(attention.forward)  # the per-request branches stay out of the graph
            elif has_llama_layer_forward(layers[i]):  # whole-step skips also skip the input norm (eager only)
                layers[i].forward = RoutedLayer(
                    layer=layers[i], original_forward=layers[i].forward, attention=attention.forward
                )

    def load_weights(self, weights):
        loaded = set(super().load_weights(weights))
        if self._routertune.static_skip is not None:
            return loaded  # a static drop has no router weights
        path = self._routertune.routers_path(self._routertune_dir)
        if not path.is_file():
            raise FileNotFoundError(f"router weights {path} not found; re-export the folder with `routertune export`")
        state = load_file(str(path))
        routers = getattr(self, _ROUTERS_ATTR)
        weights = {f"layers.{i}.router.weight" for i in routers}
        biases = {f"layers.{i}.router.bias" for i in routers}
        trust = {f"layers.{i}.router.trust_region" for i in routers}
        # files from before routers had a trust region (none) or a bias (bias 0) load too
        if set(state) not in (weights | biases | trust, weights | biases, weights):
            raise ValueError(f"{path} holds {sorted(state)}, the routed layers need {sorted(weights | biases | trust)}")
        for i, router in routers.items():
            load_router(router, state, f"layers.{i}.router")
            loaded.update(
                {
                    f"{_ROUTERS_ATTR}.{i}.proj.weight",
                    f"{_ROUTERS_ATTR}.{i}.proj.bias",
                    f"{_ROUTERS_ATTR}.{i}.trust_region",
                }
            )
        return loaded


def _compiles(vllm_config) -> bool:
    """Whether vLLM will torch.compile the model (no enforce_eager: on the CPU backend, one dynamo trace compiled
    by inductor; its guards are dropped, so nothing traced may branch per step)."""
    from vllm.config import CompilationMode

    return vllm_config.compilation_config.mode != CompilationMode.NONE


def _no_kv_cache_spec(*_args, **_kwargs):
    return None


@functools.cache
def routed_class(base_arch: str) -> type:
    for arch, module in VLLM_ARCHITECTURES.values():
        if arch == base_arch:
            base = getattr(importlib.import_module(module), arch)
            return type(ARCH_PREFIX + arch, (RoutedServingMixin, base), {"__module__": __name__})
    raise ValueError(
        f"no routed vLLM class for {base_arch!r}; known: {sorted(a for a, _ in VLLM_ARCHITECTURES.values())}"
    )


def __getattr__(name: str):
    if name.startswith(ARCH_PREFIX):
        return routed_class(name[len(ARCH_PREFIX) :])
    raise AttributeError(name)

"""The only module that changes a base model: wrap routed sublayers, hook the decoder's forward so every call
gets its own routing state, mark only routers trainable, and undo it all exactly.

Hugging Face modeling code is wrapped, never forked (the pattern of peft's adaption_prompt): each routed
sublayer is replaced on its parent by a `RoutedSublayer` that keeps the original module as `base_layer`.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from routertune.config import RouterConfig
from routertune.routing import arch
from routertune.routing.cache import RoutedCache
from routertune.routing.router import Router, masked_mean, straight_through_gate
from routertune.routing.state import (
    RoutingCall,
    active_call,
    current_call,
    current_decode_only,
    current_forcing,
    resolve_pool_mask,
)
from routertune.routing.template import content_mask

# keyword arguments of a sublayer call that carry a batch dimension and must follow the row selection
_BATCHED_KWARGS = ("attention_mask", "position_ids", "position_embeddings")
_HOOK_ATTR = "_routertune_original_forward"


class RoutedSublayer(nn.Module):
    """Runs `base_layer` only for the sequences whose router says so.

    Inference: gather the running rows, run, scatter back; skipped rows contribute nothing (attention/MLP
    output zero, block output = its input) and write no K/V. Training: run every row and multiply by the
    straight-through binary gate, so skipping rows still get a gradient (docs/method.md#the-straight-through-gate).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        layer_idx: int,
        granularity: str,
        hidden_size: int,
        input_norm: nn.Module | None,
        threshold_for,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.router = Router(hidden_size)
        self.layer_idx = layer_idx
        self.granularity = granularity
        # whole-block routing pools the block's normed input, like the sublayer variants; the norm is
        # borrowed (not owned) so it is not registered twice
        self._input_norm = [input_norm] if input_norm is not None else []
        self._threshold_for = threshold_for

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # unknown attributes (e.g. Gemma 3's `attention_type` on a block) come from the wrapped module
            return getattr(super().__getattr__("base_layer"), name)

    # -- decisions --------------------------------------------------------------------------------------
    def _router_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._input_norm:
            return self._input_norm[0](hidden_states)
        return hidden_states

    def _decide(self, call: RoutingCall, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B,) bool: which sequences run this sublayer. Prefill decides; decode reuses."""
        batch = hidden_states.shape[0]
        cache = call.cache
        if cache is not None:
            stored = cache.decision(self.layer_idx)
            if stored is not None:
                if stored.shape[0] != batch:
                    raise ValueError(
                        f"layer {self.layer_idx}: the cache holds decisions for {stored.shape[0]} sequences "
                        f"but this step has {batch}; use one RoutedCache per batch of prompts"
                    )
                call.decisions[self.layer_idx] = stored
                return stored
            if call.past_length > 0:
                raise ValueError(
                    f"decode step without a prefill decision for layer {self.layer_idx}: the cache already "
                    f"holds {call.past_length} tokens but no routing decisions. Start generation from the "
                    "prompt with a fresh RoutedCache (RoutedModel.generate does this for you)."
                )
        forcing = call.forcing
        threshold = self._threshold_for(self.layer_idx)
        if call.prefill_skip is not None and self.layer_idx in call.prefill_skip:
            runs = torch.zeros(batch, dtype=torch.bool, device=hidden_states.device)  # nothing runs it, ever
        elif forcing is not None:
            runs = forcing.decision(self.layer_idx, batch, hidden_states.device)
        else:
            pooled = masked_mean(self._router_input(hidden_states), call.pool_mask)  # (B, H)
            scores = self.router(pooled)  # (B,)
            call.scores[self.layer_idx] = scores
            if call.training:
                call.gates[self.layer_idx] = straight_through_gate(scores, threshold)
            runs = scores.detach() >= threshold
        if call.training and self.layer_idx not in call.gates:
            call.gates[self.layer_idx] = runs.float()
        call.decisions[self.layer_idx] = runs
        if cache is not None:
            cache.set_decision(self.layer_idx, runs)
        return runs

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        call = current_call()
        runs = self._decide(call, hidden_states)
        if call.training:
            return self._gated(hidden_states, call.gates[self.layer_idx], args, kwargs)
        if call.prefill_skip is not None and call.past_length == 0:
            # decode-only routing: the prompt runs the layer whatever the decision, which waits for decode
            if self.layer_idx in call.prefill_skip:
                return self._skipped(hidden_states)
            return self.base_layer(hidden_states, *args, **kwargs)
        if call.cache is not None:
            # counted once per prefill decision, not once per decode step (a device sync on GPU)
            n_run, rows = call.cache.run_plan(self.layer_idx, runs)
        else:
            n_run, rows = int(runs.sum()), None
        if n_run == runs.shape[0]:
            return self.base_layer(hidden_states, *args, **kwargs)
        if n_run == 0:
            return self._skipped(hidden_states)
        if rows is None:
            rows = runs.nonzero().squeeze(-1)  # (n_run,)
        batch = hidden_states.shape[0]
        sub_kwargs = {k: (_select_rows(v, rows, batch) if k in _BATCHED_KWARGS else v) for k, v in kwargs.items()}
        out = self.base_layer(hidden_states.index_select(0, rows), *args, **sub_kwargs)
        main = out[0] if isinstance(out, tuple) else out
        full = self._skipped_tensor(hidden_states).index_copy(0, rows, main)
        return (full, *out[1:]) if isinstance(out, tuple) else full

    def _skipped_tensor(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # a skipped block passes its input through; a skipped sublayer adds nothing to the residual
        return hidden_states if self.granularity == "block" else torch.zeros_like(hidden_states)

    def _skipped(self, hidden_states: torch.Tensor):
        out = self._skipped_tensor(hidden_states)
        return (out, None) if self.granularity == "attention" else out

    def _gated(self, hidden_states, gate, args, kwargs):
        out = self.base_layer(hidden_states, *args, **kwargs)
        main = out[0] if isinstance(out, tuple) else out
        g = gate.to(main.dtype).view(-1, *([1] * (main.dim() - 1)))  # (B, 1, 1)
        if self.granularity == "block":
            # exact at g in {0, 1}: 1*F + 0*x == F and 0*F + 1*x == x
            gated = g * main + (1 - g) * hidden_states
        else:
            gated = g * main
        return (gated, *out[1:]) if isinstance(out, tuple) else gated


def _select_rows(value, rows: torch.Tensor, batch: int):
    """Index the batch dimension of tensors (or tuples of them); size-1 leading dims are broadcasts."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows.to(value.device))
    if isinstance(value, (tuple, list)):
        return type(value)(_select_rows(v, rows, batch) for v in value)
    return value


# ---------------------------------------------------------------------------------------------------------
def add_routers(
    model: nn.Module, config: RouterConfig, wrapper_cls: type | None = None, cache_cls: type | None = None
) -> dict[int, RoutedSublayer]:
    """Wrap the configured sublayers of `model` in place; returns {layer index: wrapper}. `wrapper_cls` and
    `cache_cls` (RoutedSublayer / RoutedCache by default) let token routing bring its own."""
    wrapper_cls = wrapper_cls or RoutedSublayer
    cache_cls = cache_cls or RoutedCache
    if is_routed(model):
        raise ValueError("this model already has routers; call remove_routers(model) before adding new ones")
    spec = arch.arch_spec(model)
    blocks = arch.blocks_of(model)
    layers = config.resolved_layers(len(blocks))
    name = arch.sublayer_name(model, config.granularity)
    hidden = model.config.hidden_size
    wrappers: dict[int, RoutedSublayer] = {}
    for idx in layers:
        block = blocks[idx]
        if name is None:
            original, norm = block, getattr(block, spec.input_norm)
        else:
            original, norm = getattr(block, name), None
        device = next(original.parameters()).device
        wrapper = wrapper_cls(original, idx, config.granularity, hidden, norm, config.threshold_for)
        wrapper.router.to(device)
        if name is None:
            blocks[idx] = wrapper
        else:
            setattr(block, name, wrapper)
        wrappers[idx] = wrapper
    _hook_decoder(arch.decoder_of(model), model, wrappers, cache_cls, config)
    return wrappers


def remove_routers(model: nn.Module) -> nn.Module:
    """Put every original module back; the model is then exactly the base model again."""
    blocks = arch.blocks_of(model)
    for idx, block in enumerate(blocks):
        if isinstance(block, RoutedSublayer):
            blocks[idx] = block.base_layer
            continue
        for child_name, child in list(block.named_children()):
            if isinstance(child, RoutedSublayer):
                setattr(block, child_name, child.base_layer)
    decoder = arch.decoder_of(model)
    if _HOOK_ATTR in decoder.__dict__:
        del decoder.__dict__["forward"]
        del decoder.__dict__[_HOOK_ATTR]
    return model


def routed_sublayers(model: nn.Module) -> dict[int, RoutedSublayer]:
    return {m.layer_idx: m for m in model.modules() if isinstance(m, RoutedSublayer)}


def is_routed(model: nn.Module) -> bool:
    return bool(routed_sublayers(model))


def is_trainable(name: str) -> bool:
    """Routers, and LoRA layers when they were added (routertune.train.lora)."""
    return ".router." in f".{name}" or "lora_" in name


def set_trainable(model: nn.Module) -> int:
    """Freeze everything but the routers and LoRA layers (the one place trainable parameters are defined)."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _hook_decoder(
    decoder: nn.Module,
    model: nn.Module,
    wrappers: dict[int, RoutedSublayer],
    cache_cls: type = RoutedCache,
    config: RouterConfig | None = None,
) -> None:
    """Give every decoder call its own RoutingCall (read from the call's arguments, never stored on modules).
    `config` is read at each call (its fixed_template, like its thresholds, may be set after the routers)."""
    original = decoder.forward
    signature = inspect.signature(original)
    routed_layers = frozenset(wrappers)
    first_wrapper = next(iter(wrappers.values()))
    cache_key = "cache" if "cache" in signature.parameters else "past_key_values"
    var_keyword = next(
        (n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), "__none__"
    )

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if args:
            bound = signature.bind_partial(*args, **kwargs)
            arguments = dict(bound.arguments)
            arguments.update(arguments.pop(var_keyword, {}))
        else:
            # keyword-only call (how the causal-LM head calls its decoder): nothing to bind
            arguments = dict(kwargs)
        if cache_key != "cache" and arguments.get("cache") is not None:
            # transformers < 5.20 (the versions vLLM pins) names it past_key_values; `cache=` reaches us in kwargs
            arguments[cache_key] = arguments.pop("cache")
        cache = arguments.get(cache_key, arguments.get("past_key_values"))
        # the routers' mode decides: the frozen base model itself always stays in eval mode (no dropout)
        training = first_wrapper.training and torch.is_grad_enabled()
        use_cache = arguments.get("use_cache")
        if use_cache is None:
            use_cache = getattr(model.config, "use_cache", False)
        if training:
            if cache is not None:
                raise ValueError("a training forward of a routed model takes no KV cache; pass use_cache=False")
            arguments["use_cache"] = False
        elif cache is None and use_cache:
            cache = cache_cls(config=model.config)
            arguments.pop("past_key_values", None)
            arguments[cache_key] = cache
        if cache is not None and not isinstance(cache, cache_cls):
            raise ValueError(
                f"this routed model needs a {cache_cls.__name__}, got {type(cache).__name__}: call "
                f"RoutedModel.generate (it makes one), or pass cache=routed.new_cache()"
            )
        forcing = current_forcing()
        if forcing is not None and not forcing.skip_layers <= routed_layers:
            raise ValueError(
                f"cannot force-skip layers {sorted(forcing.skip_layers - routed_layers)}: they are not routed "
                f"(routed layers: {sorted(routed_layers)}); route them via RouterConfig(layers=...)"
            )
        attention_mask = arguments.get("attention_mask")
        custom_mask = attention_mask is not None and not (
            isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        )
        if custom_mask:
            attention_mask = None  # a prepared 4-D mask: token routing refuses it, sequence routing pools without it
        _refuse_misaligned_outputs(arguments, model.config, first_wrapper.granularity, forcing)
        inputs = arguments.get("input_ids")
        inputs = inputs if inputs is not None else arguments.get("inputs_embeds")
        mask = resolve_pool_mask(arguments.get("attention_mask"), inputs)
        past_length = cache.get_seq_length() if cache is not None else 0
        fixed = config.fixed_template if config is not None else None
        if fixed and past_length == 0:  # the prompt's call: pool over what varies in it
            mask = content_mask(arguments.get("input_ids"), mask, fixed)
        prefill_skip = current_decode_only()
        if prefill_skip is not None:
            _check_decode_only(cache, inputs, training, first_wrapper, prefill_skip, routed_layers)
            if past_length == 0:
                cache.prefill_dense = True
        call = RoutingCall(
            pool_mask=mask,
            cache=cache,
            past_length=past_length,
            training=training,
            forcing=forcing,
            attention_mask=attention_mask,
            custom_mask=custom_mask,
            prefill_skip=prefill_skip,
        )
        with active_call(call):
            return original(**arguments)

    decoder.__dict__[_HOOK_ATTR] = original
    decoder.forward = forward


def _check_decode_only(cache, inputs, training: bool, wrapper, prefill_skip, routed_layers) -> None:
    """Decode-only routing (routing.state.decode_only) needs what carries its decisions from the prompt to the
    generated tokens: a cache, one sequence (a layer's cache holds every row of the prompt), no training."""
    problems = []
    if training:
        problems.append("it is an inference mode (call routed.eval() or run under torch.no_grad())")
    if cache is None:
        problems.append("it needs a KV cache (use_cache=True; RoutedModel.generate makes one)")
    if type(wrapper) is not RoutedSublayer or wrapper.granularity != "attention":
        problems.append("it routes attention sublayers per sequence (RouterConfig unit='sequence')")
    if inputs is not None and inputs.shape[0] != 1:
        problems.append(f"it generates one prompt at a time (this batch has {inputs.shape[0]})")
    if not prefill_skip <= routed_layers:
        problems.append(f"its prefill_skip {sorted(prefill_skip - routed_layers)} must be routed layers")
    if problems:
        raise ValueError("decode-only routing: " + "; ".join(problems))


# outputs Hugging Face records from a sublayer's own call: with rows skipped they would come back short (only
# the executed rows) or missing (a layer nobody ran), misaligned with the batch and the layer indices
_RECORDED_FROM = {"output_attentions": ("attention", "block"), "output_hidden_states": ("block",)}


def _refuse_misaligned_outputs(arguments: dict, config, granularity: str, forcing) -> None:
    if forcing is not None and forcing.mode == "run":
        return  # every row runs every sublayer: the recorded outputs are the base model's
    for flag, granularities in _RECORDED_FROM.items():
        if granularity in granularities and arguments.get(flag, getattr(config, flag, False)):
            raise ValueError(
                f"{flag}=True is not supported with {granularity} routing: a skipped row has no "
                f"{'attention weights' if flag == 'output_attentions' else 'block output'} to return, so the "
                "outputs would not line up with the batch. Drop the flag, run under RoutedModel.forced('run'), "
                "or unwrap the routers to inspect the base model."
            )

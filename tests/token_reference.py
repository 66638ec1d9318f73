"""An independent reference for token routing: the *plain* model (no routertune code on it) with hooks.

At each routed layer a hook computes every token's router score from the sublayer's normed input
(sigmoid(w . x) >= threshold, padding never runs; the first `sink` real tokens of each row always run), then
- attention / block: replaces the layer's attention mask with a per-layer 4D mask in which a key is visible
  only if its token ran at this layer (causal, sliding window where the layer has one, padding masked), and
  zeroes the attention output of tokens that skipped (a skipped block returns its input);
- MLP: zeroes the MLP output of tokens that skipped.
It runs the whole sequence at once, without a cache, so it shares nothing with the gather/scatter path or the
token cache under test.
"""

from __future__ import annotations

import contextlib

import torch


def _window(config, layer: int) -> int | None:
    types = getattr(config, "layer_types", None)
    if types is not None:
        return config.sliding_window if types[layer] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def _mask(runs: torch.Tensor, real: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1, T, T) bool: query q sees key k iff k <= q, k is real and ran here, and q - k < window."""
    steps = runs.shape[1]
    q = torch.arange(steps)[:, None]
    k = torch.arange(steps)[None, :]
    allowed = (k <= q)[None] & (runs & real)[:, None, :]
    if window is not None:
        allowed &= ((q - k) < window)[None]
    allowed |= torch.eye(steps, dtype=torch.bool)[None]  # skipped / padding queries: output replaced anyway
    return allowed[:, None]


@contextlib.contextmanager
def token_reference(
    model,
    granularity: str,
    routers: dict[int, torch.Tensor],
    thresholds: dict[int, float],
    attention_mask: torch.Tensor | None,
    forced: dict[int, bool] | None = None,
    sink: int = 1,
):
    """Inside the block, `model` (a plain HF causal LM) behaves as the token-routed model with router weights
    `routers` {layer: (weight (1, H), bias (1,))}. Yields {layer: (B, T) bool decisions} of the last forward."""
    decisions: dict[int, torch.Tensor] = {}
    handles = []
    config = model.config

    def decide(layer, normed):
        batch, steps = normed.shape[:2]
        real = (
            attention_mask[:, -steps:].bool()
            if attention_mask is not None
            else torch.ones(batch, steps, dtype=torch.bool)
        )
        if forced is not None:
            runs = real & forced[layer]
        else:
            weight, bias = routers[layer]
            score = torch.sigmoid(normed.float() @ weight.float().t() + bias.float()).squeeze(-1)  # (B, T)
            runs = (score >= thresholds[layer]) & real
            runs |= real & (real.long().cumsum(1) <= sink)  # the whole sequence is here: count from its start
        decisions[layer] = runs
        return runs, real

    for layer in routers:
        block = model.model.layers[layer]
        window = _window(config, layer)
        if granularity == "attention":

            def pre(module, args, kwargs, layer=layer, window=window):
                runs, real = decide(layer, kwargs["hidden_states"])
                kwargs["attention_mask"] = _mask(runs, real, window)
                return args, kwargs

            def post(module, args, kwargs, out, layer=layer):
                keep = decisions[layer][:, :, None].to(out[0].dtype)
                return (out[0] * keep, *out[1:])

            handles.append(block.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.self_attn.register_forward_hook(post, with_kwargs=True))
        elif granularity == "mlp":

            def post(module, args, out, layer=layer):
                runs, _ = decide(layer, args[0])
                return out * runs[:, :, None].to(out.dtype)

            handles.append(block.mlp.register_forward_hook(post))
        else:

            def pre(module, args, kwargs, layer=layer, window=window, block=block):
                hidden = args[0] if args else kwargs["hidden_states"]
                runs, real = decide(layer, block.input_layernorm(hidden))
                kwargs["attention_mask"] = _mask(runs, real, window)
                return args, kwargs

            def post(module, args, kwargs, out, layer=layer):
                hidden = args[0] if args else kwargs["hidden_states"]
                return torch.where(decisions[layer][:, :, None], out, hidden)

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        yield decisions
    finally:
        for handle in handles:
            handle.remove()


def reference_logits(model, granularity, routers, thresholds, ids, mask, forced=None, position_ids=None, sink=1):
    with torch.no_grad(), token_reference(model, granularity, routers, thresholds, mask, forced, sink) as decisions:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    return logits, {k: v.clone() for k, v in decisions.items()}


def reference_greedy(model, granularity, routers, thresholds, ids, mask, new_tokens: int, sink: int = 1):
    """Greedy continuation by re-running the reference on the whole sequence each step (no cache)."""
    for _ in range(new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() numbers left-padded rows
        logits, _ = reference_logits(
            model, granularity, routers, thresholds, ids, mask, position_ids=positions, sink=sink
        )
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids, mask

"""Token-level routing: each token's own router decides, at each routed layer, whether that token runs it.

Semantics (exact, and what the tests check against a plain model with a per-layer mask):
- the router scores each token's own normed input (no pooling); a token runs if score >= threshold, or, in
  top-k mode, if it is among the top `token_top_k` fraction of its sequence's prompt tokens, k = ceil(fraction *
  prompt tokens), the sinks below taking their places among the k first. Tokens after the prompt (generated
  ones) run if their score reaches the prompt's cut-off: the lowest score of a non-sink prompt token that ran;
  when the sinks fill all k places (a short prompt), the k-th highest non-sink prompt score instead (as if the
  sinks had taken no place); when the prompt is sinks only, the lowest of the sinks' own scores. The cut-off is
  finite whenever the prompt has a token;
- the first `token_sink` real tokens of each sequence (default 1) run every routed layer whatever their router
  says: later tokens put much of their attention on them (attention sinks), and a router that skips them there
  costs far more than it saves (README, "Token-level routing");
- attention: a skipped token adds nothing to its residual and writes no K/V at that layer; a running token
  attends causally to the earlier tokens that *wrote* K/V at that layer (and to itself);
- MLP: a skipped token adds nothing; block: a skipped token passes through the whole block unchanged, and (its
  attention not having run) writes no K/V there either;
- padding tokens never run a token-routed layer.

Inference computes only the running tokens: they are gathered per layer, each row's running tokens packed to
the left with their own position embeddings, run with a mask built from which keys were written at that layer
(`TokenLayer` in token_cache.py holds them), and scattered back. Training computes every token with the same
key masking and multiplies the output by a straight-through per-token gate, so skipped tokens still get a
gradient and the forward equals inference exactly.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import get_layer_types_and_kwargs

from routertune.config import RouterConfig
from routertune.routing.inject import RoutedSublayer
from routertune.routing.state import RoutingCall, current_call
from routertune.routing.token_cache import KeyLayout, TokenRoutedCache

_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


class TokenRoutedSublayer(RoutedSublayer):
    """Runs `base_layer` only for the tokens whose router says so (see the module docstring)."""

    def __init__(
        self,
        base_layer,
        layer_idx,
        granularity,
        hidden_size,
        input_norm,
        threshold_for,
        router_config: RouterConfig | None = None,
    ):
        super().__init__(base_layer, layer_idx, granularity, hidden_size, input_norm, threshold_for)
        self._router_config = [router_config]  # a list: not a registered submodule / state
        self._window: int | None = None
        self._attn_impl: str | None = None
        if granularity != "mlp":
            config = _config_of(base_layer)
            layer_types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
            kind = layer_types[layer_idx]
            if kind == "sliding_attention":
                self._window = int(kwargs[layer_idx]["sliding_window"])
            elif kind != "full_attention":
                raise ValueError(
                    f"layer {layer_idx} is a {kind!r} layer; token routing supports full and sliding-window "
                    "attention layers only. Route other layers (RouterConfig(layers=...)) or use unit='sequence'."
                )
            self._attn_config = [config]
            self._implementation()  # refuse an attention kernel that cannot take our masks now, not mid-generate

    # -- decisions ------------------------------------------------------------------------------------------
    def _top_k(self) -> float | None:
        config = self._router_config[0]
        return None if config is None else config.token_top_k

    def _decide_tokens(self, call: RoutingCall, x: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: which tokens run this sublayer. Also records scores / decisions / gates of real tokens."""
        if call.custom_mask:
            raise ValueError(
                "token routing builds each routed layer's attention mask from which tokens wrote K/V there, and "
                "cannot combine it with a custom 4D attention mask; pass a 2D padding mask (1 = real token)"
            )
        batch, steps = x.shape[:2]
        real = _real_tokens(call.attention_mask, batch, steps, x.device)  # (B, T)
        idx = self.layer_idx
        forcing = call.forcing
        scores = sinks = None
        if forcing is not None:
            runs = real & forcing.decision(idx, batch, x.device)[:, None]
        else:
            scores = self.router(self._router_input(x))  # (B, T) float32
            sinks = self._sink_tokens(call, real)
            fraction = self._top_k()
            if fraction is None:
                runs = (scores.detach() >= self._threshold_for(idx)) & real
            else:
                runs = self._top_k_runs(call, scores.detach(), real, fraction, sinks)
            if sinks is not None:
                runs = runs | sinks
        if scores is not None:  # the scores that decided something (calibration's quantiles): not the sinks'
            call.scores[idx] = scores.detach()[real if sinks is None else real & ~sinks]
        call.token_runs[idx] = runs
        call.decisions[idx] = runs[real]
        if call.training:
            gate = runs.float()
            if scores is not None:
                # straight-through: forward is exactly the 0/1 decision, backward is the identity to the score
                gate = gate + (scores - scores.detach())
                if sinks is not None:
                    # always run: nothing for the router to learn
                    gate = torch.where(sinks, torch.ones_like(gate), gate)
            call.gates[idx] = gate[real]
            call.token_gates[idx] = gate
        return runs

    def _sink_tokens(self, call: RoutingCall, real: torch.Tensor) -> torch.Tensor | None:
        """(B, T) bool: the tokens of this call among the first `token_sink` real tokens of their sequence (counted
        over the cached past too), which run whatever the router says; None when there are none."""
        config = self._router_config[0]
        keep = 1 if config is None else config.token_sink
        if keep not in call.token_sinks:  # the same at every layer of a call: computed once (one host sync)
            call.token_sinks[keep] = self._find_sinks(call, real, keep)
        return call.token_sinks[keep]

    @staticmethod
    def _find_sinks(call: RoutingCall, real: torch.Tensor, keep: int) -> torch.Tensor | None:
        if keep == 0 or call.past_length >= keep and call.attention_mask is None:
            return None
        steps = real.shape[1]
        mask = call.attention_mask
        if mask is not None and mask.shape[1] >= call.past_length + steps:
            counts = mask.to(device=real.device, dtype=torch.long).cumsum(1)[:, -steps:]  # real tokens up to each one
        else:  # no mask over the past: every past token was real
            counts = call.past_length + real.long().cumsum(1)
        sinks = real & (counts <= keep)
        return sinks if bool(sinks.any()) else None

    def _top_k_runs(
        self, call: RoutingCall, scores: torch.Tensor, real: torch.Tensor, fraction: float, sinks: torch.Tensor | None
    ):
        cache = call.cache
        stored = cache.cutoffs.get(self.layer_idx) if isinstance(cache, TokenRoutedCache) else None
        if stored is not None:
            return (scores >= stored[:, None]) & real
        if call.past_length > 0:
            raise ValueError(
                f"layer {self.layer_idx}: a decode step in top-k mode needs the prompt's cut-off score, but the cache "
                "holds none; start generation from the prompt with a fresh cache"
            )
        ranked = real & _columns(call.pool_mask, scores.shape[0], scores.shape[1], scores.device)  # (B, T)
        counts = ranked.sum(1)  # (B,)
        k = torch.clamp(torch.ceil(counts.double() * fraction).long(), min=1)  # (B,)
        k = torch.minimum(k, counts)
        width = max(int(k.max()), 1)
        masked = scores.masked_fill(~ranked, float("-inf"))
        if sinks is not None:  # sink tokens run anyway: they take their places among the k
            masked = masked.masked_fill(sinks & ranked, float("inf"))
        top = masked.topk(width, dim=1)  # values/indices (B, width)
        chosen = torch.arange(width, device=scores.device)[None, :] < k[:, None]  # (B, width)
        runs = torch.zeros_like(ranked)
        runs.scatter_(1, top.indices, chosen)
        runs &= ranked
        cutoff = _decode_cutoff(scores, ranked, sinks, k)
        later = real & ~_columns(call.pool_mask, scores.shape[0], scores.shape[1], scores.device)
        runs |= later & (scores >= cutoff[:, None])
        if isinstance(cache, TokenRoutedCache):
            cache.cutoffs[self.layer_idx] = cutoff
        return runs

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        call = current_call()
        if args:
            raise ValueError("token routing expects the sublayer's arguments by keyword (as transformers passes them)")
        runs = self._decide_tokens(call, hidden_states)
        if call.training:
            return self._gated_tokens(call, hidden_states, runs, kwargs)
        if self.granularity == "mlp":
            return self._mlp(hidden_states, runs)
        return self._attend(call, hidden_states, runs, kwargs)

    def _mlp(self, x: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
        flat = runs.reshape(-1).nonzero().squeeze(-1)  # (n,)
        hidden = x.shape[-1]
        out = torch.zeros_like(x).view(-1, hidden)
        if flat.numel() == 0:
            return out.view_as(x)
        if flat.numel() == out.shape[0]:
            return self.base_layer(x)
        ran = self.base_layer(x.reshape(-1, hidden).index_select(0, flat).unsqueeze(0)).squeeze(0)  # (n, H)
        return out.index_copy(0, flat, ran).view_as(x)

    def _attend(self, call: RoutingCall, x: torch.Tensor, runs: torch.Tensor, kwargs: dict):
        """Attention or whole block on the running tokens only."""
        batch, steps, hidden = x.shape
        cache = call.cache
        layer = cache.token_layer(self.layer_idx) if cache is not None else None
        if layer is not None:
            layer.start(batch, x.device)
        seen = layer.seen if layer is not None else call.past_length
        counts = runs.sum(1)  # (B,)
        counts_list = counts.tolist()  # the one device sync of a step: how much to compute
        if max(counts_list) == 0:
            if layer is not None:
                layer.advance(steps)
            return self._skipped(x)
        active_list = [b for b, n in enumerate(counts_list) if n > 0]
        rows = None if len(active_list) == batch else torch.tensor(active_list, device=x.device)
        n_active = [counts_list[b] for b in active_list]
        width = max(n_active)
        sel_runs = runs if rows is None else runs.index_select(0, rows)  # (B', T)
        n_sel = counts if rows is None else counts.index_select(0, rows)  # (B',)
        all_run = width == steps and min(n_active) == steps
        if all_run:
            order = None
            query_valid = None
        else:
            # each row's running tokens first, in time order (a stable sort of the skip flags)
            order = torch.sort((~sel_runs).to(torch.int8), dim=1, stable=True).indices[:, :width]  # (B', R)
            query_valid = (
                None if min(n_active) == width else (torch.arange(width, device=x.device)[None, :] < n_sel[:, None])
            )  # (B', R)
        times = seen + torch.arange(steps, device=x.device)  # (T,) time step of each column
        query_times = times.expand(len(active_list), steps) if order is None else times[order]  # (B', R)

        if layer is not None:
            layout = layer.plan(rows, query_valid, query_times, n_sel, need_times=self._window is not None)
        else:
            if call.past_length > 0:
                raise ValueError("a forward with past tokens needs the token cache that holds them")
            layout = KeyLayout(
                past=torch.zeros_like(n_sel),
                valid=query_valid,
                times=query_times if self._window is not None else None,
                width=width,
            )
        empty_past = layer is None or layer.stored_tokens() == 0
        mask = self._mask(layout, query_valid, query_times, x, empty_past)

        sub = dict(kwargs)
        sub["attention_mask"] = mask
        for key in ("position_embeddings", "position_ids"):
            if key in sub and sub[key] is not None:
                sub[key] = _gather(sub[key], rows, order, batch)
        x_in = x if rows is None else x.index_select(0, rows)
        if order is not None:
            x_in = x_in.gather(1, order[:, :, None].expand(-1, -1, hidden))  # (B', R, H)
        out = self.base_layer(x_in, **sub)
        main = out[0] if isinstance(out, tuple) else out  # (B', R, H)
        if layer is not None:
            layer.advance(steps)
        full = self._scatter(x, main, rows, order, query_valid, steps)
        return (full, *out[1:]) if isinstance(out, tuple) else full

    def _scatter(self, x, main, rows, order, query_valid, steps):
        batch, _, hidden = x.shape
        if rows is None and order is None:
            return main
        base = self._skipped_tensor(x).reshape(batch * steps, hidden)
        row_ids = torch.arange(batch, device=x.device) if rows is None else rows  # (B',)
        if order is None:
            positions = torch.arange(steps, device=x.device)[None, :].expand(row_ids.shape[0], steps)
        else:
            positions = order
        flat = row_ids[:, None] * steps + positions  # (B', R)
        values = main
        if query_valid is not None:
            flat, values = flat[query_valid], main[query_valid]
        else:
            flat, values = flat.reshape(-1), main.reshape(-1, hidden)
        return base.index_copy(0, flat, values.to(base.dtype)).view(batch, steps, hidden)

    # -- masks ------------------------------------------------------------------------------------------------------
    def _implementation(self) -> str:
        impl = self._attn_config[0]._attn_implementation
        if impl not in _ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"token routing builds its own per-layer attention masks, which attn_implementation={impl!r} "
                f"cannot take; load the model with attn_implementation='sdpa' (or 'eager')"
            )
        return impl

    def _mask(self, layout: KeyLayout, query_valid, query_times, x, empty_past: bool) -> torch.Tensor | None:
        """(B', 1, R, S) mask of which written keys each gathered query may attend to; None where plain causal
        attention over the gathered tokens is already exact (a prefill with every row's keys real)."""
        impl = self._implementation()
        width_q = query_times.shape[1]
        prefill = empty_past and layout.width == width_q and layout.valid is None and query_valid is None
        single = width_q == 1 and layout.valid is None
        # plain causal attention over the gathered tokens is exact here (sdpa's is_causal; eager needs a mask)
        if self._window is None and (single or (prefill and impl == "sdpa")):
            return None
        device = x.device
        slots = torch.arange(layout.width, device=device)  # (S,)
        query_slots = layout.past[:, None] + torch.arange(width_q, device=device)[None, :]  # (B', R)
        # causal in write order; this also hides the padding slots past a shorter row's last key, since they
        # come after every real query of that row
        allowed = slots[None, None, :] <= query_slots[:, :, None]  # (B', R, S)
        if self._window is not None:
            allowed &= (query_times[:, :, None] - layout.times[:, None, :]) < self._window
        if query_valid is not None:
            allowed |= ~query_valid[:, :, None]  # padding queries: anything finite, their output is dropped
        allowed = allowed[:, None]  # (B', 1, R, S)
        if impl == "eager":
            return torch.zeros(allowed.shape, dtype=x.dtype, device=device).masked_fill(
                ~allowed, torch.finfo(x.dtype).min
            )
        return allowed

    # -- training: every token computed, same key masking, straight-through gate ---------------------------------
    def _gated_tokens(self, call: RoutingCall, x: torch.Tensor, runs: torch.Tensor, kwargs: dict):
        gate = call.token_gates[self.layer_idx].to(x.dtype)[:, :, None]  # (B, T, 1)
        if self.granularity == "mlp":
            return gate * self.base_layer(x)
        batch, steps = x.shape[:2]
        real = _real_tokens(call.attention_mask, batch, steps, x.device)
        pos = torch.arange(steps, device=x.device)
        allowed = pos[None, :] <= pos[:, None]  # (T, T) causal
        if self._window is not None:
            allowed &= (pos[:, None] - pos[None, :]) < self._window
        # a key is visible if its token ran here; each query also sees itself so no row is empty (a skipped
        # query's output is multiplied by 0)
        allowed = (allowed[None] & runs[:, None, :]) | torch.eye(steps, dtype=torch.bool, device=x.device)[None]
        allowed &= real[:, None, :] | torch.eye(steps, dtype=torch.bool, device=x.device)[None]
        allowed = allowed[:, None]  # (B, 1, T, T)
        if self._implementation() == "eager":
            allowed = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
                ~allowed, torch.finfo(x.dtype).min
            )
        sub = dict(kwargs)
        sub["attention_mask"] = allowed
        out = self.base_layer(x, **sub)
        main = out[0] if isinstance(out, tuple) else out
        if self.granularity == "block":
            gated = gate * main + (1 - gate) * x
        else:
            gated = gate * main
        return (gated, *out[1:]) if isinstance(out, tuple) else gated


def _decode_cutoff(
    scores: torch.Tensor, ranked: torch.Tensor, sinks: torch.Tensor | None, k: torch.Tensor
) -> torch.Tensor:
    """(B,) the score a generated token must reach (see the module docstring): the lowest score of a non-sink
    prompt token that ran; when the sinks fill all k places, the k-th highest non-sink prompt score (as if the
    sinks had taken none); when the prompt is sinks only, the lowest of their own scores. The sinks' scores
    are left out otherwise: they run whatever the router says (their +inf stand-in for the top-k made this
    +inf, so no generated token ever ran again). Rows without prompt tokens keep +inf (nothing to compare to;
    RoutedModel refuses empty prompts)."""
    free = ranked if sinks is None else ranked & ~sinks  # (B, T) prompt tokens the router decided
    n_sinks = (ranked & ~free).sum(1)  # (B,)
    n_free = free.sum(1)
    places = torch.where(k > n_sinks, k - n_sinks, k)  # non-sink places that ran, else the k of the rule
    places = torch.minimum(places, n_free).clamp_min(1)
    width = min(max(int(places.max()), 1), scores.shape[1])
    top = scores.masked_fill(~free, float("-inf")).topk(width, dim=1).values  # (B, width)
    cutoff = top.gather(1, (places - 1)[:, None]).squeeze(1)
    lowest_sink = scores.masked_fill(~ranked, float("inf")).amin(1)
    cutoff = torch.where(n_free > 0, cutoff, lowest_sink)
    return torch.where(k > 0, cutoff, torch.full_like(cutoff, float("inf")))


def _config_of(module):
    config = getattr(module, "config", None)
    if config is None:
        for child in module.modules():
            config = getattr(child, "config", None)
            if config is not None:
                break
    if config is None:
        raise ValueError("cannot find the model config of a token-routed attention sublayer")
    return config


def _real_tokens(attention_mask: torch.Tensor | None, batch: int, steps: int, device) -> torch.Tensor:
    """(B, T) bool: the real (non-padding) tokens of this call: the last T columns of the 2D attention mask."""
    if attention_mask is None:
        return torch.ones((batch, steps), dtype=torch.bool, device=device)
    if attention_mask.shape[1] < steps:
        raise ValueError(f"the attention mask covers {attention_mask.shape[1]} tokens but the input has {steps}")
    return attention_mask[:, -steps:].to(device=device, dtype=torch.bool)


def _columns(mask: torch.Tensor | None, batch: int, steps: int, device) -> torch.Tensor:
    """The first `steps` columns of a (B, T') 0/1 mask as bool, padded with False (tokens past the prompt)."""
    if mask is None:
        return torch.ones((batch, steps), dtype=torch.bool, device=device)
    mask = mask.to(device=device).bool()
    if mask.shape[1] >= steps:
        return mask[:, :steps]
    return torch.nn.functional.pad(mask, (0, steps - mask.shape[1]), value=False)


def _gather(value, rows, order, batch):
    """Select rows then gather time steps `order` of a (B or 1, T, ...) tensor, or of each tensor of a tuple."""
    if isinstance(value, (tuple, list)):
        return type(value)(_gather(v, rows, order, batch) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return value
    if value.shape[0] != batch:
        value = value.expand(batch, *value.shape[1:])
    if rows is not None:
        value = value.index_select(0, rows.to(value.device))
    if order is None:
        return value
    index = order.to(value.device).view(*order.shape, *([1] * (value.dim() - 2))).expand(*order.shape, *value.shape[2:])
    return value.gather(1, index)

"""An independent reference for routed models: the plain Hugging Face model with forward hooks.

It shares no code with routertune's routing path (no RoutedSublayer, RoutedCache, masked_mean, routing
contexts): it takes its own decisions, per row, from the input of each routed sublayer at prefill (mean over
the prompt's real tokens, sigmoid(w . x + b) >= threshold, with the router parameters under test), and then
zeroes the output of exactly the skipped rows (a skipped block passes its input through) at prefill and at every
decode step. The plain model computes everything for every row and keeps a plain DynamicCache, so a shared
bug in subset execution, KV bookkeeping or batch reshuffles cannot make both sides agree.

Rows keep their decisions by position. That holds for everything Hugging Face generate does to a batch:
num_return_sequences / num_beams expand the prompts before prefill, and beam search only moves rows within
the beams of one prompt, which all share that prompt's decisions.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


class SkipReference:
    def __init__(self, routed, plain: nn.Module | None = None):
        """`routed` is the RoutedModel under test (read for its router weights, thresholds, granularity and
        routed layers only); `plain` is an unrouted copy of its base model (made here by default)."""
        self.plain = plain if plain is not None else copy.deepcopy(routed).unwrap()
        self.granularity = routed.router_config.granularity
        self.weights = {i: r.weight.detach().float().clone() for i, r in routed.routers.items()}  # (1, H)
        self.biases = {i: r.bias.detach().float().clone() for i, r in routed.routers.items()}  # (1,)
        # [prior, low, high]: the logit's part beyond the prior is clipped to [low, high] (inf: no region)
        self.regions = {i: [float(v) for v in r.trust_region] for i, r in routed.routers.items()}
        self.thresholds = {i: routed.router_config.threshold_for(i) for i in routed.routed_layers}
        self.forced: set[int] | None = None  # layers forced to skip (None: decide by the routers)
        # decode-only routing: the layers the prompt's prefill skips too (None: decisions apply to the prefill)
        self.decode_only: set[int] | None = None
        self.calls: dict[int, int] = {}  # routed layer -> sublayer calls in this request (1: the prefill)
        self.prompt_mask: torch.Tensor | None = None
        self.decisions: dict[int, torch.Tensor] = {}
        self.scores: dict[int, torch.Tensor] = {}
        for idx in self.weights:
            block = self.plain.model.layers[idx]
            target = {"attention": block.self_attn, "mlp": block.mlp, "block": block}[self.granularity]
            target.register_forward_pre_hook(self._pre_hook(idx, block), with_kwargs=True)
            target.register_forward_hook(self._post_hook(idx), with_kwargs=True)

    @contextlib.contextmanager
    def request(
        self,
        prompt_mask: torch.Tensor,
        skip: set[int] | None = None,
        decisions: dict[int, torch.Tensor] | None = None,
        decode_only: set[int] | None = None,
    ):
        """One request: decisions are taken at its prefill from `prompt_mask` (B, T0), one row per row the
        model will see (already expanded for beams / returned sequences), and reused until the block ends.
        `skip` forces those routed layers to skip and the others to run; `decisions` ({layer: (B,) bool},
        e.g. taken by an earlier request on another text) are used as given. `decode_only` (a set of layers):
        the prefill runs every routed layer but those, and the decisions zero the generated tokens only."""
        self.prompt_mask, self.scores, self.forced, self.decode_only = prompt_mask, {}, skip, decode_only
        self.decisions = {k: v.clone() for k, v in decisions.items()} if decisions is not None else {}
        self.calls = {}
        try:
            yield self
        finally:
            self.prompt_mask, self.forced, self.decode_only = None, None, None

    # -- hooks ---------------------------------------------------------------------------------------------
    def _pre_hook(self, idx: int, block: nn.Module):
        def hook(module, args, kwargs):
            self.calls[idx] = self.calls.get(idx, 0) + 1
            if idx in self.decisions:
                return None
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
            if self.granularity == "block":
                x = block.input_layernorm(x)  # the block's router reads its normed input
            mask = self.prompt_mask
            assert mask is not None, "run the reference inside reference.request(prompt_mask)"
            assert x.shape[0] == mask.shape[0] and x.shape[1] >= mask.shape[1], "prefill must see the prompt"
            if self.decode_only is not None and idx in self.decode_only:
                self.decisions[idx] = torch.zeros(x.shape[0], dtype=torch.bool)  # nothing runs it
                return None
            if self.forced is not None:
                self.decisions[idx] = torch.full((x.shape[0],), idx not in self.forced)
                return None
            m = mask.float()
            pooled = (x[:, : m.shape[1]].float() * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # (B, H)
            logit = (pooled @ self.weights[idx].T + self.biases[idx])[:, 0]  # (B,)
            prior, low, high = self.regions[idx]
            if (logit - prior < low).any() or (logit - prior > high).any():
                logit = torch.where(
                    (logit - prior < low) | (logit - prior > high), prior + (logit - prior).clamp(low, high), logit
                )
            score = torch.sigmoid(logit)
            self.scores[idx] = score
            self.decisions[idx] = score >= self.thresholds[idx]
            return None

        return hook

    def _post_hook(self, idx: int):
        def hook(module, args, kwargs, out):
            runs = self.decisions[idx]
            if self.decode_only is not None and self.calls[idx] == 1 and idx not in self.decode_only:
                return out  # decode-only: the prompt's prefill runs the layer whatever the decision
            main = out[0] if isinstance(out, tuple) else out
            keep = runs.to(main.device).view(-1, *([1] * (main.dim() - 1)))  # (B, 1, 1)
            if self.granularity == "block":
                x = args[0] if args else kwargs["hidden_states"]
                replaced = torch.where(keep, main, x)
            else:
                replaced = torch.where(keep, main, torch.zeros_like(main))
            return (replaced, *out[1:]) if isinstance(out, tuple) else replaced

        return hook

    # -- running ---------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids,
        attention_mask,
        skip: set[int] | None = None,
        decisions: dict[int, torch.Tensor] | None = None,
        **kwargs,
    ):
        with self.request(attention_mask, skip, decisions):
            return self.plain(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(
        self,
        input_ids,
        attention_mask,
        expand: int = 1,
        skip: set[int] | None = None,
        decode_only: set[int] | None = None,
        **kwargs,
    ):
        """Plain Hugging Face generate with the hooks; `expand` = num_beams * num_return_sequences rows per
        prompt, as generate expands before prefill (num_beams for beam search, else num_return_sequences)."""
        with self.request(attention_mask.repeat_interleave(expand, dim=0), skip, decode_only=decode_only):
            return self.plain.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

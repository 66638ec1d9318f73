"""Baselines that skip attention for every input: static drop of the least important layers ("What Matters in
Transformers? Not All Attention is Needed": importance = 1 - cos(h, h + attention(norm(h))) on calibration
text) and a seeded random drop. Both run through the same RoutedModel code path, with forced skip sets."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from routertune.routing import arch


@dataclass
class AttentionImportance:
    scores: dict[int, float]  # layer -> mean over real tokens of 1 - cos(h, h + attn)

    def least_important(self, k: int, candidates: list[int] | None = None) -> list[int]:
        pool = candidates if candidates is not None else sorted(self.scores)
        if not 0 <= k <= len(pool):
            raise ValueError(f"cannot drop {k} layers out of {len(pool)} candidates")
        return sorted(sorted(pool, key=lambda i: (self.scores[i], i))[:k])


@torch.no_grad()
def attention_importance(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> AttentionImportance:
    """Importance of every attention sublayer of a plain (unrouted) model on calibration batches
    (dicts with input_ids and attention_mask)."""
    spec = arch.arch_spec(model)
    blocks = arch.blocks_of(model)
    totals = torch.zeros(len(blocks), dtype=torch.float64)
    count = 0.0
    residual: dict[int, torch.Tensor] = {}
    current_mask: list[torch.Tensor] = []

    def save_residual(idx):
        def hook(module, args, kwargs):
            residual[idx] = args[0] if args else kwargs["hidden_states"]

        return hook

    def score(idx):
        def hook(module, args, kwargs, output):
            h = residual.pop(idx).float()  # (B, T, H) residual stream entering the block
            attn = (output[0] if isinstance(output, tuple) else output).float()
            cos = torch.nn.functional.cosine_similarity(h, h + attn, dim=-1)  # (B, T)
            totals[idx] += float(((1 - cos) * current_mask[0]).sum())

        return hook

    handles = []
    for idx, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(save_residual(idx), with_kwargs=True))
        handles.append(getattr(block, spec.attention).register_forward_hook(score(idx), with_kwargs=True))
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(batch["input_ids"])
            current_mask[:] = [mask.float()]
            model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
            count += float(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return AttentionImportance({idx: float(totals[idx] / max(count, 1.0)) for idx in range(len(blocks))})


def random_drop(k: int, candidates: list[int], seed: int = 0) -> list[int]:
    if not 0 <= k <= len(candidates):
        raise ValueError(f"cannot drop {k} layers out of {len(candidates)} candidates")
    return sorted(random.Random(seed).sample(list(candidates), k))


def droppable_layers(num_hidden_layers: int) -> list[int]:
    """Candidates for static/random drop: every layer but the first and the last, which stay dense."""
    return list(range(1, num_hidden_layers - 1))


@contextlib.contextmanager
def zeroed_attention(model: nn.Module, layers: Sequence[int]) -> Iterator[None]:
    """Static drop as the method defines it: the attention output of `layers` is zero for every input (the
    residual passes unchanged). A hook on the plain attention modules, independent of the routing code."""
    spec = arch.arch_spec(model)
    blocks = arch.blocks_of(model)

    def zero(module, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    handles = []
    try:
        for idx in layers:
            attention = getattr(blocks[idx], spec.attention)
            attention = getattr(attention, "base_layer", attention)  # the original module under a router
            handles.append(attention.register_forward_hook(zero))
        yield
    finally:
        for handle in handles:
            handle.remove()

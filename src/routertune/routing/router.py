"""The router (one linear layer on the mean-pooled sublayer input) and the straight-through gate.

Imports only torch so it can be reused anywhere.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Router(nn.Module):
    """Linear(hidden_size, 1) with a bias, zero-initialised so every score starts at exactly 0.5.

    The paper's router has no bias. Ours has one so that a router can carry a per-layer prior (how important
    its layer is on average) separately from the per-input part (the weights): the importance fit
    (routertune.train.importance) sets both, and with zero weights the routers reduce exactly to a static drop
    ordered by the biases.

    Kept in float32 whatever the base model's dtype: in bf16, tiny logits near zero fall into a dead zone
    (docs/method.md#the-router), and the router costs nothing either way.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, bias=True, dtype=torch.float32)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        # [prior, low, high]: the logit is kept within prior + [low, high]. The importance fit sets it (its
        # `trust` option) so that an input unlike the training data cannot overturn a large gap between
        # layers; (0, -inf, inf), the default, changes nothing.
        self.register_buffer("trust_region", torch.tensor([0.0, -math.inf, math.inf], dtype=torch.float32))

    def set_trust_region(self, prior: float, low: float, high: float) -> None:
        """Keep the per-input part of the logit (logit - prior) within [low, high] (infinite: unbounded)."""
        if not low <= 0.0 <= high:
            raise ValueError(f"a trust region [{low}, {high}] must hold 0 (the prior itself)")
        self.trust_region.copy_(torch.tensor([prior, low, high], dtype=self.trust_region.dtype))

    @property
    def weight(self) -> torch.Tensor:
        return self.proj.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.proj.bias

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled: (B, H) in any dtype -> scores (B,) in float32, also under bf16 autocast."""
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            return torch.sigmoid(bounded_logit(self.proj(pooled.float()).squeeze(-1), *self.trust_region))


def bounded_logit(logit: torch.Tensor, prior, low, high) -> torch.Tensor:
    """The logit with its per-input part (logit - prior) kept within [low, high]. Only parts outside are
    replaced, so a router without a region (low -inf, high inf) scores bit for bit as before."""
    part = logit - prior
    return torch.where((part < low) | (part > high), prior + part.clamp(low, high), logit)


def load_router(router: Router, state: dict[str, torch.Tensor], prefix: str) -> None:
    """Copy one router's tensors from a routers.safetensors state (keys `prefix.weight`, `.bias`,
    `.trust_region`); a missing bias (older files) loads as 0, a missing trust region as none."""
    with torch.no_grad():
        router.weight.copy_(state[f"{prefix}.weight"].float().view_as(router.weight))
        router.bias.copy_(state.get(f"{prefix}.bias", torch.zeros_like(router.bias)).float())
        region = state.get(f"{prefix}.trust_region", torch.tensor([0.0, -math.inf, math.inf]))
        if region.shape != (3,):
            raise ValueError(f"{prefix}.trust_region has shape {tuple(region.shape)}, not (3,): [prior, low, high]")
        router.set_trust_region(*(float(v) for v in region))


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens of each sequence: x (B, T, H), mask (B, T) of 0/1 -> (B, H) float32.

    Padding never enters the mean, so a sequence's decision does not depend on its batch-mates.
    """
    x = x.float()
    if mask is None:
        return x.mean(dim=1)
    if mask.shape[1] < x.shape[1]:
        # a prompt mask over a longer sequence (uncached generation): later tokens do not count
        mask = torch.nn.functional.pad(mask, (0, x.shape[1] - mask.shape[1]))
    elif mask.shape[1] > x.shape[1]:
        raise ValueError(f"pooling mask covers {mask.shape[1]} tokens but the input has {x.shape[1]}")
    weights = mask.to(device=x.device, dtype=torch.float32).unsqueeze(-1)  # (B, T, 1)
    counts = weights.sum(dim=1).clamp_min(1.0)  # (B, 1)
    return (x * weights).sum(dim=1) / counts


class _StraightThroughStep(torch.autograd.Function):
    """Forward: 1.0 where score >= threshold else 0.0. Backward: identity to the score."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores >= threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def straight_through_gate(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Binary gate whose value is exactly 0 or 1 (executed layers reproduce the base model bit for bit)
    while the router still receives dL/dgate through the sigmoid."""
    return _StraightThroughStep.apply(scores, threshold)

"""Router-Tuning: train only the routers of a frozen model.

Objective (METHOD.md §4): language-model cross-entropy on response tokens + lambda * ReLU(capacity - target),
with the straight-through binary gate; decisions are pooled over the prompt, as in generation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import IGNORE_INDEX
from .model import RoutedModel

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    target_capacity: float = field(default=0.5, metadata={"help": "fraction of routed sublayers to run, in [0, 1]"})
    capacity_weight: float = field(default=0.1, metadata={"help": "lambda of the capacity hinge"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate for the routers"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps with linear warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.target_capacity <= 1.0:
            problems.append(f"target_capacity={self.target_capacity} must lie in [0, 1]")
        if self.capacity_weight < 0:
            problems.append(f"capacity_weight={self.capacity_weight} must be >= 0")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate} must be > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"warmup_ratio={self.warmup_ratio} must lie in [0, 1)")
        if problems:
            raise ValueError("Invalid TrainConfig: " + "; ".join(problems))


@dataclass
class EvalResult:
    loss: float  # mean response-token cross-entropy
    capacity: float  # executed fraction of routed sublayers
    skip_rate: dict[int, float]  # per routed layer


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    before: EvalResult | None = None
    after: EvalResult | None = None
    dense: EvalResult | None = None


def response_loss(routed: RoutedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over labelled (response) tokens and their count.

    Logits are computed only at positions whose next token is labelled: with a 49k vocabulary the LM head
    over every position would cost more than the routed layers themselves.
    """
    targets = batch["labels"][:, 1:]  # (B, T-1): the token at t+1 is predicted at position t
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # (K,) positions read by the loss
    out = routed(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        routing_mask=batch.get("prompt_mask"),
        use_cache=False,
        logits_to_keep=keep,
    )
    chosen = targets[:, keep]  # (B, K)
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), chosen.flatten(), ignore_index=IGNORE_INDEX)
    return loss, int((chosen != IGNORE_INDEX).sum())


def routed_loss(routed: RoutedModel, batch: dict[str, torch.Tensor], cfg: TrainConfig):
    """(total loss, lm loss, capacity) for one batch, with the straight-through gates."""
    with routed.recording() as calls:
        lm_loss, _ = response_loss(routed, batch)
    capacity = calls[-1].capacity()
    total = lm_loss + cfg.capacity_weight * torch.relu(capacity - cfg.target_capacity)
    return total, lm_loss, capacity


@torch.no_grad()
def evaluate_loss(routed: RoutedModel, batches: Iterable[dict[str, torch.Tensor]], dense: bool = False) -> EvalResult:
    """Token-weighted response cross-entropy and executed fraction on held-out batches (inference routing)."""
    was_training = routed.training
    routed.eval()
    total_loss = total_tokens = 0.0
    runs: dict[int, list[torch.Tensor]] = {}
    try:
        for batch in batches:
            with routed.recording() as calls:
                with routed.forced("run") if dense else contextlib.nullcontext():
                    loss, tokens = response_loss(routed, batch)
            total_loss += float(loss) * tokens
            total_tokens += tokens
            for layer, decision in calls[-1].decisions.items():
                runs.setdefault(layer, []).append(decision.float())
    finally:
        routed.train(was_training)
    per_layer = {layer: float(torch.cat(v).mean()) for layer, v in runs.items()}
    capacity = sum(per_layer.values()) / max(len(per_layer), 1)
    return EvalResult(
        loss=total_loss / max(total_tokens, 1),
        capacity=capacity,
        skip_rate={layer: 1.0 - rate for layer, rate in per_layer.items()},
    )


def cosine_with_warmup(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_routers(
    routed: RoutedModel,
    batches: list[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    heldout: list[dict[str, torch.Tensor]] | None = None,
    progress: bool = True,
) -> TrainResult:
    """One pass over `batches` (each a collated dict); returns metrics before/after on `heldout`."""
    if not batches:
        raise ValueError("no training batches: the dataset is empty")
    torch.manual_seed(cfg.seed)
    result = TrainResult(steps=0, seconds=0.0)
    if heldout:
        result.dense = evaluate_loss(routed, heldout, dense=True)
        result.before = evaluate_loss(routed, heldout)
    params = routed.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = cosine_with_warmup(optimizer, len(batches), cfg.warmup_ratio)
    routed.train()
    start = time.perf_counter()
    bar = tqdm(batches, desc="router-tuning", disable=not progress, unit="step")
    for step, batch in enumerate(bar, start=1):
        loss, lm_loss, capacity = routed_loss(routed, batch, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        record = {"step": step, "loss": loss.item(), "lm_loss": lm_loss.item(), "capacity": capacity.item()}
        result.history.append(record)
        bar.set_postfix(lm=f"{record['lm_loss']:.3f}", cap=f"{record['capacity']:.2f}")
    routed.eval()
    result.steps = len(batches)
    result.seconds = time.perf_counter() - start
    if heldout:
        result.after = evaluate_loss(routed, heldout)
    return result

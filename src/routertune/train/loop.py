"""Router-Tuning: train only the routers of a frozen model.

Objectives (docs/method.md#objectives):
- "lm": cross-entropy on response tokens + lambda * ReLU(capacity - target);
- "distill": KL(dense model || routed model) on the same positions + the same capacity hinge. It needs no
  labels: the teacher is the base model itself (routers forced to run).
Gates are straight-through binary; decisions are pooled over the prompt, as in generation.

The loop: AdamW, cosine schedule with warm-up, gradient accumulation, clipping, fp32 or bf16 autocast,
held-out metrics every k steps, atomic checkpoints every k steps and exact resume, and data parallelism under
`accelerate launch`. Every optimiser step sees one *global batch* split into fixed micro-batches; each
micro-batch's loss is normalised by global counts, so one process with accumulation and N processes without
compute the same update.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from routertune.files import atomic_write
from routertune.model import RoutedModel
from routertune.train.data import IGNORE_INDEX, Example, collate, length_batches

log = logging.getLogger(__name__)
OBJECTIVES = ("importance", "lm", "distill")
PRECISIONS = ("fp32", "bf16")
CHECKPOINTS = "checkpoints"
PRIORS = ("importance", "searched")  # the order of the importance fit's prior: mean 1 - cos, or a searched order


def trust_bounds(cfg: TrainConfig, unit: str) -> tuple[float, float]:
    """(down, up) of the importance fit's trust region for routers of `unit`, with trust_up's default
    resolved: 0 for sequence routers, unbounded for token routers."""
    up = cfg.trust_up if cfg.trust_up is not None else (0.0 if unit == "sequence" else math.inf)
    return cfg.trust_down, up


@dataclass
class TrainConfig:
    objective: str = field(
        default="importance",
        metadata={
            "help": "importance (routers fitted to each input's attention importance, on top of static drop's order; no gradient descent), lm (response cross-entropy, the paper's) or distill (KL to the dense model)"
        },
    )
    target_capacity: float = field(default=0.75, metadata={"help": "fraction of routed sublayers to run, in [0, 1]"})
    shrink: float | None = field(
        default=None,
        metadata={
            "help": "importance objective: scale of the per-input part of each router around the training mean (1: the full ridge fit, 0: the static prior alone). Default: 1 with the searched prior (closer to dense than 0.5 on a mixed stream at 20%%: docs/evaluation.md#shrink-on-the-searched-prior), 0.5 with the importance prior (where 1 lost on code at 30%%)"
        },
    )
    importance_target: str = field(
        default="absolute",
        metadata={
            "help": "importance objective: what each router predicts per input: absolute (log importance) or relative (log importance minus the input's mean over the routed layers: layers reordered per input, about the same number skipped for every input)"
        },
    )
    prior: str | None = field(
        default=None,
        metadata={
            "help": "importance objective: the order in which the routers' prior (what they do for an average input) skips layers (default: searched for sequence routers, importance for token routers, where it was not measured): searched (the static order searched on KL to the dense model over the tuning data: --static-order FILE, the search shipped for the default model, or searched on first use and cached; the default: never measurably further from dense than the best static order at 10-30%% skip, and closer than the previous default below about 23%%, docs/evaluation.md#routers-on-the-searched-order) or importance (lowest mean 1 - cos first, the previous default; better above about 25%% skip on mixed traffic)"
        },
    )
    trust_down: float = field(
        default=math.inf,
        metadata={
            "help": "importance objective: how far below its prior (the logit at the training mean input) an input may push a router's logit, in standard deviations of the per-input part over the training records (inf: unbounded)"
        },
    )
    trust_up: float | None = field(
        default=None,
        metadata={
            "help": "importance objective: how far above its prior an input may push a router's logit, in the same units. Default: 0 for sequence routers (an input can make a layer skip sooner than the prior would, never keep it longer; on code, far from the tuning mix, the upward moves are what lost to static drop: README, the trade-off), unbounded for token routers (not measured there)"
        },
    )
    capacity_weight: float = field(
        default=0.1, metadata={"help": "lambda of the capacity hinge ReLU(capacity - target)"}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate for the routers"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps with linear warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    batch_size: int = field(default=8, metadata={"help": "global batch: sequences per optimiser step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per process per step (global batch is split)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimiser steps"})
    eval_every: int = field(
        default=0, metadata={"help": "held-out loss and capacity every k steps (0 = start and end only)"}
    )
    checkpoint_every: int = field(default=0, metadata={"help": "atomic checkpoint every k steps (0 = none)"})
    precision: str = field(default="fp32", metadata={"help": "fp32 or bf16 (autocast; routers stay fp32)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order"})
    calibrate: bool = field(
        default=True,
        metadata={
            "help": "after training, set the threshold so the routers run exactly the target capacity on the training prompts"
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"objective={self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.shrink is not None and not 0.0 <= self.shrink <= 1.0:
            problems.append(f"shrink={self.shrink} must lie in [0, 1]")
        for name, default in (("trust_down", math.inf), ("trust_up", None)):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                problems.append(f"{name}={value} must be >= 0 standard deviations (inf: unbounded)")
            elif value != default and self.objective != "importance":
                problems.append(
                    f"{name} bounds the importance fit's per-input part; objective "
                    f"{self.objective!r} has no prior to bound it around (use --objective importance)"
                )
        if self.prior is not None and self.prior not in PRIORS:
            problems.append(f"prior={self.prior!r} is not one of {', '.join(PRIORS)}")
        elif self.prior is not None and self.objective != "importance":
            problems.append(
                f"prior={self.prior!r} orders the importance fit's prior; objective {self.objective!r} has none "
                "(use --objective importance)"
            )
        if self.importance_target not in ("absolute", "relative"):
            problems.append(f"importance_target={self.importance_target!r} is not one of absolute, relative")
        if not 0.0 <= self.target_capacity <= 1.0:
            problems.append(f"target_capacity={self.target_capacity} must lie in [0, 1]")
        if self.capacity_weight < 0:
            problems.append(f"capacity_weight={self.capacity_weight} must be >= 0")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate} must be > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"warmup_ratio={self.warmup_ratio} must lie in [0, 1)")
        for name in ("batch_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps={self.max_steps} must be >= 1")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if problems:
            raise ValueError("Invalid TrainConfig: " + "; ".join(problems))


@dataclass
class EvalResult:
    loss: float  # mean response-token cross-entropy
    perplexity: float
    capacity: float  # executed fraction of routed sublayers
    skip_rate: dict[int, float]  # per routed layer


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    before: EvalResult | None = None
    after: EvalResult | None = None
    dense: EvalResult | None = None
    resumed_from: int | None = None
    uncalibrated: EvalResult | None = None  # held-out metrics at threshold 0.5, before calibration
    threshold: float = 0.5
    fit: dict | None = None  # the importance objective's choices (routertune.train.importance.ImportanceFit)


# --- losses -------------------------------------------------------------------------------------------------
def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _kept_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose logits the loss reads and their targets. With a 49k vocabulary the LM head over every
    position would cost more than the routed layers themselves."""
    targets = batch["labels"][:, 1:]  # (B, T-1): the token at t+1 is predicted at position t
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # (K,)
    return keep, targets[:, keep]  # (K,), (B, K)


def _logits(model, batch, keep) -> torch.Tensor:
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        routing_mask=batch.get("prompt_mask"),
        use_cache=False,
        logits_to_keep=keep,
    ).logits.float()  # (B, K, V)


def micro_batch_loss(model, routed: RoutedModel, batch, cfg: TrainConfig, total_tokens: int, total_seqs: int):
    """Loss of one micro-batch, normalised by the global batch's counts so micro-batch losses add up to the
    global objective. Returns (loss, summed task loss, summed gates, gate count)."""
    keep, chosen = _kept_positions(batch)
    labelled = chosen != IGNORE_INDEX  # (B, K)
    with _autocast(cfg, routed.device):
        if cfg.objective == "distill":
            with torch.no_grad(), routed.forced("run"):
                teacher = F.log_softmax(_logits(model, batch, keep), dim=-1)
        with routed.recording() as calls:
            logits = _logits(model, batch, keep)
    if cfg.objective == "distill":
        per_token = F.kl_div(F.log_softmax(logits, -1), teacher, log_target=True, reduction="none").sum(-1)
        task_sum = (per_token * labelled).sum()
    else:
        task_sum = F.cross_entropy(logits.flatten(0, 1), chosen.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    gates = torch.stack(list(calls[-1].gates.values()))  # (layers, B)
    capacity = gates.mean()
    hinge = torch.relu(capacity - cfg.target_capacity) * (batch["input_ids"].shape[0] / total_seqs)
    loss = task_sum / max(total_tokens, 1) + cfg.capacity_weight * hinge
    return loss, task_sum.detach(), gates.detach().sum(), gates.numel()


# --- evaluation --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_loss(routed: RoutedModel, batches: Sequence[dict[str, torch.Tensor]], dense: bool = False) -> EvalResult:
    """Token-weighted response cross-entropy and executed fraction on held-out batches (inference routing)."""
    was_training = routed.training
    routed.eval()
    total_loss = total_tokens = 0.0
    runs: dict[int, list[torch.Tensor]] = {}
    try:
        for batch in batches:
            keep, chosen = _kept_positions(batch)
            with routed.recording() as calls, routed.forced("run") if dense else contextlib.nullcontext():
                logits = _logits(routed, batch, keep)
            total_loss += float(
                F.cross_entropy(logits.flatten(0, 1), chosen.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            )
            total_tokens += int((chosen != IGNORE_INDEX).sum())
            for layer, decision in calls[-1].decisions.items():
                runs.setdefault(layer, []).append(decision.float())
    finally:
        routed.train(was_training)
    per_layer = {layer: float(torch.cat(v).mean()) for layer, v in runs.items()}
    loss = total_loss / max(total_tokens, 1)
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        capacity=sum(per_layer.values()) / max(len(per_layer), 1),
        skip_rate={layer: 1.0 - rate for layer, rate in per_layer.items()},
    )


# --- schedule and plan -------------------------------------------------------------------------------------------
def cosine_with_warmup(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_plan(examples: Sequence[Example], cfg: TrainConfig, parts: int) -> list[list[list[Example]]]:
    """Optimiser steps, each a list of `parts` micro-batches (one global batch split round-robin).
    Deterministic from the seed, the same on every process."""
    steps = []
    for epoch in range(cfg.epochs):
        for batch in length_batches(examples, cfg.batch_size, cfg.seed + epoch):
            if len(batch) < parts:
                continue  # too small to give every micro-batch a sequence; dropped on every process alike
            steps.append([batch[i::parts] for i in range(parts)])
    return steps[: cfg.max_steps] if cfg.max_steps else steps


# --- checkpoints ---------------------------------------------------------------------------------------------------
def save_checkpoint(directory: Path, routed: RoutedModel, optimizer, scheduler, state: dict) -> Path:
    """Write checkpoints/step-N atomically (a temporary folder renamed into place), then point `latest` at it."""
    root = directory / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:06d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    routed.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, default=str))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(root / "latest", lambda p: Path(p).write_text(name))
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / CHECKPOINTS / "latest"
    if not pointer.is_file():
        return None
    path = directory / CHECKPOINTS / pointer.read_text().strip()
    return path if path.is_dir() else None


def _load_checkpoint(path: Path, routed: RoutedModel, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    routed.load_router_state_dict(load_file(str(path / "routers.safetensors")), str(path))
    states = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    return json.loads((path / "trainer_state.json").read_text())


# --- the loop ------------------------------------------------------------------------------------------------------
def train_routers(
    routed: RoutedModel,
    examples: Sequence[Example],
    cfg: TrainConfig,
    pad_token_id: int,
    heldout: Sequence[dict[str, torch.Tensor]] | None = None,
    output: str | os.PathLike | None = None,
    resume: bool = False,
    accelerator=None,
    progress: bool = True,
) -> TrainResult:
    """Train the routers of `routed` on tokenized `examples`; checkpoints go to `output`/checkpoints."""
    if not examples:
        raise ValueError("no training examples: the dataset is empty")
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    is_main = rank == 0
    plan = step_plan(examples, cfg, world * cfg.grad_accum)
    if not plan:
        raise ValueError(
            f"no optimiser step fits: {len(examples)} examples, global batch {cfg.batch_size}, "
            f"{world * cfg.grad_accum} micro-batches per step; lower --grad-accum or raise --batch-size"
        )
    torch.manual_seed(cfg.seed)
    params = routed.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = cosine_with_warmup(optimizer, len(plan), cfg.warmup_ratio)
    result = TrainResult(steps=0, seconds=0.0)
    start_step = 0
    output = Path(output) if output is not None else None
    if resume:
        checkpoint = latest_checkpoint(output) if output is not None else None
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {output}/{CHECKPOINTS}; start without --resume")
        state = _load_checkpoint(checkpoint, routed, optimizer, scheduler)
        if state.get("config") != _jsonable(asdict(cfg)):
            raise ValueError(f"--resume: {checkpoint} was written with other training settings: {state.get('config')}")
        start_step, result.history, result.evals = state["step"], state["history"], state["evals"]
        result.dense, result.before = _eval_from_json(state.get("dense")), _eval_from_json(state.get("before"))
        result.resumed_from = start_step
        log.info("resuming from %s (step %d of %d)", checkpoint, start_step, len(plan))

    model = routed
    if accelerator is not None:
        model, optimizer = accelerator.prepare(routed, optimizer)
    if heldout and start_step == 0:
        result.dense = evaluate_loss(routed, heldout, dense=True)
        result.before = evaluate_loss(routed, heldout)
    routed.train()
    began = time.perf_counter()
    bar = tqdm(
        total=len(plan), initial=start_step, desc="router-tuning", unit="step", disable=not (progress and is_main)
    )
    for step in range(start_step + 1, len(plan) + 1):
        micro = plan[step - 1]
        mine = micro[rank * cfg.grad_accum : (rank + 1) * cfg.grad_accum]
        total_tokens = sum(_labelled_tokens(example) for part in micro for example in part)
        total_seqs = sum(len(part) for part in micro)
        task_sum = gate_sum = 0.0
        gate_count = 0
        for i, part in enumerate(mine):
            batch = collate(part, pad_token_id)
            sync = i == len(mine) - 1
            with contextlib.nullcontext() if sync or accelerator is None else accelerator.no_sync(model):
                loss, t, g, n = micro_batch_loss(model, routed, batch, cfg, total_tokens, total_seqs)
                # DDP averages gradients over processes, but the losses are already shares of the global sum
                if accelerator is None:
                    loss.backward()
                else:
                    accelerator.backward(loss * world)
            task_sum, gate_sum, gate_count = task_sum + float(t), gate_sum + float(g), gate_count + n
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {
            "step": step,
            "task_loss": task_sum / max(total_tokens, 1) * world,
            "capacity": gate_sum / max(gate_count, 1),
            "lr": scheduler.get_last_lr()[0],
        }
        result.history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['task_loss']:.3f}", cap=f"{record['capacity']:.2f}")
        if heldout and cfg.eval_every and step % cfg.eval_every == 0 and step < len(plan):
            ev = evaluate_loss(routed, heldout)
            result.evals.append({"step": step, **asdict(ev)})
            if is_main:
                log.info(
                    "step %d: held-out loss %.4f capacity %.3f skip rates %s",
                    step,
                    ev.loss,
                    ev.capacity,
                    {k: round(v, 2) for k, v in ev.skip_rate.items()},
                )
        if output is not None and is_main and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(
                output,
                routed,
                optimizer,
                scheduler,
                {
                    "step": step,
                    "history": result.history,
                    "evals": result.evals,
                    "config": _jsonable(asdict(cfg)),
                    "dense": result.dense and asdict(result.dense),
                    "before": result.before and asdict(result.before),
                },
            )
    bar.close()
    routed.eval()
    result.steps = len(plan)
    result.seconds = time.perf_counter() - began
    if heldout:
        result.after = evaluate_loss(routed, heldout)
        result.evals.append({"step": len(plan), **asdict(result.after)})
    return result


def _labelled_tokens(example: Example) -> int:
    """Targets the loss reads: labelled tokens after the first position (position t predicts t+1)."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


def _eval_from_json(data: dict | None) -> EvalResult | None:
    if data is None:
        return None
    return EvalResult(**{**data, "skip_rate": {int(k): v for k, v in data["skip_rate"].items()}})


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))

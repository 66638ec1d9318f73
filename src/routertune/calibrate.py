"""Capacity calibration: set the decision threshold (one global threshold, or one per routed layer) so that a
routed model runs a requested fraction of its routed sublayers on calibration prompts, without retraining.
This is the deployment dial between speed and quality; the thresholds are stored in router_config.json.

Decisions are taken on the prompt (prefill), so calibration only runs prompts. A layer's router sees the
hidden states left by the layers before it, so its scores move when an earlier layer's threshold moves;
calibration therefore iterates: run the prompts under the current thresholds, record every routed layer's
scores, set each threshold to the quantile of those scores that gives the target, and repeat until the
realised capacity is within `tolerance` of the target (usually 2-4 passes). The thresholds with the
realised capacity closest to the target are kept.

Tied scores (a trust region piles a layer's scores onto its bound) run whole or not at all, so some targets
cannot be met: each threshold then takes the reachable share nearest its target (nearest_share_cut), and
`routertune calibrate` refuses to save a result further than --tolerance from the target unless the user
accepts it with --accept-off-target.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from routertune.train.prompts import chat_prompts

from .model import WEIGHTS_NAME, RoutedModel

log = logging.getLogger(__name__)

# thresholds must lie strictly inside (0, 1); scores are float32 sigmoids
_EPS = 1e-6


@dataclass
class CalibrationResult:
    target: float  # requested capacity (fraction of routed sublayers that run)
    per_layer: bool
    threshold: float
    layer_thresholds: dict[int, float] | None
    capacity: float  # realised on the calibration prompts
    layer_capacity: dict[int, float]
    history: list[float] = field(default_factory=list)  # realised capacity of each pass
    prompts: int = 0
    seconds: float = 0.0


def check_capacity(capacity: float) -> float:
    if not isinstance(capacity, (int, float)) or not 0.0 <= float(capacity) <= 1.0:
        raise ValueError(
            f"capacity={capacity!r} must lie in [0, 1]: the fraction of routed sublayers that run "
            "(1 = dense, 0.5 = half of them)"
        )
    return float(capacity)


def prompt_batches(
    prompts: Sequence[Sequence[int]], pad_token_id: int, batch_tokens: int = 4096, max_batch: int = 32
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of similar-length prompts (input_ids, attention_mask)."""
    if not prompts:
        raise ValueError("no calibration prompts")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches, current = [], []
    for i in order:
        if current and (len(prompts[current[0]]) * (len(current) + 1) > batch_tokens or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    out = []
    for batch in batches:
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(prompts[i])] = torch.tensor(list(prompts[i]), dtype=torch.long)
            mask[row, : len(prompts[i])] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@torch.inference_mode()
def prompt_scores(routed: RoutedModel, batches) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Router scores and decisions of every routed layer on every prompt (prefill only), as (N,) tensors."""
    scores: dict[int, list[torch.Tensor]] = {}
    decisions: dict[int, list[torch.Tensor]] = {}
    for batch in batches:
        device = routed.device
        with routed.recording() as calls:
            routed(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
                logits_to_keep=1,
            )
        call = calls[-1]
        for layer in routed.routed_layers:
            if layer in call.scores:
                scores.setdefault(layer, []).append(call.scores[layer].float().cpu())
            decisions.setdefault(layer, []).append(call.decisions[layer].cpu())
    return ({k: torch.cat(v) for k, v in scores.items()}, {k: torch.cat(v) for k, v in decisions.items()})


def measure_capacity(routed: RoutedModel, batches) -> tuple[float, dict[int, float]]:
    """Realised capacity (mean executed fraction over routed layers and prompts) and per layer."""
    _, decisions = prompt_scores(routed, batches)
    per_layer = {layer: float(d.float().mean()) for layer, d in decisions.items()}
    return sum(per_layer.values()) / len(per_layer), per_layer


def nearest_share_cut(values: torch.Tensor, target: float) -> tuple[float | None, float | None, float]:
    """The cut through `values` whose share of values at or above it is nearest `target`, among the shares a
    threshold can give: a pile of equal values (a trust-region bound piles up a layer's scores) runs whole
    or not at all, so the share jumps over it; the nearer side is taken (the larger share on an exact tie).

    Returns (the lowest value that runs or None when none does, the highest value that does not or None when
    all run, the share). One rule for calibration, the trade-off sweep and the importance fit's offset."""
    flat = values.detach().double().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("no scores to place a threshold among")
    distinct, counts = torch.unique_consecutive(flat.sort(descending=True).values, return_counts=True)
    shares = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(counts, 0).double() / n])  # j run
    errors = (shares - float(target)).abs()
    j = int(torch.nonzero(errors == errors.min()).max())  # the most distinct values run on a tie
    runs_low = float(distinct[j - 1]) if j > 0 else None
    skips_high = float(distinct[j]) if j < distinct.numel() else None
    return runs_low, skips_high, float(shares[j])


def quantile_threshold(scores: torch.Tensor, capacity: float) -> float:
    """A threshold t in (0, 1) with mean(scores >= t) as close to `capacity` as the scores allow (see
    nearest_share_cut: piles of tied scores run whole or not at all), halfway between the lowest score that
    runs and the highest that does not, so no score sits on it."""
    runs_low, skips_high, _ = nearest_share_cut(scores, capacity)
    if runs_low is None:  # none runs
        t = (skips_high + 1.0) / 2
    elif skips_high is None:  # every score runs
        t = runs_low * 0.5 if runs_low > 2 * _EPS else _EPS
    else:
        t = (runs_low + skips_high) / 2
    return min(max(t, _EPS), 1 - _EPS)


def _decided_capacity(capacity: float, scores: torch.Tensor, decisions: torch.Tensor) -> float:
    """The share of the router-decided units that must run for `capacity` of all units to run, where the units
    without a score (token routing's always-run sink tokens) run anyway."""
    forced = 1.0 - scores.numel() / max(decisions.numel(), 1)
    if not 0.0 < forced < 1.0:
        return capacity
    return min(max((capacity - forced) / (1.0 - forced), 0.0), 1.0)


def next_threshold(points: list[tuple[float, float]], capacity: float, quantile_t: float) -> float:
    """The next global threshold, from the (threshold, capacity) pairs of the passes so far.

    The quantile step assumes the scores stay put, but a new threshold changes which layers run and so the
    hidden states, and scores, of every later layer: iterating it converges slowly (6-8 passes from the
    trained threshold to within 0.002). Capacity falls as the threshold rises, so once two passes are known
    the line through the two closest to the target (interpolating between a pass above and one below the
    target when there are both) accounts for that response and needs 3-4 passes. Where the points cannot
    guide (a flat or rising line, or a threshold outside (0, 1)), the quantile step is kept."""
    if len(points) < 2:
        return quantile_t
    above = [p for p in points if p[1] > capacity]
    below = [p for p in points if p[1] < capacity]
    if above and below:
        a, b = max(above, key=lambda p: p[0]), min(below, key=lambda p: p[0])
    else:
        a, b = points[-2], points[-1]
    if a[0] == b[0] or (b[1] - a[1]) / (b[0] - a[0]) >= 0:
        return quantile_t
    t = a[0] + (capacity - a[1]) * (b[0] - a[0]) / (b[1] - a[1])
    if above and below and not min(a[0], b[0]) < t < max(a[0], b[0]):
        t = (a[0] + b[0]) / 2
    return t if _EPS <= t <= 1 - _EPS else quantile_t


def calibrate(
    routed: RoutedModel,
    batches,
    capacity: float,
    per_layer: bool = False,
    max_passes: int = 8,
    tolerance: float = 0.002,
    progress: bool = False,
) -> CalibrationResult:
    """Set `routed`'s thresholds in place so it runs `capacity` of its routed sublayers on `batches`."""
    from tqdm.auto import tqdm

    capacity = check_capacity(capacity)
    started = time.perf_counter()
    if getattr(routed.router_config, "token_top_k", None) is not None:
        return _set_top_k(routed, batches, capacity, per_layer, started)
    history: list[float] = []
    best: tuple[float, float, dict | None, dict] | None = None  # (error, threshold, layer thresholds, per layer)
    prompts = sum(int(b["input_ids"].shape[0]) for b in batches)
    points: list[tuple[float, float]] = []  # (global threshold, capacity it gave)
    bar = tqdm(total=max_passes, desc="calibration passes", unit="pass", disable=not progress)
    for step in range(max_passes):
        scores, decisions = prompt_scores(routed, batches)
        bar.update()
        if not scores:
            raise ValueError("the routers produced no scores (are decisions forced?)")
        layer_cap = {layer: float(d.float().mean()) for layer, d in decisions.items()}
        realised = sum(layer_cap.values()) / len(layer_cap)
        history.append(realised)
        bar.set_postfix(capacity=f"{realised:.3f}", target=f"{capacity:.3f}")
        config = routed.router_config
        current = (config.threshold, dict(config.layer_thresholds) if config.layer_thresholds else None)
        error = abs(realised - capacity)
        if best is None or error < best[0]:
            best = (error, current[0], current[1], layer_cap)
        log.info("calibration pass %d: capacity %.4f (target %.4f)", step + 1, realised, capacity)
        if error <= tolerance:
            break
        if per_layer:
            new = {
                layer: quantile_threshold(s, _decided_capacity(capacity, s, decisions[layer]))
                for layer, s in scores.items()
            }
            if current[1] == new:
                break
            routed.set_threshold(config.threshold, new)
        else:
            if current[1] is None:  # a pass under per-layer thresholds says nothing about a global one
                points.append((current[0], realised))
            pooled = torch.cat(list(scores.values()))
            decided = _decided_capacity(capacity, pooled, torch.cat(list(decisions.values())))
            new_t = next_threshold(points, capacity, quantile_threshold(pooled, decided))
            if current[0] == new_t and current[1] is None:
                break
            routed.set_threshold(new_t, None)
    bar.close()
    _, threshold, layer_thresholds, layer_cap = best
    routed.set_threshold(threshold, layer_thresholds)
    realised = sum(layer_cap.values()) / len(layer_cap)
    return CalibrationResult(
        target=capacity,
        per_layer=per_layer,
        threshold=threshold,
        layer_thresholds=layer_thresholds,
        capacity=realised,
        layer_capacity=layer_cap,
        history=history,
        prompts=prompts,
        seconds=time.perf_counter() - started,
    )


def _set_top_k(routed: RoutedModel, batches, capacity: float, per_layer: bool, started: float) -> CalibrationResult:
    """Token routers in top-k mode run a set fraction of each prompt's tokens and ignore thresholds: the dial is
    that fraction itself (realised capacity sits slightly above it, as each row rounds its count up)."""
    if capacity <= 0:
        raise ValueError(
            "capacity=0 cannot be reached in top-k mode (every prompt runs at least one token); "
            "use threshold mode (token_top_k=None) or force skipping"
        )
    routed.router_config.token_top_k = capacity
    realised, layer_cap = measure_capacity(routed, batches)
    config = routed.router_config
    return CalibrationResult(
        target=capacity,
        per_layer=per_layer,
        threshold=config.threshold,
        layer_thresholds=config.layer_thresholds,
        capacity=realised,
        layer_capacity=layer_cap,
        history=[realised],
        prompts=sum(int(b["input_ids"].shape[0]) for b in batches),
        seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------------------
# the `routertune calibrate` job


@dataclass
class CalibrateJob:
    """What `routertune calibrate` does; every field is a CLI flag."""

    routers: str = field(
        default="", metadata={"help": "folder written by `routertune train` (router_config.json + routers.safetensors)"}
    )
    capacity: float = field(
        default=0.5, metadata={"help": "fraction of routed sublayers to run, in [0, 1] (1 = dense)"}
    )
    per_layer: bool = field(
        default=False,
        metadata={
            "help": "one threshold per routed layer (each runs `capacity` of prompts) instead of one global threshold"
        },
    )
    output: str | None = field(
        default=None, metadata={"help": "folder for the calibrated routers (default: update --routers in place)"}
    )
    model: str | None = field(default=None, metadata={"help": "base model (default: embedded SmolLM2-135M-Instruct)"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache folder of the converted default model"})
    data: str | None = field(
        default=None,
        metadata={
            "help": "JSONL of calibration records (chat / Alpaca / text); default: prompts of the offline mix's train split"
        },
    )
    samples: int = field(default=64, metadata={"help": "calibration prompts"})
    heldout_samples: int = field(
        default=64, metadata={"help": "held-out prompts the realised capacity is reported on (0 = skip)"}
    )
    max_prompt_tokens: int = field(default=256, metadata={"help": "longer prompts keep their last tokens"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per forward"})
    tolerance: float = field(
        default=0.01,
        metadata={
            "help": "largest |realised - target| capacity on the calibration prompts that is saved; further off is refused (per-layer thresholds move in steps of 1/--samples of a layer)"
        },
    )
    accept_off_target: bool = field(
        default=False,
        metadata={
            "help": "save the thresholds nearest the target even when they miss it by more than --tolerance (tied scores, e.g. piled on a trust-region bound, move whole)"
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.tolerance, (int, float)) or not 0.0 <= float(self.tolerance) < 1.0:
            problems.append(f"tolerance={self.tolerance!r} must lie in [0, 1): a capacity difference")
        if not self.routers:
            problems.append("routers is required: pass --routers FOLDER (written by `routertune train`)")
        try:
            check_capacity(self.capacity)
        except ValueError as error:
            problems.append(str(error))
        for name in ("samples", "max_prompt_tokens", "batch_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.heldout_samples < 0:
            problems.append(f"heldout_samples={self.heldout_samples} must be >= 0")
        if problems:
            raise ValueError("Invalid calibration job: " + "; ".join(problems))


@dataclass
class CalibrateReport:
    output: str
    result: CalibrationResult
    heldout_capacity: float | None
    heldout_layer_capacity: dict[int, float] | None
    heldout_prompts: int


def _piles(routed: RoutedModel, batches, share: float = 0.05) -> str:
    """Where the scores pile up (the usual reason a target is out of reach), for the error message: the routed
    layers under the kept thresholds whose most common score holds at least `share` of the prompts."""
    scores, _ = prompt_scores(routed, batches)
    piled = {}
    for layer, s in scores.items():
        _, counts = torch.unique(s, return_counts=True)
        if s.numel() and int(counts.max()) / s.numel() >= share:
            piled[layer] = int(counts.max()) / s.numel()
    if not piled:
        return "no layer's scores pile up: too few prompts for this target"
    worst = max(piled, key=piled.get)
    return (
        f"in {len(piled)} of {len(scores)} routed layers tied scores pile up, which run whole or not at all; "
        f"the largest pile: {piled[worst]:.0%} of the prompts at layer {worst}"
    )


def calibration_prompts(tokenizer, job_data: str | None, split: str, n: int, max_tokens: int) -> list[list[int]]:
    """Prompt token ids for calibration ("train") or the held-out check ("heldout")."""
    from routertune.train import data

    if job_data is None:
        return chat_prompts(tokenizer, split=split, n=n, max_tokens=max_tokens)
    # a user file: the second half is held out, calibration reads the first half
    records = data.load_records(job_data)
    half = (len(records) + 1) // 2
    chosen = records[half:] if split == "heldout" else records[:half]
    return chat_prompts(tokenizer, n=n, max_tokens=max_tokens, records=chosen)


def calibrate_job(job: CalibrateJob) -> CalibrateReport:
    """Load a model and its routers, calibrate the thresholds, save the router config."""
    from routertune.base_model import load_model_and_tokenizer

    from .config import RouterConfig

    RouterConfig.load(job.routers)  # a wrong folder fails before the model loads
    model, tokenizer = load_model_and_tokenizer(job.model, cache_dir=job.cache_dir)
    routed = RoutedModel.from_pretrained(model, job.routers)
    pad = tokenizer.pad_token_id
    batches = prompt_batches(
        calibration_prompts(tokenizer, job.data, "train", job.samples, job.max_prompt_tokens), pad, job.batch_tokens
    )
    result = calibrate(routed, batches, job.capacity, per_layer=job.per_layer, progress=True)
    off = abs(result.capacity - result.target)
    if off > job.tolerance:
        message = (
            f"capacity {job.capacity:g} is not reachable within --tolerance {job.tolerance:g} on these "
            f"{result.prompts} calibration prompts: the nearest thresholds give realised "
            f"{result.capacity:.4f} ({_piles(routed, batches)})"
        )
        if not job.accept_off_target:
            raise ValueError(
                message + ". Nothing was saved. Save them anyway with --accept-off-target, or ask for a capacity "
                "the scores allow"
                + ("" if not job.per_layer else ", or use one global threshold (drop --per-layer)")
                + ", or calibrate on more prompts (--samples)"
            )
        log.warning("%s; saved anyway (--accept-off-target)", message)
    heldout_cap, heldout_layers, n_heldout = None, None, 0
    if job.heldout_samples:
        prompts = calibration_prompts(tokenizer, job.data, "heldout", job.heldout_samples, job.max_prompt_tokens)
        if prompts:
            heldout_cap, heldout_layers = measure_capacity(routed, prompt_batches(prompts, pad, job.batch_tokens))
            n_heldout = len(prompts)
    output = Path(job.output) if job.output else Path(job.routers)
    if output.resolve() != Path(job.routers).resolve() and (output / WEIGHTS_NAME).exists():
        raise FileExistsError(f"{output} already holds routers; choose another --output")
    routed.save_pretrained(output)
    return CalibrateReport(
        output=str(output),
        result=result,
        heldout_capacity=heldout_cap,
        heldout_layer_capacity=heldout_layers,
        heldout_prompts=n_heldout,
    )

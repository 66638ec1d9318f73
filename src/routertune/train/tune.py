"""`routertune train` end to end on a named model: load it, tune routers (the importance fit or the gradient
loop, then calibration to the target capacity), save them with their metrics.

Library functions: they take dataclasses and return dataclasses; only the CLI prints.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from routertune import calibrate
from routertune.base_model import load_model_and_tokenizer
from routertune.config import CONFIG_NAME, RouterConfig
from routertune.files import write_json
from routertune.model import RoutedModel
from routertune.progress import bar as progress_bar
from routertune.routing import static_drop as baselines
from routertune.routing import template
from routertune.train import data, importance, lora
from routertune.train.loop import CHECKPOINTS, TrainConfig, TrainResult, evaluate_loss, train_routers, trust_bounds

log = logging.getLogger(__name__)
METRICS_NAME = "train_metrics.json"


@dataclass
class TuneJob:
    """What `routertune train` does besides the optimisation settings (TrainConfig); every field is a flag."""

    output: str = field(default="runs/routers", metadata={"help": "folder for the routers, checkpoints and metrics"})
    model: str | None = field(
        default=None, metadata={"help": "local HF folder or hub id; default: embedded SmolLM2-135M-Instruct"}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "where the converted default model is cached (default $ROUTERTUNE_CACHE or ~/.cache/routertune)"
        },
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "JSONL file (chat / Alpaca / text), a saved `datasets` folder or a hub dataset; default: the offline mix"
        },
    )
    samples: int = field(default=1000, metadata={"help": "training records used"})
    plain_text: float = field(
        default=0.5,
        metadata={
            "help": "share of the default mix's records rendered as plain text instead of chat (0 = chat only); user data is used as given"
        },
    )
    heldout_samples: int = field(default=64, metadata={"help": "held-out records for loss and capacity"})
    max_length: int = field(
        default=256, metadata={"help": "tokens per sequence; longer records are truncated and counted"}
    )
    granularity: str = field(default="attention", metadata={"help": "attention (MindSkip), mlp or block"})
    layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "routed layer indices (default: every layer but the first and the last for --objective importance, the same candidates as static drop; the paper's rule, the last half before the final layer, for lm and distill)"
        },
    )
    unit: str = field(
        default="sequence",
        metadata={"help": "sequence (one decision per prompt) or token (each token decides at each routed layer)"},
    )
    token_top_k: float | None = field(
        default=None,
        metadata={
            "help": "with --unit token: run this fraction of each prompt's tokens per layer (top-k) instead of a threshold"
        },
    )
    token_sink: int = field(
        default=1,
        metadata={
            "help": "with --unit token: the first N real tokens of each sequence run every routed layer (attention sinks); 0 lets the routers decide for them too"
        },
    )
    pool: str = field(
        default="prompt",
        metadata={
            "help": "what a sequence router's mean reads: prompt (all its tokens, the paper's) or content (without the chat template's fixed head and tail, so that decisions follow what varies; plain text is pooled whole either way)"
        },
    )
    static_order: str | None = field(
        default=None,
        metadata={
            "help": "with --prior searched: a static_order.json (or its folder) searched on this model; default: the search shipped for the default model, else searched on the tuning data on first use and cached under --cache-dir"
        },
    )
    lora_rank: int = field(
        default=0, metadata={"help": "also train LoRA (q_proj, v_proj) of this rank with the routers (0 = off)"}
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    overwrite: bool = field(default=False, metadata={"help": "replace a run already in --output"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output from its latest checkpoint"})

    def __post_init__(self) -> None:
        problems = []
        for name in ("samples", "max_length"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.heldout_samples < 0:
            problems.append(f"heldout_samples={self.heldout_samples} must be >= 0")
        if not 0.0 <= self.plain_text <= 1.0:
            problems.append(f"plain_text={self.plain_text} must lie in [0, 1]")
        if self.lora_rank < 0:
            problems.append(f"lora_rank={self.lora_rank} must be >= 0")
        try:
            RouterConfig(unit=self.unit, token_top_k=self.token_top_k, token_sink=self.token_sink)
        except ValueError as error:
            problems.append(str(error).removeprefix("Invalid RouterConfig: "))
        if self.pool not in ("prompt", "content"):
            problems.append(f"pool={self.pool!r} is not one of prompt, content")
        elif self.pool == "content" and self.unit != "sequence":
            problems.append("--pool content needs --unit sequence: token routers read each token, not a mean")
        if self.overwrite and self.resume:
            problems.append("--overwrite and --resume exclude each other")
        if problems:
            raise ValueError("Invalid training job: " + "; ".join(problems))


def _fixed_template(job: TuneJob, tokenizer) -> list[list[int]] | None:
    """--pool content: the chat template's fixed ends the routers pool without (refused without a template)."""
    if job.pool != "content":
        return None
    fixed = template.fixed_template_ids(tokenizer)
    if not fixed or not (fixed[0] or fixed[1]):
        raise ValueError(
            f"--pool content: {job.model or 'the model'}'s tokenizer has no chat template with fixed tokens to "
            "leave out; train with --pool prompt"
        )
    return fixed


@dataclass
class TuneReport:
    output: str
    samples: int
    truncated: int
    trainable_parameters: int
    result: TrainResult


def tune(job: TuneJob, train_cfg: TrainConfig, progress: bool = True) -> TuneReport:
    """Train routers on a frozen model and save them (router_config.json, routers.safetensors, metrics)."""
    output = Path(job.output)
    if train_cfg.objective == "importance":
        problems = []
        if job.resume:
            problems.append(
                "--resume: the importance fit is one pass with no checkpoints; run it again (with --overwrite)"
            )
        if job.lora_rank:
            problems.append("--lora-rank needs gradient training: use --objective lm or distill")
        if job.granularity != "attention":
            problems.append(
                f"--objective importance fits attention routers; for --granularity {job.granularity} "
                "use --objective lm or distill"
            )
        if problems:
            raise ValueError("; ".join(problems))
    _check_output(output, job)
    accelerator = _accelerator()
    device = accelerator.device if accelerator is not None else _device(job.device)
    records, heldout_records = _records(job)
    model, tokenizer = load_model_and_tokenizer(job.model, cache_dir=job.cache_dir, device=device)
    examples, truncated = data.encode_records(records, tokenizer, job.max_length)
    heldout_examples, _ = data.encode_records(heldout_records, tokenizer, job.max_length)
    order = _prior_order(job, train_cfg, model, tokenizer) if train_cfg.objective == "importance" else None
    pad = tokenizer.pad_token_id
    heldout = [
        _to(data.collate(b, pad), device) for b in data.length_batches(heldout_examples, train_cfg.batch_size, 0)
    ]

    if job.lora_rank:
        lora.add_lora(model, job.lora_rank)
    layers = job.layers
    if layers is None and train_cfg.objective == "importance":
        layers = baselines.droppable_layers(int(model.config.num_hidden_layers))
    routed = RoutedModel(
        model,
        RouterConfig(
            granularity=job.granularity,
            layers=layers,
            unit=job.unit,
            token_top_k=job.token_top_k,
            token_sink=job.token_sink,
            fixed_template=_fixed_template(job, tokenizer),
        ),
    )
    if job.overwrite:
        shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
    if train_cfg.objective == "importance":
        result = _fit_importance(routed, examples, train_cfg, pad, heldout, device, show=progress, order=order)
    else:
        result = train_routers(
            routed,
            examples,
            train_cfg,
            pad,
            heldout=heldout,
            output=output,
            resume=job.resume,
            accelerator=accelerator,
            progress=progress,
        )
        if train_cfg.calibrate:
            _calibrate_to_target(routed, examples, train_cfg.target_capacity, pad, heldout, result)
    report = TuneReport(
        output=str(output),
        samples=len(examples),
        truncated=truncated,
        trainable_parameters=sum(p.numel() for p in routed.trainable_parameters()),
        result=result,
    )
    if accelerator is None or accelerator.is_main_process:
        routed.save_pretrained(output)
        write_json(output / METRICS_NAME, {"job": asdict(job), "train": asdict(train_cfg), **asdict(report)})
    return report


def _prior_order(job: TuneJob, cfg: TrainConfig, model, tokenizer) -> list[int] | None:
    """The searched static order the importance fit's prior follows (--prior searched), or None (mean 1 - cos):
    from --static-order, else the search shipped for the model, else searched on the tuning data and cached,
    far enough for the target capacity (two layers beyond what an average input skips)."""
    # the default follows the evidence: measured for sequence routers; token routers keep 1 - cos (not measured)
    default = "searched" if job.unit == "sequence" else "importance"
    if (cfg.prior or default) != "searched":
        return None
    from routertune.train import static_order

    candidates = job.layers or baselines.droppable_layers(int(model.config.num_hidden_layers))
    count = min(len(candidates), math.ceil((1 - cfg.target_capacity) * len(candidates)) + 2)
    found = static_order.order_for(
        model, tokenizer, count, job.static_order, job.cache_dir, candidates=job.layers, log=log.info
    )
    log.info("prior: the searched static order %s", found.order)
    return found.order


def _fit_importance(
    routed, examples, cfg: TrainConfig, pad, heldout, device, show: bool = True, order: list[int] | None = None
) -> TrainResult:
    """The importance objective: one dense pass, a closed-form fit per router (routertune.train.importance), and the
    capacity target met by the fit itself (no threshold set afterwards)."""
    import time

    began = time.perf_counter()
    batches = [_to(data.collate(b, pad), device) for b in data.length_batches(examples, cfg.batch_size, cfg.seed)]
    result = TrainResult(steps=0, seconds=0.0)
    # counted in records: the dense pass over every record is the fit's cost (minutes at ~1,000 records); the
    # held-out records are passed four times (dense loss, the fit's held-out features, the fitted loss)
    held = sum(int(b["input_ids"].shape[0]) for b in heldout or [])
    records = sum(int(b["input_ids"].shape[0]) for b in batches) + 3 * held
    with progress_bar("importance fit", records, unit="record", show=show) as bar:
        if heldout:
            bar.note("held-out loss, dense")
            result.dense = evaluate_loss(routed, heldout, dense=True)
            bar.update(held)
        bar.note("dense pass")
        fit = importance.fit_routers(
            routed,
            batches,
            heldout,
            cfg.target_capacity,
            # the default follows the evidence for each prior (TrainConfig.shrink's help)
            shrink=cfg.shrink if cfg.shrink is not None else (1.0 if order is not None else 0.5),
            target=cfg.importance_target,
            trust=trust_bounds(cfg, routed.router_config.unit),
            progress=bar.update,
            prior_order=order,
        )
        result.fit = asdict(fit)
        result.seconds = time.perf_counter() - began
        if heldout:
            bar.note("held-out loss, routed")
            result.after = evaluate_loss(routed, heldout)
            result.evals.append({"step": 0, **asdict(result.after)})
            bar.update(held)
    return result


def _calibrate_to_target(
    routed, examples, target, pad, heldout, result, max_prompts: int = 64, tolerance: float = 0.01
) -> None:
    """The hinge only pushes capacity down while it is above the target, and the language-model loss pushes
    back, so training settles near, not at, the target. One global threshold, set on the training prompts,
    puts the routers at the target; the held-out metrics are measured again with it. 64 prompts and a
    tolerance of 0.01 keep this to 3-4 passes (about a minute for the default model on 2 CPU cores)."""
    prompts = [ex.input_ids[: ex.prompt_length] for ex in examples[:max_prompts]]
    batches = [_to(b, routed.device) for b in calibrate.prompt_batches(prompts, pad)]
    outcome = calibrate.calibrate(routed, batches, target, tolerance=tolerance)
    result.threshold = outcome.threshold
    if heldout:
        result.uncalibrated = result.after
        result.after = evaluate_loss(routed, heldout)
        result.evals.append({"step": result.steps, "calibrated": True, **asdict(result.after)})


def _check_output(output: Path, job: TuneJob) -> None:
    holds_run = (output / CONFIG_NAME).exists() or (output / CHECKPOINTS).exists()
    if holds_run and not (job.overwrite or job.resume):
        raise FileExistsError(
            f"{output} already holds another run; choose another --output, continue it with --resume, "
            "or replace it with --overwrite"
        )


def _accelerator():
    """An accelerate Accelerator when launched with several processes (`accelerate launch`), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _records(job: TuneJob) -> tuple[list[dict], list[dict]]:
    if job.data is None:
        return (
            data.mix_forms(data.default_records("train", n=job.samples), job.plain_text),
            data.mix_forms(data.default_records("heldout", n=job.heldout_samples), job.plain_text)
            if job.heldout_samples
            else [],
        )
    records = data.load_any(job.data)
    # hold out the tail of the user's data (deterministic), at most a tenth of it
    n_heldout = min(job.heldout_samples, len(records) // 10)
    cut = len(records) - n_heldout
    return records[:cut][: job.samples], records[cut:]

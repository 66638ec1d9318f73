"""End-to-end jobs on a named model: load, tune routers, save; load routers, generate.

Library functions: they take dataclasses and return dataclasses; only the CLI prints.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data
from .config import CONFIG_NAME, RouterConfig
from .files import write_json
from .model import RoutedModel
from .models import load_model_and_tokenizer
from .train import TrainConfig, TrainResult, train_routers

log = logging.getLogger(__name__)
METRICS_NAME = "train_metrics.json"


@dataclass
class TuneJob:
    """What `routertune train` does; every field is a CLI flag."""

    output: str = field(default="runs/routers", metadata={"help": "folder for the routers and metrics"})
    model: str | None = field(default=None, metadata={"help": "local HF folder or hub id; default: embedded SmolLM2-135M-Instruct"})
    cache_dir: str | None = field(default=None, metadata={"help": "where the converted default model is cached (default $ROUTERTUNE_CACHE or ~/.cache/routertune)"})
    data: str | None = field(default=None, metadata={"help": "JSONL file (chat / Alpaca / text); default: the offline mix of generative tasks"})
    samples: int = field(default=1000, metadata={"help": "training records used (one epoch)"})
    heldout_samples: int = field(default=64, metadata={"help": "held-out records for loss and capacity"})
    batch_size: int = field(default=8, metadata={"help": "sequences per optimiser step"})
    max_length: int = field(default=512, metadata={"help": "tokens per sequence; longer records are truncated and counted"})
    granularity: str = field(default="attention", metadata={"help": "attention (MindSkip), mlp or block"})
    layers: list[int] | None = field(default=None, metadata={"help": "routed layer indices (default: paper's rule)"})
    overwrite: bool = field(default=False, metadata={"help": "replace routers already in --output"})

    def __post_init__(self) -> None:
        problems = []
        for name in ("samples", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.heldout_samples < 0:
            problems.append(f"heldout_samples={self.heldout_samples} must be >= 0")
        if problems:
            raise ValueError("Invalid training job: " + "; ".join(problems))


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
    if (output / CONFIG_NAME).exists() and not job.overwrite:
        raise FileExistsError(
            f"{output} already holds routers from another run; choose another --output or pass --overwrite"
        )
    records, heldout_records = _records(job)
    model, tokenizer = load_model_and_tokenizer(job.model, cache_dir=job.cache_dir)
    examples, truncated = data.encode_records(records, tokenizer, job.max_length)
    heldout_examples, _ = data.encode_records(heldout_records, tokenizer, job.max_length)
    pad = tokenizer.pad_token_id
    batches = [data.collate(b, pad) for b in data.length_batches(examples, job.batch_size, train_cfg.seed)]
    heldout = [data.collate(b, pad) for b in data.length_batches(heldout_examples, job.batch_size, 0)]

    routed = RoutedModel(model, RouterConfig(granularity=job.granularity, layers=job.layers))
    result = train_routers(routed, batches, train_cfg, heldout=heldout, progress=progress)
    routed.save_pretrained(output)
    report = TuneReport(
        output=str(output),
        samples=len(examples),
        truncated=truncated,
        trainable_parameters=sum(p.numel() for p in routed.trainable_parameters()),
        result=result,
    )
    write_json(output / METRICS_NAME, {"job": asdict(job), "train": asdict(train_cfg), **asdict(report)})
    return report


def _records(job: TuneJob) -> tuple[list[dict], list[dict]]:
    if job.data is None:
        return (
            data.default_records("train", n=job.samples),
            data.default_records("heldout", n=job.heldout_samples) if job.heldout_samples else [],
        )
    records = data.load_records(job.data)
    # hold out the tail of the user's file (deterministic) when asked to
    n_heldout = min(job.heldout_samples, len(records) // 10)
    heldout, train = records[len(records) - n_heldout:] if n_heldout else [], records[: len(records) - n_heldout]
    return train[: job.samples], heldout


@dataclass
class GenerateJob:
    prompts: list[str]
    routers: str | None = field(default=None, metadata={"help": "folder written by `routertune train`"})
    model: str | None = field(default=None, metadata={"help": "base model (default: embedded SmolLM2-135M-Instruct)"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache folder of the converted default model"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate per prompt"})
    threshold: float | None = field(default=None, metadata={"help": "override the decision threshold in (0, 1)"})
    force: str | None = field(default=None, metadata={"help": "force 'run' (dense) or 'skip' on every routed layer"})
    chat: bool = field(default=True, metadata={"help": "wrap prompts in the tokenizer's chat template"})


@dataclass
class Generation:
    prompt: str
    completion: str
    runs: dict[int, bool]  # routed layer -> ran for this prompt


def generate(job: GenerateJob) -> list[Generation]:
    """Greedy completions with routers; reports, per prompt, which routed layers ran."""
    if not job.prompts:
        raise ValueError("no prompts given")
    model, tokenizer = load_model_and_tokenizer(job.model, cache_dir=job.cache_dir)
    if job.routers is None:
        raise ValueError("pass --routers FOLDER (written by `routertune train`)")
    routed = RoutedModel.from_pretrained(model, job.routers)
    if job.threshold is not None:
        routed.set_threshold(job.threshold)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        if job.chat else p
        for p in job.prompts
    ]
    tokenizer.padding_side = "left"  # batched generation continues every row from its last real token
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not job.chat)
    cache = routed.new_cache()
    with torch.no_grad(), (routed.forced(job.force) if job.force else contextlib.nullcontext()):
        output = routed.generate(**inputs, max_new_tokens=job.max_new_tokens, do_sample=False, cache=cache,
                                 pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    completions = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [
        Generation(prompt=p, completion=c.strip(),
                   runs={layer: bool(d[row]) for layer, d in sorted(cache.decisions.items())})
        for row, (p, c) in enumerate(zip(job.prompts, completions))
    ]

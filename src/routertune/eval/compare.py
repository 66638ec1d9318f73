"""`routertune compare`: dense, static attention drop, random drop and trained routers at matched attention
skip ratios, on the same harness tasks, held-out perplexity and generation fidelity; one table (markdown +
JSON).

A skip ratio is a fraction of ALL attention sublayers of the model (30 for SmolLM2-135M). Static and random
drop remove round(ratio x layers) attention sublayers for every input (never the first or the last layer);
the routers are calibrated (global threshold) to the capacity that skips the same fraction,
capacity = 1 - ratio x layers / routed layers, on calibration prompts that are not the evaluated data.
The skip ratio each setting actually reached on the evaluated items is measured and reported next to it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from routertune.eval import tasks as task_configs
from routertune.eval.evaluate import Setting, check_routers, prepared_lm
from routertune.eval.harness import run_harness
from routertune.eval.metrics import PERPLEXITY_SOURCES, generation_fidelity, heldout_texts, perplexity
from routertune.files import atomic_write, write_json
from routertune.train.prompts import chat_prompts

log = logging.getLogger(__name__)

DEFAULT_COMPARE_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "openbookqa", "boolq", "mmlu"]


@dataclass
class CompareJob:
    """What `routertune compare` does; every field is a CLI flag."""

    routers: str = field(default="", metadata={"help": "folder written by `routertune train`"})
    tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": f"harness tasks ({', '.join(task_configs.TASKS)}); default: {' '.join(DEFAULT_COMPARE_TASKS)}"
        },
    )
    skip_ratios: list[float] | None = field(
        default=None,
        metadata={"help": "attention skip ratios, as fractions of ALL attention sublayers; default: 0.10 0.25"},
    )
    limit: int | None = field(default=None, metadata={"help": "items per task (default: the full sets)"})
    shots: str = field(
        default="zero",
        metadata={"help": "few-shot examples: zero, paper (docs/method.md#the-papers-evaluation-protocol) or a number"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the random drop and of the harness"})
    perplexity: list[str] | None = field(
        default=None,
        metadata={
            "help": f"held-out perplexity sources ({', '.join(PERPLEXITY_SOURCES)}); default: both; 'none' to skip"
        },
    )
    ppl_texts: int = field(default=200, metadata={"help": "passages per perplexity source"})
    fidelity_prompts: int = field(
        default=32, metadata={"help": "held-out chat prompts for generation fidelity (0 = skip)"}
    )
    fidelity_tokens: int = field(default=32, metadata={"help": "greedy tokens per prompt for generation fidelity"})
    calibration_samples: int = field(
        default=64, metadata={"help": "calibration prompts (router capacity, static-drop importance)"}
    )
    max_prompt_tokens: int = field(
        default=256, metadata={"help": "calibration / fidelity prompts keep their last tokens"}
    )
    output: str = field(default="runs/compare", metadata={"help": "folder for compare.json and compare.md"})
    model: str | None = field(default=None, metadata={"help": "base model (default: embedded SmolLM2-135M-Instruct)"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache folder of the converted default model"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per forward"})

    def __post_init__(self) -> None:
        problems = []
        self.tasks = list(DEFAULT_COMPARE_TASKS) if self.tasks is None else list(self.tasks)
        self.skip_ratios = [0.10, 0.25] if self.skip_ratios is None else list(self.skip_ratios)
        self.perplexity = list(PERPLEXITY_SOURCES) if self.perplexity is None else list(self.perplexity)
        if not self.routers:
            problems.append("routers is required: pass --routers FOLDER (written by `routertune train`)")
        try:
            task_configs.check_task_names(self.tasks)
        except ValueError as error:
            problems.append(str(error))
        try:
            task_configs.shots_for(self.tasks[0] if self.tasks else "arc_easy", self.shots)
        except ValueError as error:
            problems.append(str(error))
        for ratio in self.skip_ratios:
            if not 0.0 < ratio < 1.0:
                problems.append(f"skip ratio {ratio} must lie strictly between 0 and 1")
        self.perplexity = [p for p in self.perplexity if p != "none"]
        bad = [p for p in self.perplexity if p not in PERPLEXITY_SOURCES]
        if bad:
            problems.append(f"unknown perplexity source {bad}; available: {', '.join(PERPLEXITY_SOURCES)}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit={self.limit} must be >= 1")
        for name in ("ppl_texts", "calibration_samples", "max_prompt_tokens", "batch_tokens", "fidelity_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.fidelity_prompts < 0:
            problems.append(f"fidelity_prompts={self.fidelity_prompts} must be >= 0")
        if problems:
            raise ValueError("Invalid compare job: " + "; ".join(problems))


@dataclass
class SettingResult:
    name: str
    kind: str
    target_skip_ratio: float
    skip_ratio: float  # measured on the evaluated items (all attention sublayers)
    scores: dict[str, float]  # task -> headline metric
    stderr: dict[str, float]
    metrics: dict[str, dict[str, float]]  # task -> all metrics
    average: float
    perplexity: dict[str, float]
    fidelity: dict | None
    dropped: list[int] | None = None
    capacity: float | None = None  # routers: calibrated capacity
    calibration_capacity: float | None = None
    threshold: float | None = None
    layer_skip_rate: dict[str, float] | None = None
    task_layer_skip_rate: dict[str, dict] | None = None  # task -> layer -> skip rate
    seconds: float = 0.0


@dataclass
class CompareReport:
    job: dict
    settings: list[SettingResult]
    headline: dict[str, str]  # task -> metric shown
    samples: dict[str, int]  # task -> items scored
    seconds: float
    markdown: str = ""


def plan(job: CompareJob, num_layers: int, routed_layers: int) -> list[tuple[float, Setting]]:
    """The settings of a comparison: dense, then static / random / routers for every skip ratio."""
    settings: list[tuple[float, Setting]] = [(0.0, Setting("dense"))]
    for ratio in job.skip_ratios:
        k = int(round(ratio * num_layers))
        capacity = 1 - ratio * num_layers / routed_layers
        if not 0.0 <= capacity <= 1.0:
            raise ValueError(
                f"a skip ratio of {ratio} of {num_layers} attention sublayers needs more than the "
                f"{routed_layers} routed ones; the largest reachable is {routed_layers / num_layers:.3f}"
            )
        settings += [
            (ratio, Setting("static", drop=k)),
            (ratio, Setting("random", drop=k, seed=job.seed)),
            (
                ratio,
                Setting("routers", routers=job.routers, capacity=capacity, name=f"routers @ capacity {capacity:.3f}"),
            ),
        ]
    return settings


def compare(job: CompareJob, progress: bool = True) -> CompareReport:
    """Run every setting through the harness, perplexity and fidelity; write compare.json / compare.md after
    each setting (a long run can be read while it goes)."""
    from routertune.base_model import load_model_and_tokenizer
    from routertune.calibrate import prompt_batches
    from routertune.config import RouterConfig
    from routertune.routing import static_drop as baselines

    started = time.perf_counter()
    output = Path(job.output)
    task_configs.data_root()  # a missing data wheel fails (naming it) before the model loads
    saved = RouterConfig.load(job.routers)  # a wrong folder fails before the model loads
    model, tokenizer = load_model_and_tokenizer(job.model, cache_dir=job.cache_dir)
    check_routers(model, job.routers)  # routers of another base model fail before any work
    num_layers = int(model.config.num_hidden_layers)
    routed_layers = len(saved.resolved_layers(num_layers))
    settings = plan(job, num_layers, routed_layers)

    calibration = chat_prompts(tokenizer, split="train", n=job.calibration_samples, max_tokens=job.max_prompt_tokens)
    importance = None
    if any(s.kind == "static" for _, s in settings):
        pad = tokenizer.pad_token_id
        importance = baselines.attention_importance(model, prompt_batches(calibration, pad, job.batch_tokens))
    fidelity_prompts = (
        chat_prompts(tokenizer, split="heldout", n=job.fidelity_prompts, max_tokens=job.max_prompt_tokens)
        if job.fidelity_prompts
        else []
    )
    texts = {source: heldout_texts(source, job.ppl_texts) for source in job.perplexity}

    results: list[SettingResult] = []
    reference = None
    headline: dict[str, str] = {}
    samples: dict[str, int] = {}
    for ratio, setting in settings:
        t0 = time.perf_counter()
        log.info("compare: %s", setting.name)
        with prepared_lm(
            setting,
            model,
            tokenizer,
            calibration,
            importance=importance,
            batch_tokens=job.batch_tokens,
            progress=progress,
        ) as (lm, info):
            harness = run_harness(lm, job.tasks, shots=job.shots, limit=job.limit, seed=job.seed)
            ppl = {source: perplexity(lm, texts[source], source).ppl for source in job.perplexity}
            fidelity = None
            if fidelity_prompts:
                if setting.kind == "dense":
                    reference = lm.greedy(fidelity_prompts, job.fidelity_tokens)
                fidelity = asdict(generation_fidelity(lm, reference, fidelity_prompts, job.fidelity_tokens))
        for name, score in harness.tasks.items():
            headline[name] = score.headline
            samples[name] = score.samples
        scores = {n: s.metrics[s.headline] for n, s in harness.tasks.items()}
        results.append(
            SettingResult(
                name=setting.name,
                kind=setting.kind,
                target_skip_ratio=ratio,
                skip_ratio=harness.skip_ratio,
                scores=scores,
                stderr={n: s.stderr.get(s.headline, math.nan) for n, s in harness.tasks.items()},
                metrics={n: s.metrics for n, s in harness.tasks.items()},
                average=harness.average(),
                perplexity=ppl,
                fidelity=fidelity,
                dropped=info.dropped,
                capacity=setting.capacity,
                calibration_capacity=getattr(info.calibration, "capacity", None),
                threshold=info.threshold,
                layer_skip_rate=harness.layer_skip_rate,
                task_layer_skip_rate={n: s.skip.get("layer_skip_rate") for n, s in harness.tasks.items()},
                seconds=time.perf_counter() - t0,
            )
        )
        report = CompareReport(
            job=asdict(job), settings=results, headline=headline, samples=samples, seconds=time.perf_counter() - started
        )
        report.markdown = markdown_table(report)
        _write(output, report)
    return report


def markdown_table(report: CompareReport) -> str:
    names = list(report.headline)
    labels = [task_configs.TASKS[n].label for n in names]
    ppl_sources = list(report.settings[0].perplexity) if report.settings else []
    has_fidelity = any(s.fidelity for s in report.settings)
    header = (
        ["setting", "attn skip (target / measured)"]
        + [f"{l} ({report.headline[n]})" for n, l in zip(names, labels)]
        + ["avg"]
        + [f"ppl {s}" for s in ppl_sources]
        + (["greedy token agreement", "exact match"] if has_fidelity else [])
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in report.settings:
        cells = [
            s.name + (f" {s.dropped}" if s.dropped is not None and len(s.dropped) <= 10 else ""),
            f"{s.target_skip_ratio:.1%} / {s.skip_ratio:.1%}",
        ]
        cells += [f"{100 * s.scores[n]:.1f} ± {100 * s.stderr[n]:.1f}" for n in names]
        cells += [f"{100 * s.average:.1f}"] + [f"{s.perplexity[p]:.2f}" for p in ppl_sources]
        if has_fidelity:
            cells += (
                [f"{s.fidelity['token_agreement']:.3f}", f"{s.fidelity['exact_match']:.3f}"] if s.fidelity else ["", ""]
            )
        lines.append("| " + " | ".join(cells) + " |")
    counts = ", ".join(f"{task_configs.TASKS[n].label} {report.samples[n]}" for n in names)
    job = report.job
    lines.append("")
    lines.append(
        f"Items per task: {counts} (limit {job['limit'] or 'none: full sets'}); shots: {job['shots']}; "
        f"perplexity: {job['ppl_texts']} passages per source, second half given the first; "
        f"fidelity: {job['fidelity_prompts']} held-out prompts x {job['fidelity_tokens']} greedy tokens "
        f"vs dense. Metrics in %, ± one standard error."
    )
    return "\n".join(lines) + "\n"


def _write(output: Path, report: CompareReport) -> None:
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "compare.json", asdict(report))
    atomic_write(output / "compare.md", lambda tmp: Path(tmp).write_text(report.markdown))

"""The quality-for-skip trade-off of one set of routers against static and random attention drop.

For one set of routers, the threshold is swept (no retraining) and every setting is scored on the *same*
items as the baselines: static drop of the k least important attention sublayers (k = 0..K) and random drop
(several seeds). Quality is measured with signals that resolve on a small model:

- mean per-token KL(dense || setting) and perplexity on held-out text of several domains, none of them in the
  tuning mix (the second half of each text, routed on the first half);
- accuracy on multiple-choice tasks the model is clearly above chance on, through lm-eval's own task
  configs and metrics (each item's choices routed on its context);
- greedy agreement with the dense model's completions of held-out chat prompts.

The x axis is always the *measured* fraction of all attention sublayers skipped on those items. Curves are
compared at chosen skip ratios by interpolating each one linearly between the two measured points around it
(per item, so the comparison stays paired), with a paired bootstrap interval over items.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from routertune.files import write_json
from routertune.progress import bar as progress_bar
from routertune.routing import state as routing
from routertune.routing import static_drop as baselines
from routertune.routing.static_drop import zeroed_attention
from routertune.stats import interpolate, paired_bootstrap

DOMAINS = ("lambada", "wikipedia", "code")
TASKS = ("arc_easy", "piqa", "hellaswag")
KINDS = ("dense", "static", "searched", "random", "routers")
RESULT_NAME = "tradeoff.json"


# --- settings --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One way of running the model: dense, a fixed attention drop (static: the k least important by 1 - cos;
    searched: the first k of the KL-searched order of routertune.train.static_order; random), or the routers
    at a threshold."""

    kind: str
    drop: tuple[int, ...] = ()  # static / random: attention sublayers skipped for every input
    k: int = 0
    seed: int = 0
    threshold: float | None = None

    @property
    def name(self) -> str:
        if self.kind == "static":
            return f"static {self.k}"
        if self.kind == "searched":
            return f"searched static {self.k}"
        if self.kind == "random":
            return f"random {self.k} (seed {self.seed})"
        if self.kind == "routers":
            return f"routers @ {self.threshold:.6g}"
        return "dense"


@contextlib.contextmanager
def applied(variant: Variant, routed) -> Iterator[None]:
    """Run the routed model as `variant`: routers at a threshold, or forced to run with a fixed drop."""
    if variant.kind == "routers":
        saved = (routed.router_config.threshold, routed.router_config.layer_thresholds)
        routed.set_threshold(variant.threshold)
        try:
            yield
        finally:
            routed.set_threshold(*saved)
    else:
        with routing.forced("run"), zeroed_attention(routed.base_model, variant.drop):
            yield


# --- items -----------------------------------------------------------------------------------------------------
def domain_texts(domain: str, n: int) -> list[str]:
    """Held-out text of one domain, never in the tuning mix: LAMBADA fiction, BoolQ's Wikipedia passages,
    HumanEval code (prompt + canonical solution)."""
    from routertune.eval import tasks
    from routertune.train import data

    if domain == "lambada":
        return data.lambada_passages(n)
    if domain == "wikipedia":
        seen, passages = set(), []
        for passage in tasks.load_split("boolq", "validation")["passage"]:
            if passage not in seen:
                seen.add(passage)
                passages.append(passage)
            if len(passages) >= n:
                break
        return passages
    if domain == "code":
        return data.humaneval_texts(n)
    raise ValueError(f"unknown domain {domain!r}; available: {', '.join(DOMAINS)}")


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    route_mask: torch.Tensor  # (B, T): the first half of each text, what the routers decide from
    score_mask: torch.Tensor  # (B, K) over the kept positions: predictions of second-half tokens
    keep: torch.Tensor  # (K,) positions whose logits are computed
    targets: torch.Tensor  # (B, K)
    rows: list[int]  # text index of each row


def text_batches(token_lists: Sequence[list[int]], pad_id: int, batch_size: int = 8) -> list[TextBatch]:
    """Each text: route on its first half, score its second half (positions half-1 .. n-2 predict half .. n-1)."""
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(token_lists[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        route = torch.zeros_like(mask)
        first = min(len(token_lists[i]) // 2 for i in rows) - 1
        keep = torch.arange(first, width - 1)
        score = torch.zeros((len(rows), len(keep)), dtype=torch.bool)
        targets = torch.zeros((len(rows), len(keep)), dtype=torch.long)
        for b, i in enumerate(rows):
            tokens = token_lists[i]
            n, half = len(tokens), len(tokens) // 2
            ids[b, :n] = torch.tensor(tokens)
            mask[b, :n] = 1
            route[b, :half] = 1
            positions = torch.arange(half - 1, n - 1)
            score[b, positions - first] = True
            targets[b, positions - first] = torch.tensor(tokens[half:])
        batches.append(TextBatch(ids, mask, route, score, keep, targets, rows))
    return batches


@dataclass
class TextScores:
    """Per text: summed KL(dense || variant) and NLL over its scored tokens, scored tokens, skipped layers."""

    kl: np.ndarray
    nll: np.ndarray
    tokens: np.ndarray
    skipped: np.ndarray  # attention sublayers skipped for this text (routers: its own decisions; token
    # routers: the mean over its scored tokens of the sublayers each skipped)
    patterns: list = field(default_factory=list)  # per text: the tuple of skipped layers
    skipped_all: np.ndarray | None = None  # token routers: the same mean over all its real tokens

    def summary(self, num_layers: int) -> dict:
        out = {
            "kl": float(self.kl.sum() / self.tokens.sum()),
            "ppl": float(math.exp(self.nll.sum() / self.tokens.sum())),
            "skip": float(self.skipped.mean() / num_layers),
            "texts": int(len(self.kl)),
            "tokens": int(self.tokens.sum()),
            "distinct_patterns": len(set(self.patterns)),
        }
        if self.skipped_all is not None:
            out["skip_all_tokens"] = float(self.skipped_all.mean() / num_layers)
        return out


@torch.inference_mode()
def score_texts(
    routed,
    batches: Sequence[TextBatch],
    variants: Sequence[Variant],
    n_texts: int,
    progress: Callable[[int], None] | None = None,
) -> dict[Variant, TextScores]:
    """KL to dense and NLL of every variant on the same texts. Batches outer, variants inner: the dense
    log-probabilities of a batch are computed once and never stored for the whole set."""
    out = {v: TextScores(*(np.zeros(n_texts) for _ in range(4)), patterns=[()] * n_texts) for v in variants}
    for batch in batches:

        def logprobs(variant: Variant):
            with applied(variant, routed), routed.recording() as calls:
                logits = routed(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    routing_mask=batch.route_mask,
                    use_cache=False,
                    logits_to_keep=batch.keep,
                ).logits
            return F.log_softmax(logits.float(), dim=-1), calls  # (B, K, V)

        dense, _ = logprobs(Variant("dense"))
        for variant in variants:
            lp, calls = (dense, []) if variant.kind == "dense" else logprobs(variant)
            kl = (dense.exp() * (dense - lp)).sum(-1)  # (B, K)
            nll = -lp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
            scored = torch.zeros(batch.input_ids.shape, dtype=torch.bool)  # (B, T): positions whose logits count
            scored[:, batch.keep] = batch.score_mask
            skipped, patterns, skipped_all = _skipped_per_row(variant, calls, len(batch.rows), scored)
            scores = out[variant]
            if skipped_all is not None and scores.skipped_all is None:
                scores.skipped_all = np.zeros(n_texts)
            for b, i in enumerate(batch.rows):
                m = batch.score_mask[b]
                scores.kl[i] = float(kl[b][m].sum())
                scores.nll[i] = float(nll[b][m].sum())
                scores.tokens[i] = float(m.sum())
                scores.skipped[i] = float(skipped[b])
                scores.patterns[i] = patterns[b]
                if skipped_all is not None:
                    scores.skipped_all[i] = float(skipped_all[b])
            if progress:
                progress(len(batch.rows))
    return out


def _skipped_per_row(
    variant: Variant, calls, batch: int, scored: torch.Tensor | None = None
) -> tuple[np.ndarray, list[tuple[int, ...]], np.ndarray | None]:
    """Per row: how many attention sublayers it skipped, which, and (token routers only) the skip over all
    its real tokens. `scored` (B, T): the positions whose predictions are scored (token routers' skip is
    measured there; None = every real token)."""
    if variant.kind != "routers":
        return np.full(batch, float(len(variant.drop))), [tuple(variant.drop)] * batch, None
    decisions = calls[-1].decisions if calls else {}
    if not decisions:
        return np.zeros(batch), [()] * batch, None
    if calls[-1].token_runs:
        return _token_skipped_per_row(calls[-1], batch, scored)
    layers = sorted(decisions)
    runs = torch.stack([decisions[i].cpu() for i in layers])  # (layers, B)
    patterns = [tuple(layers[j] for j in range(len(layers)) if not runs[j, b]) for b in range(batch)]
    return (~runs).sum(0).double().numpy(), patterns, None


def _token_skipped_per_row(
    call, batch: int, scored: torch.Tensor | None
) -> tuple[np.ndarray, list[tuple[int, ...]], np.ndarray]:
    """Token routers: per row, the attention sublayers skipped per scored token (a mean, so that skip / layers
    is the share of (scored token, layer) pairs skipped, comparable to a sequence router's share of sublayers
    skipped: the sublayers that did not run for the predictions scored), the layers every one of its tokens
    skipped, and the same mean over all its real tokens (the prefill's compute)."""
    layers = sorted(call.token_runs)
    runs = torch.stack([call.token_runs[i].cpu() for i in layers])  # (layers, B, T)
    steps = runs.shape[-1]
    real = (
        call.attention_mask[:, -steps:].bool().cpu()
        if call.attention_mask is not None
        else torch.ones(runs.shape[1:], dtype=torch.bool)
    )
    counted = real if scored is None else real & scored[:, -steps:].cpu()

    def mean_skipped(where):  # (B,)
        return (((~runs) & where).sum(0).double().sum(-1) / where.sum(-1).clamp_min(1)).numpy()

    patterns = [tuple(layers[j] for j in range(len(layers)) if not runs[j, b][real[b]].any()) for b in range(batch)]
    return mean_skipped(counted), patterns, mean_skipped(real)


# --- multiple-choice accuracy through lm-eval's task configs ---------------------------------------------------
@dataclass
class TaskItems:
    name: str
    metric: str  # acc or acc_norm, the metric reported for this task
    task: object  # the lm-eval Task
    instances: list  # its loglikelihood requests
    docs: list  # (doc_id, doc) in order


def task_items(names: Sequence[str], limit: int | None) -> list[TaskItems]:
    from routertune.eval import tasks
    from routertune.eval.harness import quiet_harness

    out = []
    with quiet_harness():
        built = tasks.build_tasks(list(names), "zero")
    for name, task in zip(names, built):
        with quiet_harness():
            task.build_all_requests(limit=limit, rank=0, world_size=1)
        instances = sorted(task.instances, key=lambda inst: (inst.doc_id, inst.idx))
        docs = {}
        for inst in instances:
            docs.setdefault(inst.doc_id, inst.doc)
        metric = tasks.TASKS[name].paper_metric
        out.append(TaskItems(name, metric, task, instances, sorted(docs.items())))
    return out


@dataclass
class TaskScores:
    correct: np.ndarray  # per item, 0/1 for the task's metric
    skip: float  # measured fraction of all attention sublayers skipped over the task's contexts


TASK_CHUNK = 25  # items scored per call, so that a setting that takes minutes reports its progress as it goes


def score_tasks(
    routed,
    tokenizer,
    items: Sequence[TaskItems],
    variant: Variant,
    num_layers: int,
    batch_tokens: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> dict[str, TaskScores]:
    """Accuracy of `variant` on every item; `progress` gets the number of items finished, chunk by chunk (an
    item's choices stay in one chunk, so their shared context is still scored once)."""
    from routertune.eval.harness import RoutedLM

    out = {}
    with applied(variant, routed):
        lm = RoutedLM(routed, tokenizer, batch_tokens=batch_tokens, progress=False)
        for task in items:
            lm.stats.clear()
            by_doc: dict[int, list] = {}
            doc_ids = [doc_id for doc_id, _ in task.docs]
            for start in range(0, len(doc_ids), TASK_CHUNK):
                chunk = set(doc_ids[start : start + TASK_CHUNK])
                instances = [inst for inst in task.instances if inst.doc_id in chunk]
                for inst, result in zip(instances, lm.loglikelihood(instances, disable_tqdm=True)):
                    by_doc.setdefault(inst.doc_id, []).append(result)
                if progress:
                    progress(len(chunk))
            correct = np.array(
                [float(task.task.process_results(doc, by_doc[doc_id])[task.metric]) for doc_id, doc in task.docs]
            )
            if variant.kind == "routers":
                stats = lm.stats.get(task.name)
                skip = stats.skip_ratio if stats is not None else 0.0
            else:
                skip = len(variant.drop) / num_layers
            out[task.name] = TaskScores(correct, float(skip))
    return out


# --- the job ---------------------------------------------------------------------------------------------------
@dataclass
class TradeoffJob:
    """`routertune tradeoff`: every flag is a field."""

    routers: str = field(default="", metadata={"help": "folder written by `routertune train`"})
    output: str = field(default="runs/tradeoff", metadata={"help": "folder for tradeoff.json"})
    model: str | None = field(default=None, metadata={"help": "base model (default: embedded SmolLM2-135M-Instruct)"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache folder of the converted default model"})
    domains: list[str] = field(
        default_factory=lambda: list(DOMAINS),
        metadata={
            "help": "held-out text domains for KL and perplexity; the flag with no names runs none",
            "may_be_empty": True,
        },
    )
    texts: int = field(default=32, metadata={"help": "texts per domain"})
    max_tokens: int = field(
        default=192, metadata={"help": "tokens per text (the first half routes, the second is scored)"}
    )
    tasks: list[str] = field(
        default_factory=lambda: list(TASKS),
        metadata={
            "help": "multiple-choice tasks (lm-eval configs); the flag with no names runs none",
            "may_be_empty": True,
        },
    )
    limit: int | None = field(
        default=1000, metadata={"help": "items per task (first N of the validation set; 0 = all)"}
    )
    skip_targets: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.3],
        metadata={"help": "measured skip ratios (of all attention sublayers) where the curves are compared"},
    )
    max_drop: int = field(default=10, metadata={"help": "static drop traced for k = 0..max_drop"})
    random_seeds: int = field(default=3, metadata={"help": "random-drop seeds"})
    random_drops: list[int] | None = field(
        default=None, metadata={"help": "k of random drop (default: the layer counts of --skip-targets)"}
    )
    thresholds: list[float] | None = field(
        default=None,
        metadata={
            "help": "router thresholds to sweep (default: set from the calibration prompts to span the skip targets)"
        },
    )
    sweep_points: int = field(default=10, metadata={"help": "router thresholds in the automatic sweep"})
    max_gap: float = field(
        default=0.025,
        metadata={
            "help": "around each target, router points are added until the measured skips bracketing it lie at most this far apart"
        },
    )
    fidelity_prompts: int = field(default=32, metadata={"help": "held-out chat prompts for greedy agreement (0 = off)"})
    fidelity_tokens: int = field(default=32, metadata={"help": "greedy tokens per fidelity prompt"})
    calibration_samples: int = field(
        default=64,
        metadata={
            "help": "chat prompts of the tuning mix's train split: static-drop importance and the sweep's thresholds"
        },
    )
    searched_static: bool = field(
        default=False,
        metadata={
            "help": "also trace the searched static order (the first k layers of an order searched greedily for the least KL to dense on the tuning data, routertune.train.static_order) as a baseline, 'the best static order': the search costs minutes of one thread per layer (over 200 CPU seconds for the first layer of SmolLM2-135M on 16 records), once per model and data (cached)"
        },
    )
    searched_order: str | None = field(
        default=None,
        metadata={
            "help": "static_order.json (or its folder) of a search of this model to read as it is (e.g. benchmarks/results/static-order; no search here); default: search, cached in the routertune cache per model and data"
        },
    )
    searched_records: int = field(default=32, metadata={"help": "tuning records the static order is searched on"})
    accuracy_settings: str = field(
        default="matched",
        metadata={
            "help": "which settings the (costly) accuracy runs on: 'matched' (static drop at the targets and, per target, the router point nearest it on the task's contexts; dense is not run), 'searched' (the same, with the searched static order as the only static baseline: a third fewer passes) or 'all' (every setting, dense included)"
        },
    )
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for the intervals"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per forward for the accuracy tasks"})
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue the run whose tradeoff.json is in --output: the domains, the fidelity and the task settings it finished are kept, the rest is measured (the job must be the same)"
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if not self.routers:
            problems.append("pass --routers FOLDER (written by `routertune train`)")
        bad = [d for d in self.domains if d not in DOMAINS]
        if bad:
            problems.append(f"unknown domains {bad}; available: {', '.join(DOMAINS)}")
        for name in ("texts", "max_tokens", "sweep_points", "bootstrap", "searched_records"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_tokens < 8:
            problems.append(f"max_tokens={self.max_tokens} must be >= 8 (half routes, half is scored)")
        if not self.domains and not self.tasks:
            problems.append("nothing to measure: pass at least one of --domains, --tasks")
        if not self.skip_targets or any(not 0 < t < 1 for t in self.skip_targets):
            problems.append(f"skip_targets={self.skip_targets} must lie in (0, 1)")
        if self.thresholds is not None and any(not 0 < t < 1 for t in self.thresholds):
            problems.append(f"thresholds={self.thresholds} must lie in (0, 1)")
        if self.accuracy_settings not in ("matched", "searched", "all"):
            problems.append(f"accuracy_settings={self.accuracy_settings!r} is not one of matched, searched, all")
        if self.accuracy_settings == "searched" and not (self.searched_static or self.searched_order):
            problems.append(
                "accuracy_settings='searched' compares against the searched static order: keep --searched-static "
                "on or pass --searched-order"
            )
        if self.limit is not None and self.limit < 0:
            problems.append(f"limit={self.limit} must be >= 0 (0 = full sets)")
        if problems:
            raise ValueError("Invalid tradeoff job: " + "; ".join(problems))


def sweep_thresholds(
    routed, calibration_batches, skip_targets: Sequence[float], points: int, num_layers: int
) -> list[float]:
    """Router thresholds that span 0.4x .. 1.5x the skip targets, from one pass over `calibration_batches`
    (prompts, or the routing part of the evaluated texts) with every routed layer running: the thresholds at
    the matching quantiles of the routers' scores there. Scores move once earlier layers skip, so each
    threshold's actual skip is whatever the items give: the curves use the measured skip, never these
    targets."""
    from routertune.calibrate import prompt_scores, quantile_threshold

    routed_n = len(routed.routed_layers)
    low, high = 0.4 * min(skip_targets), min(1.5 * max(skip_targets), routed_n / num_layers * 0.98)
    saved = (routed.router_config.threshold, routed.router_config.layer_thresholds)
    routed.set_threshold(1e-9)  # every layer runs: scores of the dense hidden states
    try:
        scores, _ = prompt_scores(routed, calibration_batches)
    finally:
        routed.set_threshold(*saved)
    pooled = torch.cat(list(scores.values()))
    thresholds = set()
    for skip in np.linspace(low, high, points):
        capacity = float(np.clip(1 - skip * num_layers / routed_n, 0.0, 1.0))
        thresholds.add(round(quantile_threshold(pooled, capacity), 6))
    return sorted(thresholds)


def refine_sweep(
    skip_of: Callable[[float], float],
    known: dict[float, float],
    targets: Sequence[float],
    max_gap: float,
    max_new: int = 12,
) -> dict[float, float]:
    """Add router thresholds where the measured skips around a target lie more than `max_gap` apart, so the
    linear interpolation there spans a short piece of the curve (a long chord of a convex curve overstates
    it). `known` maps threshold -> measured skip and is extended in place; skip rises with the threshold, so
    the new threshold is the midpoint of the two that bracket the target."""
    for _ in range(max_new):
        widest = None
        for target in targets:
            below = [(s, t) for t, s in known.items() if s <= target]
            above = [(s, t) for t, s in known.items() if s > target]
            if not below or not above:
                continue
            (s0, t0), (s1, t1) = max(below), min(above)
            if s1 - s0 > max_gap and abs(t1 - t0) > 1e-6 and (widest is None or s1 - s0 > widest[0]):
                widest = (s1 - s0, round((t0 + t1) / 2, 6))
        if widest is None or widest[1] in known:
            break
        known[widest[1]] = skip_of(widest[1])
    return known


def _add_variants(result: dict, variants) -> None:
    names = {v["name"] for v in result["variants"]}
    result["variants"] += [_describe(v) for v in variants if v.name not in names]


def compare_curves(
    curves: dict[str, list[tuple[float, np.ndarray]]],
    target: float,
    weights=None,
    iterations: int = 2000,
    baseline: str = "static",
) -> dict:
    """Every curve at measured skip `target` (interpolated) minus the baseline curve there, paired."""
    base = interpolate(curves[baseline], target)
    out = {}
    for name, points in curves.items():
        got = interpolate(points, target)
        if got is None or base is None:
            out[name] = {"reached": False, "measured_range": [min(p[0] for p in points), max(p[0] for p in points)]}
            continue
        values, between = got
        w = None if weights is None else np.asarray(weights)
        mean = float((values * (w if w is not None else 1)).sum() / (w.sum() if w is not None else len(values)))
        entry = {"reached": True, "value": mean, "between": list(between)}
        if name != baseline:
            diff, low, high = paired_bootstrap(values, base[0], w, iterations)
            entry.update({"minus_" + baseline: diff, "interval": [low, high]})
        out[name] = entry
    return out


def run_tradeoff(job: TradeoffJob, progress: bool = True, log: Callable[[str], None] = lambda s: None) -> dict:
    """The whole measurement; writes tradeoff.json after each stage so a long run can be read as it goes."""
    from routertune.base_model import load_model_and_tokenizer
    from routertune.calibrate import prompt_batches
    from routertune.config import RouterConfig
    from routertune.model import RoutedModel
    from routertune.train.prompts import chat_prompts

    started = time.perf_counter()
    progress_bars = progress  # the name `progress` is the per-part callback below
    output = Path(job.output)
    RouterConfig.load(job.routers)  # a wrong folder fails before the model loads
    previous = previous_result(job)  # so does --resume of a different job
    model, tokenizer = load_model_and_tokenizer(job.model, cache_dir=job.cache_dir)
    max_static = min(job.max_drop, len(baselines.droppable_layers(int(model.config.num_hidden_layers))))
    # on the plain model, before the routers are attached: the search runs the base model's own layers
    order = (
        searched_static_order(model, tokenizer, job, max_static, progress_bars, log)
        if (job.searched_static or job.searched_order) and max_static > 0
        else None
    )
    routed = RoutedModel.from_pretrained(model, job.routers)
    top_k = routed.router_config.token_top_k
    if top_k is not None:
        # the curve sweeps a threshold on the routers' scores; in top-k mode the threshold would be ignored and
        # every point would sit at the same skip, so the same routers are traced in threshold mode instead
        log(f"tradeoff: the token routers run top-k ({top_k}); their scores are swept with thresholds instead")
        routed.router_config.token_top_k = None
    num_layers = int(model.config.num_hidden_layers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # baselines: static drop by importance on the calibration prompts, random drop with seeds
    calibration = chat_prompts(tokenizer, split="train", n=job.calibration_samples, max_tokens=256)
    calibration_batches = prompt_batches(calibration, pad)
    # two passes before the first curve (seconds each at the defaults): counted, so that nothing runs unseen
    setup = progress_bar("importance and sweep", 2, unit="pass", show=progress_bars)
    with routing.forced("run"):
        importance = baselines.attention_importance(model, calibration_batches)
    setup.update(1)
    candidates = baselines.droppable_layers(num_layers)

    def static_variant(k: int) -> Variant:
        return Variant("static", tuple(importance.least_important(k, candidates)), k) if k else Variant("dense")

    def searched_variant(k: int) -> Variant:
        return Variant("searched", tuple(order.first(k)), k) if k else Variant("dense")

    variants = [Variant("dense")]
    for k in range(1, min(job.max_drop, len(candidates)) + 1):
        variants.append(static_variant(k))
    if order is not None:
        variants += [searched_variant(k) for k in range(1, min(max_static, len(order.order)) + 1)]
    random_ks = job.random_drops or sorted({int(round(t * num_layers)) for t in job.skip_targets})
    for k in random_ks:
        for seed in range(job.random_seeds):
            variants.append(Variant("random", tuple(baselines.random_drop(k, candidates, seed)), k, seed))
    domain_tokens = {}
    for domain in job.domains:
        texts = domain_texts(domain, job.texts)
        lists = [ids[: job.max_tokens] for ids in (tokenizer(t)["input_ids"] for t in texts)]
        domain_tokens[domain] = [ids for ids in lists if len(ids) >= 8]
    # the sweep's points are placed on what is evaluated (the routing half of every text) and on chat prompts,
    # so that they spread over the measured skip of every domain rather than of chat prompts alone
    placement = calibration_batches + [
        {"input_ids": b.input_ids, "attention_mask": b.route_mask}
        for lists in domain_tokens.values()
        for b in text_batches(lists, pad)
    ]
    thresholds = job.thresholds or sweep_thresholds(routed, placement, job.skip_targets, job.sweep_points, num_layers)
    setup.update(1)
    setup.close()
    variants += [Variant("routers", threshold=t) for t in thresholds]
    result: dict = {
        "job": asdict(job),
        "routers_sha256": routers_fingerprint(job.routers),
        "num_layers": num_layers,
        "routed_layers": routed.routed_layers,
        "unit": routed.router_config.unit,
        "token_top_k_swept_as_thresholds": top_k,
        "importance": importance.scores,
        "variants": [_describe(v) for v in variants],
        "domains": {},
        "tasks": {},
        "fidelity": {},
        "matched": {},
    }
    kept: dict = {"domains": [], "fidelity": False, "task_settings": {}}  # what --resume took from the stored run
    seconds_before = 0.0
    if previous is not None:
        check_resumable(previous, result)
        result["variants"] = previous["variants"]
        result["resumed"] = kept
        # elapsed time is saved with every write, so a stopped run's time carries over (older files: not known)
        kept["seconds_before"] = previous.get("seconds")
        seconds_before = previous.get("seconds") or 0.0

    def save() -> None:
        result["seconds"] = seconds_before + time.perf_counter() - started
        write_json(output / RESULT_NAME, result)

    # 1. KL and perplexity on held-out domains (every variant, same texts)
    for domain, token_lists in domain_tokens.items():
        if previous is not None and domain in previous["domains"] and domain in previous["matched"]:
            stored_texts = previous["domains"][domain]["texts"]
            if stored_texts != len(token_lists):
                raise ValueError(
                    f"--resume: the stored run scored {stored_texts} {domain} texts, this data gives "
                    f"{len(token_lists)}; the data changed since, drop --resume to measure from scratch"
                )
            log(f"tradeoff: {domain}: kept from the stored run")
            result["domains"][domain], result["matched"][domain] = (
                previous["domains"][domain],
                previous["matched"][domain],
            )
            kept["domains"].append(domain)
            continue
        batches = text_batches(token_lists, pad)
        log(f"tradeoff: {domain}: {len(token_lists)} texts x {len(variants)} settings")
        bar = progress_bar(f"KL {domain}", len(token_lists) * len(variants), unit="text", show=progress_bars)
        scores = score_texts(routed, batches, variants, len(token_lists), progress=bar.update)

        def domain_skip(threshold: float) -> float:  # one more sweep point on this domain's texts
            extra = Variant("routers", threshold=threshold)
            bar.grow(len(token_lists))
            scores.update(score_texts(routed, batches, [extra], len(token_lists), progress=bar.update))
            return float(scores[extra].skipped.mean() / num_layers)

        known = {v.threshold: float(scores[v].skipped.mean() / num_layers) for v in variants if v.kind == "routers"}
        refine_sweep(domain_skip, known, job.skip_targets, job.max_gap)
        bar.close()
        _add_variants(result, scores)
        result["domains"][domain] = {
            "texts": len(token_lists),
            "settings": {
                _describe(v)["name"]: {
                    **s.summary(num_layers),
                    "per_text_kl": s.kl.tolist(),
                    "per_text_tokens": s.tokens.tolist(),
                    # each text's skipped share, so that a comparison on a subset of texts measures its own skip
                    "per_text_skip": (s.skipped / num_layers).tolist(),
                }
                for v, s in scores.items()
            },
        }
        result["matched"][domain] = match_kl(scores, list(scores), job, num_layers)
        save()

    # 2. greedy agreement with dense on held-out chat prompts
    if job.fidelity_prompts and previous is not None and previous["fidelity"]:
        result["fidelity"], kept["fidelity"] = previous["fidelity"], True
    elif job.fidelity_prompts:
        result["fidelity"] = _fidelity(routed, tokenizer, variants, job, num_layers, show=progress_bars)
        save()

    # 3. accuracy (the costly part): per task, dense, static drop around the targets and the router thresholds
    #    that bracket each target on that task's own contexts (or every setting, with --accuracy-settings all)
    if job.tasks:
        items = task_items(job.tasks, job.limit or None)
        per_task: dict[str, dict[Variant, TaskScores]] = {}
        for task in items:
            if job.accuracy_settings == "all":
                chosen = variants
            else:
                placing = progress_bar(f"placement {task.name}", len(thresholds), unit="threshold", show=progress_bars)

                def context_skip(t: float, extra: bool = False) -> float:  # the routers on the first contexts
                    if extra:
                        placing.grow(1)
                    skip = task_context_skips(routed, tokenizer, task, [t], num_layers, pad)[t]
                    placing.update(1)
                    return skip

                known = {t: context_skip(t) for t in thresholds}
                refine_sweep(lambda t: context_skip(t, extra=True), known, job.skip_targets, 0.02)
                placing.close()
                chosen = _accuracy_settings(variants, known, job, num_layers)
                _add_variants(result, {v: None for v in chosen})
            per_task[task.name] = {}
            # counted in items (settings x items), so that a setting that takes minutes still moves the bar
            bar = progress_bar(f"accuracy {task.name}", len(chosen) * len(task.docs), unit="item", show=progress_bars)

            stored_task = (previous or {}).get("tasks", {}).get(task.name, {})
            stored = stored_task.get("settings", {})
            if stored and (stored_task["items"], stored_task["metric"]) != (len(task.docs), task.metric):
                raise ValueError(
                    f"--resume: the stored run scored {task.name} on {stored_task['items']} items "
                    f"({stored_task['metric']}), this data gives {len(task.docs)} ({task.metric}); "
                    "the task data changed since, drop --resume to measure from scratch"
                )

            def score(variant: Variant) -> None:
                if variant.name in stored:  # --resume: this setting finished in the stored run
                    log(f"tradeoff: {task.name}, {variant.name}: kept from the stored run")
                    kept["task_settings"].setdefault(task.name, []).append(variant.name)
                    per_task[task.name][variant] = TaskScores(
                        np.asarray(stored[variant.name]["per_item"], float), stored[variant.name]["skip"]
                    )
                    bar.update(len(task.docs))
                else:
                    log(f"tradeoff: {task.name}, {variant.name}")
                    bar.note(variant.name)
                    per_task[task.name][variant] = score_tasks(
                        routed, tokenizer, [task], variant, num_layers, job.batch_tokens, progress=bar.update
                    )[task.name]
                result["tasks"][task.name] = _task_result(per_task[task.name], task)
                save()

            for variant in chosen:
                score(variant)
            # a router point's skip on all the items can differ from its estimate on the first contexts (PIQA:
            # 9.7% where 10.1% was estimated); static drop is interpolated at the measured skip, so it also
            # runs at the layer counts around that skip if they are missing, or the comparison is not reached
            measured = [s.skip for v, s in per_task[task.name].items() if v.kind == "routers"]
            have = {v.k for v in per_task[task.name] if v.kind in ("static", "dense")}
            missing = [
                static_variant(k)
                for k in static_counts_to_add(measured, have, job.skip_targets, num_layers)
                if k <= len(candidates) and job.max_drop > 0 and job.accuracy_settings != "searched"
            ]  # --max-drop 0: no static drop here; --accuracy-settings searched: only the searched order
            if order is not None:  # the searched order too, at the same counts (dense is shared)
                have = {v.k for v in per_task[task.name] if v.kind in ("searched", "dense")}
                missing += [
                    searched_variant(k)
                    for k in static_counts_to_add(measured, have, job.skip_targets, num_layers)
                    if 0 < k <= len(order.order)  # past --max-drop where a router point lands past it
                ]
            _add_variants(result, {v: None for v in missing})
            bar.grow(len(missing) * len(task.docs))
            for variant in missing:
                score(variant)
            bar.close()
            result["matched"][task.name] = task_matched(per_task[task.name], measured, job.skip_targets, job.bootstrap)
            save()
    save()
    (output / "tradeoff.md").write_text(markdown_table(result) + "\n")
    routed.unwrap()
    return result


def searched_static_order(
    model, tokenizer, job: TradeoffJob, count: int, show: bool = True, log: Callable[[str], None] = lambda s: None
):
    """The searched static order (routertune.train.static_order) of the plain `model`, up to `count` layers:
    read as it is from --searched-order (a finished or partial search of this model; no search here), else
    searched on the tuning data and cached per model weights and data in the routertune cache (a later run,
    e.g. the next demo, reads it back; a longer order extends the stored one)."""
    from routertune.base_model import default_cache_dir
    from routertune.train import static_order

    bar = progress_bar("static order search", count, unit="layer", show=show)
    try:
        identity = static_order.model_identity(model)
        if job.searched_order:
            path = Path(job.searched_order)
            found = static_order.read_order(path, identity, flag="--searched-order")
            log(
                f"tradeoff: searched static order read from {path}: {found.order} "
                f"({'finished' if found.finished else 'unfinished'} search)"
            )
        else:
            settings = static_order.OrderSettings(max_count=count, n_records=job.searched_records)
            root = Path(job.cache_dir) if job.cache_dir else default_cache_dir()
            path = root / "static_order" / f"{identity['sha256'][:16]}-{job.searched_records}.json"

            def note(message: str) -> None:  # the search logs each layer it adds: "static order: N layers ..."
                log(f"tradeoff: {message}")
                words = message.split()
                if len(words) > 3 and words[:2] == ["static", "order:"] and words[2].isdigit() and words[3] == "layers":
                    bar.update(max(0, min(int(words[2]), count) - bar.done))

            found = static_order.searched_order(model, tokenizer, settings, path, on_mismatch="recompute", log=note)
        done = min(len(found.order), count)
        if bar.done < done:  # read whole (from a file or the cache): no step was logged
            bar.update(done - bar.done)
    finally:
        bar.close()
    return found


def previous_result(job: TradeoffJob) -> dict | None:
    """The unfinished run in `job.output` that `--resume` continues, or None when there is none; a run of a
    different job is refused, since its settings would be mixed with this job's."""
    path = Path(job.output) / RESULT_NAME
    if not job.resume or not path.exists():
        return None
    previous = json.loads(path.read_text())
    ours, theirs = asdict(job), dict(previous.get("job", {}))
    # runs stored before the searched static order existed traced none: resumable with --no-searched-static
    for key, before in (
        ("searched_static", False),
        ("searched_order", None),
        ("searched_records", ours["searched_records"]),
    ):
        theirs.setdefault(key, before)
    # the folders may have moved or be named another way; every flag that shapes the numbers must match
    differ = sorted(k for k in ours if k not in ("resume", "output", "cache_dir") and ours[k] != theirs.get(k))
    if differ:
        raise ValueError(
            f"--resume: {path} was written by a different job ({', '.join(differ)} differ: "
            + "; ".join(f"{k} {theirs.get(k)!r} there, {ours[k]!r} here" for k in differ)
            + "); rerun with the same flags, or drop --resume / pick another --output to start over"
        )
    return previous


def routers_fingerprint(folder: str) -> str:
    """sha256 over the files that define the routers (config, weights, LoRA adapter if any): retrained routers
    in the same folder are other routers, even when fixed --thresholds make every setting look the same."""
    from routertune.config import CONFIG_NAME
    from routertune.model import WEIGHTS_NAME
    from routertune.train.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME, ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def check_resumable(previous: dict, result: dict) -> None:
    """The stored run must come from the same routers and model and have started from the same settings: static
    drop's and random drop's layers and the sweep's thresholds (its first variants, in order). Otherwise its
    numbers do not belong with this run's. (Files written before the routers' fingerprint was stored are
    checked on the settings alone.)"""
    for key in ("routers_sha256", "num_layers", "routed_layers", "unit", "token_top_k_swept_as_thresholds"):
        if key in previous and previous[key] != result[key]:
            raise ValueError(
                f"--resume: the stored run's {key} is {previous[key]!r}, now {result[key]!r}: the "
                "routers or the model changed since it was written; drop --resume to measure from "
                "scratch"
            )
    if previous.get("variants", [])[: len(result["variants"])] != result["variants"]:
        raise ValueError(
            "--resume: the stored run started from other settings (static drop's layers or the "
            "sweep's thresholds differ), so the routers, the model or the data changed since it was "
            "written; drop --resume to measure from scratch"
        )


def _describe(v: Variant) -> dict:
    return {"name": v.name, "kind": v.kind, "k": v.k, "seed": v.seed, "drop": list(v.drop), "threshold": v.threshold}


def _curves_kl(scores: dict[Variant, TextScores], variants, num_layers) -> dict[str, list]:
    """Per family, (measured skip, per-text summed KL) points; random averages its seeds at each k."""
    curves: dict[str, list] = {"static": [], "random": [], "routers": []}
    if any(v.kind == "searched" for v in variants):
        curves["searched"] = []
    dense = next(v for v in variants if v.kind == "dense")
    for family in curves:
        curves[family].append((0.0, scores[dense].kl))
    by_k: dict[int, list] = {}
    for v in variants:
        s = scores[v]
        if v.kind in ("static", "searched"):
            curves[v.kind].append((v.k / num_layers, s.kl))
        elif v.kind == "routers":
            curves["routers"].append((float(s.skipped.mean() / num_layers), s.kl))
        elif v.kind == "random":
            by_k.setdefault(v.k, []).append(s.kl)
    for k, values in sorted(by_k.items()):
        curves["random"].append((k / num_layers, np.mean(values, axis=0)))
    return curves


def match_kl(scores, variants, job: TradeoffJob, num_layers: int) -> dict:
    """Per skip target of `job`: the KL curves of `variants` (one per family) interpolated at that measured skip and
    compared per token (texts weighted by their scored tokens, paired bootstrap), as `compare_curves` does."""
    curves = _curves_kl(scores, variants, num_layers)
    tokens = next(iter(scores.values())).tokens
    # per-text KL sums weighted back into a per-token mean: value_i = kl_i / tokens_i, weight tokens_i
    per_token = {f: [(x, v / tokens) for x, v in pts] for f, pts in curves.items()}
    out = {}
    for t in job.skip_targets:
        out[f"{t:.2f}"] = compare_curves(per_token, t, weights=tokens, iterations=job.bootstrap)
        against_searched(out[f"{t:.2f}"], per_token, t, tokens, job.bootstrap)
    return out


def against_searched(entry: dict, curves: dict, at: float, weights=None, iterations: int = 2000) -> None:
    """Add routers minus the searched static order (paired, at the same measured skip) to a compare_curves
    entry, as routers' minus_searched and interval_searched; nothing when there is no searched curve or it
    does not reach `at`."""
    if "searched" not in curves or not entry.get("routers", {}).get("reached"):
        return
    routers = compare_curves(
        {"searched": curves["searched"], "routers": curves["routers"]}, at, weights, iterations, baseline="searched"
    )["routers"]
    if routers.get("reached"):
        entry["routers"]["minus_searched"] = routers["minus_searched"]
        entry["routers"]["interval_searched"] = routers["interval"]


@torch.inference_mode()
def task_context_skips(
    routed, tokenizer, task: TaskItems, thresholds: Sequence[float], num_layers: int, pad: int, sample: int = 100
) -> dict[float, float]:
    """Estimated measured skip of each router threshold on a task: the routers run on the contexts of its
    first `sample` items (decisions depend on the context alone)."""
    from routertune.calibrate import prompt_batches

    contexts, seen = [], set()
    for inst in task.instances:
        if inst.doc_id not in seen and len(seen) < sample:
            seen.add(inst.doc_id)
            contexts.append(tokenizer(inst.arguments[0])["input_ids"][-512:] or [pad])
    batches = prompt_batches(contexts, pad)
    out = {}
    for t in thresholds:
        with applied(Variant("routers", threshold=t), routed):
            skipped = total = 0.0
            for batch in batches:
                with routed.recording() as calls:
                    routed(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        use_cache=False,
                        logits_to_keep=1,
                    )
                runs = torch.stack([d.float() for d in calls[-1].decisions.values()])  # (layers, B)
                skipped += float((1 - runs).sum())
                total += runs.shape[1] * num_layers
            out[t] = skipped / max(total, 1.0)
    return out


def task_matched(scores: dict, measured: Sequence[float], targets: Sequence[float], iterations: int) -> dict:
    """Per target, a task's curves compared where the router point nearest it measured its skip on the items
    (the accuracy runs hold one router point per target; the static curves are interpolated there): routers
    minus static drop, and minus the searched order when it ran; when only the searched order ran
    (--accuracy-settings searched) it is the baseline, the routers' entry carrying minus_searched and
    interval_searched as in the other case."""
    curves = _accuracy_curves(scores)
    if not curves["static"]:
        del curves["static"]
    out = {}
    for t in targets:
        at = min(measured, key=lambda x: abs(x - t), default=t)  # router points only, never dense's 0
        if "static" in curves:
            entry = compare_curves(curves, at, iterations=iterations)
            against_searched(entry, curves, at, iterations=iterations)
        else:
            entry = compare_curves(curves, at, iterations=iterations, baseline="searched")
            if entry["routers"].get("reached"):
                entry["routers"]["interval_searched"] = entry["routers"].pop("interval")
        entry["at"] = at
        out[f"{t:.2f}"] = entry
    return out


def _accuracy_settings(variants, skips: dict[float, float], job: TradeoffJob, num_layers: int) -> list[Variant]:
    """The fewest settings a paired accuracy comparison at each target needs (each costs a pass over every
    item): static drop at the layer counts around each target, and per target the one router threshold whose
    skip on the task's contexts is nearest the target, on the side where static drop has a point next to it
    (above the smallest target, below the largest), so that static drop is interpolated there over at most
    the span between two adjacent targets' layer counts."""
    chosen = []
    low, high = min(job.skip_targets), max(job.skip_targets)
    kinds = ("searched",) if job.accuracy_settings == "searched" else ("static", "searched")
    for t in job.skip_targets:  # target by target, so that a run cut short still holds whole comparisons
        for v in variants:  # static drop and the searched order at the layer counts around the target
            if v.kind in kinds and v.k in (
                math.floor(t * num_layers + 1e-9),
                math.ceil(t * num_layers - 1e-9),
            ):
                chosen.append(v)
        candidates = [
            th for th, s in skips.items() if (s >= t or t > low) and (s <= t or t < high) and low <= s <= high
        ]
        pool = candidates or list(skips)
        best = min(pool, key=lambda th: abs(skips[th] - t))
        chosen.append(Variant("routers", threshold=best))
        # static drop is interpolated at the router point's skip: when no point lies inside the targets' span
        # (the fallback above), also run the static k on either side of it, or the comparison is not reached
        around = {math.floor(skips[best] * num_layers + 1e-9), math.ceil(skips[best] * num_layers - 1e-9)}
        chosen += [v for v in variants if v.kind in kinds and v.k in around and not candidates]
    return list(dict.fromkeys(chosen))


def static_counts_to_add(
    router_skips: Sequence[float], have: set[int], targets: Sequence[float], num_layers: int
) -> list[int]:
    """The static layer counts (0 = dense) still to run so that static drop can be interpolated at the
    measured skip of the router point nearest each target: the counts on either side of that skip."""
    needed: set[int] = set()
    for t in targets if router_skips else ():
        at = min(router_skips, key=lambda x: abs(x - t))
        needed |= {math.floor(at * num_layers + 1e-9), math.ceil(at * num_layers - 1e-9)}
    return sorted(needed - have)


def _task_result(scores: dict, task: TaskItems) -> dict:
    return {
        "metric": task.metric,
        "items": len(task.docs),
        "settings": {
            v.name: {"accuracy": float(s.correct.mean()), "skip": s.skip, "per_item": s.correct.astype(int).tolist()}
            for v, s in scores.items()
        },
    }


def _accuracy_curves(scores: dict) -> dict[str, list]:
    curves: dict[str, list] = {"static": [], "routers": []}
    if any(v.kind == "searched" for v in scores):
        curves["searched"] = []
    for v, s in scores.items():
        point = (s.skip, s.correct)
        if v.kind == "dense":
            for family in curves:
                curves[family].append(point)
        elif v.kind in curves:
            curves[v.kind].append(point)
    return curves


def _fidelity(routed, tokenizer, variants, job: TradeoffJob, num_layers: int, show: bool = True) -> dict:
    from routertune.eval.harness import RoutedLM
    from routertune.train.prompts import chat_prompts

    prompts = chat_prompts(tokenizer, split="heldout", n=job.fidelity_prompts, max_tokens=256)
    out, reference = {}, None
    bar = progress_bar("agreement", len(variants), unit="setting", show=show)
    for variant in variants:
        with applied(variant, routed):
            lm = RoutedLM(routed, tokenizer, batch_tokens=job.batch_tokens, progress=False)
            completions = lm.greedy(prompts, job.fidelity_tokens)
            stats = lm.stats.get("generation")
        if variant.kind == "dense":
            reference = completions
        agree = [sum(a == b for a, b in zip(r, c)) / max(len(r), len(c), 1) for r, c in zip(reference, completions)]
        skip = stats.skip_ratio if (variant.kind == "routers" and stats is not None) else len(variant.drop) / num_layers
        out[variant.name] = {"token_agreement": float(np.mean(agree)), "skip": float(skip)}
        bar.update(1)
    bar.close()
    return out


def markdown_table(result: dict) -> str:
    """The matched comparison: per domain (KL per token, lower is better) and task (accuracy, higher is
    better), at each target skip: each curve's interpolated value and routers minus static with its interval
    (and, when the run traced the searched static order, its value and routers minus it with its interval)."""
    searched = any("searched" in row for rows in result.get("matched", {}).values() for row in rows.values())
    extra = " searched static |" if searched else ""
    extra_diff = " routers - searched static [95% CI] |" if searched else ""
    lines = [
        f"| where | measured skip | static |{extra} random | routers | routers - static [95% CI] |{extra_diff}"
        " router points used |",
        "|---|---|---|" + ("---|" if searched else "") + "---|---|---|" + ("---|" if searched else "") + "---|",
    ]
    for where, rows in result.get("matched", {}).items():
        is_task = where in result.get("tasks", {})
        scale, unit = (100.0, " pts") if is_task else (1.0, "")
        for target, row in rows.items():

            def value(name):
                entry = row.get(name)
                if not entry:
                    return "-"
                if not entry.get("reached"):
                    return "not reached"
                return f"{entry['value'] * scale:.2f}" if is_task else f"{entry['value']:.4f}"

            def difference(key: str, interval: str) -> str:
                if not (routers.get("reached") and key in routers):
                    return "-"
                low, high = routers[interval]
                return (
                    f"{routers[key] * scale:+.2f}{unit} [{low * scale:+.2f}, {high * scale:+.2f}]"
                    if is_task
                    else f"{routers[key]:+.4f} [{low:+.4f}, {high:+.4f}]"
                )

            routers = row.get("routers", {})
            diff = difference("minus_static", "interval")
            between = "-".join(f"{x:.3f}" for x in routers["between"]) if diff != "-" else "-"
            kind = f"{where} (acc, %)" if is_task else f"{where} (KL/token)"
            skip = f"{float(target):.0%}" + (f" (at {row['at']:.1%})" if "at" in row else "")
            cells = (
                [kind, skip, value("static")]
                + ([value("searched")] if searched else [])
                + [value("random"), value("routers"), diff]
                + ([difference("minus_searched", "interval_searched")] if searched else [])
                + [between]
            )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""The README's main job, `routertune demo`: every part of routertune once, on the default model, in one
folder. Train routers, calibrate them to a capacity, show what they skip, evaluate a subset against dense,
static drop and random drop, benchmark speed, write the report, and summarise it all in one table.

Each stage is an existing job (TuneJob, CalibrateJob, GenerateJob, CompareJob, BenchConfig, ReportConfig);
this module only chooses settings that fit about a quarter of an hour on two CPU cores and reads the
results back for the summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a haiku about autumn leaves.",
]
STAGES = ("train", "calibrate", "evaluate", "bench", "report")


@dataclass
class DemoJob:
    """What `routertune demo` does; every field is a flag. The defaults fit ~15 minutes on 2 CPU cores."""

    output: str = field(default="runs/demo", metadata={"help": "folder for everything the job writes (replaced on each run)"})
    model: str | None = field(default=None, metadata={"help": "base model (default: embedded SmolLM2-135M-Instruct)"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache folder of the converted default model"})
    samples: int = field(default=128, metadata={"help": "training records (the paper uses ~1,000; 128 keeps the demo short)"})
    capacity: float = field(default=0.75, metadata={"help": "fraction of routed attention layers the routers run after calibration"})
    tasks: list[str] | None = field(default=None, metadata={"help": "harness tasks of the evaluation subset (default: arc_easy piqa)"})
    limit: int = field(default=50, metadata={"help": "items per task in the evaluation subset"})
    ppl_texts: int = field(default=64, metadata={"help": "LAMBADA passages for held-out perplexity"})
    fidelity_prompts: int = field(default=16, metadata={"help": "held-out prompts for greedy agreement with the dense model"})
    calibration_samples: int = field(default=64, metadata={"help": "prompts for calibration and static-drop importance (and as many held-out ones)"})
    bench_lengths: list[int] | None = field(default=None, metadata={"help": "prefill lengths benchmarked (default: 128 512 2048)"})
    decode_prompt: int = field(default=512, metadata={"help": "prompt tokens before decoding in the benchmark"})
    decode_tokens: int = field(default=32, metadata={"help": "tokens decoded per sequence in the benchmark"})
    bench: bool = field(default=True, metadata={"help": "run the speed benchmark stage"})

    def __post_init__(self) -> None:
        from . import tasks
        from .calibrate import check_capacity

        self.tasks = ["arc_easy", "piqa"] if self.tasks is None else list(self.tasks)
        self.bench_lengths = [128, 512, 2048] if self.bench_lengths is None else list(self.bench_lengths)
        problems = []
        try:  # an unknown task fails here, not after the training stage
            tasks.check_task_names(self.tasks)
        except ValueError as error:
            problems.append(str(error))
        try:
            check_capacity(self.capacity)
        except ValueError as error:
            problems.append(str(error))
        if not 0.0 < self.capacity < 1.0:
            problems.append(f"capacity={self.capacity} must lie strictly between 0 and 1 for the demo "
                            "(1 is the dense model, 0 skips every routed layer)")
        for name in ("samples", "limit", "ppl_texts", "fidelity_prompts", "calibration_samples", "decode_prompt",
                     "decode_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if problems:
            raise ValueError("Invalid demo job: " + "; ".join(dict.fromkeys(problems)))


@dataclass
class DemoResult:
    output: str
    seconds: dict[str, float]  # stage -> wall seconds
    tune: object  # pipeline.TuneReport
    calibration: object  # calibrate.CalibrateReport
    generations: list  # pipeline.Generation
    compare: object  # compare.CompareReport
    bench: dict | None  # bench JSON (None with --no-bench)
    report: object  # report.Report
    summary: list[str] = field(default_factory=list)  # markdown lines


def run_demo(job: DemoJob, announce: Callable[[str], None] = print,
             finished: Callable[[str, object], None] = lambda stage, outcome: None) -> DemoResult:
    """Run every stage in order; `announce` gets a line as each stage starts, `finished` each stage's outcome."""
    from . import bench, calibrate, compare, pipeline, report
    from .config import RouterConfig
    from .files import atomic_write
    from .train import TrainConfig

    out = Path(job.output)
    _claim(out, job)
    seconds: dict[str, float] = {}
    running = {"name": None, "since": time.perf_counter()}

    def stage(name: str | None, what: str = "") -> None:
        """Close the running stage's clock; announce and start the next one (None: the end)."""
        now = time.perf_counter()
        if running["name"]:
            seconds[running["name"]] = now - running["since"]
        running.update(name=name, since=now)
        if name:
            announce(f"\n[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {what}")

    stage("train", f"Router-Tuning on {job.samples} samples of the offline mix -> {out}")
    tune = pipeline.tune(
        pipeline.TuneJob(output=str(out), model=job.model, cache_dir=job.cache_dir, samples=job.samples,
                         heldout_samples=32, overwrite=True),
        # stage 2 calibrates, on prompts training never saw, and reports held-out capacity
        TrainConfig(target_capacity=job.capacity, calibrate=False),
    )
    finished("train", tune)

    stage("calibrate", f"threshold for capacity {job.capacity} (the deployment dial), then generate")
    calibration = calibrate.calibrate_job(calibrate.CalibrateJob(
        routers=str(out), capacity=job.capacity, model=job.model, cache_dir=job.cache_dir,
        samples=job.calibration_samples, heldout_samples=job.calibration_samples))
    generations = pipeline.generate(pipeline.GenerateJob(
        prompts=DEMO_PROMPTS, routers=str(out), model=job.model, cache_dir=job.cache_dir, max_new_tokens=48))
    finished("calibrate", (calibration, generations))

    # static and random drop skip the same share of ALL attention sublayers as the calibrated routers
    saved = RouterConfig.load(out)
    num_layers = saved.base_model.num_hidden_layers
    routed_layers = len(saved.resolved_layers(num_layers))
    skip_ratio = (1 - job.capacity) * routed_layers / num_layers
    stage("evaluate", f"{', '.join(job.tasks)} ({job.limit} items each), LAMBADA perplexity and greedy "
                      f"fidelity: dense, static drop, random drop, routers at {skip_ratio:.1%} attention skipped")
    comparison = compare.compare(compare.CompareJob(
        routers=str(out), tasks=job.tasks, skip_ratios=[skip_ratio], limit=job.limit, perplexity=["lambada"],
        ppl_texts=job.ppl_texts, fidelity_prompts=job.fidelity_prompts, calibration_samples=job.calibration_samples,
        output=str(out / "compare"), model=job.model, cache_dir=job.cache_dir))
    finished("evaluate", comparison)

    bench_json = None
    if job.bench:
        stage("bench", "prefill, decode, KV bytes: dense, static drop, routers forced to its skip set, routers")
        cfg = bench.BenchConfig(
            model=job.model, cache_dir=job.cache_dir, routers=str(out), lengths=job.bench_lengths,
            batch_sizes=[1, 8], decode_prompt=job.decode_prompt, decode_tokens=job.decode_tokens, repeats=3,
            overhead_repeats=5, overhead_steps=32, skip_fraction=1 - job.capacity, output=str(out / "bench.json"))
        bench_json = bench.run_bench(cfg, progress=bench.progress_bar(cfg)).to_dict()
        finished("bench", bench_json)

    stage("report", f"tables and plots -> {out / 'report'}")
    inputs = [str(out / "compare" / "compare.json")] + ([str(out / "bench.json")] if bench_json else [])
    page = report.build_report(report.ReportConfig(inputs=inputs, output=str(out / "report"),
                                                   title="routertune demo"))
    stage(None)

    result = DemoResult(output=str(out), seconds=seconds, tune=tune, calibration=calibration,
                        generations=generations, compare=comparison, bench=bench_json, report=page)
    result.summary = summary_table(result)
    atomic_write(out / "summary.md", lambda p: Path(p).write_text("\n".join(result.summary) + "\n"))
    return result


JOB_NAME = "demo_job.json"


def _claim(out: Path, job: DemoJob) -> None:
    """The demo replaces its own earlier results in `out`, never a run that something else wrote there."""
    from dataclasses import asdict

    from .config import CONFIG_NAME
    from .files import write_json
    from .train import CHECKPOINTS

    foreign = ((out / CONFIG_NAME).exists() or (out / CHECKPOINTS).exists()) and not (out / JOB_NAME).exists()
    if foreign:
        raise FileExistsError(f"{out} holds routers that the demo did not write; pass another --output "
                              "(the demo replaces what is in its folder)")
    write_json(out / JOB_NAME, asdict(job))


def summary_table(result: DemoResult) -> list[str]:
    """One markdown table: quality (evaluation subset) and speed (benchmark) per way of running the model."""
    cmp = result.compare
    tasks = ", ".join(f"{t} n={n}" for t, n in cmp.samples.items())
    speed = _speedups(result.bench) if result.bench else {}
    lines = [
        f"| setting | attention skipped | avg accuracy ({tasks}) | LAMBADA ppl | greedy token agreement "
        "| prefill speed-up | decode speed-up | KV bytes vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    bench_name = {"dense": "dense", "static": "static_drop", "routers": "routed"}
    for s in cmp.settings:
        fid = s.fidelity["token_agreement"] if s.fidelity else None
        sp = speed.get(bench_name.get(s.kind), {})
        lines.append(
            f"| {s.name} | {s.skip_ratio:.1%} | {100 * s.average:.1f} | {s.perplexity.get('lambada', float('nan')):.2f} "
            f"| {_fmt(fid, '.3f')} | {sp.get('prefill', '-')} | {sp.get('decode', '-')} | {sp.get('kv', '-')} |")
    if result.bench:
        p = speed["_where"]
        lines.append("")
        lines.append(f"Speed-ups are dense time / this time ({p}); benchmark rows have no random drop. "
                     f"Routers forced to static drop's skip set reach {speed['_forced']} of static drop's speed-up.")
    lines.append("")
    lines.append("Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
                 + f" (total {sum(result.seconds.values()) / 60:.1f} min).")
    return lines


def _speedups(bench: dict) -> dict:
    longest = max(bench["prefill"], key=lambda p: (p["length"], -p["batch"]))
    decode = max(bench["decode"], key=lambda d: d["batch"])
    speed = {}
    for name in ("dense", "static_drop", "routed"):
        pv, dv = longest["variants"][name], decode["variants"][name]
        speed[name] = {
            "prefill": f"{pv['speedup']:.3f}x (ideal {pv['ideal_speedup']:.3f}x)",
            "decode": f"{dv['speedup']:.3f}x",
            "kv": f"{dv['kv_bytes'] / decode['variants']['dense']['kv_bytes']:.3f}",
        }
    checks = bench.get("checks") or {}
    speed["_where"] = (f"prefill {longest['length']} tokens B={longest['batch']}, decode {decode['new_tokens']} "
                       f"tokens after {decode['prompt']} B={decode['batch']}")
    speed["_forced"] = _fmt(checks.get("forced_vs_static_min"), ".3f") + " (worst setting)"
    return speed


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)

"""The README's main job, `routertune demo`: every part of routertune once, on the default model, in one
folder. Train routers (the default recipe), show what they skip per prompt, trace their quality-for-skip
trade-off against static and random drop on the same items, benchmark speed, write the report, and summarise
it all: the routers beside static drop at matched measured skip, with intervals.

Each stage is an existing job (TuneJob, GenerateJob, TradeoffJob, BenchConfig, ReportConfig); this module
only chooses settings (a coffee-break size by default, the full one with --full) and reads the results back.
Every stage reports progress (routertune.progress): a bar with a count on the terminal, and events that the
tests listen to, so that no part runs silently for minutes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a haiku about autumn leaves.",
]
STAGES = ("train", "generate", "tradeoff", "bench", "report")


# The two sizes of the job. QUICK (the default) shows every stage working in a coffee break: KL to the dense
# model resolves routers against static drop with a dozen texts a domain, while accuracy on a few hundred items
# cannot (intervals several points wide), so it is left to --full, which restores the earlier full settings.
QUICK = dict(
    samples=256,
    tasks=[],
    limit=200,
    texts=8,
    fidelity_prompts=0,  # greedy agreement (3+ minutes) separates little at this size: --full
    sweep_points=6,
    random_seeds=1,
    bench_lengths=[512],
    bench_repeats=5,
    decode_tokens=16,
    searched_records=16,
)
FULL = dict(
    samples=1000,
    tasks=["arc_easy", "piqa"],
    limit=200,
    texts=16,
    fidelity_prompts=16,
    sweep_points=8,
    random_seeds=2,
    bench_lengths=[128, 512, 2048],
    bench_repeats=7,
    decode_tokens=32,
    searched_records=32,
)
# wall minutes on an idle 2-core machine, set-up excluded: this size measured 14.2 minutes from a fresh clone
# (docs/demo.md#measured-runs); the full size is an estimate from earlier full runs
QUICK_MINUTES = "15"
FULL_MINUTES = "40"
FULL_COMMAND = "routertune demo --full"
FULL_DOCS = "docs/evaluation.md and docs/demo.md"
REPO_HEADROOM = "benchmarks/results/headroom/headroom.json"  # the per-input oracles, measured (committed)
REPO_ORDER = "benchmarks/results/static-order/static_order.json"  # the searched static order, committed  # where the measurements that decide are written up
HELP = (
    f"main job: train, generate, trade-off vs static and random drop, benchmark, report, summary; about "
    f"{QUICK_MINUTES} minutes on 2 CPU cores (`{FULL_COMMAND}`: the full settings, about {FULL_MINUTES} "
    "minutes)"
)


def _size_help(name: str, what: str) -> dict:
    def shown(value) -> str:
        return (" ".join(map(str, value)) or "none") if isinstance(value, list) else str(value)

    return {
        "help": f"{what} (default: {shown(QUICK[name])}; with --full: {shown(FULL[name])})",
        "default_in_help": True,
    }


@dataclass
class DemoJob:
    """What `routertune demo` does; every field is a flag. Fields left at None take the demo's size (QUICK), or
    the full size with --full (FULL); a flag given explicitly wins over either."""

    output: str = field(
        default="runs/demo", metadata={"help": "folder for everything the job writes (replaced on each run)"}
    )
    model: str | None = field(default=None, metadata={"help": "base model (default: embedded SmolLM2-135M-Instruct)"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache folder of the converted default model"})
    full: bool = field(
        default=False,
        metadata={
            "help": f"the full measurement (about {FULL_MINUTES} minutes): "
            "1,000 training samples, ARC-Easy and PIQA accuracy, 16 "
            "texts a domain, the bench at 128/512/2048 tokens"
        },
    )
    samples: int | None = field(default=None, metadata=_size_help("samples", "training records (the paper's ~1,000)"))
    heldout_samples: int = field(default=32, metadata={"help": "held-out records for the training stage's loss report"})
    capacity: float = field(
        default=0.75, metadata={"help": "fraction of routed attention layers the routers run at the default threshold"}
    )
    tasks: list[str] | None = field(
        default=None,
        metadata={
            **_size_help("tasks", "multiple-choice tasks of the trade-off; the flag with no names runs none"),
            "may_be_empty": True,
        },
    )
    limit: int | None = field(default=None, metadata=_size_help("limit", "items per task in the trade-off"))
    texts: int | None = field(
        default=None,
        metadata=_size_help("texts", "held-out texts per domain (LAMBADA, Wikipedia, code) for KL and perplexity"),
    )
    skip_targets: list[float] | None = field(
        default=None,
        metadata={
            "help": "measured skip ratios where routers and static drop are compared (default: 0.1 0.2)",
            "default_in_help": True,
        },
    )
    fidelity_prompts: int | None = field(
        default=None,
        metadata=_size_help("fidelity_prompts", "held-out prompts for greedy agreement with the dense model"),
    )
    sweep_points: int | None = field(
        default=None, metadata=_size_help("sweep_points", "router thresholds in the trade-off's sweep")
    )
    random_seeds: int | None = field(
        default=None, metadata=_size_help("random_seeds", "random-drop seeds in the trade-off")
    )
    calibration_samples: int = field(
        default=32, metadata={"help": "chat prompts for static-drop importance and the sweep's placement"}
    )
    bench_lengths: list[int] | None = field(
        default=None, metadata=_size_help("bench_lengths", "prefill lengths benchmarked")
    )
    bench_repeats: int | None = field(
        default=None,
        metadata=_size_help("bench_repeats", "paired repeats per prefill setting (the summary gives the interval)"),
    )
    decode_prompt: int = field(default=512, metadata={"help": "prompt tokens before decoding in the benchmark"})
    decode_tokens: int | None = field(
        default=None, metadata=_size_help("decode_tokens", "tokens decoded per sequence in the benchmark")
    )
    bench: bool = field(default=True, metadata={"help": "run the speed benchmark stage"})
    searched_static: bool | None = field(
        default=None,
        metadata={
            "help": "search the static order here and compare the routers with it (routertune.train.static_order: minutes of one thread per layer at the first run, then read from the routertune cache); default: read the repository's search ("
            + REPO_ORDER
            + ") when it exists and the model is the default one, else none; --no-searched-static: none"
        },
    )
    searched_order: str | None = field(
        default=None,
        metadata={
            "help": "a search of this model to read as it is, e.g. benchmarks/results/static-order (no search; the comparison then costs seconds at demo size too)"
        },
    )
    searched_records: int | None = field(
        default=None, metadata=_size_help("searched_records", "tuning records the static order is searched on")
    )

    def __post_init__(self) -> None:
        from routertune.eval import tasks

        from .calibrate import check_capacity

        size = FULL if self.full else QUICK
        for name, value in size.items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        self.tasks = list(self.tasks)
        if (
            self.searched_static is None
            and self.searched_order is None
            and self.model is None
            and Path(REPO_ORDER).exists()
        ):
            self.searched_order = REPO_ORDER  # a checkout's committed search of the default model: read, no search
        self.searched_static = bool(self.searched_static)
        self.bench_lengths = list(self.bench_lengths)
        self.skip_targets = [0.1, 0.2] if self.skip_targets is None else list(self.skip_targets)
        problems = []
        try:  # an unknown task fails here, not after the training stage (no tasks: KL alone, the default)
            if self.tasks:
                tasks.check_task_names(self.tasks)
        except ValueError as error:
            problems.append(str(error))
        try:
            check_capacity(self.capacity)
        except ValueError as error:
            problems.append(str(error))
        if not 0.0 < self.capacity < 1.0:
            problems.append(
                f"capacity={self.capacity} must lie strictly between 0 and 1 for the demo "
                "(1 is the dense model, 0 skips every routed layer)"
            )
        for name in (
            "samples",
            "heldout_samples",
            "limit",
            "texts",
            "calibration_samples",
            "searched_records",
            "decode_prompt",
            "decode_tokens",
            "bench_repeats",
            "sweep_points",
            "random_seeds",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.fidelity_prompts < 0:
            problems.append(f"fidelity_prompts={self.fidelity_prompts} must be >= 0 (0: no greedy agreement)")
        if any(not 0 < t < 1 for t in self.skip_targets):
            problems.append(f"skip_targets={self.skip_targets} must lie in (0, 1)")
        if problems:
            raise ValueError("Invalid demo job: " + "; ".join(dict.fromkeys(problems)))


def banner(job: DemoJob) -> str:
    """The first line the demo prints: what it runs, how long that takes, where it writes."""
    size = (
        f"the full measurement, about {FULL_MINUTES} minutes"
        if job.full
        else f"demo size, about {QUICK_MINUTES} minutes; `{FULL_COMMAND}` for the full measurement, about "
        f"{FULL_MINUTES} minutes"
    )
    return (
        f"routertune demo on {job.model or 'the embedded SmolLM2-135M-Instruct'}: {len(STAGES)} stages "
        f"({', '.join(STAGES)}), {size}, on 2 CPU cores -> {job.output}"
    )


@dataclass
class DemoResult:
    output: str
    seconds: dict[str, float]  # stage -> wall seconds
    tune: object  # pipeline.TuneReport
    generations: list  # generate.Generation
    tradeoff: dict  # tradeoff.json
    bench: dict | None  # bench JSON (None with --no-bench)
    report: object  # report.Report
    summary: list[str] = field(default_factory=list)  # markdown lines
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # stage -> CPU seconds of this process


def run_demo(
    job: DemoJob,
    announce: Callable[[str], None] = print,
    finished: Callable[[str, object], None] = lambda stage, outcome: None,
) -> DemoResult:
    """Run every stage in order; `announce` gets a line as each stage starts, `finished` each stage's outcome."""
    from routertune import progress

    try:
        return _run_demo(job, announce, finished)
    finally:
        progress.set_stage("")  # events after the demo (or after a stage that failed) carry no stage


def _run_demo(job: DemoJob, announce, finished) -> DemoResult:
    from routertune import generate, progress, report
    from routertune.bench import runner as bench
    from routertune.eval import tradeoff
    from routertune.train import tune as pipeline
    from routertune.train.loop import TrainConfig

    from .files import atomic_write

    out = Path(job.output)
    _claim(out, job)
    seconds: dict[str, float] = {}
    # CPU seconds beside wall seconds: with one thread on a shared machine, wall time counts the waits for a
    # core and CPU time does not, so the pair shows how much of a slow run was the machine's load
    cpu_seconds: dict[str, float] = {}
    running = {"name": None, "since": time.perf_counter(), "cpu": time.process_time()}

    def stage(name: str | None, what: str = "") -> None:
        """Close the running stage's clock; announce and start the next one (None: the end). Progress events
        of the stage's code carry its name."""
        now, cpu = time.perf_counter(), time.process_time()
        if running["name"]:
            seconds[running["name"]] = now - running["since"]
            cpu_seconds[running["name"]] = cpu - running["cpu"]
            announce(f"[{running['name']}: {seconds[running['name']]:.0f} s, CPU {cpu_seconds[running['name']]:.0f} s]")
        progress.set_stage(name or "")
        running.update(name=name, since=now, cpu=cpu)
        if name:
            announce(f"\n[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {what}")

    stage(
        "train",
        f"routers fitted to per-input attention importance on {job.samples} samples of the offline "
        f"mix, their prior the searched static order, capacity {job.capacity} -> {out}",
    )
    tune = pipeline.tune(
        pipeline.TuneJob(
            output=str(out),
            model=job.model,
            cache_dir=job.cache_dir,
            samples=job.samples,
            heldout_samples=job.heldout_samples,
            overwrite=True,
            static_order=job.searched_order,  # the order the trade-off compares with (None: shipped or searched)
        ),
        TrainConfig(target_capacity=job.capacity),
    )
    finished("train", tune)

    stage("generate", "greedy completions of the demo prompts, with run/SKIP per routed layer")
    with progress.bar("generate", len(DEMO_PROMPTS), unit="prompt") as bar:  # seconds: one count at the end
        generations = generate.generate(
            generate.GenerateJob(
                prompts=DEMO_PROMPTS, routers=str(out), model=job.model, cache_dir=job.cache_dir, max_new_tokens=48
            )
        )
        bar.update(len(generations))
    finished("generate", generations)

    from .config import RouterConfig

    num_layers = RouterConfig.load(str(out)).base_model.num_hidden_layers  # static drop's k per target
    targets = ", ".join(f"{t:.0%}" for t in job.skip_targets)
    accuracy = (
        f"{', '.join(job.tasks)} accuracy ({job.limit} items each)"
        if job.tasks
        else "no accuracy tasks (they do not resolve at demo size: --full or --tasks)"
    )
    agreement = (
        f"greedy agreement on {job.fidelity_prompts} prompts"
        if job.fidelity_prompts
        else "no greedy agreement (--full or --fidelity-prompts)"
    )
    stage(
        "tradeoff",
        f"KL to dense on {job.texts} texts x 3 held-out domains, {agreement}, {accuracy}: a threshold sweep "
        "against static and random "
        f"drop, compared at {targets} measured skip",
    )
    curve = tradeoff.run_tradeoff(
        tradeoff.TradeoffJob(
            routers=str(out),
            output=str(out / "tradeoff"),
            model=job.model,
            cache_dir=job.cache_dir,
            texts=job.texts,
            max_tokens=192,
            tasks=job.tasks,
            limit=job.limit,
            skip_targets=job.skip_targets,
            max_drop=int(round(max(job.skip_targets) * num_layers)) + 1,
            random_seeds=job.random_seeds,
            sweep_points=job.sweep_points,
            searched_static=job.searched_static,
            searched_order=job.searched_order,
            searched_records=job.searched_records,
            fidelity_prompts=job.fidelity_prompts,
            fidelity_tokens=24,
            calibration_samples=job.calibration_samples,
            bootstrap=1000,
        )
    )
    finished("tradeoff", curve)

    bench_json = None
    if job.bench:
        stage("bench", "prefill, decode, KV bytes: dense, static drop, routers forced to its skip set, routers")
        cfg = bench.BenchConfig(
            model=job.model,
            cache_dir=job.cache_dir,
            routers=str(out),
            lengths=job.bench_lengths,
            batch_sizes=[1, 8],
            decode_prompt=job.decode_prompt,
            decode_tokens=job.decode_tokens,
            repeats=job.bench_repeats,
            skip_fraction=1 - job.capacity,
            # the bench's own overhead prefill pairs (5 + 32 pairs gave [1.006, 1.059], which cannot settle a 2%
            # limit); fewer decode steps only when the demo's decode is shrunk
            overhead_steps=min(256, 8 * job.decode_tokens),
            # one thread on the process CPU clock: time spent waiting for a core (a shared machine) is not counted
            threads=1,
            clock="cpu",
            output=str(out / "bench.json"),
        )
        bench_json = bench.run_bench(cfg, progress=_bench_progress(bench.progress_bar(cfg))).to_dict()
        finished("bench", bench_json)

    stage("report", f"tables and plots -> {out / 'report'}")
    inputs = [str(out / "tradeoff" / tradeoff.RESULT_NAME)] + ([str(out / "bench.json")] if bench_json else [])
    with progress.bar("report", 1, unit="page") as bar:
        page = report.build_report(
            report.ReportConfig(inputs=inputs, output=str(out / "report"), title="routertune demo")
        )
        bar.update(1)
    stage(None)

    result = DemoResult(
        output=str(out),
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        tune=tune,
        generations=generations,
        tradeoff=curve,
        bench=bench_json,
        report=page,
    )
    result.summary = summary_table(result)
    atomic_write(out / "summary.md", lambda p: Path(p).write_text("\n".join(result.summary) + "\n"))
    return result


def _bench_progress(draw: Callable[[str], None]) -> Callable[[str], None]:
    """The bench's own progress callback (each message names the measurement starting, so the one before it
    is done; "done" ends it) also counted as progress events."""
    from routertune.progress import bar

    counted = bar("bench", None, unit="setting", show=False)  # the bench draws its own bar
    begun = []

    def note(message: str) -> None:
        draw(message)
        if begun:
            counted.update(1)
        begun.append(message)

    return note


JOB_NAME = "demo_job.json"


def _claim(out: Path, job: DemoJob) -> None:
    """The demo replaces its own earlier results in `out`, never a run that something else wrote there."""
    from dataclasses import asdict

    from routertune.train.loop import CHECKPOINTS

    from .config import CONFIG_NAME
    from .files import write_json

    foreign = ((out / CONFIG_NAME).exists() or (out / CHECKPOINTS).exists()) and not (out / JOB_NAME).exists()
    if foreign:
        raise FileExistsError(
            f"{out} holds routers that the demo did not write; pass another --output "
            "(the demo replaces what is in its folder)"
        )
    write_json(out / JOB_NAME, asdict(job))


def headroom_lines(path: str) -> list[str]:
    """The reachable oracle beside the routers and the searched order, from the repository's committed headroom
    measurement (per-input oracles cost too much for a demo): one line, or none where the file is missing."""
    if not Path(path).is_file():
        return []
    pooled = json.loads(Path(path).read_text())["pooled"]
    cells = []
    for k, row in pooled["summary"].items():
        gap = row["minus_best_static"].get("reachable")
        if gap is None:
            continue
        low, high = gap["relative_interval"]
        cells.append(f"{int(k)} layers: {gap['relative']:+.0%} [{low:+.0%}, {high:+.0%}]")
    if not cells:
        return []
    return [
        "How much any router could gain (the reachable oracle: each text's own best set, chosen on the half a "
        f"router sees, against the searched order, KL on the other half; committed measurement on "
        f"{pooled['texts']} texts, not rerun here, {path}): " + "; ".join(cells) + "."
    ]


def summary_table(result: DemoResult) -> list[str]:
    """Markdown: the routers beside static drop at matched measured skip (quality, with paired intervals),
    what the routers did per prompt, and speed with its interval."""
    from routertune.eval.tradeoff import markdown_table

    searched = any(v["kind"] == "searched" for v in result.tradeoff.get("variants", []))
    lines = [
        "Quality at matched measured skip (routers interpolated along their threshold sweep, static drop "
        "along k"
        + (
            ", the searched static order (the layers whose removal cost the least KL on the tuning "
            "data, added one at a time: the best static order found) along k"
            if searched
            else ""
        )
        + "; same items; KL per token to the dense model, lower is better; accuracy in %; every difference "
        "with its paired 95% interval):",
        "",
        markdown_table(result.tradeoff),
        "",
    ]
    patterns = {tuple(layer for layer, ran in g.runs.items() if not ran) for g in result.generations}
    lines.append(
        f"Demo prompts: {len(patterns)} distinct skip patterns over {len(result.generations)} prompts "
        "(`routertune generate` prints them)."
    )
    fidelity = result.tradeoff.get("fidelity") or {}
    if fidelity:
        best = {}
        for name, f in fidelity.items():
            family = name.split(" ")[0]
            best.setdefault(family, []).append((f["skip"], f["token_agreement"]))
        lines.append(
            "Greedy token agreement with dense (skip: agreement): "
            + "; ".join(
                f"{family} " + ", ".join(f"{x:.0%}: {y:.2f}" for x, y in sorted(points)[:6])
                for family, points in best.items()
                if family != "dense"
            )
            + "."
        )
    if result.bench:
        lines += [""] + _speed_lines(result.bench)
    lines.append("")
    if not searched:
        lines.append(
            "The searched static order (the best static order found by KL search on the tuning data) was "
            "not traced: its search takes minutes of one thread per layer. `--searched-static` searches it "
            "(cached afterwards), `--searched-order FOLDER` reads a search of this model."
        )
    lines += headroom_lines(REPO_HEADROOM) if searched else []
    if not result.tradeoff.get("tasks"):
        lines.append(
            "Accuracy was not measured: on a few hundred items a task its intervals are several points "
            "wide and settle nothing, so the demo leaves it to the full run."
        )
    lines.append(
        f"This is the demo's size. The full measurements (more texts and tasks, all items, the bench at "
        f"every length) are in {FULL_DOCS}; `{FULL_COMMAND}` reruns this job at its full size (about "
        f"{FULL_MINUTES} minutes)."
    )
    cpu = result.cpu_seconds
    lines.append(
        "Stage times, wall (CPU of this process): "
        + ", ".join(f"{k} {v:.0f} s" + (f" ({cpu[k]:.0f} s)" if k in cpu else "") for k, v in result.seconds.items())
        + f"; total {sum(result.seconds.values()) / 60:.1f} min"
        + (f" ({sum(cpu.values()) / 60:.1f} min)" if cpu else "")
        + ". Wall well above CPU means the machine was busy with other work."
    )
    return lines


def _speed_lines(bench: dict) -> list[str]:
    """Speed-up = dense time / variant time, the paired median over repeats with its interval; beside it the
    FLOP ideal. An interval that holds 1.0 means the benchmark could not tell the variant from dense."""
    lines = ["| speed | static drop | routers forced to static's set | routers (own decisions) |", "|---|---|---|---|"]
    longest = max(bench["prefill"], key=lambda p: (p["length"], -p["batch"]))
    decode = max(bench["decode"], key=lambda d: d["batch"])
    for label, entry in (
        (f"prefill {longest['length']} tokens, batch {longest['batch']}", longest),
        (f"decode {decode['new_tokens']} after {decode['prompt']}, batch {decode['batch']}", decode),
    ):
        cells = []
        for name in ("static_drop", "routed_static_set", "routed"):
            v = entry["variants"].get(name)
            if v is None:
                cells.append("-")
                continue
            ci = v.get("speedup_ci") or [None, None]
            interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci[0] is not None else ""
            cells.append(
                f"{v['speedup']:.3f}x{interval} (ideal {v['ideal_speedup']:.3f}x, "
                f"KV {v['kv_bytes'] / entry['variants']['dense']['kv_bytes']:.2f})"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)

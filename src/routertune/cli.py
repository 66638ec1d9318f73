"""`routertune` command line: a thin table from subcommand to library function. Flags come from the
dataclass fields (help text lives with the field), and this is the only module that prints."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import typing
from pathlib import Path

from routertune import generate
from routertune.demo import HELP as DEMO_HELP  # the demo's expected time, measured (the module imports nothing heavy)
from routertune.train import tune as pipeline
from routertune.train.loop import TrainConfig


def _flag_type(annotation):
    """(argparse type, nargs, is_bool) for a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _flag_type(args[0])
    if origin is list:
        return args[0], "+", False
    if annotation is bool:
        return None, None, True
    return annotation, None, False


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind, nargs, is_bool = _flag_type(hints[f.name])
        if nargs == "+" and f.metadata.get("may_be_empty"):
            nargs = "*"  # a bare flag gives []: e.g. `tradeoff --tasks` (held-out text only)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        if is_bool:
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            suffix = "" if f.metadata.get("default_in_help") else f" (default: {default})"
            group.add_argument(flag, dest=f.name, type=kind, nargs=nargs, default=default, help=help_text + suffix)


def _build(cls, namespace, **extra):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(namespace).items() if k in names}, **extra)


def _print_tune(report: pipeline.TuneReport, cfg: TrainConfig) -> None:
    res = report.result
    print(
        f"routers saved to {report.output} ({report.trainable_parameters} trainable weights, "
        f"{report.samples} samples, {report.truncated} truncated, {res.steps} steps in {res.seconds:.0f} s)"
    )
    if res.fit is not None:
        print(
            f"importance fit on {res.fit['records']} records: ridge {res.fit['ridge']:g}, held-out R^2 of per-input "
            f"log importance {max(res.fit['heldout_r2'].values(), default=float('nan')):.3f}; "
            f"capacity {res.fit['train_capacity']:.3f} on the training prompts at threshold 0.5"
        )
    if res.uncalibrated is not None:
        print(
            f"training alone reached held-out capacity {res.uncalibrated.capacity:.2f} at threshold 0.5; "
            f"calibrated threshold {res.threshold:.4f} on the training prompts"
        )
    if res.after is not None and res.dense is not None:
        print(
            f"held-out response loss: dense {res.dense.loss:.4f}  routed {res.after.loss:.4f}  "
            f"(capacity {res.after.capacity:.2f}, target {cfg.target_capacity:.2f})"
        )


def _print_generations(generations: list[generate.Generation]) -> None:
    for gen in generations:
        if gen.token_run_fraction is not None:
            print(f"\n>>> {gen.prompt}\n{gen.completion}")
            print(
                "[tokens that ran each layer] "
                + " ".join(f"{layer}:{share:.0%}" for layer, share in gen.token_run_fraction.items())
            )
            continue
        skipped = [layer for layer, ran in gen.runs.items() if not ran]
        print(f"\n>>> {gen.prompt}\n{gen.completion}")
        print("[layers] " + " ".join(f"{layer}:{'run' if ran else 'SKIP'}" for layer, ran in gen.runs.items()))
        print(f"[skipped {len(skipped)} of {len(gen.runs)} routed layers: {skipped}]")


def cmd_train(args) -> int:
    cfg = _build(TrainConfig, args)
    _print_tune(pipeline.tune(_build(pipeline.TuneJob, args), cfg), cfg)
    return 0


def cmd_generate(args) -> int:
    _print_generations(generate.generate(_build(generate.GenerateJob, args)))
    return 0


def cmd_demo(args) -> int:
    """The README's main job: train, generate, trade-off against static and random drop, benchmark, report."""
    from . import demo, report

    job = _build(demo.DemoJob, args)
    print(demo.banner(job), flush=True)

    def finished(stage: str, outcome) -> None:
        if stage == "train":
            _print_tune(outcome, TrainConfig(target_capacity=job.capacity))
        elif stage == "generate":
            _print_generations(outcome)
        elif stage == "tradeoff":
            from routertune.eval import tradeoff

            print(tradeoff.markdown_table(outcome))
        elif stage == "bench":
            print("\n".join(report.bench_tables(outcome)))
        sys.stdout.flush()

    result = demo.run_demo(job, announce=lambda line: print(line, flush=True), finished=finished)
    print(f"report: {result.report.markdown} (plots: {', '.join(Path(p).name for p in result.report.plots)})")
    print(f"\nsummary (also in {Path(result.output) / 'summary.md'}):\n")
    print("\n".join(result.summary))
    return 0


def cmd_eval(args) -> int:
    from routertune.eval import evaluate

    report = evaluate.evaluate_job(_build(evaluate.EvalJob, args))
    harness = report.harness
    print(
        f"{report.setting['name']}: attention skip ratio {harness.skip_ratio:.1%} of all attention sublayers "
        f"({harness.seconds:.0f} s in the harness, lm-eval {harness.harness_version}"
        + (f", limit {harness.limit} per task" if harness.limit else "")
        + ")"
    )
    if report.dropped is not None:
        print(f"dropped attention layers: {report.dropped}")
    print(f"{'task':<16}{'shots':>6}{'items':>7}  {'acc':>14}  {'acc_norm':>14}  {'skip':>6}")
    for name, score in harness.tasks.items():
        cells = [
            f"{100 * score.metrics[m]:6.2f} ± {100 * score.stderr.get(m, float('nan')):4.2f}"
            if m in score.metrics
            else f"{'-':>14}"
            for m in ("acc", "acc_norm")
        ]
        print(f"{name:<16}{score.shots:>6}{score.samples:>7}  {cells[0]}  {cells[1]}  {score.skip['skip_ratio']:6.1%}")
    print(
        f"average ({', '.join(f'{n} {s.headline}' for n, s in harness.tasks.items())}): {100 * harness.average():.2f}"
    )
    for source, ppl in report.perplexity.items():
        print(f"perplexity {source}: {ppl.ppl:.3f} ({ppl.texts} passages, {ppl.tokens} tokens scored)")
    if report.fidelity is not None:
        f = report.fidelity
        print(
            f"greedy fidelity vs dense ({f.prompts} prompts x {f.max_new_tokens} tokens): token agreement "
            f"{f.token_agreement:.3f}, exact match {f.exact_match:.3f}, common prefix {f.prefix_agreement:.3f}"
        )
    if report.output:
        print(f"results written to {report.output}")
    return 0


def cmd_calibrate(args) -> int:
    from . import calibrate

    report = calibrate.calibrate_job(_build(calibrate.CalibrateJob, args))
    res = report.result
    where = "per-layer thresholds" if res.per_layer else f"threshold {res.threshold:.6f}"
    print(
        f"calibrated to capacity {res.target:.3f}: {where}; realised {res.capacity:.4f} on {res.prompts} "
        f"calibration prompts ({len(res.history)} passes, {res.seconds:.0f} s)"
    )
    if report.heldout_capacity is not None:
        print(
            f"held-out capacity: {report.heldout_capacity:.4f} on {report.heldout_prompts} prompts "
            f"(off by {report.heldout_capacity - res.target:+.4f})"
        )
    if res.per_layer and res.layer_thresholds:
        print("thresholds: " + " ".join(f"{k}:{v:.4f}" for k, v in sorted(res.layer_thresholds.items())))
    print(f"router config saved to {report.output}")
    return 0


def cmd_compare(args) -> int:
    from routertune.eval import compare

    report = compare.compare(_build(compare.CompareJob, args))
    print(report.markdown)
    print(f"written to {args.output}/compare.md and compare.json ({report.seconds:.0f} s)")
    return 0


def cmd_tradeoff(args) -> int:
    from routertune.eval import tradeoff

    job = _build(tradeoff.TradeoffJob, args)
    result = tradeoff.run_tradeoff(job, log=lambda message: print(f"[tradeoff] {message}", flush=True))
    print(tradeoff.markdown_table(result))
    print(
        f"written to {job.output}/{tradeoff.RESULT_NAME} and tradeoff.md ({result['seconds']:.0f} s); "
        f"`routertune report --inputs {job.output}` draws the curves"
    )
    return 0


def cmd_bench(args) -> int:
    from routertune import report
    from routertune.bench import runner as bench
    from routertune.bench.config import BenchConfig
    from routertune.bench.results import jsonable

    cfg = _build(BenchConfig, args)
    result = bench.run_bench(cfg, progress=lambda message: print(f"[bench] {message}", flush=True))
    print("\n".join(report.bench_tables(result.to_dict())))
    if result.token is not None:
        from routertune.bench.token_rows import token_table

        print("\n".join(token_table(jsonable(result.token))))
    for note in result.skipped:
        print(f"[not measured] {note}")
    print(f"\n`routed` decisions: {result.routers}")
    print(
        f"done in {result.seconds:.0f} s"
        + (f"; results written to {cfg.output}" if cfg.output else " (pass --output FILE.json to keep the results)")
    )
    return 0


def cmd_report(args) -> int:
    from . import report

    result = report.build_report(_build(report.ReportConfig, args))
    print(
        f"report written to {result.markdown} ({len(result.plots)} plots: "
        f"{', '.join(p.rsplit('/', 1)[-1] for p in result.plots)})"
    )
    for note in result.notes:
        print(f"[note] {note}")
    return 0


def cmd_export(args) -> int:
    from .serve import export

    result = export.export(_build(export.ExportJob, args))
    if result.dropped_layers is not None:
        print(
            f"static drop of attention layers {result.dropped_layers} exported as {result.architecture} "
            f"(vLLM's native no-op attention) to {result.output}"
        )
    else:
        print(f"routers on layers {result.routed_layers} exported as {result.architecture} to {result.output}")
        if result.never_run:
            print(f"--free-kv: layers {result.never_run} can never run at the routers' thresholds and hold no KV cache")
        if result.decode_only:
            print("--decode-only: prompts prefill densely, generated tokens are routed; prefix caching stays on")
    print(f"serve it (pip install 'routertune[serve]'): routertune serve {result.output} [vLLM server flags]")
    return 0


def cmd_serve(args) -> int:
    """vLLM's OpenAI-compatible server on an export; routertune's own flags may also follow EXPORT."""
    import os
    import shlex

    from .serve import engine

    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # no prefix may catch a vLLM flag
    add_dataclass_flags(own, engine.ServeJob, ("export",))
    own.set_defaults(**{k: v for k, v in vars(args).items() if k in ("routing_log", "dry_run")})
    mine, vllm_args = own.parse_known_args(args.vllm_args)
    job = _build(engine.ServeJob, argparse.Namespace(**{**vars(args), **vars(mine)}))
    command = engine.server_command(job, vllm_args)
    kind = "routed export" if command.routed else "export without routers (static drop)"
    print(
        f"routertune serve: {kind}; "
        + (f"added {' '.join(command.added)}; " if command.added else "")
        + " ".join(f"{k}={v}" for k, v in command.env.items())
        + (" " if command.env else "")
        + shlex.join(command.argv),
        flush=True,
    )
    if job.dry_run:
        return 0
    os.execve(command.argv[0], command.argv, {**os.environ, **command.env})  # the server takes this process
    return 0  # not reached


COMMANDS = {
    "demo": (cmd_demo, DEMO_HELP, [("routertune.demo:DemoJob", ())]),
    "train": (
        cmd_train,
        "train routers on a frozen model (Router-Tuning)",
        [(pipeline.TuneJob, ()), (TrainConfig, ())],
    ),
    "generate": (
        cmd_generate,
        "generate with trained routers and show which layers each prompt skipped",
        [(generate.GenerateJob, ("prompts",))],
    ),
    "eval": (
        cmd_eval,
        "benchmarks on lm-evaluation-harness (local data): dense, routers, static or random drop",
        [("routertune.eval.evaluate:EvalJob", ())],
    ),
    "calibrate": (
        cmd_calibrate,
        "set the threshold so routers run a requested fraction of routed sublayers",
        [("routertune.calibrate:CalibrateJob", ())],
    ),
    "compare": (
        cmd_compare,
        "dense vs static drop vs random drop vs routers at matched attention skip ratios",
        [("routertune.eval.compare:CompareJob", ())],
    ),
    "tradeoff": (
        cmd_tradeoff,
        "quality vs measured skip: a router threshold sweep against static and random drop, "
        "on the same items, compared at matched skip with paired bootstrap intervals",
        [("routertune.eval.tradeoff:TradeoffJob", ())],
    ),
    "bench": (
        cmd_bench,
        "speed: dense vs static drop vs routers (prefill, decode, KV bytes, peak memory, FLOPs)",
        [("routertune.bench.config:BenchConfig", ())],
    ),
    "export": (
        cmd_export,
        "write a folder vLLM serves (routers, or --static K native static drop) with the plugin",
        [("routertune.serve.export:ExportJob", ())],
    ),
    "serve": (
        cmd_serve,
        "serve an export with vLLM's OpenAI-compatible server: routertune serve EXPORT [vLLM "
        "server flags]; adds the flags routed serving needs, refuses those it cannot work with",
        [("routertune.serve.engine:ServeJob", ("export",))],
    ),
    "report": (
        cmd_report,
        "one page (markdown + PNG plots) from bench and evaluation result JSON",
        [("routertune.report:ReportConfig", ())],
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="routertune",
        description="Router-Tuning with MindSkip: let each input skip the attention layers it does not need.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text, classes) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "generate":
            p.add_argument("prompts", nargs="+", help="prompts to complete")
        if name == "serve":
            p.add_argument("export", help="the folder `routertune export` wrote")
            p.add_argument(
                "vllm_args",
                nargs=argparse.REMAINDER,
                help="flags for vLLM's server (python -m vllm.entrypoints.openai.api_server --help)",
            )
        for cls, skip in classes:
            if isinstance(cls, str):  # imported lazily: the harness takes seconds to import
                module, _, name = cls.partition(":")
                cls = getattr(importlib.import_module(module), name)
            add_dataclass_flags(p, cls, skip)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("routertune").setLevel(logging.INFO)  # one-time conversion notices
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"routertune {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

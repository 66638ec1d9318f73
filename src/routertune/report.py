"""`routertune report`: one page (markdown + PNG plots) from result JSON files.

Inputs are read tolerantly; whatever is missing is said on the page and its plots are skipped:

* bench results (``"schema": "routertune.bench/1"``, written by `routertune bench`):
  speed-up against context length next to the ideal speed-up, decode throughput, KV-cache bytes and peak
  memory, and the tables and target checks;
* evaluation results: `routertune compare` (compare.json: settings with kind, skip_ratio, scores per task,
  average, layer_skip_rate) and `routertune eval --output` files (setting + harness.tasks with per-task skip
  statistics) are read by their shape. Any other JSON is walked: every object that names a method, an
  attention skip ratio and an accuracy is a point of the accuracy / skip-ratio picture, and every object that
  names a task and per-layer skip (or run) rates is a row of the per-layer heatmap, e.g.::

      {"points": [{"method": "routers" | "static" | "random" | "dense", "task": "arc_challenge",
                   "skip_ratio": 0.31, "accuracy": 0.42}, ...],
       "layer_skip": [{"task": "arc_challenge", "method": "routers", "rates": {"14": 0.2, "15": 0.9}}, ...]}

  but the keys may also be spelled ``variant``/``attention_skip_ratio``/``acc``/``average``/``score`` and
  ``layer_skip_rates``/``per_layer_skip``/``layer_run_rates``, at any depth.

Library code: `build_report(ReportConfig)` returns a `Report` dataclass; only the CLI prints.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .files import atomic_write

BENCH_SCHEMA_PREFIX = "routertune.bench/"
VARIANT_STYLE = {  # name -> (label, colour)
    "dense": ("dense", "#444444"),
    "static_drop": ("static drop", "#1f77b4"),
    "routed_static_set": ("routers forced to static set", "#ff7f0e"),
    "routed": ("routers, own decisions", "#2ca02c"),
}
METHOD_STYLE = {
    "routers": ("#2ca02c", "o"),
    "static": ("#1f77b4", "s"),
    "searched": ("#17becf", "v"),
    "random": ("#d62728", "^"),
    "dense": ("#444444", "*"),
    "other": ("#9467bd", "D"),
}


@dataclass
class ReportConfig:
    """What `routertune report` reads and where it writes; every field is a CLI flag."""

    inputs: list[str] | None = field(
        default=None,
        metadata={
            "help": "result JSON files or folders holding them (bench and evaluation results); default: benchmarks/results/speed"
        },
    )
    output: str = field(
        default="benchmarks/results/speed/report", metadata={"help": "folder for report.md and the PNG plots"}
    )
    title: str = field(default="routertune report", metadata={"help": "page title"})

    def __post_init__(self) -> None:
        if self.inputs is None:
            self.inputs = ["benchmarks/results/speed"]
        if not self.inputs:
            raise ValueError("Invalid report config: inputs is empty; pass result JSON files or folders")


@dataclass
class Report:
    output: str
    markdown: str  # path of report.md
    plots: list[str]  # paths of the PNGs written
    bench_files: list[str]
    eval_files: list[str]
    notes: list[str]  # what could not be shown, and why


# ---------------------------------------------------------------------------------------------------------
# reading
def find_json_files(inputs: list[str], exclude: Path | None = None) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.json") if exclude is None or exclude not in p.parents)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{item} is neither a results file nor a folder")
    return list(dict.fromkeys(files))


def is_bench(data) -> bool:
    return isinstance(data, dict) and str(data.get("schema", "")).startswith(BENCH_SCHEMA_PREFIX)


_METHOD_KEYS = ("method", "variant", "baseline", "kind", "setting")
_SKIP_KEYS = ("attention_skip_ratio", "skip_ratio", "attention_skip", "skip")
_ACC_KEYS = ("accuracy", "acc", "average", "mean_accuracy", "acc_norm", "score")
_TASK_KEYS = ("task", "benchmark", "dataset")
_LAYER_SKIP_KEYS = ("layer_skip_rates", "per_layer_skip", "layer_skip", "skip_rate_per_layer", "rates")
_LAYER_RUN_KEYS = ("layer_run_rates", "per_layer_run", "layer_run_fraction", "run_rates")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _first(d: dict, keys) -> tuple[str | None, object]:
    for key in keys:
        if key in d:
            return key, d[key]
    return None, None


def method_family(name: str) -> str:
    low = str(name).lower()
    if any(word in low for word in ("router", "routed", "mindskip", "dynamic")):
        return "routers"
    if "static" in low:
        return "static"
    if "random" in low:
        return "random"
    if "dense" in low or low in ("base", "baseline", "full"):
        return "dense"
    return "other"


def _layer_map(value) -> dict[int, float] | None:
    if not isinstance(value, dict) or not value:
        return None
    out = {}
    for k, v in value.items():
        try:
            layer = int(k)
        except (TypeError, ValueError):
            return None
        number = _number(v)
        if number is None:
            return None
        out[layer] = number
    return out


def extract_eval(data) -> tuple[list[dict], list[dict]]:
    """(points, layer rows) of an evaluation JSON.

    points: {"method", "family", "task", "skip_ratio", "accuracy"}; layer rows: {"task", "method", "rates"}
    (rates: layer -> skip rate). `routertune compare` (compare.json) and `routertune eval --output` files are
    read by their known shape; anything else by a tolerant walk over the whole document."""
    if (
        isinstance(data, dict)
        and isinstance(data.get("settings"), list)
        and data["settings"]
        and all(isinstance(s, dict) and isinstance(s.get("scores"), dict) for s in data["settings"])
    ):
        return _from_compare(data)
    harness = data.get("harness") if isinstance(data, dict) else None
    if isinstance(harness, dict) and isinstance(harness.get("tasks"), dict):
        return _from_eval(data)
    return _walk_eval(data)


def _point(method: str, family: str, task: str, skip, accuracy) -> dict | None:
    skip, accuracy = _number(skip), _number(accuracy)
    if skip is None or accuracy is None:
        return None
    return {"method": str(method), "family": family, "task": str(task), "skip_ratio": skip, "accuracy": accuracy}


def _from_compare(data: dict) -> tuple[list[dict], list[dict]]:
    """compare.json: settings[] with kind (dense/static/random/routers), skip_ratio (of all attention
    sublayers), scores {task: headline metric}, average, layer_skip_rate {layer: rate} over all tasks and
    task_layer_skip_rate {task: {layer: rate}} (older files lack it)."""
    points, rows = [], []
    for s in data["settings"]:
        name = str(s.get("name") or s.get("kind") or "setting")
        family = method_family(s.get("kind") or name)
        for task, accuracy in s["scores"].items():
            points.append(_point(name, family, task, s.get("skip_ratio"), accuracy))
        points.append(_point(name, family, "average", s.get("skip_ratio"), s.get("average")))
        if family != "routers":
            continue
        per_task = s.get("task_layer_skip_rate") if isinstance(s.get("task_layer_skip_rate"), dict) else {}
        for task, task_rates in per_task.items():
            if _layer_map(task_rates):
                rows.append({"task": task, "method": name, "rates": _layer_map(task_rates)})
        rates = _layer_map(s.get("layer_skip_rate"))
        if rates:
            rows.append({"task": "all tasks", "method": name, "rates": rates})
    return [p for p in points if p is not None], rows


def _from_eval(data: dict) -> tuple[list[dict], list[dict]]:
    """`routertune eval --output` JSON: setting {name, kind}, harness {tasks {name: {metrics, headline,
    skip {skip_ratio, layer_skip_rate}}}, skip_ratio}."""
    setting = data.get("setting") if isinstance(data.get("setting"), dict) else {}
    harness = data["harness"]
    name = str(setting.get("name") or setting.get("kind") or "routers")
    family = method_family(setting.get("kind") or name)
    points, rows, headlines = [], [], []
    for task, score in harness["tasks"].items():
        if not isinstance(score, dict):
            continue
        metrics = score.get("metrics") or {}
        accuracy = metrics.get(score.get("headline") or "acc", metrics.get("acc"))
        skip = score.get("skip") if isinstance(score.get("skip"), dict) else {}
        point = _point(name, family, task, skip.get("skip_ratio", harness.get("skip_ratio")), accuracy)
        if point is not None:
            points.append(point)
            headlines.append(point["accuracy"])
        rates = _layer_map(skip.get("layer_skip_rate"))
        if rates and family == "routers":
            rows.append({"task": task, "method": name, "rates": rates})
    if headlines:
        average = _point(name, family, "average", harness.get("skip_ratio"), sum(headlines) / len(headlines))
        if average is not None:
            points.append(average)
    return points, rows


def _walk_eval(data) -> tuple[list[dict], list[dict]]:
    points: list[dict] = []
    rows: list[dict] = []

    def visit(node, inherited_task=None, inherited_method=None):
        if isinstance(node, list):
            for item in node:
                visit(item, inherited_task, inherited_method)
            return
        if not isinstance(node, dict):
            return
        _, task = _first(node, _TASK_KEYS)
        task = str(task) if isinstance(task, (str, int)) else inherited_task
        _, method = _first(node, _METHOD_KEYS)
        method = str(method) if isinstance(method, (str, int)) else inherited_method
        _, skip = _first(node, _SKIP_KEYS)
        acc_key, acc = _first(node, _ACC_KEYS)
        skip, acc = _number(skip), _number(acc)
        if method is not None and skip is not None and acc is not None:
            points.append(
                {
                    "method": method,
                    "family": method_family(method),
                    "task": task or ("average" if acc_key == "average" else "all"),
                    "skip_ratio": skip,
                    "accuracy": acc,
                }
            )
        _, value = _first(node, _LAYER_SKIP_KEYS)
        rates = _layer_map(value)
        if rates is None:
            _, value = _first(node, _LAYER_RUN_KEYS)
            run = _layer_map(value)
            rates = {layer: 1.0 - r for layer, r in run.items()} if run else None
        if rates is not None:
            rows.append({"task": task or "all", "method": method or "routers", "rates": rates})
        for k, child in node.items():
            if not isinstance(child, (dict, list)):
                continue
            child_task, child_method = task, method
            if isinstance(child, dict) and _looks_like_result(child) and k not in _CONTAINER_KEYS:
                # a mapping name -> result names a method or a task
                if method is None and method_family(k) != "other":
                    child_method = k
                elif task is None:
                    child_task = k
            visit(child, child_task, child_method)

    visit(data)
    return points, rows


_CONTAINER_KEYS = ("points", "results", "rows", "layer_skip", "config", "metrics", "data")


def _looks_like_result(d: dict) -> bool:
    return any(k in d for k in _ACC_KEYS + _SKIP_KEYS + _LAYER_SKIP_KEYS + _LAYER_RUN_KEYS)


# ---------------------------------------------------------------------------------------------------------
# tables (markdown lines from a bench JSON dict; also what the CLI prints after a bench)
def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:.3g}"


def _x(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(ci, digits: int = 2) -> str:
    if not ci or ci[0] is None or (len(ci) > 2 and not ci[2]):  # no interval from a single pair
        return "-"
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def bench_tables(bench: dict) -> list[str]:
    lines = [
        "### Prefill (logits for the last position only)",
        "",
        "| tokens | batch | variant | median ms | speed-up | CI | ideal | achieved/ideal | executed | KV MiB | KV = dense x executed | peak MiB |",
        "|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for p in bench.get("prefill", []):
        for name, v in p["variants"].items():
            lines.append(
                f"| {p['length']} | {p['batch']} | {name} | {_ms(v['median_s'])} | {_x(v['speedup'])} | "
                f"{_ci(v.get('speedup_ci')) if name != 'dense' else ''} | "
                f"{_x(v['ideal_speedup'])} | {_x(v['achieved_over_ideal'])} | {_x(v['executed_fraction'])} | "
                f"{_mb(v['kv_bytes'])} | {'yes' if v['kv_equal'] else 'NO'} | {_mb(v['peak_memory_bytes'])} |"
            )
    lines += [
        "",
        "### Decode (greedy, one token per step, variants in lock-step)",
        "",
        "| prompt + new | batch | variant | ms / token | tokens/s | speed-up | CI | ideal | achieved/ideal | KV MiB at end | KV = dense x executed | peak MiB |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for d in bench.get("decode", []):
        for name, v in d["variants"].items():
            lines.append(
                f"| {d['prompt']} + {d['new_tokens']} | {d['batch']} | {name} | {_ms(v['median_s'])} | "
                f"{_x(v['tokens_per_s'], 1)} | {_x(v['speedup'])} | "
                f"{_ci(v.get('speedup_ci')) if name != 'dense' else ''} | {_x(v['ideal_speedup'])} | "
                f"{_x(v['achieved_over_ideal'])} | {_mb(v['kv_bytes'])} | {'yes' if v['kv_equal'] else 'NO'} | "
                f"{_mb(v['peak_memory_bytes'])} |"
            )
    lines += [
        "",
        "### Routing overhead (routers computed, every row runs, vs the plain model)",
        "",
        "| where | tokens | batch | plain ms | routed ms | ratio (paired median) | CI | pairs | limit |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for o in bench.get("overhead", []):
        lines.append(
            f"| {o['where']} | {o['length']} | {o['batch']} | {_ms(o['dense_s'])} | {_ms(o['routed_s'])} | "
            f"{o['ratio']:.3f} | {_ci(o.get('ci'), 3)} | {o['samples']} | < {o['limit']} |"
        )
    checks = bench.get("checks")
    if checks:
        met = checks.get("met", {})

        cis = checks.get("forced_vs_static_ci", {})
        overhead_cis = [o.get("ci") for o in bench.get("overhead", [])]

        def verdict(key):
            return {True: "met", False: "NOT met", None: "not measured"}[met.get(key)]

        def verdict_with_intervals(key, intervals, limit: float, met_above: bool) -> str:
            """The median's verdict, qualified when the intervals do not settle it: "met" while any interval
            reaches across the limit, "NOT met" while none lies wholly on the failing side (a few noisy pairs
            cannot settle a 1-3% target, and the table should not read as if they had)."""
            usable = [ci for ci in intervals if ci and ci[0] is not None and (len(ci) < 3 or ci[2])]
            text = verdict(key)
            if met.get(key) is True and any(ci[0] < limit <= ci[1] for ci in usable):
                text += " on the median; not resolved: an interval spans the limit"
            elif (
                met.get(key) is False
                and usable
                and not any((ci[1] < limit) if met_above else (ci[0] >= limit) for ci in usable)
            ):
                text += " on the median; not resolved: no interval lies wholly past the limit"
            return text

        per_setting = "; ".join(f"{k}: {val:.3f} {_ci(cis.get(k))}" for k, val in checks["forced_vs_static"].items())
        lines += [
            "",
            "### Targets",
            "",
            "| target | measured (median, CI) | verdict |",
            "|---|---|---|",
            f"| routers forced to static drop's set reach >= {checks['forced_vs_static_target']} of static "
            f"drop's speed-up | min {_x(checks['forced_vs_static_min'], 3)}; {per_setting} | "
            f"{verdict_with_intervals('forced_vs_static', cis.values(), checks['forced_vs_static_target'], True)} |",
        ]
        ideal = checks.get("prefill_ideal", {})
        measured = "; ".join(
            f"{name} {k}: {val:.2f}"
            for name in ("static_drop", "routed_static_set")
            for k, val in ideal.get(name, {}).items()
        )
        lines.append(
            f"| prefill at {checks['prefill_ideal_length']} tokens reaches >= "
            f"{checks['prefill_ideal_target']} of the ideal speed-up | {measured or '-'} | "
            f"{verdict('prefill_ideal')} |"
        )
        lines.append(
            f"| KV bytes = dense bytes x executed fraction | "
            f"{'exact in every setting' if checks['kv_equal_all'] else 'differs somewhere'} | "
            f"{verdict('kv_equal')} |"
        )
        lines.append(
            f"| routing overhead < {checks['overhead_limit']} x a dense step | max "
            f"{_x(checks['overhead_max'], 3)} | "
            f"{verdict_with_intervals('overhead', overhead_cis, checks['overhead_limit'], False)} |"
        )
    return lines


# ---------------------------------------------------------------------------------------------------------
# plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup(bench: dict, path: Path) -> Path | None:
    """Prefill speed-up over dense against context length (one panel per batch size), measured (solid)
    next to ideal (dashed); and decode speed-up per batch size (bars: measured, outline: ideal)."""
    prefill = bench.get("prefill", [])
    decode = bench.get("decode", [])
    if not prefill and not decode:
        return None
    plt = _pyplot()
    batches = sorted({p["batch"] for p in prefill})
    panels = len(batches) + (1 if decode else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.0), squeeze=False)
    axes = axes[0]
    for ax, batch in zip(axes, batches):
        rows = sorted((p for p in prefill if p["batch"] == batch), key=lambda p: p["length"])
        lengths = [p["length"] for p in rows]
        names = [n for n in VARIANT_STYLE if n != "dense" and rows and n in rows[0]["variants"]]
        for i, name in enumerate(names):
            label, colour = VARIANT_STYLE[name]
            # nudge the variants apart so that their error bars do not hide each other (log axis)
            xs = [n * 1.06 ** (i - (len(names) - 1) / 2) for n in lengths]
            speedups = [p["variants"][name]["speedup"] for p in rows]
            ax.errorbar(
                xs,
                speedups,
                yerr=_yerr(speedups, [p["variants"][name].get("speedup_ci") for p in rows]),
                fmt="-o",
                color=colour,
                label=label,
                capsize=3,
                markersize=4,
            )
            ax.plot(
                xs,
                [p["variants"][name]["ideal_speedup"] for p in rows],
                "--",
                marker="_",
                markersize=14,
                color=colour,
                alpha=0.8,
                label=f"ideal ({label})",
            )
        ax.axhline(1.0, color="#444444", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(lengths) / 1.6, max(lengths) * 1.6)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(n) for n in lengths])
        ax.set_xlabel("prompt tokens (prefill)")
        ax.set_ylabel("speed-up over dense")
        ax.set_title(f"prefill, batch {batch}")
        ax.grid(alpha=0.3)
    if decode:
        ax = axes[-1]
        names = [n for n in VARIANT_STYLE if n != "dense" and n in decode[0]["variants"]]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            label, colour = VARIANT_STYLE[name]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(decode))]
            speedups = [d["variants"][name]["speedup"] for d in decode]
            ax.bar(
                xs,
                speedups,
                width,
                color=colour,
                label=label,
                yerr=_yerr(speedups, [d["variants"][name].get("speedup_ci") for d in decode]),
                capsize=3,
            )
            ax.plot(
                xs,
                [d["variants"][name]["ideal_speedup"] for d in decode],
                linestyle="none",
                marker="_",
                markersize=26,
                markeredgewidth=2,
                color="black",
                label="ideal" if i == 0 else None,
            )
        ax.axhline(1.0, color="#444444", linewidth=0.8)
        ax.set_xticks(range(len(decode)))
        ax.set_xticklabels([f"batch {d['batch']}" for d in decode])
        ax.set_ylabel("speed-up over dense")
        ax.set_title(f"decode, {decode[0]['new_tokens']} tokens after {decode[0]['prompt']}\n(black bar: ideal)")
        ax.grid(alpha=0.3, axis="y")
        low = min(min(d["variants"][n]["speedup"], d["variants"][n]["ideal_speedup"]) for d in decode for n in names)
        ax.set_ylim(bottom=min(0.9, low - 0.05))
    handles, labels = axes[0].get_legend_handles_labels()
    # each variant's measured line above its ideal line (legend columns fill top to bottom)
    order = sorted(
        range(len(labels)), key=lambda i: (labels[i].removeprefix("ideal (").rstrip(")"), labels[i].startswith("ideal"))
    )
    fig.legend(
        [handles[i] for i in order], [labels[i] for i in order], loc="lower center", ncol=3, fontsize=8, frameon=False
    )
    fig.suptitle(
        f"{_model_name(bench)}: speed-up over dense vs context length "
        f"({bench.get('environment', {}).get('device', '')}; bars: CI of the median paired ratio)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    return _save(fig, path)


def _model_name(bench: dict) -> str:
    model = bench.get("model", {})
    return Path(model.get("name_or_path") or "").name or model.get("model_type") or "model"


def _yerr(values: list[float], cis: list) -> list[list[float]] | None:
    """Asymmetric error bars from [low, high, coverage] intervals (None where any is missing)."""
    if any(not ci or ci[0] is None for ci in cis):
        return None
    return [[max(v - ci[0], 0.0) for v, ci in zip(values, cis)], [max(ci[1] - v, 0.0) for v, ci in zip(values, cis)]]


def plot_memory(bench: dict, path: Path) -> Path | None:
    """KV-cache bytes at the end of decoding per variant and batch size (with the saving against dense), and
    peak memory of prefill against context length."""
    decode = bench.get("decode", [])
    prefill = bench.get("prefill", [])
    if not decode and not prefill:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0))
    ax = axes[0]
    if decode:
        names = [n for n in VARIANT_STYLE if n in decode[0]["variants"]]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            label, colour = VARIANT_STYLE[name]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(decode))]
            values = [d["variants"][name]["kv_bytes"] / 2**20 for d in decode]
            bars = ax.bar(xs, values, width, color=colour, label=label)
            for bar, d in zip(bars, decode):
                dense = d["variants"]["dense"]["kv_bytes"]
                saved = 1 - d["variants"][name]["kv_bytes"] / dense if dense else 0
                if name != "dense":
                    ax.annotate(
                        f"-{saved:.0%}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
        ax.set_xticks(range(len(decode)))
        ax.set_xticklabels([f"batch {d['batch']}" for d in decode])
        ax.set_ylabel("KV cache (MiB)")
        ax.set_title(
            f"KV cache after {decode[0]['prompt']} + {decode[0]['new_tokens']} tokens\n"
            "(= dense x executed fraction, exactly)"
        )
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    else:
        ax.set_axis_off()
    ax = axes[1]
    have_peak = [p for p in prefill if all(v.get("peak_memory_bytes") is not None for v in p["variants"].values())]
    if have_peak:
        for batch, style in zip(sorted({p["batch"] for p in have_peak}), ("-o", ":s", "-.^", "--d")):
            rows = sorted((p for p in have_peak if p["batch"] == batch), key=lambda p: p["length"])
            for name in VARIANT_STYLE:
                if name not in rows[0]["variants"]:
                    continue
                label, colour = VARIANT_STYLE[name]
                ax.plot(
                    [p["length"] for p in rows],
                    [p["variants"][name]["peak_memory_bytes"] / 2**20 for p in rows],
                    style,
                    color=colour,
                    label=f"{label}, B={batch}",
                    markersize=4,
                )
        ax.set_xscale("log", base=2)
        ticks = sorted({p["length"] for p in have_peak})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(n) for n in ticks])
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens (prefill)")
        ax.set_ylabel("peak memory above weights (MiB)")
        ax.set_title("prefill peak memory (activations + KV + logits)")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "peak memory not measured", ha="center", va="center")
    fig.tight_layout()
    return _save(fig, path)


def plot_pareto(points: list[dict], path: Path) -> Path | None:
    """Accuracy against attention skip ratio, one panel per task, one series per method family."""
    if not points:
        return None
    plt = _pyplot()
    tasks = sorted({p["task"] for p in points}, key=lambda t: (t not in ("average", "all"), t))[:12]
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        task_points = [p for p in points if p["task"] == task]
        dense = [p for p in task_points if p["family"] == "dense"]
        for family, (colour, marker) in METHOD_STYLE.items():
            series = sorted((p for p in task_points if p["family"] == family), key=lambda p: p["skip_ratio"])
            if not series:
                continue
            if family != "dense":
                series = dense + series  # every method starts from the dense point at skip 0
            ax.plot(
                [p["skip_ratio"] for p in series],
                [p["accuracy"] for p in series],
                marker=marker,
                color=colour,
                label=family,
                linestyle="-" if family != "dense" else "none",
                markersize=9 if family == "dense" else 5,
            )
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("attention skip ratio")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_axis_off()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle("accuracy vs attention skip ratio (up and to the right is better)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.92, 0.95))
    return _save(fig, path)


def plot_heatmap(rows: list[dict], path: Path) -> Path | None:
    """Per-layer skip rate (rows: task, method; columns: layer)."""
    if not rows:
        return None
    plt = _pyplot()
    layers = sorted({layer for r in rows for layer in r["rates"]})
    methods = {r["method"] for r in rows}
    labels = [f"{r['task']} ({r['method']})" if len(methods) > 1 else r["task"] for r in rows]
    matrix = [[r["rates"].get(layer, float("nan")) for layer in layers] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.42 * len(layers) + 2.5), max(2.2, 0.38 * len(rows) + 1.4)))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([str(layer) for layer in layers], fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("layer")
    if len(layers) * len(rows) <= 400:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(
                        j,
                        i,
                        f"{value:.1f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if value < 0.5 else "black",
                    )
    fig.colorbar(image, ax=ax, label="attention skip rate")
    ax.set_title("per-layer attention skip rate per task", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def is_tradeoff(data) -> bool:
    return isinstance(data, dict) and {"matched", "domains", "variants"} <= set(data)


def tradeoff_difference_curves(
    data: dict, task: str, iterations: int = 1000, baseline: str = "static"
) -> list[tuple[float, float, float, float]]:
    """For a task of a tradeoff.json: at every router point's measured skip, routers minus the baseline (static
    drop, or "searched": the searched static order; interpolated there, per item) with its paired bootstrap
    interval: (skip, diff, low, high)."""
    import numpy as np

    from routertune.stats import interpolate, paired_bootstrap

    settings = data["tasks"][task]["settings"]
    kinds = {v["name"]: v["kind"] for v in data["variants"]}
    static = [
        (s["skip"], np.array(s["per_item"], dtype=float))
        for name, s in settings.items()
        if kinds.get(name) in ("dense", baseline)
    ]
    out = []
    if not any(kinds.get(name) == baseline for name in settings):  # the baseline was not run on this task
        return out
    for name, s in sorted(settings.items(), key=lambda kv: kv[1]["skip"]):
        if kinds.get(name) != "routers":
            continue
        base = interpolate(static, s["skip"])
        if base is None:
            continue
        diff, low, high = paired_bootstrap(np.array(s["per_item"], dtype=float), base[0], iterations=iterations)
        out.append((s["skip"], diff, low, high))
    return out


def plot_tradeoff(data: dict, path: Path) -> Path | None:
    """One panel per held-out domain (mean per-token KL to dense against measured attention skip: static,
    random and the routers' threshold sweep) and per task (routers minus static drop accuracy at the routers'
    measured skip, paired, with 95% intervals)."""
    plt = _pyplot()
    domains, tasks = list(data.get("domains", {})), list(data.get("tasks", {}))
    panels = domains + tasks
    if not panels:
        return None
    kinds = {v["name"]: v for v in data["variants"]}
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.5 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        if panel in domains:
            settings = data["domains"][panel]["settings"]
            dense = settings.get("dense", {"skip": 0.0, "kl": 0.0})
            for family in ("static", "searched", "random", "routers"):
                colour, marker = METHOD_STYLE[family]
                pts = [
                    (s["skip"], s["kl"]) for name, s in settings.items() if kinds.get(name, {}).get("kind") == family
                ]
                if not pts:  # e.g. no searched static order in this run
                    continue
                if family == "random":
                    by_k: dict[float, list[float]] = {}
                    for x, y in pts:
                        by_k.setdefault(round(x, 6), []).append(y)
                    ax.scatter([x for x, _ in pts], [y for _, y in pts], color=colour, marker=marker, s=10, alpha=0.35)
                    pts = [(x, sum(v) / len(v)) for x, v in by_k.items()]
                pts = sorted([(dense["skip"], dense["kl"])] + pts)
                label = {"random": "random (mean of seeds)", "searched": "searched static order"}.get(family, family)
                ax.plot(
                    [x for x, _ in pts], [y for _, y in pts], marker=marker, color=colour, label=label, markersize=4
                )
            ax.set_ylabel("KL(dense || setting) per token")
            ax.set_title(f"{panel}: {data['domains'][panel]['texts']} held-out texts", fontsize=9)
        else:
            for baseline, colour, label in (
                ("static", METHOD_STYLE["routers"][0], "routers - static"),
                ("searched", METHOD_STYLE["searched"][0], "routers - searched static"),
            ):
                curve = tradeoff_difference_curves(data, panel, baseline=baseline)
                if curve:
                    xs = [c[0] for c in curve]
                    ax.errorbar(
                        xs,
                        [100 * c[1] for c in curve],
                        yerr=[[100 * (c[1] - c[2]) for c in curve], [100 * (c[3] - c[1]) for c in curve]],
                        color=colour,
                        marker=METHOD_STYLE["routers"][1],
                        capsize=3,
                        label=label,
                    )
            ax.axhline(0.0, color=METHOD_STYLE["static"][0], linewidth=1)
            info = data["tasks"][panel]
            ax.set_ylabel(f"{info['metric']} difference (points)")
            ax.set_title(f"{panel}: routers - static drop, {info['items']} items, paired 95% CI", fontsize=9)
        ax.set_xlabel("measured fraction of attention sublayers skipped")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(
        "quality vs measured skip: KL (lower is better) and accuracy difference (above 0: routers better)", fontsize=10
    )
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
def build_report(cfg: ReportConfig) -> Report:
    """Read the result files, draw the plots that the data allow, and write report.md next to them."""
    out = Path(cfg.output)
    files = find_json_files(cfg.inputs, exclude=out)
    benches: list[tuple[Path, dict]] = []
    tradeoffs: list[tuple[Path, dict]] = []
    eval_files: list[str] = []
    points: list[dict] = []
    layer_rows: list[dict] = []
    notes: list[str] = []
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            notes.append(f"{path}: not readable as JSON ({error}); ignored")
            continue
        if is_bench(data):
            benches.append((path, data))
            continue
        if is_tradeoff(data):
            tradeoffs.append((path, data))
            continue
        found_points, found_rows = extract_eval(data)
        if found_points or found_rows:
            eval_files.append(str(path))
            points += found_points
            layer_rows += found_rows
    if not benches and not points and not layer_rows and not tradeoffs:
        raise ValueError(
            f"no bench or evaluation results in {', '.join(cfg.inputs)}: run `routertune bench "
            "--output FILE.json` first"
        )

    plots: list[str] = []
    body: list[str] = [f"# {cfg.title}", ""]
    for path, bench in benches:
        suffix = "" if len(benches) == 1 else f"_{path.stem}"
        body += _bench_section(path, bench)
        for name, draw in (("speedup", plot_speedup), ("memory", plot_memory)):
            written = draw(bench, out / f"{name}{suffix}.png")
            if written is not None:
                plots.append(str(written))
                body += [f"![{name}]({written.name})", ""]
    if not benches:
        notes.append("no bench results (schema routertune.bench/1): speed and memory plots skipped")

    for path, data in tradeoffs:
        from routertune.eval.tradeoff import markdown_table

        suffix = "" if len(tradeoffs) == 1 else f"_{path.parent.name}"
        written = plot_tradeoff(data, out / f"tradeoff{suffix}.png")
        body += ["## Trade-off", "", f"From {path}.", ""]
        if written is not None:
            plots.append(str(written))
            body += [f"![trade-off]({written.name})", ""]
        body += [markdown_table(data), ""]
    body += ["## Accuracy", ""]
    if points:
        written = plot_pareto(points, out / "accuracy_vs_skip.png")
        plots.append(str(written))
        body += [
            f"Points from {', '.join(eval_files)}.",
            "",
            f"![accuracy vs skip ratio]({written.name})",
            "",
            "| task | method | attention skip ratio | accuracy |",
            "|---|---|---:|---:|",
        ]
        body += [
            f"| {p['task']} | {p['method']} | {p['skip_ratio']:.3f} | {p['accuracy']:.4f} |"
            for p in sorted(points, key=lambda p: (p["task"], p["family"], p["skip_ratio"]))
        ]
        body.append("")
    else:
        notes.append(
            "no accuracy data (no evaluation JSON with method, skip ratio and accuracy): the accuracy "
            "vs skip-ratio plot is skipped"
        )
        body += ["No accuracy data was found among the inputs, so the accuracy / skip-ratio picture is not drawn.", ""]
    body += ["## Per-layer skip rate per task", ""]
    if layer_rows:
        written = plot_heatmap(layer_rows, out / "layer_skip_heatmap.png")
        plots.append(str(written))
        body += [f"![per-layer skip rate]({written.name})", ""]
    else:
        notes.append("no per-layer skip rates per task among the inputs: the heatmap is skipped")
        body += ["No per-layer skip rates per task were found among the inputs, so the heatmap is not drawn.", ""]
    if notes:
        body += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    markdown = out / "report.md"
    text = "\n".join(body)
    atomic_write(markdown, lambda tmp: Path(tmp).write_text(text))
    return Report(str(out), str(markdown), plots, [str(p) for p, _ in benches], eval_files, notes)


def _bench_section(path: Path, bench: dict) -> list[str]:
    env = bench.get("environment", {})
    model = bench.get("model", {})
    cfg = bench.get("config", {})
    lines = [
        f"## Speed: {_model_name(bench)} ({path.name})",
        "",
        f"{model.get('num_hidden_layers')} layers, hidden {model.get('hidden_size')}, {model.get('dtype')}, "
        f"attention `{model.get('attn_implementation')}`; device {env.get('device')} ({env.get('gpu') or env.get('cpu')}), "
        f"{env.get('threads')} threads, torch {env.get('torch')}, transformers {env.get('transformers')}. "
        f"Load average at start / end: {_load(env.get('load_average_start'))} / {_load(env.get('load_average_end'))}. "
        f"Clock: {_clock(env, cfg)}. Prefill: {cfg.get('repeats')} repeats after {cfg.get('warmup')} warm-up; "
        f"decode: {cfg.get('decode_tokens')} steps, the variants in lock-step. Variants alternate within each "
        "repeat (order rotating); a speed-up is the median over repeats (decode: steps) of the ratio of "
        "back-to-back times; CI is the distribution-free interval of that median (order statistics; its "
        f"coverage is in the JSON: 93.8% for 5 pairs). Allocator: {env.get('malloc', '-')}. "
        f"{bench.get('seconds', 0):.0f} s in all.",
        "",
        f"Routed layers {bench.get('routed_layers')}; static drop skips {bench.get('static_drop_layers')}.",
        "",
        "| variant | what it is |",
        "|---|---|",
    ]
    lines += [f"| {name} | {text} |" for name, text in bench.get("variants", {}).items()]
    lines.append("")
    if bench.get("skipped"):
        lines += ["Not measured: " + "; ".join(bench["skipped"]) + ".", ""]
    lines += bench_tables(bench) + [""]
    return lines


def _clock(env: dict, cfg: dict) -> str:
    if str(env.get("device", "")).startswith("cuda"):
        return "CUDA events"
    if cfg.get("clock") == "cpu":
        return "process CPU time (wall-clock speed-ups in the JSON too)"
    return "wall-clock (CPU-time speed-ups in the JSON too)"


def _load(values) -> str:
    return "-" if not values else f"{values[0]:.1f}"

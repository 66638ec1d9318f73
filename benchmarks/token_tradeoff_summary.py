"""Token routers beside sequence routers and static drop on the trade-off curve (KL to dense per token).

Reads the per-domain `routertune tradeoff` runs of token routers (each a folder with tradeoff.json) and,
optionally, a `routertune tradeoff` JSON of sequence routers on the same items (same domains, --texts and
--max-tokens: the texts are then the same, in the same order, so every comparison is paired per text). Writes
a merged tradeoff.json of the token runs, and summary.json / summary.md: at each skip ratio, per domain, the
KL of static drop, token and sequence routers (each curve interpolated per text at that measured skip), and
token - static, sequence - static, token - sequence with paired bootstrap 95% intervals over texts.

    python benchmarks/token_tradeoff_summary.py --token benchmarks/results/tradeoff-token/{lambada,wikipedia,code} \
        --sequence benchmarks/results/tradeoff/tradeoff.json --output benchmarks/results/tradeoff-token
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from routertune import stats
from routertune.eval import tradeoff


def _curves(domain: dict, num_layers: int) -> tuple[dict[str, list], np.ndarray]:
    """static and routers curves of one domain: (measured skip, per-text KL per token) points."""
    settings = domain["settings"]
    tokens = np.asarray(settings["dense"]["per_text_tokens"], dtype=float)
    per_token = {name: np.asarray(s["per_text_kl"], dtype=float) / tokens for name, s in settings.items()}
    static = [(0.0, per_token["dense"])] + [
        (s["skip"], per_token[name]) for name, s in settings.items() if name.startswith("static ")
    ]
    routers = [(0.0, per_token["dense"])] + [
        (s["skip"], per_token[name]) for name, s in settings.items() if name.startswith("routers")
    ]
    return {"static": static, "routers": routers}, tokens


def _at(curve, target, tokens):
    got = stats.interpolate(curve, target)
    if got is None:
        return None
    values, between = got
    return values, float((values * tokens).sum() / tokens.sum()), list(between)


def summarise(token: dict, sequence: dict | None, targets, iterations: int = 2000) -> dict:
    out = {}
    num_layers = token["num_layers"]
    for domain, data in token["domains"].items():
        curves, tokens = _curves(data, num_layers)
        seq_curves = None
        if sequence is not None and domain in sequence.get("domains", {}):
            seq_curves, seq_tokens = _curves(sequence["domains"][domain], num_layers)
            if not np.array_equal(seq_tokens, tokens):
                raise ValueError(
                    f"{domain}: the sequence run scored other texts (tokens per text differ); "
                    "run both with the same --texts and --max-tokens"
                )
            static_gap = (
                None
                if len(curves["static"]) == 1
                else max(
                    abs(float(np.max(np.abs(a[1] - b[1]))))
                    for a, b in zip(
                        sorted(curves["static"], key=lambda p: p[0]), sorted(seq_curves["static"], key=lambda p: p[0])
                    )
                )
            )
        static_source = "token run"
        if len(curves["static"]) == 1:  # the token run traced no static drop (--max-drop 0): take the sequence
            # run's; static drop and dense do not depend on the routers, and the texts are the same (checked)
            if seq_curves is None:
                raise ValueError(f"{domain}: the token run has no static drop; pass --sequence with one")
            curves["static"], static_source = seq_curves["static"], "sequence run"
        rows = {}
        for t in targets:
            row = {}
            static = _at(curves["static"], t, tokens)
            tok = _at(curves["routers"], t, tokens)
            seq = _at(seq_curves["routers"], t, tokens) if seq_curves else None
            row["static"] = static[1] if static else None
            row["token"] = (
                {"value": tok[1], "between": tok[2]}
                if tok
                else {
                    "reached": False,
                    "range": [min(p[0] for p in curves["routers"]), max(p[0] for p in curves["routers"])],
                }
            )
            if seq_curves is not None:
                row["sequence"] = (
                    {"value": seq[1], "between": seq[2]}
                    if seq
                    else {
                        "reached": False,
                        "range": [min(p[0] for p in seq_curves["routers"]), max(p[0] for p in seq_curves["routers"])],
                    }
                )
            pairs = [
                ("token_minus_static", tok, static),
                ("sequence_minus_static", seq, static),
                ("token_minus_sequence", tok, seq),
            ]
            for name, a, b in pairs:
                if a is not None and b is not None:
                    diff, low, high = stats.paired_bootstrap(a[0], b[0], tokens, iterations)
                    row[name] = {"diff": diff, "interval": [low, high]}
            rows[f"{t:.2f}"] = row
        out[domain] = {"texts": data["texts"], "tokens": int(tokens.sum()), "static_from": static_source, "at": rows}
        if seq_curves is not None and static_source == "token run":
            out[domain]["static_max_abs_difference_between_runs"] = static_gap
    return out


def _cell(entry):
    if not entry:
        return "-"
    return f"{entry['diff']:+.4f} [{entry['interval'][0]:+.4f}, {entry['interval'][1]:+.4f}]"


def markdown(summary: dict, sequence_source: str | None) -> str:
    lines = [
        "| domain | measured skip | static | token routers | sequence routers | token - static [95% CI] | "
        "sequence - static [95% CI] | token - sequence [95% CI] | token points used |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for domain, data in summary.items():
        for target, row in data["at"].items():

            def value(entry):
                if entry is None:
                    return "-"
                if "value" not in entry:
                    return f"not reached ({entry['range'][0]:.3f}-{entry['range'][1]:.3f})"
                return f"{entry['value']:.4f}"

            between = "-".join(f"{x:.3f}" for x in row["token"].get("between", [])) or "-"
            static = "-" if row["static"] is None else f"{row['static']:.4f}"
            lines.append(
                f"| {domain} | {float(target):.0%} | {static} | {value(row['token'])} | "
                f"{value(row.get('sequence'))} | {_cell(row.get('token_minus_static'))} | "
                f"{_cell(row.get('sequence_minus_static'))} | {_cell(row.get('token_minus_sequence'))} | "
                f"{between} |"
            )
    if sequence_source:
        lines.append(f"\nSequence routers: {sequence_source}.")
    return "\n".join(lines)


def merge(folders: list[Path]) -> dict:
    merged = None
    for folder in folders:
        result = json.loads((folder / tradeoff.RESULT_NAME).read_text())
        if merged is None:
            merged = result
            merged["job"]["domains"] = list(result["domains"])
            continue
        for key in ("domains", "matched"):
            merged[key].update(result[key])
        merged["job"]["domains"] += list(result["domains"])
        merged["seconds"] = merged.get("seconds", 0) + result.get("seconds", 0)
        names = {v["name"] for v in merged["variants"]}
        merged["variants"] += [v for v in result["variants"] if v["name"] not in names]
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--token", nargs="+", required=True, help="per-domain tradeoff folders of token routers")
    parser.add_argument("--sequence", help="tradeoff.json of sequence routers on the same items")
    parser.add_argument("--sequence-source", help="how to name the sequence run in the markdown")
    parser.add_argument("--output", required=True)
    parser.add_argument("--targets", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    args = parser.parse_args()
    token = merge([Path(f) for f in args.token])
    sequence = json.loads(Path(args.sequence).read_text()) if args.sequence else None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / tradeoff.RESULT_NAME).write_text(json.dumps(token, indent=1) + "\n")
    (out / "tradeoff.md").write_text(tradeoff.markdown_table(token) + "\n")
    summary = summarise(token, sequence, args.targets)
    source = args.sequence_source or (args.sequence and f"`{args.sequence}`")
    (out / "summary.json").write_text(json.dumps({"sequence_source": source, "domains": summary}, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(summary, source) + "\n")
    print(markdown(summary, source))


if __name__ == "__main__":
    main()

"""Per-input headroom over the best static drop (issue 23, part 2): oracles on the trade-off's held-out texts.

    # 1. the per-text oracles (need no static order; the costly part)
    OMP_NUM_THREADS=1 python benchmarks/headroom.py oracles --texts 4 --max-tokens 128 --max-count 9
    # the best-static claim alone on more texts (searched order vs 1 - cos), cheap
    OMP_NUM_THREADS=1 python benchmarks/headroom.py statics --texts 16 --max-tokens 192
    # 2. everything else, once the searched order exists (routertune.train.static_order)
    OMP_NUM_THREADS=1 python benchmarks/headroom.py final --order benchmarks/results/static-order/static_order.json

Writes benchmarks/results/headroom/{oracles.json, headroom.json, headroom.md} (--output to change). Each stage
keeps what it finished in its JSON and continues from it when rerun with the same settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from routertune.eval import headroom as hr
from routertune.eval.tradeoff import DOMAINS, domain_texts
from routertune.files import write_json
from routertune.routing import static_drop

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "headroom"


def _relative(path) -> str:
    """A path as results record it: repository-relative when inside the repository (no machine paths)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} cpu {time.process_time():.0f}s] {message}", flush=True)


def token_lists(tokenizer, domain: str, texts: int, max_tokens: int) -> list[list[int]]:
    # the same texts and cut as `routertune tradeoff` (tradeoff.run_tradeoff)
    return [ids[:max_tokens] for ids in (tokenizer(t)["input_ids"] for t in domain_texts(domain, texts))]


def fingerprint(lists) -> str:
    return hashlib.sha256(json.dumps(lists).encode()).hexdigest()


def oracles(args, model, tokenizer) -> dict:
    path = Path(args.output) / "oracles.json"
    settings = {
        "texts": args.texts,
        "max_tokens": args.max_tokens,
        "max_count": args.max_count,
        "domains": args.domains,
        "candidates": static_drop.droppable_layers(model.config.num_hidden_layers),
    }
    stored = json.loads(path.read_text()) if path.exists() else None
    if stored is not None and stored["settings"] != settings:
        sys.exit(
            f"{path} was written with other settings ({stored['settings']}); pass the same flags or another --output"
        )
    result = stored or {"settings": settings, "domains": {}}
    pad = tokenizer.pad_token_id
    # kind-major: the reachable oracle of every domain first (what the question needs), the in-sample ceiling after
    for kind, make_rows, mask in (("reachable", hr.half_rows, "route"), ("in_sample", hr.full_rows, "score")):
        for domain in args.domains:
            lists = token_lists(tokenizer, domain, args.texts, args.max_tokens)
            entry = result["domains"].setdefault(domain, {"fingerprint": fingerprint(lists)})
            if entry["fingerprint"] != fingerprint(lists):
                sys.exit(f"{path}: the {domain} texts changed since it was written; pass another --output")
            if kind in entry:
                continue
            texts = hr.Texts(model, make_rows(lists), pad)
            chains, kls = hr.greedy_per_text(
                texts, settings["candidates"], args.max_count, mask, lambda s: log(f"{domain}: {s}")
            )
            entry[kind] = {"chains": chains, ("route_kl" if mask == "route" else "score_kl"): kls.tolist()}
            write_json(path, result)
    return result


def cos_importance(args, model, tokenizer) -> static_drop.AttentionImportance:
    """1 - cos importance on the tuning prompts, as `routertune tradeoff` computes it (cached in the output)."""
    from routertune.calibrate import prompt_batches
    from routertune.train.prompts import chat_prompts

    path = Path(args.output) / "importance.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored["calibration_samples"] == args.calibration_samples:
            return static_drop.AttentionImportance({int(k): v for k, v in stored["scores"].items()})
    log("1 - cos importance on the tuning prompts (as tradeoff does)")
    calibration = chat_prompts(tokenizer, split="train", n=args.calibration_samples, max_tokens=256)
    importance = static_drop.attention_importance(model, prompt_batches(calibration, tokenizer.pad_token_id))
    write_json(path, {"calibration_samples": args.calibration_samples, "scores": importance.scores})
    return importance


def final(args, model, tokenizer) -> dict:
    from routertune.train.static_order import StaticOrder

    found = json.loads((Path(args.output) / "oracles.json").read_text())
    settings = found["settings"]
    order = StaticOrder.from_json(json.loads(Path(args.order).read_text()))
    if order.model.get("num_hidden_layers") != model.config.num_hidden_layers:
        sys.exit(f"{args.order} was searched on another model ({order.model})")
    ks = [k for k in args.ks if k <= min(len(order.order), settings["max_count"])]
    candidates = settings["candidates"]
    pad = tokenizer.pad_token_id
    routers = dict(item.split("=", 1) for item in args.routers)
    importance = cos_importance(args, model, tokenizer)
    cos_sets = {k: importance.least_important(k, candidates) for k in ks}
    top = len(order.order)
    out = {
        "settings": {
            **settings,
            "ks": ks,
            "calibration_samples": args.calibration_samples,
            "bootstrap": args.bootstrap,
            "order_file": _relative(args.order),
            "routers": {name: _relative(path) for name, path in routers.items()},
        },
        "searched_order": order.order,
        "searched_order_tuning_kl": order.kl,
        "searched_order_settings": order.settings,
        "cos_sets": {str(k): v for k, v in cos_sets.items()},
        "importance": importance.scores,
        "domains": {},
    }
    per_domain = {}
    done = [d for d in settings["domains"] if "reachable" in found["domains"].get(d, {})]
    if not done:
        sys.exit("no domain has its reachable oracle yet: run the oracles stage first")
    for domain in done:
        lists = token_lists(tokenizer, domain, settings["texts"], settings["max_tokens"])
        entry = found["domains"][domain]
        if entry["fingerprint"] != fingerprint(lists):
            sys.exit(f"the {domain} texts differ from those the oracles were chosen on")
        texts = hr.Texts(model, hr.full_rows(lists), pad)
        n = len(lists)
        score_tokens, route_tokens = texts.tokens("score"), texts.tokens("route")
        # the best static order's prefixes (m = 0..top) on every text: best static at k, and the budget tables
        prefix_route, prefix_score = np.zeros((n, top + 1)), np.zeros((n, top + 1))
        for m in range(1, top + 1):
            texts.commit([order.order[: m - 1]] * n)
            got = texts.evaluate([order.order[:m]] * n)
            prefix_route[:, m], prefix_score[:, m] = got["route"], got["score"]
            log(f"{domain}: searched order, {m} layers")
        texts.commit([[]] * n)
        kl = {
            "best_static": {},
            "cos_static": {},
            "reachable": {},
            "in_sample": {},
            "budget": {},
            "budget_in_sample": {},
        }
        for name, path in routers.items():  # router sets: their trade-off curve at skip k / layers, per text
            kl[name] = routers_at(path, domain, ks, model.config.num_hidden_layers, score_tokens)
        allocations = {}
        for k in ks:
            kl["best_static"][k] = prefix_score[:, k]
            kl["cos_static"][k] = texts.evaluate([cos_sets[k]] * n)["score"]
            kl["reachable"][k] = texts.evaluate([c[:k] for c in entry["reachable"]["chains"]])["score"]
            # in-sample ceiling: NaN where that stage has not finished for the domain
            kl["in_sample"][k] = (
                np.asarray(entry["in_sample"]["score_kl"])[:, k - 1] if "in_sample" in entry else np.full(n, np.nan)
            )
            # budget oracle: expected second-half KL sum = routed half's per-token KL x scored tokens
            route_cost = prefix_route / np.maximum(route_tokens, 1)[:, None] * score_tokens[:, None]
            chosen = hr.allocate_budget(route_cost, k * n)
            kl["budget"][k] = prefix_score[np.arange(n), chosen]
            chosen_in = hr.allocate_budget(prefix_score, k * n)
            kl["budget_in_sample"][k] = prefix_score[np.arange(n), chosen_in]
            allocations[k] = {"budget": chosen, "budget_in_sample": chosen_in}
            log(f"{domain}: k={k} done")
        per_domain[domain] = (kl, score_tokens)
        out["domains"][domain] = {
            "texts": n,
            "score_tokens": score_tokens.tolist(),
            "route_tokens": route_tokens.tolist(),
            "per_text_kl_sum": {name: {str(k): v.tolist() for k, v in values.items()} for name, values in kl.items()},
            "allocations": {str(k): v for k, v in allocations.items()},
            "reachable_sets": {str(k): [sorted(c[:k]) for c in entry["reachable"]["chains"]] for k in ks},
            "in_sample_sets": {
                str(k): [sorted(c[:k]) for c in entry.get("in_sample", {}).get("chains", [])] for k in ks
            },
            "summary": summary(kl, score_tokens, ks, args.bootstrap),
            "gap_share": shares(kl, score_tokens, ks, routers, args.bootstrap),
        }
    pooled_kl = {
        name: {k: np.concatenate([per_domain[d][0][name][k] for d in per_domain]) for k in ks}
        for name in next(iter(per_domain.values()))[0]
    }
    pooled_tokens = np.concatenate([per_domain[d][1] for d in per_domain])
    out["pooled"] = {
        "texts": int(len(pooled_tokens)),
        "summary": summary(pooled_kl, pooled_tokens, ks, args.bootstrap),
        "gap_share": shares(pooled_kl, pooled_tokens, ks, routers, args.bootstrap),
    }
    write_json(Path(args.output) / "headroom.json", out)
    (Path(args.output) / "headroom.md").write_text(markdown(out) + "\n")
    return out


def statics(args, model, tokenizer) -> dict:
    """The best-static-baseline claim alone (cheap: a few passes per text, so more texts): searched order's first
    k vs 1 - cos static drop's k on the held-out texts' second halves, paired intervals over texts."""
    from routertune.train.static_order import StaticOrder

    order = StaticOrder.from_json(json.loads(Path(args.order).read_text()))
    ks = [k for k in args.ks if k <= len(order.order)]
    if not ks:
        sys.exit(f"{args.order} holds {len(order.order)} layers: none of --ks {args.ks} is reached yet")
    candidates = static_drop.droppable_layers(model.config.num_hidden_layers)
    importance = cos_importance(args, model, tokenizer)
    out = {
        "settings": {
            "texts": args.texts,
            "max_tokens": args.max_tokens,
            "ks": ks,
            "domains": args.domains,
            "bootstrap": args.bootstrap,
            "calibration_samples": args.calibration_samples,
        },
        "searched_order": order.order,
        "searched_order_tuning_kl": order.kl,
        "searched_order_settings": order.settings,
        "cos_sets": {str(k): importance.least_important(k, candidates) for k in ks},
        "domains": {},
    }
    pooled: dict = {"searched": {k: [] for k in ks}, "cos": {k: [] for k in ks}, "tokens": []}
    for domain in args.domains:
        lists = token_lists(tokenizer, domain, args.texts, args.max_tokens)
        texts = hr.Texts(model, hr.full_rows(lists), tokenizer.pad_token_id)
        tokens = texts.tokens("score")
        entry = {"texts": len(lists), "score_tokens": tokens.tolist(), "per_text_kl_sum": {}, "summary": {}}
        for k in ks:
            searched = texts.evaluate([order.first(k)] * len(lists))["score"]
            cos = texts.evaluate([importance.least_important(k, candidates)] * len(lists))["score"]
            entry["per_text_kl_sum"][str(k)] = {"searched": searched.tolist(), "cos": cos.tolist()}
            entry["summary"][str(k)] = static_row(searched, cos, tokens, args.bootstrap)
            pooled["searched"][k].append(searched)
            pooled["cos"][k].append(cos)
            log(f"statics: {domain} k={k}: {entry['summary'][str(k)]}")
        pooled["tokens"].append(tokens)
        out["domains"][domain] = entry
    tokens = np.concatenate(pooled["tokens"])
    out["pooled"] = {
        "texts": int(len(tokens)),
        "summary": {
            str(k): static_row(
                np.concatenate(pooled["searched"][k]), np.concatenate(pooled["cos"][k]), tokens, args.bootstrap
            )
            for k in ks
        },
    }
    write_json(Path(args.output) / "statics.json", out)
    lines = [
        "Searched order (tuning data) vs 1 - cos static drop, mean KL per scored token on held-out second "
        "halves; searched minus 1-cos with a 95% paired bootstrap interval over texts.",
        "",
        "| where | k | searched | 1-cos | searched - 1-cos | relative |",
        "|---|---|---|---|---|---|",
    ]
    for where, block in [*out["domains"].items(), ("pooled", out["pooled"])]:
        for k, row in block["summary"].items():
            low, high = row["interval"]
            rl, rh = row["relative_interval"]
            lines.append(
                f"| {where} ({block['texts']} texts) | {k} | {row['searched']:.4f} | {row['cos']:.4f} | "
                f"{row['minus']:+.4f} [{low:+.4f}, {high:+.4f}] | {row['relative']:+.0%} [{rl:+.0%}, {rh:+.0%}] |"
            )
    (Path(args.output) / "statics.md").write_text("\n".join(lines) + "\n")
    return out


def static_row(searched, cos, tokens, iterations) -> dict:
    gap = hr.gap_entry(searched / tokens, cos / tokens, tokens, iterations)
    return {
        "searched": float(searched.sum() / tokens.sum()),
        "cos": float(cos.sum() / tokens.sum()),
        "minus": gap["minus_baseline"],
        "interval": gap["interval"],
        "relative": gap["relative"],
        "relative_interval": gap["relative_interval"],
    }


def routers_at(path: str, domain: str, ks, layers: int, score_tokens: np.ndarray) -> dict[int, np.ndarray]:
    """A router set's per-text KL sums at measured skip k / layers, interpolated along its threshold sweep in
    a `routertune tradeoff` result on the same texts (checked: the same scored tokens per text); NaN where the
    sweep does not reach k."""
    from routertune.eval.router_sets import curve
    from routertune.stats import interpolate

    result = json.loads(Path(path).read_text())
    tokens = np.asarray(result["domains"][domain]["settings"]["dense"]["per_text_tokens"], dtype=np.float64)
    if tokens.shape != score_tokens.shape or not np.allclose(tokens, score_tokens):
        sys.exit(
            f"{path}: its {domain} texts are not these (scored tokens differ); run it with --texts and --max-tokens as here"
        )
    points = curve(result, domain, "routers")
    out = {}
    for k in ks:
        found = interpolate(points, k / layers)
        out[k] = found[0] if found is not None else np.full(len(tokens), np.nan)
    return out


def shares(kl: dict, tokens: np.ndarray, ks, routers: dict, iterations: int) -> dict:
    """Per router set and k: the share of the reachable gap (best static - reachable oracle) it closes."""
    out = {}
    for name in routers:
        out[name] = {}
        for k in ks:
            if np.isnan(kl[name][k]).any():
                continue
            out[name][str(k)] = hr.gap_share(
                kl["best_static"][k] / tokens, kl[name][k] / tokens, kl["reachable"][k] / tokens, tokens, iterations
            )
    return out


def summary(kl: dict, tokens: np.ndarray, ks, iterations: int) -> dict:
    out = {}
    for k in ks:
        per_token = {name: kl[name][k] / tokens for name in kl}
        row = {"mean_kl": {name: float(kl[name][k].sum() / tokens.sum()) for name in kl}}
        row["minus_best_static"] = {
            name: hr.gap_entry(per_token[name], per_token["best_static"], tokens, iterations)
            for name in kl
            if name != "best_static" and not np.isnan(per_token[name]).any()
        }
        out[str(k)] = row
    return out


def markdown(result: dict) -> str:
    names = {
        "best_static": "best static",
        "cos_static": "1-cos static",
        "reachable": "reachable oracle",
        "in_sample": "in-sample oracle",
        "budget": "budget oracle",
        "budget_in_sample": "budget in-sample",
    }
    names |= {name: f"routers: {name}" for name in result["settings"].get("routers", {})}
    lines = [
        "Mean KL(dense || variant) per scored token (second halves); in brackets: minus best static "
        "(searched order), relative, with a 95% paired bootstrap interval over texts.",
        "",
        "| where | k | " + " | ".join(names.values()) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    blocks = [(d, v["summary"], v["texts"]) for d, v in result["domains"].items()]
    blocks.append(("pooled", result["pooled"]["summary"], result["pooled"]["texts"]))
    for where, rows, n in blocks:
        for k, row in rows.items():
            cells = []
            for name in names:
                value = f"{row['mean_kl'][name]:.4f}"
                if name not in row["minus_best_static"]:
                    value = "not run" if np.isnan(row["mean_kl"][name]) else value
                else:
                    gap = row["minus_best_static"][name]
                    low, high = gap["relative_interval"]
                    value += f" ({gap['relative']:+.0%} [{low:+.0%}, {high:+.0%}])"
                cells.append(value)
            lines.append(f"| {where} ({n} texts) | {k} | " + " | ".join(cells) + " |")
    share_rows = [
        (where, name, k, entry)
        for where, block in [*result["domains"].items(), ("pooled", result["pooled"])]
        for name, per_k in block.get("gap_share", {}).items()
        for k, entry in per_k.items()
    ]
    if share_rows:
        lines += [
            "",
            "Share of the reachable gap (best static - reachable oracle) each router set closes, "
            "(best static - routers) / (best static - reachable oracle), 95% bootstrap interval over texts "
            "(resamples where the oracle is no better than static are left out and counted).",
            "",
            "| where | routers | k | gap (KL/token) | share | interval | resamples without a gap |",
            "|---|---|---|---|---|---|---|",
        ]
        for where, name, k, e in share_rows:
            low, high = e["interval"]
            lines.append(
                f"| {where} | {name} | {k} | {e['gap']:+.4f} | {e['share']:+.2f} | [{low:+.2f}, {high:+.2f}] | "
                f"{e['resamples_without_gap']} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("oracles", "final", "statics"))
    parser.add_argument("--texts", type=int, default=4, help="texts per domain")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-count", type=int, default=9, help="greedy depth of the per-text oracles")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS))
    parser.add_argument("--ks", nargs="+", type=int, default=[3, 6, 9])
    parser.add_argument("--order", default=str(ROOT / "benchmarks/results/static-order/static_order.json"))
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    parser.add_argument(
        "--routers",
        nargs="*",
        default=[],
        help="final: NAME=tradeoff.json of router sets to place in the table (a tradeoff run on the same texts)",
    )
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from routertune.base_model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    Path(args.output).mkdir(parents=True, exist_ok=True)
    if args.stage == "oracles":
        oracles(args, model, tokenizer)
    elif args.stage == "statics":
        statics(args, model, tokenizer)
    else:
        final(args, model, tokenizer)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What decode-only routing (`routertune export --decode-only`) costs or buys in quality, against whole-prompt
routing, on the trade-off's held-out texts (issue 24, part 3).

Each text is cut as `routertune tradeoff` cuts it: its first half is the prompt the routers decide from, its
second half is scored (the predictions at positions half-1 .. n-2). Both modes run the same two calls through a
KV cache, prompt then continuation, one text at a time:

* whole-prompt (what `routertune export` serves): the prompt is prefilled with its own decisions, and the
  continuation keeps them;
* decode-only (`--decode-only`): the prompt is prefilled densely, the routers decide from that prefill, and only
  the continuation skips (`RoutedModel.decode_only`); with `--free-kv` as well, the never-run layers are skipped
  in the prompt too (one more point, at the export's own threshold).

KL(dense || mode) per scored token, over a sweep of thresholds; the curves are compared at the same measured skip
over the scored (generated) tokens, paired by text (bootstrap over texts, weighted by scored tokens). Skip over
all the text's tokens is reported too: decode-only skips nothing in the prompt, which is what it gives up.

    OMP_NUM_THREADS=1 python benchmarks/decode_only_quality.py --texts 16

Writes benchmarks/results/decode-only/{decode_only_quality.json, decode_only_quality.md}.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from routertune import RoutedModel
from routertune.base_model import load_model_and_tokenizer
from routertune.eval.tradeoff import DOMAINS, compare_curves, domain_texts, sweep_thresholds, text_batches
from routertune.files import write_json
from routertune.serve.export import never_run_layers

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROUTERS = ROOT / "benchmarks" / "results" / "routers" / "searched-prior-shrink1"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "decode-only"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} cpu {time.process_time():.0f}s] {message}", flush=True)


@torch.inference_mode()
def score_text(routed, tokens: list[int], mode: str, prefill_skip=frozenset()) -> tuple[torch.Tensor, dict]:
    """Log-probabilities at positions half-1 .. n-2 (K, V) and the decisions, for one text in `mode`:
    "dense", "whole" (whole-prompt routing) or "decode" (decode-only, `prefill_skip` skipped in the prompt)."""
    half = len(tokens) // 2
    prompt, rest = torch.tensor([tokens[:half]]), torch.tensor([tokens[half:-1]])
    context = {
        "dense": routed.forced("run"),
        "whole": contextlib.nullcontext(),
        "decode": routed.decode_only(prefill_skip),
    }[mode]
    cache = routed.new_cache()
    with context:
        first = routed(input_ids=prompt, cache=cache, logits_to_keep=1).logits  # (1, 1, V)
        later = routed(input_ids=rest, cache=cache).logits  # (1, n-1-half, V)
    logits = torch.cat([first, later], dim=1)[0].float()
    return F.log_softmax(logits, dim=-1), {k: bool(v[0]) for k, v in cache.decisions.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routers", default=str(DEFAULT_ROUTERS))
    parser.add_argument("--texts", type=int, default=16, help="held-out texts per domain")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--points", type=int, default=7, help="thresholds in the sweep")
    parser.add_argument("--targets", type=float, nargs="*", default=[0.10, 0.20, 0.30])
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer()
    routed = RoutedModel.from_pretrained(model, args.routers)
    num_layers = routed.config.num_hidden_layers
    never = never_run_layers(load_file(str(Path(args.routers) / "routers.safetensors")), routed.router_config)
    never_layers = frozenset(never["layers"]) if never else frozenset()
    texts = [
        (domain, ids[: args.max_tokens])
        for domain in DOMAINS
        for ids in (tokenizer(t)["input_ids"] for t in domain_texts(domain, args.texts))
    ]
    token_lists = [ids for _, ids in texts]
    batches = text_batches(token_lists, tokenizer.pad_token_id or 0)
    calibration = [{"input_ids": b.input_ids, "attention_mask": b.route_mask} for b in batches]
    thresholds = sweep_thresholds(routed, calibration, args.targets, args.points, num_layers)
    default = routed.router_config.threshold
    log(f"{len(texts)} texts; thresholds {thresholds} and the export's {default}; never-run {sorted(never_layers)}")

    dense = [score_text(routed, ids, "dense")[0] for ids in token_lists]
    scored = np.array([len(ids) - len(ids) // 2 for ids in token_lists], dtype=float)
    whole_len = np.array([len(ids) for ids in token_lists], dtype=float)

    def run(mode: str, threshold: float, prefill_skip=frozenset()) -> dict:
        saved = (routed.router_config.threshold, routed.router_config.layer_thresholds)
        routed.set_threshold(threshold)
        kl, skipped, prompt_skipped = [], [], []
        try:
            for ids, ref in zip(token_lists, dense):
                lp, decisions = score_text(routed, ids, mode, prefill_skip)
                kl.append(float((ref.exp() * (ref - lp)).sum(-1).sum()))
                skipped.append(sum(not run for run in decisions.values()))
                prompt_skipped.append(skipped[-1] if mode == "whole" else len(prefill_skip))
        finally:
            routed.set_threshold(*saved)
        kl, skipped, prompt_skipped = np.array(kl), np.array(skipped, float), np.array(prompt_skipped, float)
        half = whole_len - scored
        return {
            "mode": mode,
            "threshold": threshold,
            "prefill_skip": sorted(prefill_skip),
            "kl_per_text": kl.tolist(),
            "kl": float(kl.sum() / scored.sum()),
            # skip share of attention sublayers over the generated (scored) tokens, and over every token
            "skip_generated": float(skipped.mean() / num_layers),
            "skip_all_tokens": float(((skipped * scored + prompt_skipped * half) / whole_len).mean() / num_layers),
        }

    points = []
    for threshold in sorted(set(thresholds) | {default}):
        for mode in ("whole", "decode"):
            points.append(run(mode, threshold))
            p = points[-1]
            log(f"{mode:6s} @ {threshold:.4g}: skip {p['skip_generated']:.3f} KL {p['kl']:.4f}")
    free_kv = run("decode", default, never_layers) if never_layers else None
    curves = {
        mode: [(0.0, np.zeros(len(token_lists)))]
        + sorted((p["skip_generated"], np.array(p["kl_per_text"]) / scored) for p in points if p["mode"] == mode)
        for mode in ("whole", "decode")
    }
    matched = {
        f"{t:.2f}": compare_curves(curves, t, weights=scored, iterations=args.bootstrap, baseline="whole")
        for t in args.targets
    }
    result = {
        "routers": str(Path(args.routers).resolve().relative_to(ROOT))
        if Path(args.routers).resolve().is_relative_to(ROOT)
        else args.routers,
        "texts_per_domain": args.texts,
        "max_tokens": args.max_tokens,
        "domains": list(DOMAINS),
        "never_run": sorted(never_layers),
        "points": points,
        "free_kv_point": free_kv,
        "matched": matched,
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "decode_only_quality.json", result)
    lines = [
        "| skip over generated tokens | whole-prompt KL | decode-only KL | decode-only - whole [95% CI] |",
        "|---|---|---|---|",
    ]
    for t, entry in matched.items():
        whole, decode = entry["whole"], entry["decode"]
        if not (whole.get("reached") and decode.get("reached")):
            lines.append(f"| {t} | not reached | | |")
            continue
        low, high = decode["interval"]
        lines.append(
            f"| {t} | {whole['value']:.4f} | {decode['value']:.4f} | "
            f"{decode['minus_whole']:+.4f} [{low:+.4f}, {high:+.4f}] |"
        )
    if free_kv:
        lines.append(
            f"\nDecode-only with --free-kv at the export's threshold {default:g} (layers {sorted(never_layers)} "
            f"skipped in the prompt too): KL {free_kv['kl']:.4f} at skip {free_kv['skip_generated']:.3f} over "
            f"generated tokens, {free_kv['skip_all_tokens']:.3f} over all tokens."
        )
    (out / "decode_only_quality.md").write_text("\n".join(lines) + "\n")
    log("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()

"""The trade-off on a mixed workload: one router threshold for texts of every domain at once.

`routertune tradeoff` compares routers and static drop domain by domain, each at the same measured skip *on
that domain*: to skip 30% of code the routers' threshold is raised beyond where they would put it, because at
one threshold they skip less of code than of prose. A server sees one threshold for all its traffic. This takes
the per-text results of a tradeoff.json, pools the texts of all its domains, and compares the curves at the
same *pooled* measured skip: the router thresholds measured on every domain, static drop's k (one pattern for
every text), interpolated per text, with a paired bootstrap over the pooled texts (weighted by scored tokens).
No model runs; the numbers are those of the file.

The driver benchmarks/mixed_workload.py reads a tradeoff.json and writes mixed_workload.json/.md beside it.
"""

from __future__ import annotations

import numpy as np

from routertune.eval.router_sets import pooled_curve
from routertune.stats import interpolate, paired_bootstrap


def mixed_workload(result: dict) -> dict:
    """The pooled comparison of a tradeoff.json result (its per-text KL and skips): curve points and, per
    skip target, both curves interpolated per text with the paired bootstrap of routers - static."""
    domains = list(result["domains"])
    tokens = np.concatenate([np.array(result["domains"][d]["settings"]["dense"]["per_text_tokens"]) for d in domains])
    # pooled: skip averaged over all texts, KL per text per token (routertune.eval.router_sets.pooled_curve)
    curves = {
        kind: [(x, kl / tokens) for x, kl in pooled_curve(result, domains, prefix)]
        for kind, prefix in (("static", "static"), ("searched", "searched static"), ("routers", "routers"))
    }
    # the baselines this run traced (dense alone is no curve): 1 - cos static drop, and the searched order
    baselines = [b for b in ("static", "searched") if len(curves[b]) > 1]
    out = {
        "domains": domains,
        "texts": int(len(tokens)),
        "points": {k: [round(x, 4) for x, _ in sorted(v, key=lambda p: p[0])] for k, v in curves.items() if v},
        "baselines": baselines,
        "matched": {},
    }
    for target in result["job"]["skip_targets"]:
        routers = interpolate(curves["routers"], target)
        at = {b: interpolate(curves[b], target) for b in baselines}
        if routers is None or any(v is None for v in at.values()):
            out["matched"][f"{target:.2f}"] = {"reached": False}
            continue
        entry = {
            "reached": True,
            "routers": float((routers[0] * tokens).sum() / tokens.sum()),
            "routers_between": list(routers[1]),
        }
        for b, (values, between) in at.items():
            diff, low, high = paired_bootstrap(
                routers[0], values, weights=tokens, iterations=result["job"]["bootstrap"]
            )
            # 1 - cos static drop keeps its historical keys (minus_static, interval); the others are named
            entry |= {
                b: float((values * tokens).sum() / tokens.sum()),
                f"minus_{b}": diff,
                "interval" if b == "static" else f"{b}_interval": [low, high],
                f"{b}_between": list(between),
            }
        out["matched"][f"{target:.2f}"] = entry
    return out


def markdown(out: dict) -> str:
    """The markdown table of a `mixed_workload` result."""
    baselines = out.get("baselines", ["static"])
    names = {"static": "static (1 - cos)", "searched": "searched static"}
    lines = [
        f"Mixed workload ({', '.join(out['domains'])}; {out['texts']} texts, one threshold): KL(dense || setting) per token",
        "",
        "| pooled measured skip | "
        + " | ".join(names[b] for b in baselines)
        + " | routers | "
        + " | ".join(f"routers - {names[b]} [95% CI]" for b in baselines)
        + " | router points used |",
        "|---" * (3 + 2 * len(baselines)) + "|",
    ]
    for target, m in out["matched"].items():
        if not m["reached"]:
            lines.append(f"| {float(target):.0%} | not reached |" + " |" * (2 + 2 * len(baselines)))
            continue
        cells = [f"{m[b]:.4f}" for b in baselines] + [f"{m['routers']:.4f}"]
        for b in baselines:
            lo, hi = m["interval" if b == "static" else f"{b}_interval"]
            cells.append(f"{m[f'minus_{b}']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        between = m["routers_between"]
        lines.append(f"| {float(target):.0%} | " + " | ".join(cells) + f" | {between[0]:.3f}-{between[1]:.3f} |")
    return "\n".join(lines) + "\n"

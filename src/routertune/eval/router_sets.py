"""Two router sets (or a router set and a static baseline) from two `routertune tradeoff` runs on the same texts,
compared at the same measured skip, per domain and on the mixed stream (all domains pooled, one threshold).

No model runs: the per-text KL sums and skips of the two tradeoff.json files are interpolated to each skip
target (routertune.stats.interpolate) and compared text by text, with a paired bootstrap over texts for the
difference and for the relative change (a / b - 1, a ratio of token-weighted means)."""

from __future__ import annotations

import numpy as np

from routertune.stats import interpolate, paired_bootstrap


def curve(result: dict, domain: str, prefix: str) -> list[tuple[float, np.ndarray]]:
    """(measured skip, per-text KL sums) of the settings whose names start with `prefix`, plus dense."""
    settings = result["domains"][domain]["settings"]
    return [
        (s["skip"], np.asarray(s["per_text_kl"], dtype=np.float64))
        for name, s in settings.items()
        if name == "dense" or name.startswith(prefix)
    ]


def pooled_curve(result: dict, domains: list[str], prefix: str) -> list[tuple[float, np.ndarray]]:
    """The mixed stream's curve: settings present on every domain, skip averaged over all texts."""
    settings = [result["domains"][d]["settings"] for d in domains]
    shared = set(settings[0]).intersection(*settings[1:])
    out = []
    for name in sorted(shared):
        if name == "dense" or name.startswith(prefix):
            per_text = [np.asarray(s[name]["per_text_kl"], dtype=np.float64) for s in settings]
            skip = sum(s[name]["skip"] * len(v) for s, v in zip(settings, per_text)) / sum(len(v) for v in per_text)
            out.append((skip, np.concatenate(per_text)))
    return out


def relative_interval(
    a: np.ndarray, b: np.ndarray, iterations: int, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """sum(a) / sum(b) - 1 (KL sums: a ratio of token-weighted means) and its paired percentile bootstrap."""
    point = float(a.sum() / b.sum() - 1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(iterations, len(a)))
    samples = a[idx].sum(1) / np.maximum(b[idx].sum(1), 1e-300) - 1
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return point, float(low), float(high)


def _texts(result: dict, domain: str) -> list[float]:
    return result["domains"][domain]["settings"]["dense"]["per_text_tokens"]


def compare(
    a: dict, b: dict, targets: list[float], a_prefix: str = "routers", b_prefix: str = "routers", iterations: int = 2000
) -> dict:
    """Curve `a_prefix` of tradeoff result `a` minus curve `b_prefix` of result `b`, at each measured skip in
    `targets`: per domain and pooled. The two runs must hold the same texts (token counts checked per text)."""
    domains = [d for d in a["domains"] if d in b["domains"]]
    if not domains:
        raise ValueError("the two tradeoff results share no domain")
    for d in domains:
        if _texts(a, d) != _texts(b, d):
            raise ValueError(
                f"domain {d}: the two runs scored different texts (token counts differ); rerun both with the same "
                "--texts and --max-tokens"
            )
    out = {"domains": domains, "a": a_prefix, "b": b_prefix, "matched": {}}
    places = [(d, [d]) for d in domains] + ([("mixed", domains)] if len(domains) > 1 else [])
    for place, members in places:
        tokens = np.concatenate([np.asarray(_texts(a, d), dtype=np.float64) for d in members])
        if len(members) == 1:
            curves = curve(a, place, a_prefix), curve(b, place, b_prefix)
        else:
            curves = pooled_curve(a, members, a_prefix), pooled_curve(b, members, b_prefix)
        rows = {}
        for target in targets:
            at_a, at_b = interpolate(curves[0], target), interpolate(curves[1], target)
            if at_a is None or at_b is None:
                rows[f"{target:.2f}"] = {"reached": False}
                continue
            kl_a, kl_b = at_a[0], at_b[0]
            diff, low, high = paired_bootstrap(kl_a / tokens, kl_b / tokens, weights=tokens, iterations=iterations)
            rel, rel_low, rel_high = relative_interval(kl_a, kl_b, iterations)
            rows[f"{target:.2f}"] = {
                "reached": True,
                "a": float(kl_a.sum() / tokens.sum()),
                "b": float(kl_b.sum() / tokens.sum()),
                "a_minus_b": diff,
                "interval": [low, high],
                "relative": rel,
                "relative_interval": [rel_low, rel_high],
                "a_between": list(at_a[1]),
                "b_between": list(at_b[1]),
            }
        out["matched"][place] = {"texts": int(len(tokens)), "rows": rows}
    return out


def markdown(out: dict, a_name: str, b_name: str) -> str:
    lines = [
        f"KL(dense || setting) per token, {a_name} against {b_name} at the same measured skip (95% paired bootstrap "
        "over texts)",
        "",
        f"| where | measured skip | {b_name} | {a_name} | difference | relative |",
        "|---|---|---|---|---|---|",
    ]
    for place, entry in out["matched"].items():
        for target, r in entry["rows"].items():
            where = f"{place} ({entry['texts']} texts)"
            if not r["reached"]:
                lines.append(f"| {where} | {float(target):.0%} | not reached | | | |")
                continue
            lo, hi = r["interval"]
            rlo, rhi = r["relative_interval"]
            lines.append(
                f"| {where} | {float(target):.0%} | {r['b']:.4f} | {r['a']:.4f} | {r['a_minus_b']:+.4f} "
                f"[{lo:+.4f}, {hi:+.4f}] | {r['relative']:+.0%} [{rlo:+.0%}, {rhi:+.0%}] |"
            )
    return "\n".join(lines) + "\n"

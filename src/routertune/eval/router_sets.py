"""Two router sets (or a router set and a static baseline) from two `routertune tradeoff` runs on the same texts,
compared at the same measured skip, per domain and on the mixed stream (all domains pooled, one threshold).

No model runs: the per-text KL sums and skips of the two tradeoff.json files are interpolated to each skip
target (routertune.stats.interpolate) and compared text by text, with a paired bootstrap over texts for the
difference and for the relative change (a / b - 1, a ratio of token-weighted means)."""

from __future__ import annotations

import numpy as np

from routertune.stats import interpolate, paired_bootstrap

ONE_SET = ("dense", "static ", "searched static ", "random ")  # settings that skip the same layers on every text


def curve(result: dict, domain: str, prefix: str, texts: int | None = None) -> list[tuple[float, np.ndarray]]:
    """(measured skip, per-text KL sums) of the settings whose names start with `prefix`, plus dense; with
    `texts`, the first that many texts only (their skip is then the mean over those texts, where recorded)."""
    settings = result["domains"][domain]["settings"]
    out = []
    for name, s in settings.items():
        if name == "dense" or name.startswith(prefix):
            kl = np.asarray(s["per_text_kl"], dtype=np.float64)[:texts]
            skip = s["skip"]
            if texts is not None and texts < len(s["per_text_kl"]):
                if "per_text_skip" in s:
                    skip = float(np.mean(s["per_text_skip"][:texts]))
                elif not name.startswith(ONE_SET):  # a router's skip varies by text: its mean over a subset is unknown
                    raise ValueError(
                        f"{domain} {name!r}: this run recorded no per-text skips, so its first {texts} texts have no "
                        "known measured skip; rerun it, or compare runs of the same --texts"
                    )
            out.append((skip, kl))
    return out


def pooled_curve(
    result: dict, domains: list[str], prefix: str, texts: dict[str, int] | None = None
) -> list[tuple[float, np.ndarray]]:
    """The mixed stream's curve: settings present on every domain, skip averaged over all texts (the first
    texts[d] of each domain, when given)."""
    shared = set(result["domains"][domains[0]]["settings"]).intersection(
        *(result["domains"][d]["settings"] for d in domains[1:])
    )
    per_domain = {d: dict(curve_named(result, d, prefix, (texts or {}).get(d))) for d in domains}
    out = []
    for name in sorted(shared):
        if name == "dense" or name.startswith(prefix):
            points = [per_domain[d][name] for d in domains]
            skip = sum(x * len(v) for x, v in points) / sum(len(v) for _, v in points)
            out.append((skip, np.concatenate([v for _, v in points])))
    return out


def curve_named(result: dict, domain: str, prefix: str, texts: int | None = None) -> list[tuple[str, tuple]]:
    """curve(), with each point's setting name."""
    names = [n for n in result["domains"][domain]["settings"] if n == "dense" or n.startswith(prefix)]
    return list(zip(names, curve(result, domain, prefix, texts)))


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
    # runs of different --texts share their first texts (the same list, cut): compare on those
    common = {}
    for d in domains:
        ta, tb = _texts(a, d), _texts(b, d)
        n = min(len(ta), len(tb))
        if ta[:n] != tb[:n]:
            raise ValueError(
                f"domain {d}: the two runs scored different texts (token counts differ); rerun both with the same "
                "--texts and --max-tokens"
            )
        common[d] = n
    out = {"domains": domains, "a": a_prefix, "b": b_prefix, "matched": {}}
    places = [(d, [d]) for d in domains] + ([("mixed", domains)] if len(domains) > 1 else [])
    for place, members in places:
        tokens = np.concatenate([np.asarray(_texts(a, d)[: common[d]], dtype=np.float64) for d in members])
        if len(members) == 1:
            curves = curve(a, place, a_prefix, common[place]), curve(b, place, b_prefix, common[place])
        else:
            curves = pooled_curve(a, members, a_prefix, common), pooled_curve(b, members, b_prefix, common)
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

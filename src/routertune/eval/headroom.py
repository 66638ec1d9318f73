"""How much could per-input attention skipping gain over the best static drop? Oracles on held-out text.

On the trade-off's held-out texts (tradeoff.domain_texts; each text routes on its first half and is scored on
its second half, as tradeoff.text_batches does), at k skipped attention sublayers per text:

- best static: the searched order's first k layers (routertune.train.static_order, found on tuning data);
- 1 - cos static drop: the k least important layers (static_drop.attention_importance on tuning prompts);
- reachable per-input oracle: each text's own k-set, chosen greedily by KL on its routed (first) half,
  scored on its second half (what a router that sees the first half could at best do, up to greedy);
- in-sample oracle: chosen greedily on the scored half itself and scored there (a loose ceiling);
- budget oracle: each text gets k_i layers along the best static order, mean k_i = k exactly, the k_i
  chosen by an exact allocation (dynamic programming) on the routed half's KL (and in-sample on the scored
  half's), scored on the second half.

The routed half's KL counts positions 0 .. half-2 (predictions of tokens inside the first half), disjoint from
the scored positions half-1 .. n-2; it uses only the first half's tokens, which is all a prompt router sees.
KL is per token, token-weighted (a text's weight is its scored tokens); gaps to best static carry a paired
bootstrap interval over texts (stats.paired_bootstrap).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from routertune.stats import paired_bootstrap
from routertune.train.static_order import LayerEvaluator, score_batches


# --- rows --------------------------------------------------------------------------------------------------------
def split_masks(n: int) -> dict[str, list[bool]]:
    """Per position of an n-token text: 'route' (predicts a token of the first half) and 'score' (predicts a
    token of the second half: positions half-1 .. n-2, as tradeoff.text_batches scores)."""
    half = n // 2
    if half < 2:
        raise ValueError(f"a text of {n} tokens is too short: its halves need at least 2 tokens each")
    return {"route": [t < half - 1 for t in range(n)], "score": [half - 1 <= t < n - 1 for t in range(n)]}


def full_rows(token_lists: Sequence[list[int]]) -> list[tuple[list[int], dict[str, list[bool]]]]:
    return [(list(tokens), split_masks(len(tokens))) for tokens in token_lists]


def half_rows(token_lists: Sequence[list[int]]) -> list[tuple[list[int], dict[str, list[bool]]]]:
    """The first half of each text alone (what a router sees), with its 'route' positions: by causality the
    KL there equals the full text's there."""
    out = []
    for tokens in token_lists:
        half = len(tokens) // 2
        masks = split_masks(len(tokens))
        out.append((list(tokens[:half]), {"route": masks["route"][:half]}))
    return out


class Texts:
    """Evaluators over batches of rows, with per-text (original order) results."""

    def __init__(self, model, rows, pad_id: int, batch_size: int = 8):
        batches, self.index = score_batches(rows, pad_id, batch_size)
        self.evaluators = [LayerEvaluator(model, b) for b in batches]
        self.n = len(rows)

    def evaluate(self, sets_per_text: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Per mask, per text summed KL with text i's attention outputs of sets_per_text[i] zeroed."""
        out: dict[str, np.ndarray] = {}
        for ev, rows in zip(self.evaluators, self.index):
            got = ev.evaluate([sets_per_text[i] for i in rows])
            for name, values in got.items():
                out.setdefault(name, np.zeros(self.n))[rows] = values.numpy()
        return out

    def commit(self, sets_per_text: Sequence[Sequence[int]]) -> None:
        for ev, rows in zip(self.evaluators, self.index):
            ev.commit([sets_per_text[i] for i in rows])

    def tokens(self, name: str) -> np.ndarray:
        out = np.zeros(self.n)
        for ev, rows in zip(self.evaluators, self.index):
            out[rows] = ev.tokens(name).numpy()
        return out


# --- per-input oracles -------------------------------------------------------------------------------------------
def greedy_per_text(
    texts: Texts, candidates: Sequence[int], max_count: int, mask: str, log: Callable[[str], None] = lambda s: None
) -> tuple[list[list[int]], np.ndarray]:
    """Each text's own greedy chain: add, one at a time, the candidate whose zeroing raises that text's KL on
    `mask` the least (ties: the lower layer). Returns per text its chain (the first k layers are its k-set)
    and (texts, max_count) summed KL of each prefix on `mask`."""
    candidates = sorted(set(candidates))
    if max_count > len(candidates):
        raise ValueError(f"max_count={max_count} exceeds the {len(candidates)} candidates")
    chains: list[list[int]] = [[] for _ in range(texts.n)]
    kls = np.zeros((texts.n, max_count))
    for step in range(max_count):
        best = np.full(texts.n, np.inf)
        choice = [-1] * texts.n
        for layer in candidates:
            sets = [c + [layer] if layer not in c else c for c in chains]
            values = texts.evaluate(sets)[mask]
            for i in range(texts.n):
                if layer not in chains[i] and values[i] < best[i]:
                    best[i], choice[i] = values[i], layer
        for i in range(texts.n):
            chains[i].append(choice[i])
        kls[:, step] = best
        texts.commit(chains)
        log(f"headroom: greedy on {mask}, {step + 1} layers")
    return chains, kls


def exhaustive_per_text(
    texts: Texts, candidates: Sequence[int], k: int, mask: str
) -> tuple[list[list[int]], np.ndarray]:
    """Each text's best k-set over all C(n, k) subsets (small n only: the exact oracle the greedy one
    approximates). Ties: the lexicographically first set."""
    best = np.full(texts.n, np.inf)
    sets: list[list[int]] = [[] for _ in range(texts.n)]
    for subset in itertools.combinations(sorted(set(candidates)), k):
        values = texts.evaluate([list(subset)] * texts.n)[mask]
        for i in range(texts.n):
            if values[i] < best[i]:
                best[i], sets[i] = values[i], list(subset)
    return sets, best


def allocate_budget(costs: np.ndarray, total: int) -> list[int]:
    """Exact allocation: m_i in 0..M per row of `costs` (rows x (M+1)), sum m_i == total, minimizing
    sum_i costs[i, m_i] (dynamic programming over rows and the budget used). Ties: the first optimum found
    (lower m for earlier rows)."""
    costs = np.asarray(costs, dtype=np.float64)
    n, width = costs.shape
    top = width - 1
    if not 0 <= total <= n * top:
        raise ValueError(f"a budget of {total} layers cannot be split over {n} texts of 0..{top} layers each")
    inf = np.inf
    best = np.full((n + 1, total + 1), inf)
    pick = np.zeros((n + 1, total + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for i in range(n):
        for used in range(total + 1):
            if best[i, used] == inf:
                continue
            for m in range(min(top, total - used) + 1):
                value = best[i, used] + costs[i, m]
                if value < best[i + 1, used + m]:
                    best[i + 1, used + m] = value
                    pick[i + 1, used + m] = m
    out, used = [0] * n, total
    for i in range(n, 0, -1):
        out[i - 1] = int(pick[i, used])
        used -= out[i - 1]
    return out


# --- statistics --------------------------------------------------------------------------------------------------
def gap_share(
    static: np.ndarray,
    routers: np.ndarray,
    oracle: np.ndarray,
    weights: np.ndarray | None = None,
    iterations: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Share of the reachable gap that routers close: (static - routers) / (static - oracle), each a
    (weighted) mean of per-text values (per-token KL per text, weights = scored tokens), with a percentile
    bootstrap interval resampling texts (the three stay paired). Resamples whose gap is <= 0 (the oracle no
    better than static there) have no share; their count is reported and they are left out of the interval."""
    s, r, o = (np.asarray(x, dtype=np.float64) for x in (static, routers, oracle))
    if not (s.shape == r.shape == o.shape) or s.ndim != 1 or len(s) == 0:
        raise ValueError(f"gap_share needs three equal-length non-empty vectors, got {s.shape}, {r.shape}, {o.shape}")
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)

    def means(idx):
        ww = w[idx]
        return (
            (s[idx] * ww).sum(-1) / ww.sum(-1),
            (r[idx] * ww).sum(-1) / ww.sum(-1),
            (o[idx] * ww).sum(-1) / ww.sum(-1),
        )

    ms, mr, mo = means(np.arange(len(s)))
    gap = ms - mo
    share = float((ms - mr) / gap) if gap > 0 else float("nan")
    idx = np.random.default_rng(seed).integers(0, len(s), size=(iterations, len(s)))
    bs, br, bo = means(idx)
    valid = (bs - bo) > 0
    samples = (bs[valid] - br[valid]) / (bs[valid] - bo[valid])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail]) if len(samples) else (float("nan"),) * 2
    return {
        "share": share,
        "interval": [float(low), float(high)],
        "static": float(ms),
        "routers": float(mr),
        "oracle": float(mo),
        "gap": float(gap),
        "resamples_without_gap": int((~valid).sum()),
    }


def gap_entry(values: np.ndarray, baseline: np.ndarray, tokens: np.ndarray, iterations: int = 2000) -> dict:
    """values - baseline in per-token KL (token-weighted), paired interval, and relative to the baseline."""
    diff, low, high = paired_bootstrap(values, baseline, tokens, iterations)
    base = float((baseline * tokens).sum() / tokens.sum())
    return {
        "minus_baseline": diff,
        "interval": [low, high],
        "relative": diff / base if base > 0 else float("nan"),
        "relative_interval": [low / base, high / base] if base > 0 else [float("nan")] * 2,
    }

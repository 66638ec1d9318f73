"""Per-input oracles (routertune.eval.headroom) against brute force: per-text KLs from the plain tiny model with
static_drop.zeroed_attention, one text at a time; the budget allocation against every allocation; gap_share's
arithmetic on constructed numbers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from routertune.eval import headroom as hr
from routertune.routing.static_drop import zeroed_attention
from tiny_lm import tiny_llama

torch.set_num_threads(1)
LAYERS = 7  # candidates 1..5


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=5, layers=LAYERS)


@pytest.fixture(scope="module")
def lists():
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(3, 259, (n,), generator=gen).tolist() for n in (14, 9, 20, 11)]


def reference_kl(model, tokens, layers, part):
    """Summed KL of one text, unpadded, on its routed (positions 0..half-2) or scored (half-1..n-2) part."""
    ids = torch.tensor([tokens])
    half = len(tokens) // 2
    with torch.no_grad():
        d = F.log_softmax(model(ids).logits[0].float(), -1)
        with zeroed_attention(model, sorted(layers)):
            q = F.log_softmax(model(ids).logits[0].float(), -1)
    per = (d.exp() * (d - q)).sum(-1)
    span = slice(0, half - 1) if part == "route" else slice(half - 1, len(tokens) - 1)
    return float(per[span].sum())


def test_masks_split_like_text_batches():
    masks = hr.split_masks(7)  # half 3: route predicts tokens 1..2, score predicts tokens 3..6
    assert masks["route"] == [True, True, False, False, False, False, False]
    assert masks["score"] == [False, False, True, True, True, True, False]
    with pytest.raises(ValueError, match="too short"):
        hr.split_masks(3)


@pytest.mark.parametrize("part", ["route", "score"])
def test_oracles_equal_exhaustive_search(model, lists, part):
    candidates = list(range(1, LAYERS - 1))
    rows = hr.half_rows(lists) if part == "route" else hr.full_rows(lists)
    texts = hr.Texts(model, rows, 0, batch_size=3)
    # greedy at k = 1 is exhaustive by definition; exhaustive mode at k = 2 against brute force
    chains, kls = hr.greedy_per_text(texts, candidates, 2, part)
    sets, best = hr.exhaustive_per_text(hr.Texts(model, rows, 0, batch_size=3), candidates, 2, part)
    for i, tokens in enumerate(lists):
        singles = {l: reference_kl(model, tokens, {l}, part) for l in candidates}
        assert chains[i][0] == min(singles, key=singles.get)
        assert kls[i, 0] == pytest.approx(min(singles.values()), rel=1e-4)
        pairs = {s: reference_kl(model, tokens, set(s), part) for s in itertools.combinations(candidates, 2)}
        assert sets[i] == list(min(pairs, key=pairs.get))
        assert best[i] == pytest.approx(min(pairs.values()), rel=1e-4)
        # the greedy pair is a pair, scored right (never better than the exhaustive one)
        assert kls[i, 1] == pytest.approx(pairs[tuple(sorted(chains[i]))], rel=1e-4)
        assert kls[i, 1] >= best[i] - 1e-9


def test_routed_half_alone_gives_the_full_texts_routed_kl(model, lists):
    # a router sees only the first half: the oracle chosen on it must not depend on the second half
    layers = [2, 4]
    half = hr.Texts(model, hr.half_rows(lists), 0).evaluate([layers] * len(lists))["route"]
    full = hr.Texts(model, hr.full_rows(lists), 0).evaluate([layers] * len(lists))["route"]
    np.testing.assert_allclose(half, full, rtol=1e-4)


def test_budget_allocation_equals_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, top = rng.integers(2, 5), rng.integers(1, 4)
        costs = rng.random((n, top + 1)) * rng.integers(1, 4, size=(n, 1))
        if trial % 2:
            costs = np.cumsum(costs, axis=1)  # increasing in m, like KL along an order
        for total in range(0, n * top + 1):
            best = min(
                sum(costs[i, m] for i, m in enumerate(a))
                for a in itertools.product(range(top + 1), repeat=n)
                if sum(a) == total
            )
            got = hr.allocate_budget(costs, total)
            assert sum(got) == total and all(0 <= m <= top for m in got)
            assert sum(costs[i, m] for i, m in enumerate(got)) == pytest.approx(best, abs=1e-12)
    with pytest.raises(ValueError, match="cannot be split"):
        hr.allocate_budget(np.zeros((2, 3)), 5)


def test_gap_share_arithmetic():
    # routers close a quarter of the gap (a half would read the same from either end)
    static, routers, oracle = np.array([1.0, 3.0]), np.array([0.75, 2.5]), np.array([0.0, 1.0])
    got = hr.gap_share(static, routers, oracle, iterations=500)
    assert got["gap"] == pytest.approx(1.5) and got["share"] == pytest.approx(0.375 / 1.5)
    # weighted: static (1 + 9) / 4 = 2.5, routers (0.75 + 7.5) / 4 = 2.0625, oracle 3 / 4 = 0.75
    got = hr.gap_share(static, routers, oracle, weights=np.array([1.0, 3.0]), iterations=500)
    assert got["share"] == pytest.approx((2.5 - 2.0625) / (2.5 - 0.75))
    low, high = got["interval"]
    assert low <= got["share"] <= high
    # every resample of a constant share has that share
    s, o = np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0])
    got = hr.gap_share(s, s - 0.25 * (s - o), o, iterations=200)
    assert got["interval"] == pytest.approx([0.25, 0.25]) and got["share"] == pytest.approx(0.25)
    nothing = hr.gap_share(np.ones(3), np.ones(3), np.ones(3), iterations=50)
    assert np.isnan(nothing["share"]) and nothing["resamples_without_gap"] == 50
    with pytest.raises(ValueError, match="equal-length"):
        hr.gap_share(np.ones(2), np.ones(3), np.ones(2))

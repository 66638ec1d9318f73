"""The searched static order (routertune.train.static_order) against brute force on a tiny model: the
reference KLs come from the plain model run with static_drop.zeroed_attention, one record at a time."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from routertune.routing.static_drop import zeroed_attention
from routertune.train import data
from routertune.train import static_order as so
from tiny_lm import tiny_llama, tiny_tokenizer

torch.set_num_threads(1)

RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "What is two plus three?"},
            {"role": "assistant", "content": "Two plus three is five."},
        ]
    },
    {"text": "The quick brown fox jumps over the lazy dog near the river bank."},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like sky."}]},
    {"text": "def add(a, b):\n    return a + b\n"},
]
LAYERS = 8  # candidates 1..6


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3, layers=LAYERS)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def settings(**kw):
    base = dict(max_count=3, n_records=len(RECORDS), max_length=48, plain_text=0.0)
    base.update(kw)
    return so.OrderSettings(**base)


@pytest.fixture(scope="module")
def reference(model, tokenizer):
    """Mean per-token KL over the records' response tokens of any set, computed independently: plain model,
    zeroed_attention hooks, one unpadded record at a time."""
    examples = [data.encode_record(r, tokenizer, 48) for r in RECORDS]
    dense = []
    with torch.no_grad():
        for ex in examples:
            dense.append(F.log_softmax(model(torch.tensor([ex.input_ids])).logits[0].float(), -1))
    cache = {}

    def kl(layers) -> float:
        key = frozenset(layers)
        if key not in cache:
            total = count = 0.0
            with torch.no_grad(), zeroed_attention(model, sorted(key)):
                for ex, d in zip(examples, dense):
                    q = F.log_softmax(model(torch.tensor([ex.input_ids])).logits[0].float(), -1)
                    per = (d.exp() * (d - q)).sum(-1)[:-1]  # position t predicts token t + 1
                    scored = torch.tensor([label != data.IGNORE_INDEX for label in ex.labels[1:]])
                    total += float(per[scored].sum())
                    count += float(scored.sum())
            cache[key] = total / count
        return cache[key]

    return kl


def test_greedy_first_step_is_the_best_single_layer(model, tokenizer, reference):
    result = so.searched_order(model, tokenizer, settings(max_count=1), records=RECORDS)
    singles = {layer: reference({layer}) for layer in range(1, LAYERS - 1)}
    best = min(singles, key=singles.get)
    assert result.order == [best]
    assert result.kl[0] == pytest.approx(singles[best], rel=1e-4)


def test_greedy_follows_the_reference_step_by_step(model, tokenizer, reference):
    result = so.searched_order(model, tokenizer, settings(max_count=3), records=RECORDS)
    chosen = []
    for step in range(3):
        options = {l: reference(set(chosen) | {l}) for l in range(1, LAYERS - 1) if l not in chosen}
        chosen.append(min(options, key=options.get))
        assert result.kl[step] == pytest.approx(options[chosen[-1]], rel=1e-4)
    assert result.order == chosen


def test_wide_beam_equals_exhaustive_search(model, tokenizer, reference):
    candidates = list(range(1, LAYERS - 1))
    width = max(len(list(itertools.combinations(candidates, k))) for k in range(1, 4))
    result = so.searched_order(model, tokenizer, settings(max_count=3, beam=width), records=RECORDS)
    for k in range(1, 4):
        subsets = {s: reference(s) for s in itertools.combinations(candidates, k)}
        best = min(subsets, key=subsets.get)
        assert result.best_sets[k - 1]["layers"] == list(best)
        assert result.best_sets[k - 1]["kl"] == pytest.approx(subsets[best], rel=1e-4)
    # the order: the chain of nested sets with the lowest summed KL, over every ordered 3 of the candidates
    chains = {c: sum(reference(c[: i + 1]) for i in range(3)) for c in itertools.permutations(candidates, 3)}
    assert sum(result.kl) == pytest.approx(min(chains.values()), rel=1e-4)
    assert result.order == list(min(chains, key=chains.get))
    # greedy is never better than the exhaustive optimum, and here strictly needs the beam somewhere or matches
    greedy = so.searched_order(model, tokenizer, settings(max_count=3), records=RECORDS)
    assert all(g >= b["kl"] - 1e-9 for g, b in zip(greedy.kl, result.best_sets))


def test_swaps_never_make_a_prefix_worse(model, tokenizer, reference):
    greedy = so.searched_order(model, tokenizer, settings(max_count=3), records=RECORDS)
    refined = so.searched_order(model, tokenizer, settings(max_count=3, swaps=True), records=RECORDS)
    for k, (a, b) in enumerate(zip(refined.kl, greedy.kl)):
        assert a <= b + 1e-9
        assert a == pytest.approx(reference(refined.order[: k + 1]), rel=1e-4)


def test_resume_continues_and_gives_the_same_order(model, tokenizer, tmp_path):
    path = tmp_path / "order.json"
    fresh = so.searched_order(model, tokenizer, settings(max_count=3), records=RECORDS)
    # an interrupted run: the file after two steps (written atomically after every step)
    so.searched_order(model, tokenizer, settings(max_count=2), path, records=RECORDS)
    stored = json.loads(path.read_text())
    assert stored["order"] == fresh.order[:2] and stored["finished"]
    # mark the stored first step: a search that continues keeps it, one that starts over recomputes it
    stored["kl"][0] += 1.0
    stored["beam_state"][0]["kls"][0] += 1.0
    path.write_text(json.dumps(stored))
    resumed = so.searched_order(model, tokenizer, settings(max_count=3), path, records=RECORDS)
    assert resumed.order == fresh.order
    assert resumed.kl[0] == pytest.approx(fresh.kl[0] + 1.0, rel=1e-6)
    assert resumed.kl[1:] == pytest.approx(fresh.kl[1:], rel=1e-6)
    # continuing evaluated only the third step's candidates (6 - 2), not the first two steps again
    assert resumed.evaluations == stored["evaluations"] + (LAYERS - 2 - 2)
    # a finished search is returned as stored, and a shorter request is its prefix
    again = so.searched_order(model, tokenizer, settings(max_count=3), path, records=RECORDS)
    assert again.evaluations == resumed.evaluations and again.order == fresh.order
    shorter = so.searched_order(model, tokenizer, settings(max_count=1), path, records=RECORDS)
    assert shorter.order == fresh.order[:1] and shorter.kl[0] == pytest.approx(fresh.kl[0] + 1.0, rel=1e-6)


def test_other_settings_model_or_data_are_refused_or_recomputed(model, tokenizer, tmp_path):
    path = tmp_path / "order.json"
    so.searched_order(model, tokenizer, settings(max_count=1), path, records=RECORDS)
    with pytest.raises(ValueError, match="beam 1 there, 2 here"):
        so.searched_order(model, tokenizer, settings(max_count=1, beam=2), path, records=RECORDS)
    with pytest.raises(ValueError, match="data"):
        so.searched_order(model, tokenizer, settings(max_count=1), path, records=RECORDS[:3] + RECORDS[:1])
    with pytest.raises(ValueError, match="model"):
        so.searched_order(tiny_llama(seed=4, layers=LAYERS), tokenizer, settings(max_count=1), path, records=RECORDS)
    redone = so.searched_order(
        model, tokenizer, settings(max_count=1, beam=2), path, on_mismatch="recompute", records=RECORDS
    )
    assert json.loads(path.read_text())["settings"]["beam"] == 2 and redone.finished


def test_bad_settings_are_refused(model, tokenizer):
    with pytest.raises(ValueError, match="max_count"):
        so.OrderSettings(max_count=0)
    with pytest.raises(ValueError, match="exceeds"):
        so.searched_order(model, tokenizer, settings(max_count=7), records=RECORDS)
    with pytest.raises(ValueError, match="do not exist"):
        so.searched_order(model, tokenizer, settings(candidates=[1, 9]), records=RECORDS)


def test_order_for_reads_a_file_takes_a_shipped_search_only_when_it_matches_and_else_searches(
    model, tokenizer, tmp_path, monkeypatch
):
    """order_for: --static-order FILE is read; a search shipped for these weights with these settings is used
    as it is (no search runs); one with other settings, or for other weights, is not: the search runs."""
    identity = so.model_identity(model)
    searches = []
    real = so.searched_order

    def counting(*args, **kwargs):
        searches.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(so, "searched_order", counting)
    shipped_dir = tmp_path / "orders"
    shipped_dir.mkdir()
    monkeypatch.setattr(so, "SHIPPED", shipped_dir)
    # nothing shipped: searched here and cached
    first = so.order_for(model, tokenizer, 2, cache_dir=tmp_path / "cache")
    assert len(searches) == 1 and len(first.order) == 2
    # shipped with these settings (the cached search itself, copied as a shipped file): used, no search
    (cached,) = (tmp_path / "cache" / "static_order").glob("*.json")
    shipped = so.StaticOrder.from_json(json.loads(cached.read_text()))
    shipped.order = [first.order[1], first.order[0]]  # a different order, so its use is visible
    (shipped_dir / "model.json").write_text(json.dumps(shipped.to_json()))
    assert so.order_for(model, tokenizer, 2, cache_dir=tmp_path / "other").order == shipped.order
    assert len(searches) == 1
    # shipped with other settings (fewer records): not used, searched here
    other = so.StaticOrder.from_json(shipped.to_json())
    other.settings = {**other.settings, "n_records": 8}
    (shipped_dir / "model.json").write_text(json.dumps(other.to_json()))
    assert so.order_for(model, tokenizer, 2, cache_dir=tmp_path / "other").order == first.order
    assert len(searches) == 2
    (shipped_dir / "model.json").write_text(json.dumps(shipped.to_json()))
    # longer than shipped: searched
    assert len(so.order_for(model, tokenizer, 3, cache_dir=tmp_path / "other").order) == 3
    assert len(searches) == 3
    # shipped for other weights: not used
    shipped.model = {**shipped.model, "sha256": "0" * 64}
    (shipped_dir / "model.json").write_text(json.dumps(shipped.to_json()))
    assert so.order_for(model, tokenizer, 2, cache_dir=tmp_path / "third").order == first.order
    assert len(searches) == 4
    # a file is read as it is
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(so.StaticOrder(order=[5], kl=[0.1], model=identity).to_json()))
    assert so.order_for(model, tokenizer, 4, path=path).order == [5]
    assert len(searches) == 4

"""The harness LM off its default path (issue 10): choices of a truncated item, per-row skip statistics, and
batched generate_until, checked against the plain model with hooks (tests/reference.py)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from lm_eval.api.instance import Instance

from reference import SkipReference
from routertune import RoutedModel, RouterConfig
from routertune.eval.harness import RoutedLM, ScoredRow
from tiny_lm import randomize_routers, tiny_llama, tiny_tokenizer

LAYERS = [1, 2, 3, 4]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _routed(seed=0, scale=1.0):
    model = tiny_llama(seed)
    plain = copy.deepcopy(model)
    routed = RoutedModel(model, RouterConfig(layers=LAYERS))
    randomize_routers(routed, seed, scale)
    return routed, SkipReference(routed, plain)


def _decide(ref: SkipReference, tokens: list[int]) -> dict[int, torch.Tensor]:
    """The reference's decisions for one prompt, alone."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        ref.forward(ids, torch.ones_like(ids))
    return dict(ref.decisions)


def _reference_logprob(ref: SkipReference, row: ScoredRow, decisions) -> float:
    """Log-probability of the row's continuation under the plain model with `decisions` zeroing the skipped
    attention outputs."""
    ids = torch.tensor([row.tokens[:-1]])
    with torch.no_grad():
        logits = ref.forward(ids, torch.ones_like(ids), decisions=decisions).logits[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    n = len(row.tokens) - 1
    target = torch.tensor(row.tokens[-row.n_cont :])
    return float(logprobs[n - row.n_cont : n].gather(-1, target[:, None]).sum())


# --- bug 6: the choices of one item run at one depth, also after truncation ------------------------------------
SHARED = "Sarah was a much better surgeon than Maria so"
CHOICES = [
    (" Sarah", " always got the harder cases."),
    (" Maria", " got the easy ones."),
    (" Sarah", " did it, obviously and without any doubt."),
]


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("max_length", [40, 50, 2048])
def test_choices_of_a_truncated_item_share_one_depth(tok, share_prefix, max_length):
    """max_length=40 or 50 cuts every row at a different place (continuations differ in length), so no prefix
    of the truncated rows is shared: the item's decisions still come from its shared context (its last 40
    tokens when it is longer), for every choice."""
    routed, ref = _routed(seed=3)
    lm = RoutedLM(routed, tok, max_length=max_length, share_prefix=share_prefix, progress=False)
    requests = [
        Instance("loglikelihood", {}, (SHARED + name, cont), idx, metadata=("item", 7, 1))
        for idx, (name, cont) in enumerate(CHOICES)
    ]
    got = lm.loglikelihood(requests)
    contexts = [lm._encode(*r.args)[0] for r in requests]
    shared = os.path.commonprefix(contexts)  # SHARED and the space before the name: 46 tokens
    assert len(shared) == len(lm.tok_encode(SHARED)) + 1 == 46
    item = _decide(ref, shared[-max_length:])  # what fits in the model
    assert 0 < sum(bool(v) for v in item.values()) < len(item)  # a mixed decision, so a change would show
    rows = lm._rows([lm._encode(*r.args) for r in requests], [("item", 7)] * 3, [""] * 3)
    if max_length < 2048:
        # the regression: each truncated choice alone would route differently from the item
        assert any(_decide(ref, r.tokens[: r.n_ctx]) != item for r in rows), "the test needs a differing choice"
        assert all(len(r.tokens) == max_length + 1 for r in rows)
    for row, (logprob, _) in zip(rows, got):
        assert logprob == pytest.approx(_reference_logprob(ref, row, item), abs=1e-4)
    assert lm.stats["item"].sequences >= 1


# --- per-row skip statistics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("share_prefix", [True, False])
def test_skip_statistics_count_every_row(tok, share_prefix):
    """Counts per layer equal the decisions of each routed prefix taken alone (the reference)."""
    routed, ref = _routed(seed=1)
    lm = RoutedLM(routed, tok, batch_tokens=4096, share_prefix=share_prefix, progress=False)
    contexts = [
        "The cat sat on the mat because",
        "Another one",
        "Short",
        "Question: what is up?\nAnswer:",
        "Zebras are",
        "1 2 3 4",
    ]
    rows = []
    for ctx in contexts:
        a, b = lm._encode(ctx, " it was warm")
        rows.append(ScoredRow(a + b, len(b), len(a)))
    lm.score(rows)
    expected = {layer: 0 for layer in LAYERS}
    for row in rows:
        for layer, runs in _decide(ref, row.tokens[: row.n_route]).items():
            expected[layer] += int(runs.sum())
    assert lm.stats[""].sequences == len(rows)
    assert lm.stats[""].runs == expected
    assert len({tuple(_decide(ref, r.tokens[: r.n_route])[LAYERS[0]].tolist()) for r in rows}) == 2  # mixed rows


# --- generate_until: batched, truncated, cut at the stop strings -------------------------------------------------
def _alone(routed, tokens: list[int], max_new: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = routed.generate(input_ids=torch.tensor([tokens]), max_new_tokens=max_new, do_sample=False)
    new = out[0, len(tokens) :].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def test_generate_until_is_batched_truncated_and_cut_at_stops(tok, monkeypatch):
    routed, _ = _routed()
    lm = RoutedLM(routed, tok, max_length=24, progress=False)
    contexts = [
        "The cat sat on the mat because it was",
        "Another one",
        "Short",
        "Question: what is up today and tomorrow?\nAnswer:",
        "Zebras",
    ]
    calls = []
    generate = routed.base_model.generate
    monkeypatch.setattr(routed.base_model, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    requests = [
        Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 8}), i) for i, c in enumerate(contexts)
    ]
    got = lm.generate_until(requests)
    assert len(calls) == 1, "one batched generate, not one per request"
    for ctx, text in zip(contexts, got):
        prompt = lm.tok_encode(ctx)[-(24 - 8) :]  # room for the 8 new tokens within max_length
        expected = lm.tok_decode(_alone(routed, prompt, 8, tok.eos_token_id)).split("\n\n")[0]
        assert text == expected
    with pytest.raises(ValueError, match="max_gen_toks=24.*max_length 24"):
        lm.generate_until([Instance("generate_until", {}, ("Hi", {"max_gen_toks": 24}), 0)])


# --- logits at per-row positions, on every transformers release vLLM pins ----------------------------------
@pytest.mark.parametrize("boolean_keep", [True, False])
def test_kept_logits_are_each_rows_own_positions(boolean_keep, monkeypatch):
    """The harness scores only chosen positions of each row (a (B, T) mask, different per row). transformers
    5.20+ slice that mask itself; earlier ones (vLLM's pin) get the union of positions and the harness picks
    each row's own. Both must equal the full logits indexed by the mask, in row-major order."""
    from routertune.eval import harness

    if boolean_keep and not harness._BOOLEAN_LOGITS_TO_KEEP:
        pytest.skip("this transformers has no boolean logits_to_keep")
    monkeypatch.setattr(harness, "_BOOLEAN_LOGITS_TO_KEEP", boolean_keep)
    model = tiny_llama(0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=gen)
    keep = torch.zeros(3, 9, dtype=torch.bool)
    keep[0, [1, 4]] = True
    keep[1, [2, 3, 8]] = True  # rows keep different positions, and different counts
    keep[2, 4] = True
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        got = harness._kept_logits(model, keep, input_ids=ids, use_cache=False)
    assert got.shape == (int(keep.sum()), model.config.vocab_size)
    torch.testing.assert_close(got, full[keep], atol=1e-5, rtol=1e-5)

"""Routed prefill and decode against an independent reference (tests/reference.py: the plain model with hooks
that zero exactly the skipped rows), in every family: logits, K/V contents, and tokens for greedy, seeded
sampling, beam search with several returned sequences, and early EOS in a mixed batch, cached and uncached."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import FAMILIES, GRANULARITIES, build_tiny, padded_batch
from helpers import mix_decisions
from reference import SkipReference
from routertune import RoutedModel, RouterConfig

LENGTHS = [9, 4, 7]  # unequal prompts, left-padded as generation needs
NEW = 6
ATOL = 1e-4

MODES = {
    # mode -> (generate kwargs, rows per prompt as generate expands them before prefill)
    "greedy": (dict(do_sample=False), 1),
    "sample": (dict(do_sample=True, top_k=20, temperature=0.8, num_return_sequences=2), 2),
    "beams": (dict(do_sample=False, num_beams=3, num_return_sequences=2), 3),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(family: str, granularity: str = "attention", lengths=LENGTHS):
    base = build_tiny(family)
    plain = copy.deepcopy(base)
    routed = RoutedModel(base, RouterConfig(granularity=granularity))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # per-layer priors too (mix_decisions draws the weights and places the thresholds)
        for router in routed.routers.values():
            router.bias.copy_(torch.randn(router.bias.shape, generator=gen))
    ids, mask, _ = padded_batch(lengths, "left")
    mix_decisions(routed, ids, mask)  # every routed layer: some rows run, some skip
    return routed, SkipReference(routed, plain), ids, mask


def _assert_decisions_match(recorded: dict, reference: dict):
    assert set(recorded) == set(reference)
    for layer, runs in reference.items():
        assert recorded[layer].tolist() == runs.tolist(), f"layer {layer}"


def _assert_logits_close(got, expected):
    assert len(got) == len(expected)
    for step, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0, msg=lambda m: f"step {step}: {m}")


def _returned_cache(output):
    """The KV cache a forward returned: `cache` from transformers 5.20, `past_key_values` before."""
    return output.cache if "cache" in output else output.past_key_values


def test_prefill_logits_and_kv_contents_equal_reference(family, granularity):
    """A mixed-decision, unequal-length batch: logits at every real position, the decisions, and the cached
    K/V of every layer (executed rows only in routed layers, every row in dense ones) equal the reference."""
    routed, ref, ids, mask = _setup(family, granularity)
    cache = routed.new_cache()
    with torch.no_grad(), routed.recording() as calls:
        got = routed(input_ids=ids, attention_mask=mask, cache=cache)
    with torch.no_grad():
        expected = ref.forward(ids, mask, use_cache=True)
    real = mask.bool()
    torch.testing.assert_close(got.logits[real], expected.logits[real], atol=ATOL, rtol=0)
    _assert_decisions_match(calls[-1].decisions, ref.decisions)
    stores_kv = granularity in ("attention", "block")
    for idx, (mine, theirs) in enumerate(zip(cache.layers, _returned_cache(expected).layers)):
        runs = ref.decisions.get(idx) if stores_kv else None
        if runs is not None and not runs.any():
            assert not mine.is_initialized or mine.keys.numel() == 0, f"layer {idx} stored K/V nobody ran"
            continue
        rows = runs.nonzero().squeeze(-1) if runs is not None else torch.arange(ids.shape[0])
        # padded positions hold K/V of pad tokens on both sides; compare the real ones
        for name in ("keys", "values"):
            a, b = getattr(mine, name), getattr(theirs, name)[rows]
            assert a.shape == b.shape, f"layer {idx} {name}: {tuple(a.shape)} vs {tuple(b.shape)}"
            keep = mask[rows][:, None, -a.shape[2] :, None].bool().expand_as(a)
            torch.testing.assert_close(a[keep], b[keep], atol=ATOL, rtol=0, msg=lambda m: f"layer {idx} {name}: {m}")


# Every family with attention routing, cached and uncached. MLP and block routing change what the cache stores
# (MLP routing: every row's K/V; block routing: the running rows' only), which beam reshuffles must respect, so
# they run cached in every family; their uncached path differs from attention's only in the routed module, so
# one family keeps the suite's time down.
GENERATE_CASES = [
    (family, granularity, use_cache)
    for family in FAMILIES
    for granularity in GRANULARITIES
    for use_cache in (True, False)
    if granularity == "attention" or use_cache or family == "llama"
]


@pytest.mark.parametrize(
    "family,granularity,use_cache",
    GENERATE_CASES,
    ids=[f"{f}-{g}-{'cached' if c else 'uncached'}" for f, g, c in GENERATE_CASES],
)
@pytest.mark.parametrize("mode", list(MODES))
def test_generate_equals_reference(family, granularity, mode, use_cache):
    routed, ref, ids, mask = _setup(family, granularity)
    kwargs, expand = MODES[mode]
    common = dict(max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True, **kwargs)
    cache = routed.new_cache() if use_cache else None
    torch.manual_seed(1234)
    with torch.no_grad(), routed.recording() as calls:
        got = routed.generate(
            input_ids=ids,
            attention_mask=mask,
            use_cache=use_cache,
            **({"cache": cache} if cache is not None else {}),
            **common,
        )
    torch.manual_seed(1234)
    with torch.no_grad():
        expected = ref.generate(ids, mask, expand=expand, **common)
    assert got.sequences.tolist() == expected.sequences.tolist()
    _assert_logits_close(got.logits, expected.logits)
    _assert_decisions_match(calls[0].decisions, ref.decisions)
    if use_cache:
        # every step reused the prefill decisions, and after beam reshuffles each row still holds its prompt's
        assert [c.past_length > 0 for c in calls] == [False] + [True] * (len(calls) - 1)
        _assert_decisions_match(cache.decisions, ref.decisions)
    else:
        assert all(c.cache is None for c in calls)
        for call in calls:
            _assert_decisions_match(call.decisions, ref.decisions)


def test_generate_without_attention_mask_equals_reference(family):
    """generate infers the mask from the pad tokens; both the cached and the uncached path must route on it."""
    routed, ref, ids, mask = _setup(family)
    with torch.no_grad():
        expected = ref.generate(ids, mask, max_new_tokens=NEW, do_sample=False)
        for use_cache in (True, False):
            got = routed.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, use_cache=use_cache)
            assert got.tolist() == expected.tolist(), f"use_cache={use_cache}"


def _early_eos(sequences: torch.Tensor, width: int) -> tuple[int, int]:
    """(token, row) such that the row emits the token after its first new token and no other row ever does."""
    new = sequences[:, width:]
    for step in range(1, new.shape[1] - 1):
        for row in range(new.shape[0]):
            token = int(new[row, step])
            others = torch.cat([new[:row], new[row + 1 :]])
            if token not in new[row, :step].tolist() and not (others == token).any():
                return token, row
    raise AssertionError("no token ends exactly one row early; change the seed")


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_early_eos_in_a_mixed_batch_equals_reference(family, use_cache):
    routed, ref, ids, mask = _setup(family)
    width = ids.shape[1]
    with torch.no_grad():
        free = routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        eos, row = _early_eos(free, width)
        common = dict(
            max_new_tokens=NEW, do_sample=False, eos_token_id=eos, output_logits=True, return_dict_in_generate=True
        )
        got = routed.generate(input_ids=ids, attention_mask=mask, use_cache=use_cache, **common)
        expected = ref.generate(ids, mask, **common)
    assert got.sequences.tolist() == expected.sequences.tolist()
    _assert_logits_close(got.logits, expected.logits)
    new = got.sequences[:, width:]
    stop = new[row].tolist().index(eos)
    assert stop < NEW - 1 and (new[row, stop + 1 :] == 0).all(), "the row stops early and is padded"
    assert all(eos not in new[r].tolist() for r in range(len(new)) if r != row), "the others run on"


def test_forced_skip_with_decode_equals_reference(family, granularity):
    """Forced decisions (the baselines' path) over unequal lengths, prefill and decode."""
    base = build_tiny(family)
    plain = copy.deepcopy(base)
    routed = RoutedModel(base, RouterConfig(granularity=granularity, layers=[1, 3, 4]))
    ref = SkipReference(routed, plain)
    ids, mask, _ = padded_batch([8, 3, 6], "left")
    common = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with routed.forced("skip_set", skip_layers=[1, 4]):
            got = routed.generate(input_ids=ids, attention_mask=mask, **common)
        expected = ref.generate(ids, mask, skip={1, 4}, **common)
        dense = ref.generate(ids, mask, skip=set(), **common)
    assert got.sequences.tolist() == expected.sequences.tolist()
    _assert_logits_close(got.logits, expected.logits)
    assert any((g - d).abs().max() > 1e-3 for g, d in zip(got.logits, dense.logits)), "skipping must matter"

"""Decode-only routing (RoutedModel.decode_only): the prompt is prefilled with every routed layer running but the
never-run ones, the routers decide from that prefill, and only generated tokens skip. Checked against the
independent reference of tests/reference.py (the plain model with hooks, a plain DynamicCache)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_tiny, padded_batch
from helpers import mix_decisions
from reference import SkipReference
from routertune import RoutedModel, RouterConfig


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _routed(family="llama", layers=None):
    base = build_tiny(family)
    plain = copy.deepcopy(base)
    routed = RoutedModel(base, RouterConfig(layers=layers))
    ids, mask, _ = padded_batch([9, 4, 7], "left")
    mix_decisions(routed, ids, mask)
    return routed, SkipReference(routed, plain), ids, mask


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_decode_only_generation_equals_the_reference(family):
    """Tokens, logits and decisions, per prompt; the first routed layer is never run (prefill_skip), so the
    cache's lengths come from another layer (layer 0 is routed here, a prompt that skips it in decode keeps
    only its prompt there)."""
    routed, ref, ids, mask = _routed(family, layers=[0, 1, 2, 3])
    never = {1}
    seen = set()
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        one_ids, one_mask = ids[row : row + 1, real], mask[row : row + 1, real]
        cache = routed.new_cache()
        kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
        with torch.no_grad(), routed.decode_only(never):
            got = routed.generate(input_ids=one_ids, attention_mask=one_mask, cache=cache, **kwargs)
        with torch.no_grad():
            expected = ref.generate(one_ids, one_mask, decode_only=never, **kwargs)
        assert got.sequences.tolist() == expected.sequences.tolist()
        for a, b in zip(got.scores, expected.scores):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        decisions = {layer: bool(runs[0]) for layer, runs in cache.decisions.items()}
        assert decisions == {layer: bool(runs[0]) for layer, runs in ref.decisions.items()}
        assert decisions[1] is False
        seen.update(decisions.items())
    # the prompts' decisions differ somewhere, and some generated token skipped a layer its prompt ran
    assert any((layer, True) in seen and (layer, False) in seen for layer in (0, 2, 3))


def test_decode_only_differs_from_routing_the_prefill():
    """The mode is not a no-op: with the same routers, routing the prefill too gives other logits."""
    routed, _, ids, mask = _routed(layers=[0, 1, 2, 3])
    one_ids, one_mask = ids[:1], mask[:1]
    kwargs = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), routed.forced("skip"):
        whole = routed.generate(input_ids=one_ids, attention_mask=one_mask, **kwargs)
    with torch.no_grad(), routed.forced("skip"), routed.decode_only():
        decode = routed.generate(input_ids=one_ids, attention_mask=one_mask, **kwargs)
    with torch.no_grad(), routed.forced("run"):
        dense = routed.generate(input_ids=one_ids, attention_mask=one_mask, **kwargs)
    # the first token comes from the prefill: dense under decode-only, skipped when the prefill is routed
    torch.testing.assert_close(decode.scores[0], dense.scores[0])
    assert not torch.allclose(whole.scores[0], dense.scores[0], atol=1e-3)


def test_decode_only_refuses_what_it_cannot_do():
    routed, _, ids, mask = _routed()
    with torch.no_grad(), routed.decode_only(), pytest.raises(ValueError, match="one prompt at a time"):
        routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with torch.no_grad(), routed.decode_only(), pytest.raises(ValueError, match="needs a KV cache"):
        routed(input_ids=ids[:1], attention_mask=mask[:1], use_cache=False)
    with torch.no_grad(), routed.decode_only({0}), pytest.raises(ValueError, match="must be routed layers"):
        routed.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=2)


def test_teacher_forced_continuation_equals_the_reference():
    """A prompt call, then a continuation in two calls through the same cache (how the decode-only quality
    measurement scores held-out text): the second call's positions come from the cache's length, which a layer
    skipped in decode (here layer 0, holding the prompt alone) must not shorten."""
    from transformers import DynamicCache

    routed, ref, ids, mask = _routed(layers=[0, 1, 2, 3])
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        prompt, prompt_mask = ids[row : row + 1, real], mask[row : row + 1, real]
        continuation = torch.randint(3, 60, (1, 5), generator=torch.Generator().manual_seed(row))
        cache = routed.new_cache()
        with torch.no_grad(), routed.decode_only({1}):
            routed(input_ids=prompt, attention_mask=prompt_mask, cache=cache)
            got = [routed(input_ids=part, cache=cache).logits for part in continuation.split([3, 2], dim=1)]
        with torch.no_grad(), ref.request(prompt_mask, decode_only={1}):
            plain_cache = DynamicCache(config=ref.plain.config)
            ref.plain(input_ids=prompt, attention_mask=prompt_mask, past_key_values=plain_cache, use_cache=True)
            expected = ref.plain(input_ids=continuation, past_key_values=plain_cache, use_cache=True).logits
        torch.testing.assert_close(torch.cat(got, dim=1), expected, rtol=1e-4, atol=1e-4)

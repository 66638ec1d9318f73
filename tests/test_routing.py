"""Routing invariants on tiny models of every family and granularity."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_tiny, padded_batch
from helpers import mix_decisions, zero_sublayer_hooks
from routertune import RoutedModel, RouterConfig


def test_forced_run_equals_base(family, granularity):
    base = build_tiny(family)
    ids, mask, pos = padded_batch([9, 6, 4], "right")
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
        routed = RoutedModel(base, RouterConfig(granularity=granularity))
        with routed.forced("run"):
            got = routed(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_forced_skip_equals_zeroed_sublayer(family, granularity):
    """Prefill over unequal lengths; mixed decisions and decode steps: tests/test_reference.py."""
    base = build_tiny(family)
    reference = copy.deepcopy(base)
    ids, mask, _ = padded_batch([8, 5], "right")
    routed = RoutedModel(base, RouterConfig(granularity=granularity, layers=[1, 3, 4]))
    skipped = [1, 4]
    handles = zero_sublayer_hooks(reference, granularity, skipped)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        with routed.forced("skip_set", skip_layers=skipped):
            got = routed(input_ids=ids, attention_mask=mask).logits
        dense = routed.unwrap()(input_ids=ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    assert (got[real] - dense[real]).abs().max() > 1e-3, "skipping should change the output"


@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_batch_equals_each_sequence_alone(family, granularity, side):
    base = build_tiny(family)
    routed = RoutedModel(base, RouterConfig(granularity=granularity))
    lengths = [10, 5, 8]
    ids, mask, pos = padded_batch(lengths, side)
    decisions = mix_decisions(routed, ids, mask)
    with torch.no_grad(), routed.recording() as calls:
        batched = routed(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        for row, _n in enumerate(lengths):
            real = mask[row].bool()
            alone = routed(input_ids=ids[row, real][None], use_cache=False).logits[0]
            torch.testing.assert_close(batched[row, real], alone, atol=1e-5, rtol=0)
            for layer, runs in decisions.items():
                assert bool(calls[-1].decisions[layer][0]) == bool(runs[row])


def test_mixed_batch_greedy_generation_equals_alone(family):
    """Left padding, as generation needs (right-padded generation is refused)."""
    base = build_tiny(family)
    routed = RoutedModel(base, RouterConfig())
    lengths = [9, 4, 7]
    ids, mask, _ = padded_batch(lengths, "left")
    mix_decisions(routed, ids, mask)
    with torch.no_grad():
        batched = routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for row in range(len(lengths)):
            real = mask[row].bool()
            alone = routed.generate(input_ids=ids[row, real][None], max_new_tokens=6, do_sample=False)
            assert batched[row, ids.shape[1] :].tolist() == alone[0, real.sum() :].tolist()


def test_cached_greedy_equals_uncached(family, granularity):
    base = build_tiny(family)
    routed = RoutedModel(base, RouterConfig(granularity=granularity))
    ids, mask, _ = padded_batch([9, 4, 7], "left")
    mix_decisions(routed, ids, mask)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        cached = routed.generate(**kwargs, use_cache=True)
        uncached = routed.generate(**kwargs, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_beam_search_equals_each_prompt_alone_and_decisions_follow_the_beams(family):
    """Seeded sampling and logits against an independent reference: tests/test_reference.py."""
    base = build_tiny(family)
    routed = RoutedModel(base, RouterConfig())
    ids, mask, _ = padded_batch([9, 4, 7], "left")
    decisions = mix_decisions(routed, ids, mask)
    with torch.no_grad():
        cache = routed.new_cache()
        beams = routed.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            num_beams=3,
            num_return_sequences=2,
            do_sample=False,
            cache=cache,
        )
    assert beams.shape == (6, ids.shape[1] + 6)
    # after every beam reshuffle, each of a prompt's 3 beams still carries that prompt's decisions
    for layer, runs in decisions.items():
        assert cache.decisions[layer].tolist() == runs.repeat_interleave(3).tolist(), f"layer {layer}"
    # beam search equals the same beam search run on each prompt alone
    with torch.no_grad():
        for row in range(3):
            real = mask[row].bool()
            alone = routed.generate(
                input_ids=ids[row, real][None], max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False
            )
            assert beams[2 * row : 2 * row + 2, ids.shape[1] :].tolist() == alone[:, real.sum() :].tolist()


def test_kv_cache_holds_only_executed_rows(family, granularity):
    base = build_tiny(family)
    routed = RoutedModel(base, RouterConfig(granularity=granularity))
    ids, mask, _ = padded_batch([9, 4, 7], "left")
    decisions = mix_decisions(routed, ids, mask)
    batch = ids.shape[0]

    def per_layer_elements(cache):
        return [layer.keys.numel() + layer.values.numel() if layer.is_initialized else 0 for layer in cache.layers]

    with torch.no_grad():
        dense_cache, routed_cache = routed.new_cache(), routed.new_cache()
        with routed.forced("run"):
            routed(input_ids=ids, attention_mask=mask, cache=dense_cache)
        routed(input_ids=ids, attention_mask=mask, cache=routed_cache)
    dense, got = per_layer_elements(dense_cache), per_layer_elements(routed_cache)
    stores_kv = granularity in ("attention", "block")
    for layer, (d, g) in enumerate(zip(dense, got)):
        runs = decisions.get(layer) if stores_kv else None
        executed = batch if runs is None else int(runs.sum())
        assert g * batch == d * executed, f"layer {layer}: {g} elements, dense {d}, {executed}/{batch} run"
    expected_total = (
        sum(d * (int(decisions[i].sum()) if stores_kv and i in decisions else batch) for i, d in enumerate(dense))
        // batch
    )
    assert routed_cache.kv_elements() == expected_total
    if stores_kv:
        assert routed_cache.kv_elements() < dense_cache.kv_elements()


def test_layer_skipped_by_every_sequence_stores_nothing_and_is_not_called(family):
    base = build_tiny(family)
    routed = RoutedModel(base, RouterConfig(layers=[2, 3]))
    calls = []
    attention = base.model.layers[3].self_attn.base_layer
    handle = attention.register_forward_hook(lambda *a: calls.append(1))
    ids, mask, _ = padded_batch([6, 5], "left")
    cache = routed.new_cache()
    with torch.no_grad(), routed.forced("skip_set", skip_layers=[3]):
        routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache=cache)
    handle.remove()
    assert calls == []
    assert not cache.layers[3].is_initialized
    assert cache.layers[2].keys.shape[0] == 2


def test_interleaved_requests_do_not_interfere(family):
    base = build_tiny(family)
    routed = RoutedModel(base, RouterConfig())
    ids, mask, _ = padded_batch([8, 8, 8], "right", seed=3)
    mix_decisions(routed, ids, mask)
    a, b = ids[:1], ids[1:2]

    def greedy_steps(cache, prompt, steps):
        out, tokens = routed(input_ids=prompt, cache=cache), []
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            out = routed(input_ids=nxt, cache=cache)
        return tokens

    with torch.no_grad():
        alone_a = greedy_steps(routed.new_cache(), a, 4)
        alone_b = greedy_steps(routed.new_cache(), b, 4)
        cache_a, cache_b = routed.new_cache(), routed.new_cache()
        out_a, out_b = routed(input_ids=a, cache=cache_a), routed(input_ids=b, cache=cache_b)
        got_a, got_b = [], []
        for _ in range(4):
            na, nb = out_a.logits[:, -1].argmax(-1, keepdim=True), out_b.logits[:, -1].argmax(-1, keepdim=True)
            got_a.append(int(na))
            got_b.append(int(nb))
            out_a = routed(input_ids=na, cache=cache_a)
            out_b = routed(input_ids=nb, cache=cache_b)
    assert (got_a, got_b) == (alone_a, alone_b)
    assert any(bool(cache_a.decisions[l]) != bool(cache_b.decisions[l]) for l in cache_a.decisions)


def test_decisions_ignore_padding_and_batch_mates(family):
    base = build_tiny(family)
    routed = RoutedModel(base, RouterConfig())
    ids, mask, _ = padded_batch([9, 3], "right")
    mix_decisions(routed, ids, mask)
    with torch.no_grad(), routed.recording() as calls:
        routed(input_ids=ids, attention_mask=mask, use_cache=False)
        # the same short sequence with much more padding, next to another partner
        ids2, mask2, _ = padded_batch([3, 12], "right", total=15)
        ids2[0, :3] = ids[1, :3]
        routed(input_ids=ids2.flip(0), attention_mask=mask2.flip(0), use_cache=False)
    for layer in routed.routed_layers:
        torch.testing.assert_close(calls[0].scores[layer][1], calls[1].scores[layer][1], atol=1e-6, rtol=0)

"""Token-level routing on the tiny models of every family, against the independent reference in
token_reference.py (the plain model with per-layer 4D masks and zeroed outputs)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_tiny, padded_batch
from routertune import RoutedModel, RouterConfig
from routertune.routing.token_cache import TokenLayer, TokenRoutedCache
from token_reference import reference_greedy, reference_logits

ATOL = 2e-5


def _routed(family, granularity, seed=0, **config):
    """A token-routed tiny model with random router weights (about half the tokens run each layer), and a
    second, untouched copy of the same base model for the reference."""
    routed = RoutedModel(build_tiny(family), RouterConfig(granularity=granularity, unit="token", **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in routed.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 2)
            router.bias.copy_(torch.randn(router.bias.shape, generator=gen) * 0.5)
    plain = build_tiny(family)
    routers = {layer: (r.weight.detach().clone(), r.bias.detach().clone()) for layer, r in routed.routers.items()}
    thresholds = {layer: routed.router_config.threshold_for(layer) for layer in routers}
    return routed, plain, routers, thresholds


def _mixed(decisions: dict[int, torch.Tensor], real: torch.Tensor) -> None:
    """The test is only meaningful if tokens of one row both run and skip at every routed layer."""
    for layer, runs in decisions.items():
        ran = int(runs[real].sum())
        assert 0 < ran < int(real.sum()), f"layer {layer}: decisions are not mixed ({ran} of {int(real.sum())})"


def test_forced_run_equals_dense(family, granularity):
    routed = RoutedModel(build_tiny(family), RouterConfig(granularity=granularity, unit="token"))
    plain = build_tiny(family)
    ids, mask, _ = padded_batch([11, 6, 9], "left")
    with torch.no_grad():
        dense = plain(input_ids=ids, attention_mask=mask).logits
        with routed.forced("run"):
            out = routed(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], dense[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_routed_prefill_equals_reference(family, granularity, side):
    routed, plain, routers, thresholds = _routed(family, granularity)
    ids, mask, _ = padded_batch([12, 7, 10], side)
    expected, ref_decisions = reference_logits(plain, granularity, routers, thresholds, ids, mask)
    real = mask.bool()
    _mixed(ref_decisions, real)
    with torch.no_grad(), routed.recording() as calls:
        out = routed(input_ids=ids, attention_mask=mask, use_cache=True).logits
    for layer, runs in ref_decisions.items():
        assert torch.equal(calls[-1].token_runs[layer], runs), f"layer {layer} decided differently"
    torch.testing.assert_close(out[real], expected[real], atol=ATOL, rtol=0)


def test_routed_decode_equals_reference(family, granularity, seed=3):
    """Cached greedy generation (each new token decides per layer, stores K/V only where it runs) equals the
    reference re-run on the whole sequence, token for token and logit for logit."""
    # seed 2: decode steps mix running and skipping tokens at every layer in every family (checked below)
    routed, plain, routers, thresholds = _routed(family, granularity, seed=2)
    ids, mask, _ = padded_batch([9, 5, 7], "left")
    new = 6
    out = routed.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        min_new_tokens=new,
    )
    ref_ids, ref_mask = reference_greedy(plain, granularity, routers, thresholds, ids, mask, new)
    assert torch.equal(out.sequences, ref_ids)
    # every step's logits against the reference on the full sequence
    positions = (ref_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        from token_reference import token_reference

        with token_reference(plain, granularity, routers, thresholds, ref_mask) as decisions:
            full = plain(input_ids=ref_ids, attention_mask=ref_mask, position_ids=positions).logits
    real = ref_mask.bool()
    _mixed({k: v[:, ids.shape[1] :] for k, v in decisions.items()}, real[:, ids.shape[1] :])
    for step, scores in enumerate(out.logits):
        torch.testing.assert_close(scores, full[:, ids.shape[1] - 1 + step], atol=1e-4, rtol=0)


def test_batch_equals_each_sequence_alone(family, granularity):
    routed, _, _, _ = _routed(family, granularity)
    lengths = [12, 6, 9]
    ids, mask, _ = padded_batch(lengths, "left")
    batch = routed.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        min_new_tokens=5,
        output_logits=True,
        return_dict_in_generate=True,
    )
    for row, n in enumerate(lengths):
        alone_ids = ids[row : row + 1, -n:]
        alone = routed.generate(
            input_ids=alone_ids,
            attention_mask=torch.ones_like(alone_ids),
            max_new_tokens=5,
            do_sample=False,
            min_new_tokens=5,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert torch.equal(batch.sequences[row, -(n + 5) :], alone.sequences[0])
        for a, b in zip(batch.logits, alone.logits):
            torch.testing.assert_close(a[row], b[0], atol=1e-4, rtol=0)


def test_cached_equals_uncached(family, granularity):
    routed, _, _, _ = _routed(family, granularity)
    ids, mask, _ = padded_batch([10, 6, 8], "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    cached = routed.generate(**kwargs)
    uncached = routed.generate(**kwargs, use_cache=False)
    assert torch.equal(cached, uncached)


def test_kv_elements_equal_executed_pairs(family, granularity):
    """After prefill + decode, every token-routed layer stores exactly the (token, layer) pairs that executed
    it, counted independently by the reference on the final sequence; dense layers store every position."""
    routed, plain, routers, thresholds = _routed(family, granularity)
    ids, mask, _ = padded_batch([9, 5, 7], "left")
    cache = routed.new_cache()
    new = 5
    seq = routed.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, cache=cache
    )
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    # the last generated token is never fed back, so it wrote no K/V anywhere
    fed, fed_mask, fed_pos = seq[:, :-1], full_mask[:, :-1], positions[:, :-1]
    from token_reference import token_reference

    with torch.no_grad(), token_reference(plain, granularity, routers, thresholds, fed_mask) as decisions:
        plain(input_ids=fed, attention_mask=fed_mask, position_ids=fed_pos)
    cfg = plain.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_key_value_heads * head_dim
    expected_total = 0
    for idx, layer in enumerate(cache.layers):
        if granularity != "mlp" and idx in decisions:
            assert isinstance(layer, TokenLayer)
            executed = int(decisions[idx].sum())
            assert 0 < executed < int(fed_mask.sum())
            assert layer.keys.numel() + layer.values.numel() == executed * per_token, f"layer {idx}"
            expected_total += executed * per_token
        else:
            assert not isinstance(layer, TokenLayer)
            expected_total += layer.keys.numel() + layer.values.numel()
    assert cache.kv_elements() == expected_total
    if granularity != "mlp":
        dense_total = sum(1 for _ in cache.layers) * fed.numel() * per_token
        assert cache.kv_elements() < dense_total or any(getattr(l, "is_sliding", False) for l in cache.layers)


def test_layer_all_tokens_skip_stores_nothing_and_is_not_called(family):
    routed = RoutedModel(
        build_tiny(family), RouterConfig(unit="token", layers=[2, 3], layer_thresholds={3: 0.99}, token_sink=0)
    )
    with torch.no_grad():
        routed.routers[2].weight.normal_()
        routed.routers[3].weight.zero_()  # every score 0.5 < 0.99
    calls = []
    handle = routed.base_model.model.layers[3].self_attn.base_layer.register_forward_hook(lambda *a: calls.append(1))
    ids, mask, _ = padded_batch([8, 6], "left")
    cache = routed.new_cache()
    routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache=cache)
    handle.remove()
    assert calls == []
    assert cache.stored_tokens()[3] == 0 and cache.layers[3].keys is None


def test_beam_search_cached_equals_uncached_and_sampling_runs(family):
    routed, _, _, _ = _routed(family, "attention")
    ids, mask, _ = padded_batch([9, 6], "left")
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        min_new_tokens=5,
        num_beams=3,
        do_sample=False,
        num_return_sequences=2,
    )
    cached = routed.generate(**kwargs)
    uncached = routed.generate(**kwargs, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.manual_seed(0)
    sampled = routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=5)
    assert sampled.shape == (2, ids.shape[1] + 4)


# --- top-k mode ----------------------------------------------------------------------------------------------
def test_top_k_runs_a_fixed_fraction_of_each_prompt_and_decodes_consistently(family):
    routed, _, _, _ = _routed(family, "attention", token_top_k=0.4)
    lengths = [10, 5, 8]
    ids, mask, _ = padded_batch(lengths, "left")
    with torch.no_grad(), routed.recording() as calls:
        routed(input_ids=ids, attention_mask=mask, use_cache=False)
    first = mask.bool() & (mask.cumsum(1) == 1)
    for layer, runs in calls[-1].token_runs.items():
        # the sink token (the first real one) takes one of the k places; it does not add to them
        assert runs.sum(1).tolist() == [int(-(-0.4 * n // 1)) for n in lengths], f"layer {layer}"
        assert not runs[~mask.bool()].any() and runs[first].all()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    cached = routed.generate(**kwargs)
    assert torch.equal(cached, routed.generate(**kwargs, use_cache=False))
    for row, n in enumerate(lengths):
        alone = routed.generate(input_ids=ids[row : row + 1, -n:], max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert torch.equal(cached[row, -(n + 5) :], alone[0])


def _expected_cutoff(scores: list[float], k: int, sink: int) -> float:
    """The decode cut-off of one prompt, by the documented rule, from its tokens' router scores in order: the
    lowest score of a non-sink token that ran (the k places go to the sinks first, then to the highest
    non-sink scores); when the sinks fill every place, the k-th highest non-sink score (the lowest, if fewer
    are left); when the prompt is sinks only, the lowest of their own scores."""
    free = sorted(scores[sink:], reverse=True)
    if not free:
        return min(scores)
    places = k - min(sink, len(scores))
    return free[min(places if places > 0 else k, len(free)) - 1]


@pytest.mark.parametrize("top_k,sink", [(0.1, 1), (0.3, 2), (0.5, 1)])
def test_top_k_decode_cutoff_is_the_lowest_non_sink_score_that_ran(top_k, sink):
    """The cut-off a generated token must reach, checked against the scores of each prompt: finite also when
    the sinks fill all k places (a 5-token prompt at top_k 0.1 gave +inf, and no generated token ever ran a
    routed layer again), and each decode step runs exactly the tokens that reach it."""
    routed, _, _, _ = _routed("llama", "attention", token_top_k=top_k, token_sink=sink)
    lengths = [5, 12, 3, 1]
    ids, mask, _ = padded_batch(lengths, "left")
    width = ids.shape[1]
    scores: dict[int, list[torch.Tensor]] = {layer: [] for layer in routed.routers}
    hooks = [
        router.register_forward_hook(lambda m, a, out, layer=layer: scores[layer].append(out.detach()))
        for layer, router in routed.routers.items()
    ]
    cache = routed.new_cache()
    try:
        with torch.no_grad(), routed.recording() as calls:
            routed.generate(
                input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=4, min_new_tokens=4, do_sample=False
            )
    finally:
        for hook in hooks:
            hook.remove()
    for layer, cutoff in cache.cutoffs.items():
        prefill = scores[layer][0]  # (B, T) every token's score, sinks included
        for row, n in enumerate(lengths):
            k = max(1, math.ceil(n * top_k))
            expected = _expected_cutoff(prefill[row, width - n :].tolist(), k, sink)
            assert math.isfinite(float(cutoff[row])), f"layer {layer} row {row}: cut-off {float(cutoff[row])}"
            assert float(cutoff[row]) == pytest.approx(expected, abs=1e-6), f"layer {layer} row {row}"
        for step, call in enumerate(calls[1:], start=1):
            is_sink = torch.tensor([[n + step <= sink] for n in lengths])  # a short prompt's first new tokens
            expected_runs = (scores[layer][step] >= cache.cutoffs[layer][:, None]) | is_sink  # (B, 1)
            assert torch.equal(call.token_runs[layer], expected_runs), f"layer {layer} step {step}"


# --- training ------------------------------------------------------------------------------------------------
def test_training_forward_equals_inference_and_capacity_counts_token_pairs(family, granularity):
    routed, _, _, _ = _routed(family, granularity)
    ids, mask, _ = padded_batch([10, 6, 8], "right")
    with torch.no_grad():
        inference = routed(input_ids=ids, attention_mask=mask, use_cache=False).logits
    routed.train()
    with routed.recording() as calls:
        training = routed(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(training[real], inference[real], atol=ATOL, rtol=0)
    call = calls[-1]
    executed = sum(int(runs[real].sum()) for runs in call.token_runs.values())
    pairs = int(real.sum()) * len(call.token_runs)
    assert float(call.capacity()) == pytest.approx(executed / pairs)
    # a skipping token still sends a gradient to its router (STE), from the LM loss alone
    training[real].logsumexp(-1).sum().backward()
    for layer, router in routed.routers.items():
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0, f"layer {layer}"


def test_train_step_changes_only_routers(family):
    from routertune.train.loop import TrainConfig, micro_batch_loss

    routed, _, _, _ = _routed(family, "attention")
    ids, mask, _ = padded_batch([10, 7, 9], "right")
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    prompt = torch.zeros_like(mask)
    prompt[:, :4] = 1
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, prompt_mask=prompt)
    before = {k: v.clone() for k, v in routed.state_dict().items()}
    routed.train()
    optimizer = torch.optim.AdamW(routed.trainable_parameters(), lr=0.1)
    loss, _, gate_sum, gate_count = micro_batch_loss(
        routed, routed, batch, TrainConfig(target_capacity=0.2), int((labels[:, 1:] != -100).sum()), 3
    )
    assert gate_count == int(mask.sum()) * len(routed.routed_layers)  # one gate per (real token, layer)
    loss.backward()
    optimizer.step()
    after = routed.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".router.proj." in k}


# --- checkpoints, calibration, refusals ---------------------------------------------------------------------------
def test_save_load_keeps_unit_and_old_files_load_as_sequence(tmp_path, family):
    routed, _, _, _ = _routed(family, "block", token_top_k=0.5)
    ids, mask, _ = padded_batch([9, 6], "left")
    with torch.no_grad():
        before = routed(input_ids=ids, attention_mask=mask, use_cache=False).logits
    routed.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "router_config.json").read_text())
    assert saved["unit"] == "token" and saved["token_top_k"] == 0.5
    loaded = RoutedModel.from_pretrained(build_tiny(family), tmp_path)
    assert isinstance(loaded.new_cache(), TokenRoutedCache)
    with torch.no_grad():
        after = loaded(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(before, after)
    # a file written before token routing existed has no `unit`: it is a sequence router
    del saved["unit"], saved["token_top_k"]
    (tmp_path / "router_config.json").write_text(json.dumps(saved))
    old = RoutedModel.from_pretrained(build_tiny(family), tmp_path)
    assert old.router_config.unit == "sequence" and not isinstance(old.new_cache(), TokenRoutedCache)
    # token routers written before `token_sink` existed keep the behaviour they were fitted with: no sinks
    saved.update(unit="token", token_top_k=None)
    del saved["token_sink"]
    (tmp_path / "router_config.json").write_text(json.dumps(saved))
    assert RoutedModel.from_pretrained(build_tiny(family), tmp_path).router_config.token_sink == 0


@pytest.mark.parametrize("sink", [1, 2])
def test_sink_tokens_run_every_layer_in_prefill_only(family, sink):
    """Routers that would skip every token: the first `sink` real tokens of each row still run every routed
    layer (left padding counted out; a generated token only while the row has fewer than `sink` real tokens
    before it), and the logits equal the reference's (plain model, per-layer masks) with the same sinks."""
    routed, plain, routers, _ = _routed(family, "attention", token_sink=sink, threshold=0.99)
    with torch.no_grad():
        for router in routed.routers.values():
            router.weight.zero_()
            router.bias.zero_()  # every score 0.5 < 0.99
    routers = {layer: (r.weight.detach().clone(), r.bias.detach().clone()) for layer, r in routed.routers.items()}
    thresholds = {layer: 0.99 for layer in routers}
    lengths = [8, 5, 1]
    ids, mask, _ = padded_batch(lengths, "left")
    expected_runs = mask.bool() & (mask.cumsum(1) <= sink)
    with torch.no_grad(), routed.recording() as calls:
        routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    prefill, *decode = calls
    assert decode and prefill.past_length == 0
    for layer, runs in prefill.token_runs.items():
        assert torch.equal(runs, expected_runs), f"layer {layer}"
    for step, call in enumerate(decode):
        expected_step = torch.tensor([[n + step + 1 <= sink] for n in lengths])
        for layer, runs in call.token_runs.items():
            assert torch.equal(runs, expected_step), f"decode step {step}, layer {layer}"
    expected, ref_runs = reference_logits(plain, "attention", routers, thresholds, ids, mask, sink=sink)
    assert all(torch.equal(r, expected_runs) for r in ref_runs.values())
    with torch.no_grad():
        out = routed(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(out[mask.bool()], expected[mask.bool()], atol=ATOL, rtol=0)


@pytest.mark.parametrize("sink", [0, 2])
def test_importance_fit_never_samples_sink_tokens(sink):
    """Rows shorter than the tokens sampled per record: every real token but the sinks is one sample."""
    from routertune.train import importance

    routed, plain, _, _ = _routed("llama", "attention", token_sink=sink)
    lengths = [6, 4, 3]
    ids, mask, _ = padded_batch(lengths, "right")
    assert max(lengths) <= importance.TOKENS_PER_RECORD
    features, targets = importance.collect(routed, [dict(input_ids=ids, attention_mask=mask)])
    for layer in routed.routed_layers:
        assert features[layer].shape[0] == targets[layer].shape[0] == sum(lengths) - sink * len(lengths)
    # the samples are the tokens after the sinks: their normed inputs, read off the plain model
    normed = {}
    handles = [
        plain.model.layers[i].self_attn.register_forward_pre_hook(
            lambda m, a, k, i=i: normed.__setitem__(i, k["hidden_states"]), with_kwargs=True
        )
        for i in routed.routed_layers
    ]
    with torch.no_grad():
        plain(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    keep = mask.bool() & (mask.cumsum(1) > sink)
    layer = routed.routed_layers[0]
    expected = normed[layer][keep].double()
    got = features[layer]
    assert torch.allclose(got[got[:, 0].argsort()], expected[expected[:, 0].argsort()], atol=1e-5)


def test_sink_tokens_get_gate_one_and_no_router_gradient():
    routed, _, _, _ = _routed("llama", "attention", token_sink=1)
    ids, mask, _ = padded_batch([7, 4], "left")
    routed.train()
    with routed.recording() as calls:
        routed(input_ids=ids, attention_mask=mask, use_cache=False)
    first = mask.bool() & (mask.cumsum(1) == 1)
    for layer, gate in calls[-1].token_gates.items():
        assert torch.equal(gate[first], torch.ones(2)), f"layer {layer}"
        score_grad = torch.autograd.grad(gate[first].sum(), routed.routers[layer].weight, allow_unused=True)[0]
        assert score_grad is None or not score_grad.any()


def test_calibrate_sets_token_thresholds_to_the_target_fraction():
    from routertune.calibrate import calibrate, measure_capacity

    routed, _, _, _ = _routed("llama", "attention")
    ids, mask, _ = padded_batch([20, 14, 17, 9], "right", seed=3)
    batches = [dict(input_ids=ids, attention_mask=mask)]
    result = calibrate(routed, batches, 0.3, tolerance=0.02)
    capacity, _ = measure_capacity(routed, batches)
    with torch.no_grad(), routed.recording() as calls:
        routed(input_ids=ids, attention_mask=mask, use_cache=False)
    runs = calls[-1].token_runs
    executed = sum(int(r[mask.bool()].sum()) for r in runs.values()) / (int(mask.sum()) * len(runs))
    assert abs(executed - 0.3) <= 0.02 and capacity == pytest.approx(executed)
    assert result.capacity == pytest.approx(executed)


def test_bad_token_configs_are_refused():
    with pytest.raises(ValueError, match="unit='token'"):
        RouterConfig(token_top_k=0.5)
    with pytest.raises(ValueError, match="unit='tokens' is not one of sequence, token"):
        RouterConfig(unit="tokens")
    with pytest.raises(ValueError, match=r"token_top_k=1.5 must lie in \(0, 1\]"):
        RouterConfig(unit="token", token_top_k=1.5)


def test_unsupported_attention_implementation_is_refused():
    base = build_tiny("llama")
    base.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        RoutedModel(base, RouterConfig(unit="token"))


def test_cropping_the_token_cache_is_refused():
    cache = TokenRoutedCache(config=build_tiny("llama").config)
    cache.token_layer(2)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)


def test_eager_attention_matches_sdpa():
    routed, _, _, _ = _routed("qwen2", "attention")
    ids, mask, _ = padded_batch([10, 6], "left")
    with torch.no_grad():
        sdpa = routed.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        routed.config._attn_implementation = "eager"
        eager = routed.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(sdpa.sequences, eager.sequences)
    for a, b in zip(sdpa.logits, eager.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# --- evaluation and the command line ------------------------------------------------------------------------------
def test_harness_scores_with_shared_prefill_equal_one_forward(family):
    """The eval path (prefill the shared context once into the token cache, then score each continuation
    against it) gives the numbers of one uncached forward over context + continuation."""
    from routertune.eval.harness import RoutedLM, ScoredRow
    from tiny_lm import tiny_tokenizer

    routed, _, _, _ = _routed(family, "attention")
    lm = RoutedLM(routed.base_model, tiny_tokenizer(), batch_tokens=48, max_batch=4, progress=False)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n_ctx in (3, 9, 14):
        ctx = torch.randint(3, 96, (n_ctx,), generator=gen).tolist()
        for n_cont in (1, 4):
            rows.append(ScoredRow(ctx + torch.randint(3, 96, (n_cont,), generator=gen).tolist(), n_cont, n_ctx))
    for row, (logprob, _) in zip(rows, lm.score(rows)):
        ids = torch.tensor([row.tokens[:-1]])
        with torch.no_grad():
            logits = routed(input_ids=ids, use_cache=False).logits[0].float()
        n = len(row.tokens) - 1
        target = torch.tensor(row.tokens[-row.n_cont :])
        direct = float(torch.log_softmax(logits, -1)[n - row.n_cont : n].gather(-1, target[:, None]).sum())
        assert logprob == pytest.approx(direct, abs=1e-4)
    stats = lm.stats[""]
    assert 0 < stats.routed_capacity < 1  # token shares, counted over the prefills' real tokens


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from routertune.base_model import load_tokenizer

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("small-llama-token")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("objective", ["importance", "lm"])
def test_cli_train_generate_calibrate_with_token_units(small_model, tmp_path, capsys, objective):
    """`routertune train --unit token` end to end, with the default objective (a per-token importance fit) and
    the paper's; then generate and calibrate on the saved token routers."""
    from routertune.cli import main

    out = tmp_path / "token-routers"
    code = main(
        [
            "train",
            "--model",
            small_model,
            "--output",
            str(out),
            "--unit",
            "token",
            "--objective",
            objective,
            "--samples",
            "48",
            "--heldout-samples",
            "8",
            "--max-length",
            "64",
            "--batch-size",
            "8",
            "--learning-rate",
            "1e-2",
            "--target-capacity",
            "0.6",
            "--token-sink",
            "2",
        ]
    )
    assert code == 0, capsys.readouterr()
    saved = json.loads((out / "router_config.json").read_text())
    assert saved["unit"] == "token" and saved["token_sink"] == 2
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert abs(metrics["result"]["after"]["capacity"] - 0.6) < 0.1  # calibrated on (token, layer) pairs
    assert main(["generate", "--model", small_model, "--routers", str(out), "--max-new-tokens", "4", "Hi"]) == 0
    assert "[tokens that ran each layer]" in capsys.readouterr().out
    assert (
        main(
            [
                "calibrate",
                "--model",
                small_model,
                "--routers",
                str(out),
                "--capacity",
                "0.3",
                "--samples",
                "16",
                "--heldout-samples",
                "0",
            ]
        )
        == 0
    )
    routed = RoutedModel.from_pretrained(build_tiny_from(small_model), out)
    assert routed.router_config.unit == "token" and routed.router_config.threshold != saved["threshold"]


def build_tiny_from(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()


def test_cli_refuses_top_k_without_token_unit(capsys):
    from routertune.cli import main

    assert main(["train", "--output", "x", "--token-top-k", "0.5"]) == 2
    assert "needs unit='token'" in capsys.readouterr().err


def test_custom_4d_mask_is_refused():
    routed, _, _, _ = _routed("llama", "attention")
    ids, mask, _ = padded_batch([6, 4], "left")
    block = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="cannot combine it with a custom 4D attention mask"), torch.no_grad():
        routed(input_ids=ids, attention_mask=block, use_cache=False)


# --- benchmark rows ----------------------------------------------------------------------------------------------
def test_token_flops_count_what_ran_by_hand():
    from routertune.bench.flops import FlopCounter
    from routertune.bench.token_rows import token_flops

    fc = FlopCounter(
        hidden_size=8,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        intermediate_size=16,
        vocab_size=10,
        windows=(None, None),
    )
    runs = {1: torch.tensor([[True, False, True, True]])}  # layer 1 token-routed; layer 0 dense
    got = token_flops(fc, 0, 4, 1, runs, {1: torch.tensor([0])}, logit_positions=1)
    proj, per_key = fc.attention_projections(), 4 * 2 * 4
    dense_layer = 4 * proj + per_key * (1 + 2 + 3 + 4)
    token_layer = 3 * proj + per_key * (1 + 2 + 3)  # the 1st, 2nd, 3rd token to run see 1, 2, 3 keys
    assert got == 2 * 4 * fc.mlp() + fc.lm_head() + dense_layer + token_layer
    # decode: 2 tokens had run before; the new one is the 3rd
    got = token_flops(fc, 4, 5, 1, {1: torch.tensor([[True]])}, {1: torch.tensor([2])}, logit_positions=1)
    assert got == 2 * fc.mlp() + fc.lm_head() + proj + per_key * 5 + proj + per_key * 3


def test_bench_token_rows_on_a_tiny_model():
    from routertune.bench.config import BenchConfig
    from routertune.bench.runner import bench_model

    cfg = BenchConfig(
        quick=True,
        token_routing=True,
        memory=False,
        lengths=[24],
        batch_sizes=[1, 2],
        overhead_repeats=1,
        overhead_steps=1,
    )
    token = bench_model(build_tiny("llama"), cfg).token
    phases = [(r["phase"], r["batch"]) for r in token["rows"]]
    assert phases == [("prefill", 1), ("decode", 1), ("prefill", 2), ("decode", 2)]
    for row in token["rows"]:
        assert row["token_kv_equal"], row  # stored K/V = executed (token, layer) pairs exactly
        if row["phase"] == "prefill":
            # top-k at the sequence side's fraction: ceil(fraction x 24) tokens of every row, every layer
            assert row["token_executed_fraction"] == pytest.approx(math.ceil(token["fraction"] * 24) / 24)
        assert row["ideal_vs_dense"] > 1 and row["achieved_over_ideal"] > 0


def test_calibrating_top_k_routers_sets_their_fraction():
    from routertune.calibrate import calibrate

    routed, _, _, _ = _routed("qwen2", "attention", token_top_k=0.5)
    ids, mask, _ = padded_batch([20, 14, 17, 9], "right", seed=3)
    result = calibrate(routed, [dict(input_ids=ids, attention_mask=mask)], 0.25)
    assert routed.router_config.token_top_k == 0.25
    expected = sum(math.ceil(0.25 * n) for n in (20, 14, 17, 9)) / (20 + 14 + 17 + 9)
    assert result.capacity == pytest.approx(expected)
    with pytest.raises(ValueError, match="capacity=0 cannot be reached in top-k mode"):
        calibrate(routed, [dict(input_ids=ids, attention_mask=mask)], 0.0)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> str:
    from tiny_lm import tiny_llama, tiny_tokenizer

    folder = tmp_path_factory.mktemp("byte-llama-token")
    tiny_llama(layers=6).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def test_default_command_token_routers_on_the_tradeoff_curve(byte_model, tmp_path):
    """`routertune train --unit token` (default objective) then `routertune tradeoff`: token routers land on the
    curve beside static and random drop, their skip measured as the share of (token, layer) pairs skipped."""
    from routertune.cli import main

    routers, out = tmp_path / "routers", tmp_path / "tradeoff"
    assert (
        main(
            [
                "train",
                "--model",
                byte_model,
                "--output",
                str(routers),
                "--unit",
                "token",
                "--samples",
                "48",
                "--heldout-samples",
                "16",
                "--max-length",
                "64",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    metrics = json.loads((routers / "train_metrics.json").read_text())
    assert metrics["train"]["objective"] == "importance"
    assert metrics["result"]["fit"]["train_capacity"] == pytest.approx(metrics["train"]["target_capacity"], abs=0.02)
    assert (
        main(
            [
                "tradeoff",
                "--routers",
                str(routers),
                "--model",
                byte_model,
                "--output",
                str(out),
                "--texts",
                "6",
                "--max-tokens",
                "40",
                "--tasks",
                "arc_easy",
                "--limit",
                "8",
                "--fidelity-prompts",
                "2",
                "--fidelity-tokens",
                "4",
                "--max-drop",
                "3",
                "--random-seeds",
                "2",
                "--sweep-points",
                "5",
                "--skip-targets",
                "0.2",
                "--bootstrap",
                "100",
                "--calibration-samples",
                "8",
            ]
        )
        == 0
    )
    result = json.loads((out / "tradeoff.json").read_text())
    settings = result["domains"]["code"]["settings"]
    routed = [v for k, v in settings.items() if k.startswith("routers")]
    assert routed and all(0 <= v["skip"] <= 4 / 6 for v in routed)
    assert max(v["skip"] for v in routed) > 0  # token routers skipped some (token, layer) pairs

"""Benchmark machinery on tiny models: analytic FLOPs against a hand computation, the static-drop speed baseline,
and the JSON a quick bench produces (schema and exact KV accounting; never timed asserts)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_tiny, padded_batch
from helpers import zero_sublayer_hooks
from routertune import RoutedCache, RoutedModel, RouterConfig
from routertune.bench.config import BenchConfig
from routertune.bench.flops import FlopCounter, sum_min
from routertune.bench.results import SCHEMA, VARIANTS
from routertune.bench.runner import bench_model
from routertune.bench.variants import DroppedAttention, shared_copy, static_drop_model


# --- analytic FLOPs ------------------------------------------------------------------------------------------
def test_flop_counter_matches_hand_computation():
    """Tiny llama: hidden 32, 4 heads of 8, 2 KV heads, MLP 64, vocab 96, 6 layers."""
    flops = FlopCounter.from_config(build_tiny("llama").config)
    # per token and layer: q 2*32*32 + k 2*32*16 + v 2*32*16 + o 2*32*32
    assert flops.attention_projections() == 2048 + 1024 + 1024 + 2048 == 6144
    assert flops.mlp() == 2 * 3 * 32 * 64 == 12288
    assert flops.lm_head() == 2 * 32 * 96 == 6144
    # per (query, key): 2 FLOPs x 4 heads x 8 dims, for Q K^T and again for A V
    assert flops.attention_scores(0, 0, 1) == 128
    # prefill of 4 tokens, one sequence, logits of the last position: keys 1 + 2 + 3 + 4 = 10
    dense = 6 * (4 * (6144 + 12288) + 128 * 10) + 6144
    assert dense == 456192
    assert flops.forward(0, 4, [1] * 6, batch=1, logit_positions=1) == dense
    # skipping layer 2's attention removes its projections and scores, nothing else
    assert flops.forward(0, 4, [1, 1, 0, 1, 1, 1], batch=1, logit_positions=1) == dense - (4 * 6144 + 128 * 10)
    # decode 2 tokens after 4 (positions 4 and 5 see 5 and 6 keys), a logit per step, batch 3
    decode = 3 * (6 * (2 * (6144 + 12288) + 128 * (5 + 6)) + 2 * 6144)
    assert flops.forward(4, 6, [3] * 6, batch=3, logit_positions=2) == decode


def test_flops_respect_sliding_windows():
    flops = FlopCounter.from_config(build_tiny("mistral").config)  # window 6 on every layer
    assert flops.windows == (6,) * 6
    # positions 0..9 see 1, 2, 3, 4, 5, 6, 6, 6, 6, 6 keys (the window counts the token itself, as HF masks it)
    assert sum_min(1, 10, 6) == 45
    assert flops.attention_scores(0, 0, 10) == 4 * 4 * 8 * 45
    gemma = FlopCounter.from_config(build_tiny("gemma3_text").config)
    assert gemma.windows == (5, 5, None, 5, 5, None)
    for first, last, cap in [(1, 4, 6), (3, 9, 5), (7, 9, 5), (1, 1, None), (2, 1, 3)]:
        expected = sum(min(n, cap) if cap else n for n in range(first, last + 1))
        assert sum_min(first, last, cap) == expected


# --- the static-drop baseline ----------------------------------------------------------------------------
def test_static_drop_model_is_the_zeroed_sublayer_and_leaves_the_model_alone():
    base = build_tiny("llama")
    attention_before = [block.self_attn for block in base.model.layers]
    dropped = static_drop_model(base, [2, 4])
    assert [block.self_attn for block in base.model.layers] == attention_before  # original untouched
    assert isinstance(dropped.model.layers[2].self_attn, DroppedAttention)
    assert dropped.model.layers[1].self_attn.q_proj.weight is base.model.layers[1].self_attn.q_proj.weight
    ids, mask, _ = padded_batch([9, 6], "right")
    with torch.no_grad():
        got = dropped(input_ids=ids, attention_mask=mask, use_cache=False).logits
        handles = zero_sublayer_hooks(base, "attention", [2, 4])
        try:
            expected = base(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        routed = RoutedModel(shared_copy(base), RouterConfig(layers=[2, 3, 4]))
        with routed.forced("skip_set", skip_layers={2, 4}):
            forced = routed(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(forced[real], got[real], atol=1e-5, rtol=0)


def test_shared_copy_shares_every_weight():
    base = build_tiny("qwen3")
    copy_ = shared_copy(base)
    assert copy_ is not base and copy_.model.layers[0] is not base.model.layers[0]
    for (name, p), (_, q) in zip(base.named_parameters(), copy_.named_parameters()):
        assert p is q, name


def test_run_plan_is_counted_once_per_decision():
    """Decode steps reuse the prefill decision's count and rows; a new decision tensor is counted afresh."""
    cache = RoutedCache()
    runs = torch.tensor([True, False, True])
    cache.set_decision(3, runs)
    n_run, rows = cache.run_plan(3, runs)
    assert n_run == 2 and rows.tolist() == [0, 2]
    assert cache.run_plan(3, runs)[1] is rows  # reused, not recounted
    assert cache.run_plan(3, torch.tensor([True, True, True])) == (3, None)
    assert cache.run_plan(3, torch.tensor([False, False, False])) == (0, None)


def test_bench_config_errors_name_the_field():
    with pytest.raises(ValueError, match="skip_fraction=1.5"):
        BenchConfig(skip_fraction=1.5)
    with pytest.raises(ValueError, match="clock='gpu'"):
        BenchConfig(clock="gpu")
    with pytest.raises(ValueError, match="repeats=0"):
        BenchConfig(repeats=0)
    assert BenchConfig(quick=True, repeats=4).repeats == 4  # explicit values win over --quick


def test_bench_refuses_a_routed_model():
    routed = RoutedModel(build_tiny("llama"), RouterConfig())
    with pytest.raises(ValueError, match="plain base model"):
        bench_model(routed.base_model, BenchConfig(quick=True))


# --- a quick bench end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick():
    model = build_tiny("llama")
    result = bench_model(model, BenchConfig(quick=True, threads=1))
    return model, result, result.to_dict()


def test_quick_bench_schema_and_exact_kv_accounting(quick):
    model, result, data = quick
    json.dumps(data, allow_nan=False)  # plain JSON
    assert data["schema"] == SCHEMA
    assert data["routed_layers"] == [2, 3, 4]
    assert len(data["static_drop_layers"]) == 2 and set(data["static_drop_layers"]) <= {2, 3, 4}
    assert "synthetic routers" in data["routers"]
    assert {(p["length"], p["batch"]) for p in data["prefill"]} == {(16, 1), (32, 1), (16, 2), (32, 2)}
    assert [d["batch"] for d in data["decode"]] == [1, 2]
    assert [o["where"] for o in data["overhead"]] == ["prefill", "decode_step"]

    flops = FlopCounter.from_config(model.config)
    cfg = model.config
    kv_per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4  # K+V, fp32
    static = set(data["static_drop_layers"])
    for group, kind in [(p, "prefill") for p in data["prefill"]] + [(d, "decode") for d in data["decode"]]:
        batch = group["batch"]
        tokens = group["length"] if kind == "prefill" else group["prompt"] + group["new_tokens"]
        assert set(group["variants"]) == set(VARIANTS)
        dense = group["variants"]["dense"]
        assert dense["kv_bytes"] == 6 * batch * tokens * kv_per_token
        assert dense["speedup"] == 1.0 and dense["ideal_speedup"] == 1.0 and dense["executed_fraction"] == 1.0
        for name, v in group["variants"].items():
            assert v["kv_equal"] is True
            assert v["kv_bytes"] == v["kv_bytes_expected"]
            assert v["kv_bytes"] * 6 * batch == dense["kv_bytes"] * round(v["executed_fraction"] * 6 * batch)
            assert all(t > 0 for t in v["times_s"]) and v["median_s"] > 0
            assert math.isclose(v["achieved_over_ideal"], v["speedup"] / v["ideal_speedup"])
            assert math.isclose(v["ideal_speedup"], dense["flops"] / v["flops"])
            assert v["cpu_median_s"] is not None and v["wall_median_s"] > 0
            if name in ("static_drop", "routed_static_set"):
                assert v["executed_fraction"] == pytest.approx((6 - len(static)) / 6)
                assert v["ideal_speedup"] > 1.0
        # the FLOPs are the counter's for the executed layers
        executed = [0 if layer in static else batch for layer in range(6)]
        if kind == "prefill":
            expected = flops.forward(0, group["length"], executed, batch, 1)
        else:
            expected = flops.forward(group["prompt"], tokens, executed, batch, group["new_tokens"])
        assert group["variants"]["static_drop"]["flops"] == expected
        if kind == "decode":
            assert len(dense["times_s"]) == group["new_tokens"]
        peaks = [v["peak_memory_bytes"] for v in group["variants"].values()]
        assert all(p is None or p > 0 for p in peaks)

    checks = data["checks"]
    assert checks["kv_equal_all"] is True and checks["met"]["kv_equal"] is True
    assert set(checks["forced_vs_static"]) == {f"prefill L={p['length']} B={p['batch']}" for p in data["prefill"]} | {
        "decode B=1",
        "decode B=2",
    }
    assert checks["prefill_ideal_length"] == 32
    assert set(checks["prefill_ideal"]) == {"static_drop", "routed_static_set", "routed"}


def test_quick_bench_leaves_the_model_plain_and_threads_alone(quick):
    model, _, _ = quick
    from routertune.routing.inject import is_routed

    assert not is_routed(model)
    assert not any(isinstance(b.self_attn, DroppedAttention) for b in model.model.layers)


def test_trained_routers_take_their_own_decisions(tmp_path):
    base = build_tiny("llama")
    saved = RoutedModel(shared_copy(base), RouterConfig(layers=[1, 2, 3, 4]))
    with torch.no_grad():
        for router in saved.routers.values():
            router.weight.normal_(0, 1)
    saved.save_pretrained(tmp_path / "routers")
    result = bench_model(
        base,
        BenchConfig(
            quick=True, threads=1, lengths=[8], batch_sizes=[2], memory=False, routers=str(tmp_path / "routers")
        ),
    )
    assert result.routed_layers == [1, 2, 3, 4] and result.routers.startswith("trained routers from")
    assert set(result.static_drop_layers) <= {1, 2, 3, 4} and len(result.static_drop_layers) == 2
    routed = result.prefill[0].variants["routed"]
    assert set(routed.layer_run_fraction) == {1, 2, 3, 4} and routed.kv_equal


def test_token_cap_skips_and_lists_settings():
    result = bench_model(
        build_tiny("llama"),
        BenchConfig(quick=True, threads=1, lengths=[8, 64], batch_sizes=[1], max_prefill_tokens=32, memory=False),
    )
    assert [p.length for p in result.prefill] == [8]
    assert len(result.skipped) == 1 and "L=64 B=1" in result.skipped[0]
    assert all(v.peak_memory_bytes is None for p in result.prefill for v in p.variants.values())

"""Training, checkpoints, unwrapping and bad input on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny, padded_batch
from helpers import mix_decisions
from routertune import RoutedCache, RoutedModel, RouterConfig
from routertune.train.loop import TrainConfig, micro_batch_loss


def _batch(seed=1):
    ids, mask, _ = padded_batch([10, 7, 9], "right", seed=seed)
    labels = ids.masked_fill(mask == 0, -100)
    prompt = torch.zeros_like(mask)
    prompt[:, :4] = mask[:, :4]
    labels[:, :4] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels, prompt_mask=prompt)


def test_only_router_weights_change_and_trainable_count(family, granularity):
    base = build_tiny(family)
    routed = RoutedModel(base, RouterConfig(granularity=granularity))
    n_layers = len(routed.routed_layers)
    assert n_layers == base.config.num_hidden_layers // 2
    trainable = sum(p.numel() for p in routed.parameters() if p.requires_grad)
    assert trainable == n_layers * (base.config.hidden_size + 1)  # weight + bias per router
    before = {k: v.clone() for k, v in routed.state_dict().items()}
    optimizer = torch.optim.AdamW(routed.trainable_parameters(), lr=0.1)
    routed.train()
    for step in range(3):
        batch = _batch(step)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        loss, _, _, _ = micro_batch_loss(routed, routed, batch, TrainConfig(target_capacity=0.3), tokens, 3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = routed.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= {k for k in before if k.endswith((".router.proj.weight", ".router.proj.bias"))}
    assert {k for k in changed if k.endswith(".weight")} == {k for k in before if k.endswith(".router.proj.weight")}


def test_skipping_rows_still_get_gradient(family):
    """docs/method.md#the-straight-through-gate: with every row skipping a layer, its router is still pushed back towards running."""
    base = build_tiny(family)
    routed = RoutedModel(base, RouterConfig(layers=[2, 3], layer_thresholds={3: 0.9}))
    routed.train()
    with routed.recording() as calls:
        out = routed(**{k: v for k, v in _batch().items() if k != "prompt_mask"}, use_cache=False)
    assert not calls[-1].decisions[3].any() and calls[-1].decisions[2].all()
    out.loss.backward()
    assert routed.routers[3].weight.grad.abs().sum() > 0


def test_training_forward_reproduces_inference_forward(family, granularity):
    """Gated training computes every row but must give the same logits as gather/scatter inference."""
    base = build_tiny(family)
    routed = RoutedModel(base, RouterConfig(granularity=granularity))
    ids, mask, _ = padded_batch([9, 5, 7], "right")
    mix_decisions(routed, ids, mask)
    with torch.no_grad():
        inference = routed(input_ids=ids, attention_mask=mask, use_cache=False).logits
    routed.train()
    training = routed(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(training[real], inference[real], atol=1e-5, rtol=0)


def test_save_load_round_trip(tmp_path, family, granularity):
    base = build_tiny(family)
    routed = RoutedModel(base, RouterConfig(granularity=granularity))
    ids, mask, _ = padded_batch([9, 5, 7], "right")
    mix_decisions(routed, ids, mask)
    with torch.no_grad():
        expected = routed(input_ids=ids, attention_mask=mask).logits
    routed.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router_config.json", "routers.safetensors"]
    weights = load_file(tmp_path / "routers.safetensors")
    assert set(weights) == {
        f"layers.{i}.router.{p}" for i in routed.routed_layers for p in ("weight", "bias", "trust_region")
    }
    config = json.loads((tmp_path / "router_config.json").read_text())
    assert set(config["base_model"]) == {
        "model_type",
        "num_hidden_layers",
        "hidden_size",
        "fingerprint",
        "name_or_path",
    }
    loaded = RoutedModel.from_pretrained(build_tiny(family), tmp_path)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_load_onto_other_base_is_refused(tmp_path):
    RoutedModel(build_tiny("llama", seed=0)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fingerprint"):
        RoutedModel.from_pretrained(build_tiny("llama", seed=1), tmp_path)
    with pytest.raises(ValueError, match="model_type: routers were trained for 'llama'"):
        RoutedModel.from_pretrained(build_tiny("qwen2", seed=0), tmp_path)


@pytest.mark.parametrize("second_depth", [6, 4], ids=["same-depth", "shallower"])
def test_one_config_for_two_models_leaves_each_its_own_identity(tmp_path, second_depth):
    """One RouterConfig object wrapping two different models (other weights; the same or another depth): each
    keeps its own identity and layers, the caller's config is left as given, and routers saved from the
    second load on the second and are refused on the first."""
    from routertune.model import model_identity

    first, second = build_tiny("llama"), build_tiny("llama", seed=1)
    with torch.no_grad():
        second.model.layers = second.model.layers[:second_depth]
        second.config.num_hidden_layers = second_depth
        if getattr(second.config, "layer_types", None) is not None:
            second.config.layer_types = second.config.layer_types[:second_depth]
    identities = model_identity(first), model_identity(second)
    layers = {6: [2, 3, 4], 4: [1, 2]}  # half the depth, before the final layer
    config = RouterConfig()
    a = RoutedModel(first, config)
    b = RoutedModel(second, config)
    assert config.base_model is None and config.layers is None  # the caller's object is untouched
    assert (a.router_config.base_model, b.router_config.base_model) == identities
    assert a.routed_layers == layers[6] and b.routed_layers == layers[second_depth]
    b.save_pretrained(tmp_path)
    reloaded = RoutedModel.from_pretrained(copy.deepcopy(b).unwrap(), tmp_path)
    assert reloaded.routed_layers == layers[second_depth]
    with pytest.raises(ValueError, match="belong to another base model"):
        RoutedModel.from_pretrained(build_tiny("llama"), tmp_path)


def test_unwrap_restores_original_modules(family, granularity):
    base = build_tiny(family)
    original_modules = dict(base.named_modules())
    original_state = copy.deepcopy(base.state_dict())
    routed = RoutedModel(base, RouterConfig(granularity=granularity))
    unwrapped = routed.unwrap()
    assert unwrapped is base
    assert dict(base.named_modules()).keys() == original_modules.keys()
    assert all(base.get_submodule(name) is module for name, module in original_modules.items())
    assert base.state_dict().keys() == original_state.keys()
    assert "forward" not in base.model.__dict__
    RoutedModel(base, RouterConfig())  # can be routed again


def test_wrapping_twice_is_refused():
    routed = RoutedModel(build_tiny("llama"))
    with pytest.raises(ValueError, match="already has routers"):
        RoutedModel(routed.base_model)


# --- bad input --------------------------------------------------------------------------------------------
def test_unsupported_model_type_names_it_and_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"'gpt2' is not supported.*gemma3_text, llama, mistral, qwen2, qwen3"):
        RoutedModel(model)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5])
def test_threshold_outside_open_interval(value):
    with pytest.raises(ValueError, match="threshold"):
        RouterConfig(threshold=value)


@pytest.mark.parametrize("value", [-0.1, 1.01])
def test_target_capacity_out_of_range(value):
    with pytest.raises(ValueError, match="target_capacity"):
        TrainConfig(target_capacity=value)


def test_layer_out_of_range_says_the_valid_range():
    with pytest.raises(ValueError, match=r"\[6, 9\] are out of range.*0\.\.5"):
        RoutedModel(build_tiny("llama"), RouterConfig(layers=[2, 6, 9]))


def test_bad_granularity_and_gathered_problems():
    with pytest.raises(ValueError, match="granularity='token'.*threshold=2"):
        RouterConfig(granularity="token", threshold=2)


def test_decode_step_without_prefill_decision_is_an_error():
    routed = RoutedModel(build_tiny("llama"))
    ids, _, _ = padded_batch([5], "right")
    cache = RoutedCache(config=routed.config)
    with torch.no_grad():
        routed(input_ids=ids, cache=cache)
        cache.decisions.clear()  # as if the prompt had been run without routers
        with pytest.raises(ValueError, match="decode step without a prefill decision"):
            routed(input_ids=ids[:, :1], cache=cache)


def test_plain_dynamic_cache_is_refused_with_the_fix():
    from transformers import DynamicCache

    routed = RoutedModel(build_tiny("llama"))
    ids, _, _ = padded_batch([5], "right")
    with pytest.raises(ValueError, match="needs a RoutedCache"):
        routed(input_ids=ids, cache=DynamicCache(config=routed.config))


def test_forced_skip_set_outside_routed_layers_is_an_error():
    routed = RoutedModel(build_tiny("llama"), RouterConfig(layers=[2, 3]))
    ids, _, _ = padded_batch([5], "right")
    with pytest.raises(ValueError, match="not routed"):
        with routed.forced("skip_set", skip_layers=[0]):
            routed(input_ids=ids)


def test_static_drop_importance_equals_hand_computation():
    from routertune.routing.static_drop import attention_importance

    model = build_tiny("llama")
    ids, mask, _ = padded_batch([7, 4], "right")
    got = attention_importance(model, [{"input_ids": ids, "attention_mask": mask}]).scores
    # by hand: run the blocks one by one and compare the residual before and after attention
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        rope = model.model.rotary_emb(h, pos)
        from transformers.masking_utils import create_causal_mask

        # the cache argument is positional: `cache` from transformers 5.20, `past_key_values` before
        causal = create_causal_mask(model.config, h, mask, None, position_ids=pos)
        for idx, block in enumerate(model.model.layers):
            attn, _ = block.self_attn(block.input_layernorm(h), position_embeddings=rope, attention_mask=causal)
            cos = torch.nn.functional.cosine_similarity(h, h + attn, dim=-1)
            expected = float(((1 - cos) * mask).sum() / mask.sum())
            assert got[idx] == pytest.approx(expected, rel=1e-5)
            h = block(h, attention_mask=causal, position_embeddings=rope, position_ids=pos)

"""Decisions pooled over what varies in a chat prompt (RouterConfig.fixed_template, routing/template.py):
the rule on hand-made rows, the ends found from a real chat template, and a routed model checked against the
independent reference of tests/reference.py given the hand-made pooling mask."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_tiny
from reference import SkipReference
from routertune import RoutedModel, RouterConfig
from routertune.routing.template import content_mask, content_span, fixed_template_ids

HEAD, TAIL = [11, 12, 13], [14, 15]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_content_span_takes_out_each_end_only_where_it_is():
    fixed = [HEAD, TAIL]
    assert content_span(HEAD + [40, 41] + TAIL, fixed) == (3, 5)
    assert content_span([40, 41, 42], fixed) == (0, 3)  # plain text: pooled whole
    assert content_span(HEAD + [40, 41], fixed) == (3, 5)  # head only (a prompt cut before its end)
    assert content_span([12, 13, 40] + TAIL, fixed) == (0, 3)  # a head cut at its start is not the head
    assert content_span(HEAD + TAIL, fixed) == (3, 5)  # nothing varies: the tail stays, something is pooled
    assert content_span(HEAD, fixed) == (0, 3)
    assert content_span(HEAD + [40], None) == (0, 4)


def test_content_mask_reads_each_rows_real_tokens_left_or_right_padded():
    ids = torch.tensor([[0, 0, *HEAD, 40, *TAIL], [*HEAD, 40, 41, *TAIL[:1], 0, 0], [0, 0, 0, 0, 40, 41, 42, 43]])
    mask = (ids != 0).long()
    mask[2, :4] = 0
    got = content_mask(ids, mask, [HEAD, TAIL])
    assert got.tolist() == [
        [0, 0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0],  # the tail is cut short: only the head comes out
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]
    # a mask over the first columns only (the prompt of a longer sequence): the tail is the prompt's end
    prompt_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    ids = torch.tensor([[*HEAD, 40, *TAIL, 50, 51]])
    assert content_mask(ids, prompt_mask, [HEAD, TAIL]).tolist() == [[0, 0, 0, 1, 0, 0, 0, 0]]
    assert content_mask(ids, prompt_mask, None) is prompt_mask


def test_the_ends_of_a_real_chat_template():
    from routertune.base_model import load_tokenizer

    tokenizer = load_tokenizer()
    head, tail = fixed_template_ids(tokenizer)
    assert tokenizer.decode(head).endswith("<|im_end|>\n<|im_start|>user\n") and "system" in tokenizer.decode(head)
    assert tokenizer.decode(tail) == "<|im_end|>\n<|im_start|>assistant\n"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a river."}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start, end = content_span(ids, [head, tail])
    assert tokenizer.decode(ids[start:end]) == "Name a river."


def test_routed_generation_pools_without_the_template_as_the_reference_given_that_mask():
    base = build_tiny("llama")
    plain = copy.deepcopy(base)
    routed = RoutedModel(base, RouterConfig(layers=[1, 2, 3, 4], fixed_template=[HEAD, TAIL]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for router in routed.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.2)
            router.bias.zero_()
    # left-padded: a chat prompt with both ends, one with its head only, and plain text
    rows = [[*HEAD, 30, 31, 32, *TAIL], [*HEAD, 33, 34, 35, 36], [37, 38, 39, 40, 41]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (ids != 0).long()
    hand = mask.clone()  # the pooled tokens, marked by hand
    hand[0, :3], hand[0, -2:], hand[1, 1:4] = 0, 0, 0
    assert hand.tolist()[0] == [0, 0, 0, 1, 1, 1, 0, 0] and hand.tolist()[1] == [0, 0, 0, 0, 1, 1, 1, 1]

    ref = SkipReference(routed, plain)
    with torch.no_grad(), routed.recording() as calls:
        got = routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with torch.no_grad(), ref.request(hand):
        expected = ref.plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        ref_decisions = {k: v.clone() for k, v in ref.decisions.items()}
        ref_scores = {k: v.clone() for k, v in ref.scores.items()}
    assert got.tolist() == expected.tolist()
    for layer, runs in calls[0].decisions.items():
        assert runs.tolist() == ref_decisions[layer].tolist(), layer
        torch.testing.assert_close(calls[0].scores[layer], ref_scores[layer], atol=1e-5, rtol=0)
    # the template matters: pooled over whole prompts, the chat rows score otherwise, the plain row alike
    with torch.no_grad(), ref.request(mask):
        ref.plain(input_ids=ids, attention_mask=mask)
        whole = {k: v.clone() for k, v in ref.scores.items()}
    for layer in whole:
        assert (whole[layer][:2] - ref_scores[layer][:2]).abs().min() > 1e-3, layer
        torch.testing.assert_close(whole[layer][2], ref_scores[layer][2], atol=1e-6, rtol=0)


def test_a_fixed_template_is_checked():
    with pytest.raises(ValueError, match="head token ids, tail token ids"):
        RouterConfig(fixed_template=[[1, 2]])
    with pytest.raises(ValueError, match="unit='sequence'"):
        RouterConfig(unit="token", fixed_template=[[1], [2]])
    assert RouterConfig.from_dict(RouterConfig(fixed_template=[[1], []]).to_dict()).fixed_template == [[1], []]


def test_the_importance_fit_reads_the_features_the_routers_will_pool():
    """importance.collect's pooled features under a fixed template: the mean over the hand-marked varying
    tokens of each routed layer's attention input, read by a hook on the plain model's input norm."""
    from routertune.train import importance

    base = build_tiny("llama")
    plain = copy.deepcopy(base)
    routed = RoutedModel(base, RouterConfig(layers=[1, 3], fixed_template=[HEAD, TAIL]))
    ids = torch.tensor([[*HEAD, 30, 31, *TAIL, 50, 51], [40, 41, 42, 43, 44, 45, 46, 47, 48]])
    mask = torch.ones_like(ids)
    prompt = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0]])  # the prompts' tokens
    hand = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0]])
    features, _ = importance.collect(routed, [dict(input_ids=ids, attention_mask=mask, prompt_mask=prompt)])
    seen = {}
    hooks = [
        plain.model.layers[i].input_layernorm.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, out.detach().double())
        )
        for i in (1, 3)
    ]
    with torch.no_grad():
        plain(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    for i in (1, 3):
        expected = (seen[i] * hand.unsqueeze(-1)).sum(1) / hand.sum(1, keepdim=True)
        torch.testing.assert_close(features[i], expected, atol=1e-5, rtol=0)


def test_train_pool_content_stores_the_templates_ends(tmp_path, capsys):
    import json

    from routertune.base_model import load_tokenizer
    from routertune.cli import main
    from tiny_lm import tiny_llama, tiny_tokenizer

    folder = tmp_path / "byte-llama"
    tiny_llama(layers=6).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "routers"
    args = ["train", "--model", str(folder), "--output", str(out), "--samples", "16", "--heldout-samples", "4"]
    assert main([*args, "--max-length", "48", "--batch-size", "8", "--pool", "content"]) == 0
    stored = json.loads((out / "router_config.json").read_text())["fixed_template"]
    assert stored == fixed_template_ids(load_tokenizer(str(folder))) and stored[0] and stored[1]
    assert main([*args, "--overwrite", "--pool", "content", "--unit", "token"]) == 2
    assert "--pool content needs --unit sequence" in capsys.readouterr().err

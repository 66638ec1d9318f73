"""The generate wrapper off the default path, cache lengths and reshuffles, and refused flags: regression tests
for issue 10, each checked against the independent reference of tests/reference.py."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GenerationConfig

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


def _mixed(family="llama", lengths=(9, 4, 7), granularity="attention", layers=None):
    base = build_tiny(family)
    plain = copy.deepcopy(base)
    routed = RoutedModel(base, RouterConfig(granularity=granularity, layers=layers))
    ids, mask, _ = padded_batch(list(lengths), "left")
    mix_decisions(routed, ids, mask)
    return routed, SkipReference(routed, plain), ids, mask


# --- bug 1: use_cache=False with beams / several returned sequences ---------------------------------------
@pytest.mark.parametrize("granularity", ["attention", "mlp", "block"])
def test_uncached_beam_search_expands_the_routing_mask(granularity):
    """Also cached: beam reorders re-map each layer's stored K/V rows (only the running rows under attention
    and block routing, every row under MLP routing)."""
    routed, ref, ids, mask = _mixed(granularity=granularity)
    with torch.no_grad():
        got = routed.generate(input_ids=ids, attention_mask=mask, num_beams=3, use_cache=False, max_new_tokens=4)
        cached = routed.generate(input_ids=ids, attention_mask=mask, num_beams=3, max_new_tokens=4)
        expected = ref.generate(ids, mask, expand=3, num_beams=3, max_new_tokens=4)
    assert got.tolist() == expected.tolist() == cached.tolist()


def test_uncached_sampling_with_several_returned_sequences():
    routed, ref, ids, mask = _mixed()
    kwargs = dict(do_sample=True, num_return_sequences=3, max_new_tokens=4, top_k=20)
    with torch.no_grad():
        torch.manual_seed(5)
        got = routed.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
        torch.manual_seed(5)
        expected = ref.generate(ids, mask, expand=3, **kwargs)
    assert got.tolist() == expected.tolist()


# --- bug 2: chunked prefill would decide on the first chunk alone ------------------------------------------
def test_chunked_prefill_is_refused():
    routed, _, ids, mask = _mixed()
    with torch.no_grad():
        with pytest.raises(ValueError, match="prefill_chunk_size.*whole prompt"):
            routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, prefill_chunk_size=4)
        with pytest.raises(ValueError, match="prefill_chunk_size"):
            routed.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=2,
                generation_config=GenerationConfig(prefill_chunk_size=4, max_new_tokens=2),
            )
        routed.base_model.generation_config.prefill_chunk_size = 4
        with pytest.raises(ValueError, match="prefill_chunk_size"):
            routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
        # an explicit None turns the model's default off: whole-prompt prefill
        routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, prefill_chunk_size=None)


# --- bug 3: cache length when every layer of one kind, or a reshuffled layer, holds nothing ---------------
SLIDING = [0, 1, 3, 4]  # every sliding-window layer of the tiny Gemma 3 (layers 2 and 5 are full attention)


def test_every_sliding_layer_skipped_keeps_the_cache_length():
    base = build_tiny("gemma3_text")
    ref = SkipReference(RoutedModel(copy.deepcopy(base), RouterConfig(layers=SLIDING)), copy.deepcopy(base))
    routed = RoutedModel(base, RouterConfig(layers=SLIDING))
    ids, mask, _ = padded_batch([10], "left")
    cache = routed.new_cache()
    with torch.no_grad(), routed.forced("skip"):
        routed(input_ids=ids, cache=cache)
        assert [layer.is_initialized for layer in cache.layers] == [False, False, True, False, False, True]
        assert cache.get_seq_length() == 10 and cache.get_seq_length(0) == 10
        got = routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    expected = ref.generate(ids, mask, skip=set(SLIDING), max_new_tokens=6, do_sample=False)
    assert got.tolist() == expected.tolist()
    # the guard against decoding without prefill decisions still sees the 10 cached tokens
    cache.decisions.clear()
    with torch.no_grad(), pytest.raises(ValueError, match="decode step without a prefill decision"):
        routed(input_ids=ids[:, -1:], cache=cache)


def test_layer_emptied_by_row_selection_keeps_the_cache_length():
    """Row 0 runs every sliding layer, row 1 skips them all; keeping row 1 empties them (0 rows)."""
    base = build_tiny("gemma3_text")
    ref = SkipReference(RoutedModel(copy.deepcopy(base), RouterConfig(layers=SLIDING)), copy.deepcopy(base))
    routed = RoutedModel(base, RouterConfig(layers=SLIDING))
    ids, mask, _ = padded_batch([7, 10], "left")
    cache = routed.new_cache()
    for layer in SLIDING:
        cache.set_decision(layer, torch.tensor([True, False]))  # taken instead of the routers' at prefill
    steps = 5
    with torch.no_grad():
        logits = routed(input_ids=ids, attention_mask=mask, cache=cache).logits[1:, -1]
        cache.batch_select_indices(torch.tensor([1]))
        assert all(cache.layers[i].keys.shape[0] == 0 for i in SLIDING)
        assert [cache.get_seq_length(i) for i in range(6)] == [10] * 6
        tokens = []
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)  # (1, 1)
            tokens.append(int(nxt))
            logits = routed(input_ids=nxt, cache=cache).logits[:, -1]
    expected = ref.generate(ids[1:], mask[1:], skip=set(SLIDING), max_new_tokens=steps, do_sample=False)
    assert tokens == expected[0, 10:].tolist()


@pytest.mark.parametrize("granularity", ["attention", "mlp", "block"])
def test_batch_repeat_interleave_expands_decisions_and_rows(granularity):
    """Expanding a filled cache (several continuations of one prefill) keeps each copy on its prompt's depth."""
    routed, ref, ids, mask = _mixed(granularity=granularity)
    cache = routed.new_cache()
    with torch.no_grad():
        first = routed(input_ids=ids, attention_mask=mask, cache=cache).logits[:, -1]
        nxt = first.argmax(-1, keepdim=True)  # (B, 1)
        cache.batch_repeat_interleave(2)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        got = routed(
            input_ids=nxt.repeat_interleave(2, 0), attention_mask=mask2.repeat_interleave(2, 0), cache=cache
        ).logits[:, -1]
        full = torch.cat([ids, nxt], dim=1).repeat_interleave(2, 0)
        with ref.request(mask.repeat_interleave(2, 0)):
            expected = ref.plain(input_ids=full, attention_mask=mask2.repeat_interleave(2, 0)).logits[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    for layer, runs in ref.decisions.items():
        assert cache.decisions[layer].tolist() == runs.tolist()


# --- bug 4: use_cache=False without an attention mask --------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])  # families where pooling over padding flips a decision
def test_uncached_without_attention_mask_routes_on_the_inferred_mask(family):
    routed, ref, ids, mask = _mixed(family)
    with torch.no_grad(), routed.recording() as calls:
        got = routed.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=False)
    expected = ref.generate(ids, mask, max_new_tokens=6, do_sample=False)
    for layer, runs in ref.decisions.items():
        assert calls[0].decisions[layer].tolist() == runs.tolist()
    assert got.tolist() == expected.tolist()


# --- bug 5: generation_config.use_cache = False ------------------------------------------------------------------
def test_generation_config_use_cache_false_is_honoured():
    routed, ref, ids, mask = _mixed("qwen2")
    expected = ref.generate(ids, mask, max_new_tokens=6, do_sample=False)
    routed.base_model.generation_config.use_cache = False
    with torch.no_grad(), routed.recording() as calls:
        got = routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert got.tolist() == expected.tolist()
    assert len(calls) == 6 and all(c.cache is None for c in calls)
    routed.base_model.generation_config.use_cache = True
    with torch.no_grad(), routed.recording() as calls:
        got = routed.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            generation_config=GenerationConfig(use_cache=False, max_new_tokens=6, pad_token_id=0),
        )
    assert got.tolist() == expected.tolist()
    assert all(c.cache is None for c in calls)


# --- smaller problems ---------------------------------------------------------------------------------------------
def test_right_padded_generation_is_refused_with_the_fix():
    routed = RoutedModel(build_tiny("llama"))
    ids, mask, _ = padded_batch([6, 4], "right")
    with torch.no_grad():
        with pytest.raises(ValueError, match="right-padded.*padding_side = 'left'"):
            routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
        with pytest.raises(ValueError, match="right-padded"):  # mask inferred from the pad token, as generate does
            routed.generate(input_ids=ids, max_new_tokens=2)
        left, left_mask, _ = padded_batch([6, 4], "left")
        routed.generate(input_ids=left, attention_mask=left_mask, max_new_tokens=2)


def test_empty_prompts_are_refused_by_index_with_the_fix():
    """An empty prompt in a left-padded batch is not right padding, and a lone empty prompt has nothing to pool
    or continue from: both name the row and the fix, in generate (with or without a mask) and in forward."""
    routed = RoutedModel(build_tiny("llama"))
    ids, mask, _ = padded_batch([6, 0, 4], "left")
    with torch.no_grad():
        for kwargs in (dict(attention_mask=mask), {}):  # without a mask, generate infers it from the pad token
            with pytest.raises(ValueError, match=r"prompt 1 is empty.*at least one token") as error:
                routed.generate(input_ids=ids, max_new_tokens=2, **kwargs)
            assert "right-padded" not in str(error.value)
        with pytest.raises(ValueError, match=r"prompt 1 is empty"):
            routed(input_ids=ids, attention_mask=mask)
        lone = torch.zeros((1, 0), dtype=torch.long)
        with pytest.raises(ValueError, match=r"prompt 0 is empty"):
            routed.generate(input_ids=lone, max_new_tokens=2)
        with pytest.raises(ValueError, match=r"prompt 0 is empty"):
            routed(input_ids=lone)


def test_cli_generate_refuses_an_empty_prompt(tmp_path, capsys):
    """`routertune generate --no-chat ""` printed an IndexError traceback: now exit 2 and what to do."""
    from routertune.cli import main
    from tiny_lm import tiny_llama, tiny_tokenizer

    model = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    RoutedModel(tiny_llama()).save_pretrained(tmp_path / "routers")
    common = [
        "generate",
        "--model",
        str(tmp_path / "model"),
        "--routers",
        str(tmp_path / "routers"),
        "--max-new-tokens",
        "2",
    ]
    assert main(common + ["--no-chat", "hello", ""]) == 2
    err = capsys.readouterr().err
    assert "prompt 1 is empty" in err and "chat mode" in err and "Traceback" not in err
    assert main(common + ["--no-chat", ""]) == 2  # a lone empty prompt (was an IndexError)
    assert "prompt 0 is empty" in capsys.readouterr().err
    assert main(common + ["hello", ""]) == 0  # the chat template gives the empty message tokens


@pytest.mark.parametrize(
    "granularity,flag",
    [("attention", "output_attentions"), ("block", "output_attentions"), ("block", "output_hidden_states")],
)
def test_misaligned_output_flags_are_refused(granularity, flag):
    """Attention weights exist only for executed rows and a skipped block records no hidden state: refused."""
    routed, _, ids, mask = _mixed(granularity=granularity)
    with torch.no_grad(), pytest.raises(ValueError, match=f"{flag}.*{granularity}"):
        routed(input_ids=ids, attention_mask=mask, **{flag: True})
    with torch.no_grad(), pytest.raises(ValueError, match=flag):
        routed.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=2, return_dict_in_generate=True, **{flag: True}
        )


@pytest.mark.parametrize("granularity", ["attention", "mlp"])
def test_hidden_states_are_full_batch_where_they_can_be(granularity):
    """Attention or MLP routing leaves every block's output full-batch: hidden states equal the reference's."""
    routed, ref, ids, mask = _mixed(granularity=granularity)
    with torch.no_grad():
        got = routed(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        expected = ref.forward(ids, mask, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == routed.config.num_hidden_layers + 1
    real = mask.bool()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g[real], e[real], atol=1e-4, rtol=0)

"""routertune.serve without an engine: the exported folders, the refusals, and the per-request decision logic of
the routed attention (run in vLLM by tests/test_serve_vllm.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny
from routertune import RoutedModel, RouterConfig
from routertune.routing.state import Forcing
from routertune.serve.attention import PartialPromptError, RoutedAttention
from routertune.serve.config import CONFIG_KEY, ROUTERS_FILE, ServeRouting
from routertune.serve.export import ExportJob, export
from routertune.serve.requests import RequestRouting, ServeBatch, forcing_of
from tiny_lm import tiny_family_folder

LAYERS = [2, 3, 4]


def _tiny_folder(tmp_path):
    """A tiny llama saved as a Hugging Face folder, with a word-level tokenizer (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = build_tiny("llama")
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="w0", eos_token="w2").save_pretrained(folder)
    return folder


@pytest.fixture
def routers(tmp_path):
    folder = _tiny_folder(tmp_path)
    from routertune.base_model import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(folder))
    routed = RoutedModel(model, RouterConfig(layers=LAYERS, layer_thresholds={3: 0.6}))
    with torch.no_grad():
        for router in routed.routers.values():
            router.weight.normal_()
            router.bias.normal_()
            router.set_trust_region(float(router.bias), -0.5, 0.0)  # carried into the export
    routed.save_pretrained(tmp_path / "routers")
    return folder, tmp_path / "routers", routed


def test_routed_export_names_the_routed_arch_and_carries_the_routers(routers, tmp_path):
    folder, routers_dir, routed = routers
    out = tmp_path / "serve"
    report = export(ExportJob(output=str(out), routers=str(routers_dir), model=str(folder)))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["RoutertuneLlamaForCausalLM"] == [report.architecture]
    serving = ServeRouting.from_dict(config[CONFIG_KEY])
    assert serving.router_config.layers == LAYERS
    assert serving.router_config.threshold_for(3) == 0.6 and serving.router_config.threshold_for(2) == 0.5
    state = load_file(str(out / ROUTERS_FILE))
    assert set(state) == {f"layers.{i}.router.{p}" for i in LAYERS for p in ("weight", "bias", "trust_region")}
    for i in LAYERS:
        assert torch.equal(state[f"layers.{i}.router.weight"], routed.routers[i].weight.detach())
        assert torch.equal(state[f"layers.{i}.router.bias"], routed.routers[i].bias.detach())
        assert torch.equal(state[f"layers.{i}.router.trust_region"], routed.routers[i].trust_region)
    # the base weights are served unchanged; no router tensor lies where vLLM looks for model weights
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(folder / "model.safetensors")).keys()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert (out / "tokenizer.json").is_file()


def test_static_export_is_native_no_op_attention_without_those_weights(routers, tmp_path):
    folder, routers_dir, _ = routers
    out = tmp_path / "static"
    report = export(ExportJob(output=str(out), routers=str(routers_dir), model=str(folder), static=2))
    dropped = report.dropped_layers
    assert len(dropped) == 2 and set(dropped) <= set(LAYERS)  # among the routed layers: comparable sets
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    blocks = config["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [i in dropped for i in range(len(blocks))]
    assert all(not b["ffn"]["no_op"] and b["ffn"]["intermediate_size"] == config["intermediate_size"] for b in blocks)
    keys = load_file(str(out / "model.safetensors")).keys()
    for i in range(len(blocks)):
        has_attention = any(k.startswith(f"model.layers.{i}.self_attn.") for k in keys)
        assert has_attention == (i not in dropped), i
    # the configuration class the plugin registers reads the blocks as vLLM's DeciLM code does
    from routertune.serve.static import config_class

    cfg = config_class()(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    assert [cfg.block_configs[i].attention.no_op for i in range(len(blocks))] == [
        b["attention"]["no_op"] for b in blocks
    ]
    assert not hasattr(cfg.block_configs[0].ffn, "ffn_mult")


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma3_text"])
def test_static_export_of_other_families_is_the_routed_class_forced_to_the_static_set(family, tmp_path):
    # vLLM's DeciLM is Llama-shaped: Qwen3's q/k norms fail its load, Qwen2's q/k/v biases are dropped by it
    # silently, Gemma 3's RoPE and norms and Mistral's sliding window are not its own. These families serve
    # static drop through their routed class, every request skipping the static set (tests/test_serve_static_vllm.py
    # serves each in vLLM against the plain model with those layers zeroed)
    folder = tiny_family_folder(tmp_path / family, family)
    out = tmp_path / "static"
    report = export(ExportJob(output=str(out), model=str(folder), static=2))
    config = json.loads((out / "config.json").read_text())
    arch = {"mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3_text": "Gemma3"}[family]
    assert config["architectures"] == [f"Routertune{arch}ForCausalLM"] == [report.architecture]
    assert config["model_type"] == family and "block_configs" not in config
    serving = ServeRouting.from_dict(config[CONFIG_KEY])
    assert serving.static_skip == sorted(report.dropped_layers) and len(report.dropped_layers) == 2
    assert serving.router_config.layers == serving.static_skip
    # every weight of the base model, unchanged (q/k norms, biases, the dropped layers' attention included);
    # no router weights
    base, served = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert served.keys() == base.keys() and all(torch.equal(served[k], base[k]) for k in base)
    assert not (out / ROUTERS_FILE).exists()


def test_static_export_dropping_layer_0_is_served_by_the_routed_class(tmp_path):
    # vLLM's DeciLM cannot run a no-op attention in the first layer (its MLP norm expects a residual that only
    # an attention layer starts), so even llama takes the routed form there
    folder = _tiny_folder(tmp_path)
    from routertune.base_model import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(folder))
    RoutedModel(model, RouterConfig(layers=[0, 1])).save_pretrained(tmp_path / "first")
    report = export(
        ExportJob(output=str(tmp_path / "out"), model=str(folder), routers=str(tmp_path / "first"), static=2)
    )
    assert report.dropped_layers == [0, 1] and report.architecture == "RoutertuneLlamaForCausalLM"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert ServeRouting.from_dict(config[CONFIG_KEY]).static_skip == [0, 1]


def test_static_skip_section_is_checked():
    good = ServeRouting.static([4, 2]).to_dict()
    assert good["static_skip"] == [2, 4] and good["format_version"] == 2
    for bad in ([], [2], [2, "4"], "2,4"):
        with pytest.raises(ValueError, match="static_skip"):
            ServeRouting.from_dict(dict(good, static_skip=bad))
    # routed exports keep format 1 (readable by older routertune) and carry no static set
    routed = ServeRouting(RouterConfig(layers=[2, 4])).to_dict()
    assert routed["format_version"] == 1 and "static_skip" not in routed


def test_export_refusals(routers, tmp_path):
    folder, routers_dir, _ = routers
    with pytest.raises(ValueError, match="--routers DIR"):
        ExportJob(output=str(tmp_path / "x"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a routertune export"):
        export(ExportJob(output=str(tmp_path / "busy"), routers=str(routers_dir), model=str(folder)))
    out = tmp_path / "again"
    export(ExportJob(output=str(out), routers=str(routers_dir), model=str(folder)))
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(ExportJob(output=str(out), routers=str(routers_dir), model=str(folder)))
    export(ExportJob(output=str(out), routers=str(routers_dir), model=str(folder), overwrite=True))
    with pytest.raises(ValueError, match="attention only"):
        ServeRouting.from_dict({"router_config": RouterConfig(granularity="mlp").to_dict()})
    with pytest.raises(ValueError, match="one decision per request"):
        ServeRouting.from_dict({"router_config": RouterConfig(unit="token").to_dict()})
    from routertune.base_model import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(folder))
    RoutedModel(model, RouterConfig(layers=LAYERS, unit="token")).save_pretrained(tmp_path / "token-routers")
    with pytest.raises(ValueError, match="one decision per request"):
        export(ExportJob(output=str(tmp_path / "tok"), routers=str(tmp_path / "token-routers"), model=str(folder)))


def test_engine_settings_that_split_a_prompt_are_refused():
    from routertune.serve.models import check_engine_config

    def config(prefix, chunked, spec=None):
        return SimpleNamespace(
            cache_config=SimpleNamespace(enable_prefix_caching=prefix),
            scheduler_config=SimpleNamespace(enable_chunked_prefill=chunked),
            speculative_config=spec,
        )

    check_engine_config(config(False, False))
    with pytest.raises(ValueError, match="enable_prefix_caching=False"):
        check_engine_config(config(True, False))
    with pytest.raises(ValueError, match="enable_chunked_prefill=False"):
        check_engine_config(config(False, True))


def test_forcing_from_sampling_params():
    assert forcing_of(SimpleNamespace(extra_args=None)) is None
    f = forcing_of(SimpleNamespace(extra_args={"routertune": {"force": "skip_set", "skip_layers": [3, "4"]}}))
    assert f == Forcing("skip_set", frozenset({3, 4}))
    with pytest.raises(ValueError, match="skip_set"):
        forcing_of(SimpleNamespace(extra_args={"routertune": {"force": "sometimes"}}))


# --- the decision logic of the served attention, on a hand-made step layout -------------------------------
H = 8


def _attention(threshold=0.5, seed=0):
    from routertune.routing.router import Router

    torch.manual_seed(seed)
    router = Router(H)
    with torch.no_grad():
        router.weight.normal_()
        router.bias.fill_(0.3)
    return RoutedAttention(
        module=None, original_forward=None, layer_idx=5, router=router, threshold=threshold, dtype=torch.float32
    )


def _batch(prompt_lens, decisions=None, forcing=None):
    requests = [RequestRouting(prompt_len=n, prompt_sha1=str(i)) for i, n in enumerate(prompt_lens)]
    for req, dec in zip(requests, decisions or [None] * len(requests)):
        if dec is not None:
            req.decisions[5] = dec
    return ServeBatch([f"r{i}" for i in range(len(requests))], requests, forcing or [None] * len(requests))


def test_prefill_decides_from_the_mean_of_its_prompt_and_decode_reuses_it():
    attn = _attention()
    w, b = attn.router.weight.detach()[0], float(attn.router.bias)
    # step 1: two prefills (4 and 3 tokens) in one packed step
    hidden = torch.randn(7, H)
    batch = _batch([4, 3])
    runs = attn._decide(batch, starts=[0, 4, 7], seq_lens=[4, 3], hidden_states=hidden)
    expected = [bool(torch.sigmoid(hidden[i:j].mean(0) @ w + b) >= 0.5) for i, j in ((0, 4), (4, 7))]
    assert runs == expected
    assert batch.requests[0].scores[5] == pytest.approx(float(torch.sigmoid(hidden[0:4].mean(0) @ w + b)))
    # step 2: decode (one token each, context > 0): the stored decisions, whatever the new hidden states
    decode = _batch([4, 3], decisions=[not expected[0], not expected[1]])
    assert attn._decide(decode, [0, 1, 2], [5, 4], torch.randn(2, H)) == [not expected[0], not expected[1]]
    assert not decode.recomputed


def test_a_fixed_chat_template_is_pooled_without():
    """Routers trained with --pool content: a prompt that starts (ends) with the template's fixed tokens decides
    from the mean of the rest; a prompt without them from the mean of all its tokens."""
    attn = _attention()
    attn.fixed_template = [[7, 8], [9]]
    w, b = attn.router.weight.detach()[0], float(attn.router.bias)
    hidden = torch.randn(9, H)
    batch = _batch([5, 4])
    batch.requests[0].prompt_ids = (7, 8, 1, 2, 9)  # head, two varying tokens, tail
    batch.requests[1].prompt_ids = (1, 2, 3, 4)
    attn._decide(batch, starts=[0, 5, 9], seq_lens=[5, 4], hidden_states=hidden)
    for req, (i, j) in zip(batch.requests, ((2, 4), (5, 9))):
        assert req.scores[5] == pytest.approx(float(torch.sigmoid(hidden[i:j].mean(0) @ w + b)), abs=1e-6)


def test_recompute_after_preemption_keeps_the_decision_and_is_flagged():
    attn = _attention()
    batch = _batch([3], decisions=[False])
    # a preempted request comes back as one prefill over prompt + 5 generated tokens, from an empty cache
    assert attn._decide(batch, [0, 8], [8], torch.randn(8, H)) == [False]
    assert batch.recomputed == {0}


def test_a_prefill_from_cached_context_is_refused():
    attn = _attention()
    with pytest.raises(PartialPromptError, match="enable_chunked_prefill=False"):
        # 4 new prompt tokens after 6 cached ones: a prefix-cache hit or a second chunk
        attn._decide(_batch([10]), [0, 4], [10], torch.randn(4, H))


def test_forced_requests_take_the_forced_decision():
    attn = _attention(threshold=1e-9)  # the routers would run everything
    batch = _batch([2, 2], forcing=[Forcing("skip_set", frozenset({5})), None])
    assert attn._decide(batch, [0, 2, 4], [2, 2], torch.randn(4, H)) == [False, True]


def test_a_static_drop_skips_its_layers_for_every_request_whatever_the_cache_or_request_asks():
    attn = _attention(threshold=1e-9)  # the router would run everything; a static drop has none
    attn.router = None
    attn.static = Forcing("skip_set", frozenset({5}))
    # a prompt's second chunk after cached tokens (chunked prefill / prefix caching: fine for a fixed set), a
    # decode step, and a request that asks to run everything
    batch = _batch([10, 3, 2], decisions=[None, True, None], forcing=[None, None, Forcing("run")])
    assert attn._decide(batch, [0, 4, 5, 7], [10, 4, 2], torch.randn(7, H)) == [False, False, False]
    kept = RoutedAttention(
        module=None,
        original_forward=None,
        layer_idx=6,
        router=None,
        threshold=0.5,
        dtype=torch.float32,
        static=Forcing("skip_set", frozenset({5})),
    )
    assert kept._decide(_batch([2]), [0, 2], [2], torch.randn(2, H)) == [True]  # a layer outside the set runs


def test_static_export_drops_the_searched_orders_first_layers_or_1_minus_cos_on_request(routers, tmp_path):
    """--static K takes the first K layers of the order searched on KL (by default, searched and cached; or
    read from --static-order FILE); --static-order cos the K least important by 1 - cos. References: the search
    run directly on the same model, and attention_importance on the export's calibration text."""
    from routertune.base_model import load_model_and_tokenizer
    from routertune.bench.variants import calibration_batches
    from routertune.routing import static_drop as baselines
    from routertune.train import static_order

    folder, _, _ = routers
    model, tokenizer = load_model_and_tokenizer(str(folder))
    settings = static_order.OrderSettings(  # no chat template: plain text; the export's candidates
        max_count=2, n_records=16, max_length=128, plain_text=1.0, candidates=[2, 3, 4]
    )
    direct = static_order.searched_order(model, tokenizer, settings, tmp_path / "direct.json")
    report = export(ExportJob(output=str(tmp_path / "a"), model=str(folder), static=2, cache_dir=str(tmp_path / "c")))
    assert report.dropped_layers == sorted(direct.order[:2]) and report.order == direct.order
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["routertune_static"] == {"dropped_layers": sorted(direct.order[:2]), "order": direct.order}
    # from a file: a hand-made order of this model's weights is taken as it is
    hand = static_order.StaticOrder(order=[4, 2], kl=[0.1, 0.2], model=static_order.model_identity(model))
    (tmp_path / "hand.json").write_text(json.dumps(hand.to_json()))
    read = export(
        ExportJob(output=str(tmp_path / "b"), model=str(folder), static=2, static_order=str(tmp_path / "hand.json"))
    )
    assert read.dropped_layers == [2, 4]
    first = export(
        ExportJob(output=str(tmp_path / "b1"), model=str(folder), static=1, static_order=str(tmp_path / "hand.json"))
    )
    assert first.dropped_layers == [4]  # the order's first layer, not its last
    too_far = ExportJob(
        output=str(tmp_path / "d"), model=str(folder), static=3, static_order=str(tmp_path / "hand.json")
    )
    with pytest.raises(ValueError, match="holds 2 layers"):
        export(too_far)
    with pytest.raises(ValueError, match="only 3 candidate layers"):
        export(
            ExportJob(output=str(tmp_path / "e"), model=str(folder), static=4, static_order=str(tmp_path / "hand.json"))
        )
    with torch.no_grad():
        importance = baselines.attention_importance(model, calibration_batches(model, tokenizer))
    cos = export(ExportJob(output=str(tmp_path / "f"), model=str(folder), static=2, static_order="cos"))
    assert cos.dropped_layers == importance.least_important(2, sorted(cos.importance))
    with pytest.raises(ValueError, match="pass --static K too"):
        ExportJob(output=str(tmp_path / "g"), routers="x", static_order="cos")

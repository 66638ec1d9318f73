"""A tiny causal LM with a real byte-level tokenizer, both built offline, for evaluation tests (the harness
tokenises text, so the tiny models of conftest need a tokenizer that covers every byte)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (plus pad, BOS, EOS); no merges, so a context's tokens are a prefix of
    context + continuation's tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return fast


def tiny_llama(seed: int = 0, layers: int = 6) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SPECIALS) + 256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.config._attn_implementation = "sdpa"
    model.generation_config.pad_token_id = 0
    return model.eval()


def randomize_routers(routed, seed: int = 0, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in routed.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * scale)


def tiny_family_folder(folder, family: str, layers: int = 6):
    """A tiny model of `family` (a served family: llama, mistral, qwen2, qwen3, gemma3_text) with the byte-level
    tokenizer, saved as a Hugging Face folder: head size 32 (vLLM's CPU attention runs no smaller head), random
    biases (init leaves them 0, which would hide a server that drops them), offline."""
    import transformers as tf

    tokenizer = tiny_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    configs = {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=16),
        "qwen2": lambda: tf.Qwen2Config(**common),  # q/k/v biases
        "qwen3": lambda: tf.Qwen3Config(**common),  # q/k norms in every attention sublayer
        "gemma3_text": lambda: tf.Gemma3TextConfig(
            **common,
            query_pre_attn_scalar=32,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        ),
    }
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(configs[family]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

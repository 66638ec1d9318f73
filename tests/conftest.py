"""Tiny models of every supported family, built offline from config objects (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
GRANULARITIES = ("attention", "mlp", "block")
VOCAB = 96
PAD = 0

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def build_tiny(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_COMMON))
    elif family == "mistral":
        # a short sliding window so the sliding-window cache path is exercised
        model = MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=6, head_dim=8))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_COMMON))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=8))
    elif family == "gemma3_text":
        config = Gemma3TextConfig(
            **_COMMON,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        )
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(family)
    # random init is tiny; scale weights up so sublayers matter and decisions change outputs visibly
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.config._attn_implementation = "sdpa"
    model.generation_config.pad_token_id = PAD
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=GRANULARITIES)
def granularity(request) -> str:
    return request.param


def padded_batch(lengths: list[int], side: str, seed: int = 1, total: int | None = None):
    """Random token rows of the given real lengths, padded left or right; returns ids, mask, position ids."""
    gen = torch.Generator().manual_seed(seed)
    total = total or max(lengths)
    ids = torch.full((len(lengths), total), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), total), dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens = torch.randint(3, VOCAB, (n,), generator=gen)
        span = slice(total - n, total) if side == "left" else slice(0, n)
        ids[row, span] = tokens
        mask[row, span] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, positions

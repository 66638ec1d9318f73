"""The one place that knows Hugging Face submodule names. A new family is a row here, not a file."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    decoder: str = "model"  # attribute of the *ForCausalLM holding the decoder stack
    layers: str = "layers"  # attribute of the decoder holding the ModuleList of blocks
    attention: str = "self_attn"  # attention sublayer inside a block; receives the normed input
    mlp: str = "mlp"  # MLP sublayer inside a block; receives the normed input
    input_norm: str = "input_layernorm"  # the block's first norm (router input for whole-block routing)


_LLAMA_LIKE = ArchSpec()

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,  # Llama 2/3, SmolLM2
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    # Gemma 3 wraps its sublayers in extra post-norms; zeroing the attention/MLP output still leaves the
    # residual untouched because RMSNorm(0) == 0, so the same wrapping is exact.
    "gemma3_text": _LLAMA_LIKE,
}


def arch_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by routertune; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. Adding a decoder-only family is one row in routertune/arch.py."
        )
    return ARCHITECTURES[model_type]


def decoder_of(model: nn.Module) -> nn.Module:
    return getattr(model, arch_spec(model).decoder)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    return getattr(decoder_of(model), arch_spec(model).layers)


def sublayer_name(model: nn.Module, granularity: str) -> str | None:
    """Attribute name of the routed sublayer inside a block; None means the block itself."""
    spec = arch_spec(model)
    return {"attention": spec.attention, "mlp": spec.mlp, "block": None}[granularity]

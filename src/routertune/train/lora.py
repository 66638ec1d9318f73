"""Routers and LoRA trained together (the paper's LoRA table), with peft doing the LoRA part.

LoRA layers are injected into the base model in place (`peft.inject_adapter_in_model`) before the routers
are attached, so the routed model holds both; they are saved and loaded together with the routers."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from routertune.files import atomic_write

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "lora.safetensors"


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=("q_proj", "v_proj")) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"lora rank {rank} must be >= 1")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
    )
    inject_adapter_in_model(config, model)
    model._routertune_lora_config = config


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def save_lora(model: nn.Module, directory: Path) -> None:
    state = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if "lora_" in name}
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(state, tmp))
    config = model._routertune_lora_config.to_dict()
    text = json.dumps(config, indent=2, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v))
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(text))


def inject_saved_lora(model: nn.Module, directory: Path) -> bool:
    """Inject the LoRA layers described in `directory` (weights are loaded later, once routers are attached)."""
    if not (directory / ADAPTER_CONFIG).is_file():
        return False
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig.from_pretrained(str(directory))
    inject_adapter_in_model(config, model)
    model._routertune_lora_config = config
    return True


def load_lora_weights(model: nn.Module, directory: Path) -> None:
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    params = {name: p for name, p in model.named_parameters() if "lora_" in name}
    if set(state) != set(params):
        raise ValueError(
            f"{directory / ADAPTER_WEIGHTS} does not match the model's LoRA layers: "
            f"{sorted(set(state) ^ set(params))[:5]}"
        )
    for name, value in state.items():
        params[name].data.copy_(value)

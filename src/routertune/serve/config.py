"""The routing section an exported serving folder carries in its config.json (key ``routertune``), read by
the served model inside vLLM. Plain data and checks; imports neither vLLM nor transformers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import RouterConfig

CONFIG_KEY = "routertune"
ROUTERS_DIR = "routertune"  # a sub-folder: vLLM loads every top-level *.safetensors as model weights
ROUTERS_FILE = f"{ROUTERS_DIR}/routers.safetensors"
SERVE_FORMAT = 1
ARCH_PREFIX = "Routertune"

# model_type of the arch table -> vLLM architecture served with routers; the exported folder names
# ARCH_PREFIX + this (e.g. RoutertuneLlamaForCausalLM)
VLLM_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "vllm.model_executor.models.llama"),
    "mistral": ("MistralForCausalLM", "vllm.model_executor.models.mistral"),
    "qwen2": ("Qwen2ForCausalLM", "vllm.model_executor.models.qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "vllm.model_executor.models.qwen3"),
    "gemma3_text": ("Gemma3ForCausalLM", "vllm.model_executor.models.gemma3"),
}


@dataclass
class ServeRouting:
    """What the served model needs: the routers' config and where their weights lie."""

    router_config: RouterConfig
    routers_file: str = ROUTERS_FILE
    format_version: int = SERVE_FORMAT

    def to_dict(self) -> dict:
        return {"format_version": self.format_version, "routers_file": self.routers_file,
                "router_config": self.router_config.to_dict()}

    @classmethod
    def from_dict(cls, data) -> "ServeRouting":
        if not isinstance(data, dict) or "router_config" not in data:
            raise ValueError(f"config.json's {CONFIG_KEY!r} section is malformed ({data!r}); re-export the folder "
                             "with `routertune export`")
        version = int(data.get("format_version", SERVE_FORMAT))
        if version > SERVE_FORMAT:
            raise ValueError(f"serving folder format {version} is newer than this routertune ({SERVE_FORMAT}); "
                             "upgrade routertune")
        config = RouterConfig.from_dict(data["router_config"])
        if config.granularity != "attention":
            raise ValueError(f"vLLM serving routes attention only; these routers route {config.granularity!r}")
        if config.unit != "sequence":
            raise ValueError(f"vLLM serving takes one decision per request (unit='sequence'); these routers are "
                             f"{config.unit}-level: serve them through RoutedModel.generate")
        return cls(config, data.get("routers_file", ROUTERS_FILE), version)

    def routers_path(self, model_dir: str | Path) -> Path:
        return Path(model_dir) / self.routers_file

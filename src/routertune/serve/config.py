"""The routing section an exported serving folder carries in its config.json (key ``routertune``), read by
the served model inside vLLM. Plain data and checks; imports neither vLLM nor transformers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import RouterConfig

CONFIG_KEY = "routertune"
ROUTERS_DIR = "routertune"  # a sub-folder: vLLM loads every top-level *.safetensors as model weights
ROUTERS_FILE = f"{ROUTERS_DIR}/routers.safetensors"
# the newest section this routertune reads; 2 added static_skip (static-drop exports), 3 never_run, 4 decode_only
SERVE_FORMAT = 4
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
    """What the served model needs: the routers' config and where their weights lie; or, for a static-drop
    export (``static_skip``), the attention layers every request skips (no routers, no router weights)."""

    router_config: RouterConfig
    routers_file: str = ROUTERS_FILE
    format_version: int = 1  # routed exports stay readable by routertune versions that know format 1 only
    static_skip: list[int] | None = None
    # `export --free-kv`: routed layers whose routers can never reach their threshold (a trust region caps the
    # score), served with no KV cache; {"layers": [...], "score_bound": b}: no score exceeds b, so a request's
    # own threshold must lie above b (and no forcing may run them)
    never_run: dict | None = None
    # `export --decode-only`: prompts prefill densely (never_run layers aside), decisions apply to generated tokens
    decode_only: bool = False

    @classmethod
    def static(cls, layers: list[int]) -> ServeRouting:
        """Static drop served by the routed classes: `layers` skip for every request."""
        return cls(RouterConfig(layers=sorted(layers)), routers_file="", format_version=2, static_skip=sorted(layers))

    def to_dict(self) -> dict:
        out = {
            "format_version": self.format_version,
            "routers_file": self.routers_file,
            "router_config": self.router_config.to_dict(),
        }
        if self.static_skip is not None:
            out["static_skip"] = list(self.static_skip)
        if self.never_run is not None:
            out["never_run"] = {"layers": list(self.never_run["layers"]), "score_bound": self.never_run["score_bound"]}
        if self.decode_only:
            out["decode_only"] = True
        return out

    @classmethod
    def from_dict(cls, data) -> ServeRouting:
        if not isinstance(data, dict) or "router_config" not in data:
            raise ValueError(
                f"config.json's {CONFIG_KEY!r} section is malformed ({data!r}); re-export the folder "
                "with `routertune export`"
            )
        version = int(data.get("format_version", SERVE_FORMAT))
        if version > SERVE_FORMAT:
            raise ValueError(
                f"serving folder format {version} is newer than this routertune ({SERVE_FORMAT}); upgrade routertune"
            )
        config = RouterConfig.from_dict(data["router_config"])
        if config.granularity != "attention":
            raise ValueError(f"vLLM serving routes attention only; these routers route {config.granularity!r}")
        if config.unit != "sequence":
            raise ValueError(
                f"vLLM serving takes one decision per request (unit='sequence'); these routers are "
                f"{config.unit}-level: serve them through RoutedModel.generate"
            )
        static_skip = data.get("static_skip")
        if static_skip is not None:
            if (
                not isinstance(static_skip, list)
                or not static_skip
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in static_skip)
                or sorted(static_skip) != sorted(config.layers or [])
            ):
                raise ValueError(
                    f"config.json's {CONFIG_KEY!r} section: static_skip={static_skip!r} must be a "
                    f"non-empty list of layer indices equal to router_config.layers "
                    f"({config.layers}); re-export the folder with `routertune export --static K`"
                )
            static_skip = sorted(static_skip)
        never_run = data.get("never_run")
        if never_run is not None:
            layers, bound = (
                never_run.get(k) if isinstance(never_run, dict) else None for k in ("layers", "score_bound")
            )
            if (
                static_skip is not None
                or not isinstance(layers, list)
                or not layers
                or not set(layers) <= set(config.layers or [])
                or isinstance(bound, bool)
                or not isinstance(bound, (int, float))
                or not 0 < bound < 1
            ):
                raise ValueError(
                    f"config.json's {CONFIG_KEY!r} section: never_run={never_run!r} must be "
                    "{'layers': [routed layer indices], 'score_bound': a number in (0, 1)} in a routed export; "
                    "re-export the folder with `routertune export --free-kv`"
                )
            never_run = {"layers": sorted(layers), "score_bound": float(bound)}
        decode_only = data.get("decode_only", False)
        if not isinstance(decode_only, bool) or decode_only and static_skip is not None:
            raise ValueError(
                f"config.json's {CONFIG_KEY!r} section: decode_only={decode_only!r} must be true or false, and only "
                "in a routed export; re-export the folder with `routertune export --decode-only`"
            )
        return cls(config, data.get("routers_file", ROUTERS_FILE), version, static_skip, never_run, decode_only)

    def no_kv_layers(self) -> list[int]:
        """The attention layers served with no KV cache: a static drop's set, or the routed layers the routers
        can never run (`export --free-kv`); no request ever runs them."""
        if self.static_skip is not None:
            return list(self.static_skip)
        return list(self.never_run["layers"]) if self.never_run is not None else []

    def routers_path(self, model_dir: str | Path) -> Path:
        return Path(model_dir) / self.routers_file

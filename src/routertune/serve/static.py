"""Static attention drop in vLLM's native form: a Nemotron-NAS (DeciLM) config whose dropped layers have
``attention.no_op``, served by vLLM's own ``DeciLMForCausalLM`` (no routertune code runs per token).

Nemotron-NAS checkpoints normally ship their configuration class as remote code; ``StaticDropConfig``
stands in for it (a LlamaConfig whose ``block_configs`` entries read as attributes), registered with
transformers' AutoConfig by the plugin, so no ``trust_remote_code`` is needed."""

from __future__ import annotations

MODEL_TYPE = "nemotron-nas"
ARCHITECTURE = "DeciLMForCausalLM"


class _Attributes(dict):
    """A JSON-serialisable dict read as an object (``block.attention.no_op``), as vLLM's DeciLM code reads it."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _as_attributes(value):
    if isinstance(value, dict):
        return _Attributes({k: _as_attributes(v) for k, v in value.items()})
    return value


def block_configs(
    num_layers: int, dropped: list[int], num_heads: int, num_kv_heads: int, intermediate_size: int
) -> list[dict]:
    """One block config per layer: attention no-op where dropped, else the base model's grouped attention."""
    group = num_heads // num_kv_heads
    return [
        {
            "attention": {"no_op": i in dropped, "replace_with_linear": False, "n_heads_in_group": group},
            "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": intermediate_size},
        }
        for i in range(num_layers)
    ]


def config_class():
    from transformers import LlamaConfig

    class StaticDropConfig(LlamaConfig):
        model_type = MODEL_TYPE

        def __post_init__(self, **kwargs):
            blocks = kwargs.pop("block_configs", None)
            super().__post_init__(**kwargs)
            self.block_configs = [_as_attributes(b) for b in blocks or []]

    return StaticDropConfig


def register_config() -> None:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, config_class(), exist_ok=True)

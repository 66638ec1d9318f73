"""What vLLM's general-plugin loader runs in every engine process: register the routed architectures, the
configuration class of the static-drop export, and the runner hook (``requests.install_runner_hook``)."""

from __future__ import annotations

from .config import ARCH_PREFIX, VLLM_ARCHITECTURES


def register() -> None:
    from vllm import ModelRegistry

    from . import requests, static

    supported = set(ModelRegistry.get_supported_archs())
    for arch, _module in VLLM_ARCHITECTURES.values():
        name = ARCH_PREFIX + arch
        if name not in supported:
            ModelRegistry.register_model(name, f"routertune.serve.models:{name}")
    static.register_config()
    requests.install_runner_hook()

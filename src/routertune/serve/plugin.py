"""What vLLM's general-plugin loader runs in every engine process: register the routed architectures, the
configuration class of the static-drop export, the runner hook (``requests.install_runner_hook``) and the
admission check of per-request routing settings (``requests.install_admission_check``: vLLM's front-end
process validates requests, the engine process runs them; the plugin loads in both)."""

from __future__ import annotations

from .config import ARCH_PREFIX, VLLM_ARCHITECTURES


def register() -> None:
    from vllm import ModelRegistry

    from . import decode_only, requests, static

    supported = set(ModelRegistry.get_supported_archs())
    for arch, _module in VLLM_ARCHITECTURES.values():
        name = ARCH_PREFIX + arch
        if name not in supported:
            ModelRegistry.register_model(name, f"routertune.serve.models:{name}")
    static.register_config()
    requests.install_runner_hook()
    requests.install_admission_check()  # refuse malformed routing settings before the engine sees them
    decode_only.install_prompt_only_caching()  # a decode-only export caches prompt blocks only

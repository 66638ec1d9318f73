"""Serving routed models in a real engine (vLLM), as the optional extra ``routertune[serve]``.

* ``routertune export --routers DIR --output SERVE_DIR`` writes a folder that ``vllm.LLM(SERVE_DIR,
  **engine.engine_kwargs())`` and ``routertune serve SERVE_DIR`` load (``export.py``, needs no vLLM);
  ``--static K`` writes vLLM's native static attention drop (Nemotron-NAS no-op attention) instead.
* ``routertune serve SERVE_DIR [vLLM server flags]`` starts vLLM's OpenAI-compatible server (``python -m
  vllm.entrypoints.openai.api_server``) with the flags routed serving needs, refusing those that cannot work
  with routers (``engine.server_command``); ``--routing-log FILE`` logs each request's decisions.
* Per-request settings: flat ``routertune_force`` / ``routertune_skip_layers`` / ``routertune_threshold``
  keys in the request's ``vllm_xargs`` (HTTP) or ``SamplingParams.extra_args``; malformed ones are refused
  when vLLM admits the request (HTTP 400 / ValueError), never in the model runner (``requests.py``).
* The vLLM general plugin (entry point ``vllm.general_plugins: routertune = routertune.serve:register``,
  loaded by vLLM in every process) registers the routed model classes, the one runner hook they need and the
  admission check of per-request settings (``plugin.py``).

vLLM is imported only inside this package, and only by the modules that run inside an engine or start one.
"""

from __future__ import annotations


def register() -> None:
    """vLLM general-plugin entry point: safe to call more than once per process."""
    from .plugin import register as _register

    _register()

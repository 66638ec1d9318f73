"""Serving routed models in a real engine (vLLM), as the optional extra ``routertune[serve]``.

* ``routertune export --routers DIR --output SERVE_DIR`` writes a folder that ``vllm.LLM(SERVE_DIR)`` and
  ``vllm serve SERVE_DIR`` load (``export.py``, needs no vLLM); ``--static K`` writes vLLM's native static
  attention drop (Nemotron-NAS no-op attention) instead.
* The vLLM general plugin (entry point ``vllm.general_plugins: routertune = routertune.serve:register``,
  loaded by vLLM in every engine process) registers the routed model classes and the one runner hook they
  need (``plugin.py``).

vLLM is imported only inside this package, and only by the modules that run inside an engine.
"""

from __future__ import annotations


def register() -> None:
    """vLLM general-plugin entry point: safe to call more than once per process."""
    from .plugin import register as _register

    _register()

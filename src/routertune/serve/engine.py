"""Starting a vLLM engine on an exported folder with the settings routed serving needs, and a small worker
(``python -m routertune.serve.engine REQUEST.json``) that runs one engine in its own process and writes the
greedy tokens, the routing log and the routed layers' call counts as JSON: what the equality test and the
benchmark drive. One engine per process keeps vLLM's process-wide state (distributed groups, forward context)
clean."""

from __future__ import annotations

import json
import os
import sys
import time

from .attention import reset_profile
from .requests import LOG_ENV


def engine_kwargs(max_model_len: int = 2048, **overrides) -> dict:
    """Keyword arguments for ``vllm.LLM`` that routed serving needs: no prefix caching, no chunked prefill (a
    decision pools the whole prompt), a token budget that holds the longest prompt in one step, eager mode
    (the routed layers branch per request, which torch.compile's graph capture cannot follow)."""
    kwargs = dict(max_model_len=max_model_len, max_num_batched_tokens=max_model_len, enable_prefix_caching=False,
                  enable_chunked_prefill=False, enforce_eager=True, dtype="float32", seed=0)
    kwargs.update(overrides)
    return kwargs


def run_request(request: dict) -> dict:
    """Generate greedily for lists of prompt token ids with one engine.

    request: {"model": folder, "engine": {LLM kwargs}, "max_tokens": N, "prompts": [[ids]...],
              "extra_args": {...} | None, "log": path | None}
    """
    if request.get("log"):
        os.environ[LOG_ENV] = request["log"]
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(request["model"], **engine_kwargs(**request.get("engine", {})))
    load_s = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=int(request["max_tokens"]),
                            extra_args=request.get("extra_args"))
    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]], params,
                           use_tqdm=False)
    generate_s = time.perf_counter() - started
    log = []
    if request.get("log") and os.path.exists(request["log"]):
        with open(request["log"]) as handle:
            log = [json.loads(line) for line in handle]
    return {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "log": log, "load_s": load_s,
            "generate_s": generate_s, "routed_layers_profile": reset_profile()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m routertune.serve.engine REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as handle:
        request = json.load(handle)
    result = run_request(request)
    with open(argv[1], "w") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Starting vLLM on an exported folder with the settings routed serving needs:

* ``routertune serve EXPORT [vLLM server flags]`` (``ServeJob``, ``server_command``): vLLM's OpenAI-compatible
  server (``python -m vllm.entrypoints.openai.api_server --model EXPORT ...``, this interpreter, vLLM's normal
  multi-process engine) with the flags routed serving needs added, and the user's flags that cannot work with
  a routed export refused;
* ``engine_kwargs``: the same settings for ``vllm.LLM``;
* a small worker (``python -m routertune.serve.engine REQUEST.json``) that runs one engine in its own process
  and writes the greedy tokens, the routing log and the routed layers' call counts as JSON: what the equality
  test and the benchmark drive. One engine per process keeps vLLM's process-wide state (distributed groups,
  forward context) clean."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .attention import reset_profile
from .requests import LOG_ENV


def engine_kwargs(max_model_len: int = 2048, **overrides) -> dict:
    """Keyword arguments for ``vllm.LLM`` that routed serving needs: no prefix caching, no chunked prefill (a
    decision pools the whole prompt), a token budget that holds the longest prompt in one step, eager mode
    (the routed layers branch per request, which torch.compile's graph capture cannot follow). A decode-only
    export (`export --decode-only`) may override the first three: ``enable_prefix_caching=True,
    enable_chunked_prefill=True``."""
    kwargs = dict(
        max_model_len=max_model_len,
        max_num_batched_tokens=max_model_len,
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
        enforce_eager=True,
        dtype="float32",
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


DEFAULT_MAX_MODEL_LEN = 2048  # engine_kwargs' default: a step of that many tokens holds any prompt
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass
class ServeJob:
    """`routertune serve EXPORT [vLLM server flags]`: its own flags (the rest go to vLLM's server)."""

    export: str = field(default="", metadata={"help": "the folder `routertune export` wrote (routed or --static)"})
    routing_log: str | None = field(
        default=None,
        metadata={
            "help": "append each request's routing decisions to this JSONL file (sets ROUTERTUNE_SERVE_LOG for the server)"
        },
    )
    dry_run: bool = field(default=False, metadata={"help": "print the server command and exit without starting it"})


@dataclass
class ServerCommand:
    argv: list[str]  # [python, -m, vllm.entrypoints.openai.api_server, --model, EXPORT, ...]
    env: dict[str, str]  # variables to set for the server
    routed: bool
    added: list[str]  # the flags routertune added


_UNSET = object()


def _export_kind(export: str) -> str:
    """ "routed" (routers decide from the whole prompt), "decode_only" (`export --decode-only`: routers decide,
    prompts prefill densely), "static_skip" (a static drop served by the routed classes: fixed skips, no routers)
    or "plain" (vLLM's native DeciLM static drop, or any folder without a routing section); refuses a folder
    without config.json."""
    from .config import CONFIG_KEY

    config = Path(export) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{export} has no config.json; serve a folder written by `routertune export "
            "--routers DIR --output EXPORT` (or --static K)"
        )
    section = json.loads(config.read_text()).get(CONFIG_KEY)
    if section is None:
        return "plain"
    if isinstance(section, dict) and section.get("static_skip") is not None:
        return "static_skip"
    return "decode_only" if isinstance(section, dict) and section.get("decode_only") is True else "routed"


def server_command(job: ServeJob, vllm_args: list[str]) -> ServerCommand:
    """vLLM's OpenAI server command for `job.export`. The user's flags are read with vLLM's own parser (the
    forms vLLM accepts: --flag=value, --config FILE.yaml, ...); for a routed export, flags under which a
    decision would not see its whole prompt or the routed layers could not branch per request are refused,
    and the required ones added where absent. A static export is served as given (eager mode added when it
    is served by the routed classes: families other than llama)."""
    if not job.export:
        raise ValueError("routertune serve needs the export folder: routertune serve EXPORT [vLLM server flags]")
    kind = _export_kind(job.export)
    routed = kind in ("routed", "decode_only")
    whole_prompt = kind == "routed"  # decisions from the whole prompt: no prefix caching, no chunked prefill
    env = {}
    if job.routing_log:
        if not routed:
            raise ValueError(
                f"--routing-log: {job.export} is not a routed export (no routers decide there); drop "
                "the flag, or serve a folder from `routertune export --routers DIR`"
            )
        env["ROUTERTUNE_SERVE_LOG"] = str(Path(job.routing_log).resolve())
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"routertune serve needs vLLM ({error}); pip install 'routertune[serve]'") from error

    parser = make_arg_parser(FlexibleArgumentParser())
    checked = (
        "model",
        "enforce_eager",
        "enable_prefix_caching",
        "enable_chunked_prefill",
        "speculative_config",
        "max_model_len",
        "max_num_batched_tokens",
    )
    parser.set_defaults(**{name: _UNSET for name in checked})  # tell "not passed" from a passed default value
    try:
        given = parser.parse_args(list(vllm_args))
    except SystemExit as exit_:
        raise ValueError(
            f"vLLM's server does not accept the flags {vllm_args} (see python -m {SERVER_MODULE} --help)"
        ) from exit_
    if given.model is not _UNSET or getattr(given, "model_tag", None):
        raise ValueError(f"the model is EXPORT ({job.export}); drop --model / the positional model from the vLLM flags")
    added: list[str] = []
    if kind == "static_skip" and given.enforce_eager is _UNSET:
        added.append("--enforce-eager")  # eager unless asked: see the routed case below
    if routed:
        problems = []
        if whole_prompt and given.enable_prefix_caching is True:
            problems.append("--enable-prefix-caching (a prefix-cache hit prefills only the prompt's tail)")
        if whole_prompt and given.enable_chunked_prefill is True:
            problems.append("--enable-chunked-prefill (a chunk holds part of the prompt)")
        if given.speculative_config not in (_UNSET, None):
            problems.append("--speculative-config (speculative decoding is not supported with routed layers)")
        max_model_len = DEFAULT_MAX_MODEL_LEN if given.max_model_len in (_UNSET, None) else int(given.max_model_len)
        if (
            whole_prompt
            and given.max_num_batched_tokens not in (_UNSET, None)
            and int(given.max_num_batched_tokens) < max_model_len
        ):
            problems.append(
                f"--max-num-batched-tokens {given.max_num_batched_tokens} below --max-model-len "
                f"{max_model_len} (a step must hold the longest prompt whole)"
            )
        if problems:
            raise ValueError(
                "a routed export decides each request's routed layers from its whole prompt; these vLLM flags "
                "cannot work with it: "
                + "; ".join(problems)
                + ". Drop them (routertune serve adds --no-enable-prefix-caching "
                "--no-enable-chunked-prefill --max-num-batched-tokens >= --max-model-len; an export made with "
                "--decode-only keeps prefix caching and chunked prefill)"
            )
        if given.enforce_eager is _UNSET:
            # eager unless asked: --no-enforce-eager compiles the rest of the model around the routed layers
            # (opaque custom ops, serve/attention.py), at the price of a slower start
            added.append("--enforce-eager")
        if whole_prompt:
            if given.enable_prefix_caching is _UNSET:
                added.append("--no-enable-prefix-caching")
            if given.enable_chunked_prefill is _UNSET:
                added.append("--no-enable-chunked-prefill")
            if given.max_model_len in (_UNSET, None):
                added += ["--max-model-len", str(max_model_len)]
            if given.max_num_batched_tokens in (_UNSET, None):
                added += ["--max-num-batched-tokens", str(max_model_len)]
    argv = [sys.executable, "-m", SERVER_MODULE, "--model", job.export, *vllm_args, *added]
    return ServerCommand(argv, env, routed, added)


def run_request(request: dict) -> dict:
    """Generate greedily for lists of prompt token ids with one engine.

    request: {"model": folder, "engine": {LLM kwargs}, "max_tokens": N, "prompts": [[ids]...],
              "extra_args": {...} | None, "log": path | None,
              "refused_extra_args": [{...}, ...] (each tried first on the first prompt; expected to be refused),
              "later_rounds": [[[ids]...], ...] (more batches, each generated after the previous one finished,
              on the same engine: e.g. a chat's next turns, which may find earlier blocks in the prefix cache),
              "warmup": [[ids]...] (generated for one token before the timed batch, e.g. to put a shared system
              prompt in the prefix cache), "ignore_eos": bool}
    Returns the tokens of "prompts" ("tokens") and of each later round ("later_tokens"); the routing log's
    lines record each routed request's prefix-cache hit (``prefix_cached``).
    """
    if request.get("log"):
        os.environ[LOG_ENV] = request["log"]
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(request["model"], **engine_kwargs(**request.get("engine", {})))
    load_s = time.perf_counter() - started
    refused = []  # per entry of refused_extra_args: None if generate accepted it, else what it raised
    for extra in request.get("refused_extra_args", ()):
        try:
            llm.generate(
                [TokensPrompt(prompt_token_ids=request["prompts"][0])],
                SamplingParams(temperature=0.0, max_tokens=1, extra_args=extra),
                use_tqdm=False,
            )
            refused.append(None)
        except Exception as error:  # noqa: BLE001 - recorded for the caller to judge
            refused.append(
                {"type": type(error).__name__, "value_error": isinstance(error, ValueError), "message": str(error)}
            )
    if request.get("warmup"):
        llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in request["warmup"]],
            SamplingParams(temperature=0.0, max_tokens=1),
            use_tqdm=False,
        )
    params = SamplingParams(
        temperature=0.0,
        max_tokens=int(request["max_tokens"]),
        extra_args=request.get("extra_args"),
        ignore_eos=bool(request.get("ignore_eos", False)),
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]], params, use_tqdm=False)
    generate_s, generate_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    rounds = [outputs] + [
        llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        for prompts in request.get("later_rounds", ())
    ]
    kv = _kv_cache_layout(llm)
    log = []
    if request.get("log") and os.path.exists(request["log"]):
        with open(request["log"]) as handle:
            log = [json.loads(line) for line in handle]
    return {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "later_tokens": [[list(o.outputs[0].token_ids) for o in later] for later in rounds[1:]],
        "log": log,
        "load_s": load_s,
        "generate_s": generate_s,
        "generate_cpu_s": generate_cpu_s,  # the whole engine's CPU time when it runs in this process
        "routed_layers_profile": reset_profile(),
        "refused": refused,
        **kv,
    }


def _kv_cache_layout(llm) -> dict:
    """The layers vLLM gave a KV cache and its block count (in-process engine core only, else empty)."""
    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    config = getattr(getattr(core, "scheduler", None), "kv_cache_config", None)
    if config is None:
        return {}
    return {
        "kv_cache_layers": sorted(name for group in config.kv_cache_groups for name in group.layer_names),
        "kv_cache_blocks": int(config.num_blocks),
    }


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

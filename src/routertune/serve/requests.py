"""Which requests a vLLM forward step holds, and their routing state: the one hook routertune adds to vLLM.

vLLM hands a model only token-level tensors; the batch layout (query_start_loc, seq_lens) comes from the
forward context, but not which request a row belongs to. Identity matters: decisions are taken once, at a
request's prefill, from its whole prompt, and must survive preemption (vLLM recomputes a preempted request
as one prefill over prompt + output, in new blocks). The model runner knows its requests
(``input_batch.req_ids``, one ``CachedRequestState`` per request, kept while a request is preempted and
dropped when it finishes), so one wrapper around ``GPUModelRunner._model_forward`` (the CPU runner inherits
it) publishes them in a context variable for the duration of the forward. The decisions themselves live on
the request's ``CachedRequestState``, never on modules, and end with the request.

Per-request settings, as flat keys of ``SamplingParams.extra_args`` (over HTTP: the request body's
``vllm_xargs``, whose values vLLM 0.32 allows to be strings, numbers or lists of them):

* ``routertune_force``: ``"run"`` (every routed layer runs), ``"skip"`` (every routed layer skips) or
  ``"skip_set"`` (the layers of ``routertune_skip_layers`` skip, the other routed layers run);
* ``routertune_skip_layers``: a JSON list of routed layer indices, e.g. ``[20, 21]``; only with ``skip_set``;
* ``routertune_threshold``: a number in (0, 1): this request's routers decide ``score >= threshold`` at every
  routed layer (in place of the export's thresholds, per-layer ones included); only without
  ``routertune_force``.

``LLM.generate`` also takes the nested form ``extra_args={"routertune": {"force": ..., "skip_layers": [...],
"threshold": ...}}`` (not over HTTP: vllm_xargs values cannot be objects). A request whose settings are
malformed is refused when vLLM admits it (``check_request_args``, run by the plugin's admission hook in
``plugin.py``): ``LLM.generate`` raises ValueError, the OpenAI server answers HTTP 400, the engine never sees
it. The model runner parses the settings again without raising (``settings_of_runner``).

``ROUTERTUNE_SERVE_LOG=/path/log.jsonl`` (``routertune serve --routing-log``) appends one line per decided
request (vLLM's request id, prompt length and hash, how many of its prompt tokens were prefix-cache hits, the
forcing or threshold it asked for, decision and score per routed layer) and one per recomputed (preempted)
request. Over HTTP the id is the response's ``id``
(``cmpl-...``, or ``cmpl-`` + the ``X-Request-Id`` header / the body's ``request_id``) + ``-<prompt index>-``
+ 8 random characters vLLM appends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from contextvars import ContextVar
from dataclasses import dataclass, field

from routertune.routing.state import Forcing
from routertune.routing.template import content_span

logger = logging.getLogger(__name__)

LOG_ENV = "ROUTERTUNE_SERVE_LOG"
EXTRA_ARGS_KEY = "routertune"  # the nested form (LLM.generate only)
FLAT_PREFIX = "routertune_"  # the flat keys (vllm_xargs over HTTP, or extra_args)
FORCE_KEY, SKIP_LAYERS_KEY, THRESHOLD_KEY = "routertune_force", "routertune_skip_layers", "routertune_threshold"
FLAT_KEYS = (FORCE_KEY, SKIP_LAYERS_KEY, THRESHOLD_KEY)
FORCE_MODES = ("run", "skip", "skip_set")
_STATE_ATTR = "_routertune_routing"  # attribute on vLLM's CachedRequestState
_HOOKED = "_routertune_hooked"


@dataclass
class RequestRouting:
    """One request's routing state, kept on its CachedRequestState across steps and preemption."""

    prompt_len: int
    prompt_sha1: str
    decisions: dict[int, bool] = field(default_factory=dict)  # layer -> runs, taken at the prefill
    scores: dict[int, float] = field(default_factory=dict)
    logged: bool = False
    recomputes: int = 0
    prompt_ids: tuple[int, ...] = ()  # read only for a fixed chat template (pool_span)
    # prompt tokens already in the KV cache when the request first ran: its prefix-cache hit
    prefix_cached: int = 0

    def pool_span(self, fixed: list[list[int]] | None) -> tuple[int, int]:
        """The prompt tokens its decisions pool over (routertune.routing.template.content_span)."""
        if not fixed or len(self.prompt_ids) != self.prompt_len:
            return 0, self.prompt_len
        return content_span(self.prompt_ids, fixed)


@dataclass
class ServeBatch:
    """The requests of one forward step, in the runner's row order (the order of query_start_loc)."""

    req_ids: list[str]
    requests: list[RequestRouting]
    forcing: list[Forcing | None]
    # per request: its own decision threshold (routertune_threshold), None for the export's; may be left empty
    thresholds: list[float | None] = field(default_factory=list)
    layouts: dict = field(default_factory=dict)  # id(attention metadata) -> (query starts, seq lens) lists
    plans: dict = field(default_factory=dict)  # (decisions, id(metadata)) -> subset plan, reused across layers
    known: dict = field(default_factory=dict)  # layer -> (decisions known before the layer runs, rows to decide)
    recomputed: set[int] = field(default_factory=set)
    # how many routed layers a request decides (a request is logged once it has decided them all: at its
    # prefill, or under decode-only routing at its first generated token); None: log at its first decision
    layer_count: int | None = None

    def threshold_of(self, row: int, default: float | None) -> float | None:
        """The decision threshold of the step's `row`: its own, else `default` (the layer's)."""
        own = self.thresholds[row] if row < len(self.thresholds) else None
        return default if own is None else own

    def finish(self) -> None:
        path = os.environ.get(LOG_ENV)
        lines = []
        for i, req in enumerate(self.requests):
            if i in self.recomputed:
                req.recomputes += 1
                lines.append(
                    {
                        "event": "recomputed",
                        "req_id": self.req_ids[i],
                        "prompt_len": req.prompt_len,
                        "prompt_sha1": req.prompt_sha1,
                        "recomputes": req.recomputes,
                    }
                )
            if not req.logged and req.decisions and len(req.decisions) >= (self.layer_count or 0):
                req.logged = True
                lines.append(
                    {
                        "event": "decided",
                        "req_id": self.req_ids[i],
                        "prompt_len": req.prompt_len,
                        "prompt_sha1": req.prompt_sha1,
                        "prefix_cached": req.prefix_cached,
                        "forced": self.forcing[i].mode if self.forcing[i] is not None else None,
                        "threshold": self.threshold_of(i, None),
                        "decisions": {str(k): v for k, v in sorted(req.decisions.items())},
                        "scores": {str(k): v for k, v in sorted(req.scores.items())},
                    }
                )
        if path and lines:
            with open(path, "a") as handle:
                handle.write("".join(json.dumps(line) + "\n" for line in lines))


_BATCH: ContextVar[ServeBatch | None] = ContextVar("routertune_serve_batch", default=None)


def current_batch() -> ServeBatch | None:
    return _BATCH.get()


@contextlib.contextmanager
def serving(batch: ServeBatch):
    token = _BATCH.set(batch)
    try:
        yield batch
    finally:
        _BATCH.reset(token)
    batch.finish()


def prompt_sha1(token_ids) -> str:
    return hashlib.sha1(json.dumps(list(token_ids or [])).encode()).hexdigest()[:16]


class RoutingArgsError(ValueError):
    """A malformed per-request routing setting; `key` names the argument (e.g. ``routertune_force``)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class RequestSettings:
    """One request's routing settings: forced decisions, or its own threshold (neither: the export's)."""

    forcing: Forcing | None = None
    threshold: float | None = None


def _layer_list(key: str, value, routed_layers) -> frozenset[int]:
    allowed = f"routed layers {list(routed_layers)}" if routed_layers is not None else "routed layer indices"
    if not isinstance(value, (list, tuple)):
        raise RoutingArgsError(
            key, f"{key}={value!r}: expected a JSON list of layer indices, e.g. [2, 3], among the {allowed}"
        )
    layers = []
    for item in value:
        # integers, or strings of digits (vllm_xargs lists may carry strings); never bools, floats, words
        if isinstance(item, bool) or not (isinstance(item, int) or isinstance(item, str) and item.strip().isdigit()):
            raise RoutingArgsError(
                key, f"{key}={value!r}: {item!r} is not a layer index; expected a list of integers among the {allowed}"
            )
        layers.append(int(item))
    if routed_layers is not None:
        unknown = sorted(set(layers) - set(routed_layers))
        if unknown:
            raise RoutingArgsError(
                key, f"{key}={value!r}: layers {unknown} are not routed; this model routes layers {list(routed_layers)}"
            )
    return frozenset(layers)


def parse_settings(extra_args, routed_layers=None) -> RequestSettings | None:
    """This request's routing settings from SamplingParams.extra_args (flat ``routertune_*`` keys or the nested
    ``routertune`` dict), checked; None when it has none. `routed_layers` (when known) bounds skip_layers.
    Raises RoutingArgsError naming the key and the allowed values."""
    if not extra_args:
        return None
    if not isinstance(extra_args, dict):
        raise RoutingArgsError("extra_args", f"extra_args={extra_args!r}: expected a dict")
    flat = {k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith(FLAT_PREFIX)}
    nested = extra_args.get(EXTRA_ARGS_KEY)
    unknown = sorted(set(flat) - set(FLAT_KEYS))
    if unknown:
        raise RoutingArgsError(unknown[0], f"unknown routing argument(s) {unknown}; routertune reads {list(FLAT_KEYS)}")
    if nested is not None:
        if flat:
            raise RoutingArgsError(
                EXTRA_ARGS_KEY,
                f"extra_args has both {EXTRA_ARGS_KEY!r} and {sorted(flat)}: "
                "give the flat keys or the nested dict, not both",
            )
        if not isinstance(nested, dict):
            raise RoutingArgsError(
                EXTRA_ARGS_KEY,
                f"extra_args[{EXTRA_ARGS_KEY!r}]={nested!r}: expected "
                "{'force': 'run' | 'skip' | 'skip_set', 'skip_layers': [...]} "
                "or {'threshold': t}",
            )
        names = {"force": FORCE_KEY, "skip_layers": SKIP_LAYERS_KEY, "threshold": THRESHOLD_KEY}
        extra = sorted(set(nested) - set(names))
        if extra:
            raise RoutingArgsError(
                EXTRA_ARGS_KEY, f"extra_args[{EXTRA_ARGS_KEY!r}] has unknown keys {extra}; known: {sorted(names)}"
            )
        flat = {names[k]: v for k, v in nested.items()}
    if not flat:
        return None
    force = flat.get(FORCE_KEY)
    if force is not None and force not in FORCE_MODES:
        raise RoutingArgsError(
            FORCE_KEY,
            f"{FORCE_KEY}={force!r}: expected one of {list(FORCE_MODES)} ('skip_set' with routertune_skip_layers)",
        )
    forcing = None
    if force is not None:
        skip = frozenset()
        if force == "skip_set":
            if SKIP_LAYERS_KEY not in flat:
                raise RoutingArgsError(
                    SKIP_LAYERS_KEY,
                    f"{FORCE_KEY}='skip_set' needs {SKIP_LAYERS_KEY}: a JSON "
                    "list of the routed layers to skip, e.g. [2, 3]",
                )
            skip = _layer_list(SKIP_LAYERS_KEY, flat[SKIP_LAYERS_KEY], routed_layers)
        forcing = Forcing(force, skip)
    if SKIP_LAYERS_KEY in flat and force != "skip_set":
        raise RoutingArgsError(
            SKIP_LAYERS_KEY, f"{SKIP_LAYERS_KEY} applies only with {FORCE_KEY}='skip_set' (got {FORCE_KEY}={force!r})"
        )
    threshold = flat.get(THRESHOLD_KEY)
    if threshold is not None:
        if force is not None:
            raise RoutingArgsError(
                THRESHOLD_KEY,
                f"{THRESHOLD_KEY} applies only when the routers decide; "
                f"{FORCE_KEY}={force!r} fixes every decision: drop one of them",
            )
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
            or not 0 < threshold < 1
        ):
            raise RoutingArgsError(
                THRESHOLD_KEY,
                f"{THRESHOLD_KEY}={threshold!r}: expected a number strictly "
                "between 0 and 1 (a router runs its layer when score >= it)",
            )
        threshold = float(threshold)
    return RequestSettings(forcing, threshold)


def forcing_of(sampling_params) -> Forcing | None:
    """The per-request forcing in SamplingParams.extra_args (flat keys or the nested dict), checked."""
    settings = parse_settings(getattr(sampling_params, "extra_args", None))
    return settings.forcing if settings is not None else None


def check_request_args(sampling_params, routed_layers, never_run: dict | None = None) -> None:
    """The admission check (the plugin runs it where vLLM validates a request): raise RoutingArgsError for
    malformed settings. `routed_layers` is None for a model without routers, which takes none. `never_run`
    (ServeRouting.never_run of an `export --free-kv`): layers with no KV cache, so settings that could run them
    are refused."""
    extra = getattr(sampling_params, "extra_args", None)
    if routed_layers is None:
        ours = [
            k
            for k in (extra if isinstance(extra, dict) else ())
            if isinstance(k, str) and (k.startswith(FLAT_PREFIX) or k == EXTRA_ARGS_KEY)
        ]
        if ours:
            raise RoutingArgsError(
                ours[0],
                f"{ours}: this model has no routers (not a routed `routertune export`), "
                "so it takes no routing arguments",
            )
        return
    settings = parse_settings(extra, routed_layers)
    if settings is not None and never_run is not None:
        _check_never_run(settings, never_run)


def _check_never_run(settings: RequestSettings, never_run: dict) -> None:
    layers, bound = never_run["layers"], never_run["score_bound"]
    fix = "or serve an export made without --free-kv"
    forcing = settings.forcing
    if forcing is not None and forcing.mode == "run":
        raise RoutingArgsError(
            FORCE_KEY,
            f"{FORCE_KEY}='run': this export (`routertune export --free-kv`) has no KV cache for layers {layers}, "
            f"which its routers never run; use {FORCE_KEY}='skip_set' with those layers skipped, {fix}",
        )
    if forcing is not None and forcing.mode == "skip_set" and not set(layers) <= forcing.skip_layers:
        missing = sorted(set(layers) - forcing.skip_layers)
        raise RoutingArgsError(
            SKIP_LAYERS_KEY,
            f"{SKIP_LAYERS_KEY} must include layers {missing}: this export (`routertune export --free-kv`) has no "
            f"KV cache for them; add them to the list, {fix}",
        )
    if settings.threshold is not None and settings.threshold <= bound:
        raise RoutingArgsError(
            THRESHOLD_KEY,
            f"{THRESHOLD_KEY}={settings.threshold!r}: at or below {bound:.6g} the routers could run layers {layers}, "
            f"which this export (`routertune export --free-kv`) holds no KV cache for; pass a threshold above "
            f"{bound:.6g}, {fix}",
        )


_REFUSED_IN_RUNNER: set[str] = set()


def settings_of_runner(req_id: str, sampling_params) -> RequestSettings | None:
    """The settings inside the model runner: never raises (a raise there kills the engine for every request).
    Admission has refused malformed ones already; should one get through, it is logged and the routers decide."""
    try:
        return parse_settings(getattr(sampling_params, "extra_args", None))
    except ValueError as error:
        if req_id not in _REFUSED_IN_RUNNER:
            _REFUSED_IN_RUNNER.add(req_id)
            logger.error(
                "routertune: request %s reached the model runner with malformed routing settings (%s); "
                "its routers decide instead",
                req_id,
                error,
            )
        return None


def batch_of_runner(runner, layer_count: int | None = None) -> ServeBatch:
    """The step's requests from vLLM's model runner (GPUModelRunner and its CPU subclass); `layer_count`: how
    many routed layers the served model has."""
    num_reqs = runner.input_batch.num_reqs
    req_ids = list(runner.input_batch.req_ids[:num_reqs])
    requests, forcing, thresholds = [], [], []
    for req_id in req_ids:
        state = runner.requests[req_id]
        routing = getattr(state, _STATE_ATTR, None)
        if routing is None:
            routing = RequestRouting(
                prompt_len=int(state.num_prompt_tokens),
                prompt_sha1=prompt_sha1(state.prompt_token_ids),
                prompt_ids=tuple(state.prompt_token_ids or ()),
                prefix_cached=int(state.num_computed_tokens),
            )
            setattr(state, _STATE_ATTR, routing)
        requests.append(routing)
        settings = settings_of_runner(req_id, state.sampling_params)
        forcing.append(settings.forcing if settings is not None else None)
        thresholds.append(settings.threshold if settings is not None else None)
    return ServeBatch(req_ids, requests, forcing, thresholds, layer_count=layer_count)


def install_runner_hook() -> None:
    """Wrap GPUModelRunner._model_forward (inherited by the CPU runner) once per process. Only models that
    declare ``routertune_serving`` get a batch; others run untouched."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = getattr(GPUModelRunner, "_model_forward", None)
    if original is None:
        raise RuntimeError(
            "this vLLM has no GPUModelRunner._model_forward; routertune's serving plugin was built "
            "for vLLM 0.32 (pip install 'routertune[serve]' installs a matching version)"
        )
    if getattr(original, _HOOKED, False):
        return

    def _model_forward(self, *args, **kwargs):
        model = self.get_model()
        if not getattr(model, "routertune_serving", False):
            return original(self, *args, **kwargs)
        with serving(batch_of_runner(self, len(getattr(model, "routertune_layers", ())) or None)):
            return original(self, *args, **kwargs)

    setattr(_model_forward, _HOOKED, True)
    _model_forward.__wrapped__ = original
    GPUModelRunner._model_forward = _model_forward


def routed_section(model_config):
    """The ServeRouting of a routed export vLLM serves; None for a plain model or a static-drop export served
    by the routed classes (neither has routers)."""
    from .config import CONFIG_KEY, ServeRouting

    section = getattr(model_config.hf_config, CONFIG_KEY, None)
    if section is None or isinstance(section, dict) and section.get("static_skip") is not None:
        return None
    return ServeRouting.from_dict(section)


def routed_layers_of(model_config) -> list[int] | None:
    """The routed layers of the model vLLM serves (None: not a routed export), from its config.json section."""
    routing = routed_section(model_config)
    if routing is None:
        return None
    hf_config = model_config.hf_config
    text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
    return routing.router_config.resolved_layers(int(text_config.num_hidden_layers))


def never_run_of(model_config) -> dict | None:
    """ServeRouting.never_run of the model vLLM serves (`export --free-kv`), None otherwise."""
    routing = routed_section(model_config)
    return routing.never_run if routing is not None else None


def install_admission_check() -> None:
    """Wrap vLLM's InputProcessor._validate_params (where every request, from LLM.generate or the OpenAI server,
    is validated before it reaches the engine) once per process, so malformed routing settings are refused
    there: as vLLM's own VLLMValidationError (HTTP 400, ``param`` the key) that is also a ValueError. A raise
    inside the model runner instead would kill the engine for every request."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = getattr(InputProcessor, "_validate_params", None)
    if original is None:
        raise RuntimeError(
            "this vLLM has no InputProcessor._validate_params; routertune's serving plugin was "
            "built for vLLM 0.32 (pip install 'routertune[serve]' installs a matching version)"
        )
    if getattr(original, _HOOKED, False):
        return

    class RoutingArgsValidationError(VLLMValidationError, ValueError):
        pass

    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        if isinstance(params, SamplingParams):
            if not hasattr(self, "_routertune_routed_layers"):
                self._routertune_routed_layers = routed_layers_of(self.model_config)
                self._routertune_never_run = never_run_of(self.model_config)
            try:
                check_request_args(params, self._routertune_routed_layers, self._routertune_never_run)
            except RoutingArgsError as error:
                raise RoutingArgsValidationError(
                    str(error), parameter=error.key, value=(params.extra_args or {}).get(error.key)
                ) from None
        return result

    setattr(_validate_params, _HOOKED, True)
    _validate_params.__wrapped__ = original
    InputProcessor._validate_params = _validate_params

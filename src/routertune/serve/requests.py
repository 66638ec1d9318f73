"""Which requests a vLLM forward step holds, and their routing state: the one hook routertune adds to vLLM.

vLLM hands a model only token-level tensors; the batch layout (query_start_loc, seq_lens) comes from the
forward context, but not which request a row belongs to. Identity matters: decisions are taken once, at a
request's prefill, from its whole prompt, and must survive preemption (vLLM recomputes a preempted request
as one prefill over prompt + output, in new blocks). The model runner knows its requests
(``input_batch.req_ids``, one ``CachedRequestState`` per request, kept while a request is preempted and
dropped when it finishes), so one wrapper around ``GPUModelRunner._model_forward`` (the CPU runner inherits
it) publishes them in a context variable for the duration of the forward. The decisions themselves live on
the request's ``CachedRequestState``, never on modules, and end with the request.

Per-request forcing (benchmarks, audits): ``SamplingParams(extra_args={"routertune": {"force": "skip_set",
"skip_layers": [20, 21]}})``; ``"run"`` runs every routed layer, ``"skip"`` skips them all.

``ROUTERTUNE_SERVE_LOG=/path/log.jsonl`` appends one line per decided request (request id, prompt length and
hash, decision and score per routed layer) and one per recomputed (preempted) request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from contextvars import ContextVar
from dataclasses import dataclass, field

from routertune.routing.state import Forcing

LOG_ENV = "ROUTERTUNE_SERVE_LOG"
EXTRA_ARGS_KEY = "routertune"
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


@dataclass
class ServeBatch:
    """The requests of one forward step, in the runner's row order (the order of query_start_loc)."""

    req_ids: list[str]
    requests: list[RequestRouting]
    forcing: list[Forcing | None]
    layouts: dict = field(default_factory=dict)  # id(attention metadata) -> (query starts, seq lens) lists
    plans: dict = field(default_factory=dict)  # (decisions, id(metadata)) -> subset plan, reused across layers
    known: dict = field(default_factory=dict)  # layer -> (decisions known before the layer runs, rows to decide)
    recomputed: set[int] = field(default_factory=set)

    def finish(self) -> None:
        path = os.environ.get(LOG_ENV)
        lines = []
        for i, req in enumerate(self.requests):
            if i in self.recomputed:
                req.recomputes += 1
                lines.append({"event": "recomputed", "req_id": self.req_ids[i], "prompt_len": req.prompt_len,
                              "prompt_sha1": req.prompt_sha1, "recomputes": req.recomputes})
            if not req.logged and req.decisions:
                req.logged = True
                lines.append({"event": "decided", "req_id": self.req_ids[i], "prompt_len": req.prompt_len,
                              "prompt_sha1": req.prompt_sha1,
                              "forced": self.forcing[i].mode if self.forcing[i] is not None else None,
                              "decisions": {str(k): v for k, v in sorted(req.decisions.items())},
                              "scores": {str(k): v for k, v in sorted(req.scores.items())}})
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


def forcing_of(sampling_params) -> Forcing | None:
    """The per-request override in SamplingParams.extra_args["routertune"], checked."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    spec = extra.get(EXTRA_ARGS_KEY)
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("force") not in ("run", "skip", "skip_set"):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]={spec!r}: expected {{'force': 'run' | 'skip' | "
                         "'skip_set', 'skip_layers': [...]}}")
    return Forcing(spec["force"], frozenset(int(i) for i in spec.get("skip_layers", ())))


def batch_of_runner(runner) -> ServeBatch:
    """The step's requests from vLLM's model runner (GPUModelRunner and its CPU subclass)."""
    num_reqs = runner.input_batch.num_reqs
    req_ids = list(runner.input_batch.req_ids[:num_reqs])
    requests, forcing = [], []
    for req_id in req_ids:
        state = runner.requests[req_id]
        routing = getattr(state, _STATE_ATTR, None)
        if routing is None:
            routing = RequestRouting(prompt_len=int(state.num_prompt_tokens),
                                     prompt_sha1=prompt_sha1(state.prompt_token_ids))
            setattr(state, _STATE_ATTR, routing)
        requests.append(routing)
        forcing.append(forcing_of(state.sampling_params))
    return ServeBatch(req_ids, requests, forcing)


def install_runner_hook() -> None:
    """Wrap GPUModelRunner._model_forward (inherited by the CPU runner) once per process. Only models that
    declare ``routertune_serving`` get a batch; others run untouched."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = getattr(GPUModelRunner, "_model_forward", None)
    if original is None:
        raise RuntimeError("this vLLM has no GPUModelRunner._model_forward; routertune's serving plugin was built "
                           "for vLLM 0.32 (pip install 'routertune[serve]' installs a matching version)")
    if getattr(original, _HOOKED, False):
        return

    def _model_forward(self, *args, **kwargs):
        if not getattr(self.get_model(), "routertune_serving", False):
            return original(self, *args, **kwargs)
        with serving(batch_of_runner(self)):
            return original(self, *args, **kwargs)

    setattr(_model_forward, _HOOKED, True)
    _model_forward.__wrapped__ = original
    GPUModelRunner._model_forward = _model_forward

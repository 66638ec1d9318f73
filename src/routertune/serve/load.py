"""A load test of `routertune serve` (vLLM's OpenAI-compatible server on a routed export), over loopback HTTP.

Many completions requests at once (bounded concurrency), with mixed prompt lengths and mixed per-request routing
settings (the routers deciding, ``routertune_force`` run / skip / skip_set with layers, ``routertune_threshold``),
some streamed and some of those closed by the client after a few chunks, and a few malformed ones. Checked:

* every completed response (greedy) equals the same request served alone afterwards, token for token, and a
  cancelled stream's tokens are a prefix of it;
* the routing log's decisions of every request that reached the engine equal those of the request served alone,
  and its line names the forcing / threshold that request asked for (no request sees another's settings);
* malformed settings are answered 400 naming the key, and never reach the engine (no routing log line);
* no request fails otherwise; the server still answers /health and a normal request; the engine ends with
  nothing running or waiting, and counts the client's cancellations as aborts;
* the server's memory (RSS of its process tree) after the load is back near its idle level, idle measured after
  a warm-up round (allocators keep what the first requests grew).

``benchmarks/serve_load.py`` runs it on a fresh server; tests/test_serve_http.py runs a small version on its own.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

COMPLETIONS = "/v1/completions"
MIB = 1024 * 1024


@dataclass
class LoadRequest:
    """One request of the load: a completions body (without its request id), how the client reads it, and what
    it expects."""

    kind: str  # "routers" | "run" | "skip" | "skip_set" | "threshold" | "malformed"
    body: dict
    stream: bool = False
    cancel_after: int | None = None  # streamed: close the connection after this many chunks
    expect_param: str | None = None  # malformed: the key the 400 must name

    @property
    def key(self) -> str:
        """The distinct request (equal keys: the same prompt, settings and limits)."""
        return json.dumps([self.body, self.stream], sort_keys=True)

    @property
    def xargs(self) -> dict:
        return self.body.get("vllm_xargs") or {}


@dataclass
class Outcome:
    """What the client saw for one request."""

    request_id: str
    status: int | None = None  # HTTP status; None: the connection failed
    tokens: list[int] = field(default_factory=list)
    top_logprobs: list[dict] = field(default_factory=list)  # per token: {"token_id:N": logprob}
    finish_reason: str | None = None
    chunks: int = 0
    cancelled: bool = False
    error: str | None = None  # a 4xx/5xx body's error, or the exception
    param: str | None = None  # a 400's error.param
    error_code: int | None = None  # the code of a streamed response's error event (its HTTP status was 200)
    seconds: float = 0.0


def completion(
    kind: str,
    model: str,
    prompt: list[int],
    max_tokens: int,
    xargs: dict | None = None,
    *,
    stream: bool = False,
    cancel_after: int | None = None,
    min_tokens: int | None = None,
    expect_param: str | None = None,
) -> LoadRequest:
    """A greedy completions request for token ids `prompt`; the response carries its token ids and each token's
    top-2 log-probabilities (how close a greedy choice was, should two runs differ)."""
    body = {
        "model": model,
        "prompt": list(prompt),
        "max_tokens": int(max_tokens),
        "temperature": 0.0,
        "return_token_ids": True,
        "logprobs": 2,
        "return_tokens_as_token_ids": True,
    }
    if min_tokens is not None:
        body["min_tokens"] = int(min_tokens)
    if xargs:
        body["vllm_xargs"] = dict(xargs)
    return LoadRequest(kind, body, stream, cancel_after, expect_param)


def text_prompts(tokenizer, texts: list[str], lengths: list[int]) -> list[list[int]]:
    """One prompt of exactly each length: windows of the concatenated texts' tokens, each from a new place."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
    if len(stream) < max(lengths):
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than the longest prompt ({max(lengths)})")
    prompts, start = [], 0
    for length in lengths:
        if start + length > len(stream):
            start = 0
        prompts.append(stream[start : start + length])
        start += length // 2 + 7
    return prompts


def malformed_requests(model: str, prompt: list[int], routed_layers: list[int]) -> list[LoadRequest]:
    """Routing settings the admission check must refuse (HTTP 400 naming the key), two of them streamed; and, as
    a control, a setting vLLM itself refuses at the same place (logprobs beyond its maximum), plain and streamed.
    vLLM 0.32 validates a streamed request only once its stream has begun: the refusal comes as the stream's
    error event (code 400, the key as param) after HTTP 200, for vLLM's own checks as for routertune's."""
    outside = next(layer for layer in range(max(routed_layers) + 2) if layer not in routed_layers)
    cases = [
        ({"routertune_force": "sometimes"}, "routertune_force", False),
        (
            {"routertune_force": "skip_set", "routertune_skip_layers": [routed_layers[0], outside]},
            "routertune_skip_layers",
            False,
        ),
        ({"routertune_threshold": 1.5}, "routertune_threshold", True),
        ({"routertune_skip_layers": [routed_layers[-1]]}, "routertune_skip_layers", False),
        ({"routertune_force": "run", "routertune_threshold": 0.4}, "routertune_threshold", False),
        ({"routertune_treshold": 0.4}, "routertune_treshold", True),
    ]
    requests = [
        completion("malformed", model, prompt, 4, xargs, stream=stream, expect_param=param)
        for xargs, param, stream in cases
    ]
    for stream in (False, True):
        control = completion("malformed", model, prompt, 4, stream=stream, expect_param="logprobs")
        control.body["logprobs"] = 1000
        requests.append(control)
    return requests


def settings_mix(routed_layers: list[int], thresholds: list[float], rng: random.Random) -> tuple[str, dict | None]:
    """One request's routing settings, drawn: the routers (most often), forced run / skip, a random skip set,
    or a request threshold."""
    kind = rng.choice(["routers", "routers", "run", "skip", "skip_set", "skip_set", "threshold", "threshold"])
    if kind == "routers":
        return kind, None
    if kind in ("run", "skip"):
        return kind, {"routertune_force": kind}
    if kind == "skip_set":
        size = rng.randint(1, max(1, len(routed_layers) // 2))
        return kind, {
            "routertune_force": "skip_set",
            "routertune_skip_layers": sorted(rng.sample(list(routed_layers), size)),
        }
    return kind, {"routertune_threshold": rng.choice(thresholds)}


def build_mix(
    model: str,
    prompts: list[list[int]],
    routed_layers: list[int],
    *,
    distinct: int,
    repeats: int,
    seed: int = 0,
    thresholds=(0.3, 0.5, 0.7),
    max_tokens=(8, 16, 24),
    stream_every: int = 3,
    cancel_every: int = 2,
    cancel_max_tokens: int = 48,
    pinned: list[LoadRequest] = (),
) -> list[LoadRequest]:
    """`distinct` requests drawn over `prompts` and the settings, plus `pinned` ones, plus `repeats` copies of
    drawn ones (the same request twice at once must not matter either), plus the malformed ones; shuffled.
    Every `stream_every`-th drawn request is streamed, every `cancel_every`-th of those is cancelled after 2-4
    chunks (with `cancel_max_tokens`, so that it is still generating when the client leaves)."""
    rng = random.Random(seed)
    drawn: list[LoadRequest] = []
    streamed = 0
    for i in range(distinct):
        prompt = prompts[i % len(prompts)]
        kind, xargs = settings_mix(routed_layers, list(thresholds), rng)
        stream = i % stream_every == stream_every - 1
        cancel_after = None
        if stream:
            streamed += 1
            if streamed % cancel_every == 0:
                cancel_after = rng.randint(2, 4)
        tokens = cancel_max_tokens if cancel_after else rng.choice(list(max_tokens))
        drawn.append(completion(kind, model, prompt, tokens, xargs, stream=stream, cancel_after=cancel_after))
    mix = drawn + list(pinned)
    mix += [drawn[rng.randrange(len(drawn))] for _ in range(repeats)]
    mix += malformed_requests(model, min(prompts, key=len), list(routed_layers))
    rng.shuffle(mix)
    return mix


# --- the client ------------------------------------------------------------------------------------------------
def _read_choice(outcome: Outcome, choice: dict) -> None:
    outcome.tokens += list(choice.get("token_ids") or [])
    logprobs = choice.get("logprobs") or {}
    outcome.top_logprobs += list(logprobs.get("top_logprobs") or [])
    if choice.get("finish_reason"):
        outcome.finish_reason = choice["finish_reason"]


async def send(client, base_url: str, request: LoadRequest, request_id: str) -> Outcome:
    """Send one request; a streamed one whose `cancel_after` chunks have come is closed there: leaving the
    stream unread makes httpx close the connection, which the server sees as the client gone."""
    outcome = Outcome(request_id)
    body = dict(request.body, request_id=request_id, stream=request.stream)
    started = time.perf_counter()
    try:
        if not request.stream:
            response = await client.post(base_url + COMPLETIONS, json=body)
            outcome.status = response.status_code
            data = response.json() if response.content else {}
            if response.status_code == 200:
                _read_choice(outcome, data["choices"][0])
            else:
                _read_error(outcome, data)
        else:
            async with client.stream("POST", base_url + COMPLETIONS, json=body) as response:
                outcome.status = response.status_code
                if response.status_code != 200:
                    raw = await response.aread()
                    _read_error(outcome, json.loads(raw) if raw else {})
                else:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        payload = line[len("data: ") :]
                        if payload.strip() == "[DONE]":
                            break
                        data = json.loads(payload)
                        if "error" in data:  # an error after the 200: the stream's own error event
                            _read_error(outcome, data)
                            code = data["error"].get("code") if isinstance(data["error"], dict) else None
                            outcome.error_code = int(code) if code is not None else -1
                            break
                        outcome.chunks += 1
                        _read_choice(outcome, data["choices"][0])
                        if (
                            request.cancel_after
                            and outcome.chunks >= request.cancel_after
                            and outcome.finish_reason is None
                        ):
                            outcome.cancelled = True
                            break
    except Exception as error:  # noqa: BLE001 - a failed request is counted and reported, not raised
        outcome.status, outcome.error = None, f"{type(error).__name__}: {error}"
    outcome.seconds = time.perf_counter() - started
    return outcome


def _read_error(outcome: Outcome, data: dict) -> None:
    error = data.get("error", data)
    if isinstance(error, dict):
        outcome.error, outcome.param = str(error.get("message")), error.get("param")
    else:
        outcome.error = str(error)


async def _drive(base_url: str, requests: list[tuple[str, LoadRequest]], concurrency: int) -> list[Outcome]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for index, item in enumerate(requests):
        queue.put_nowait((index, item))
    outcomes: list[Outcome | None] = [None] * len(requests)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:

        async def worker():
            while not queue.empty():
                index, (request_id, request) = queue.get_nowait()
                outcomes[index] = await send(client, base_url, request, request_id)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes  # type: ignore[return-value]


def drive(base_url: str, requests: list[tuple[str, LoadRequest]], concurrency: int) -> list[Outcome]:
    """Send (request id, request) pairs with at most `concurrency` in flight; outcomes in the same order."""
    return asyncio.run(_drive(base_url, requests, concurrency))


# --- the server's side: memory, metrics, routing log -------------------------------------------------------------
def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants (vLLM's API server and engine core), in bytes."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass  # a helper that ended between the listing and the read
    return total


class MemorySampler:
    """Samples tree_rss(pid) every `interval` seconds on a thread; `peak` is the largest sample."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.samples = pid, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


def settled_rss(pid: int, seconds: float = 3.0, samples: int = 7) -> int:
    """The median of a few samples over `seconds`, after the server went quiet."""
    values = []
    for _ in range(samples):
        values.append(tree_rss(pid))
        time.sleep(seconds / samples)
    return int(statistics.median(values))


def _get(url: str, timeout: float = 30.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except Exception as error:  # noqa: BLE001 - reported by the caller
        return -1, f"{type(error).__name__}: {error}"


_METRIC = re.compile(r"^(vllm:[\w:]+)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN)$")


def engine_metrics(base_url: str) -> dict[str, float]:
    """From vLLM's Prometheus /metrics: requests running and waiting now, and tokens generated so far (summed
    over the engine and model labels). vLLM 0.32 counts no aborted requests there (request_success has an
    "abort" label that stays 0 when clients leave), so a cancellation shows as tokens never generated."""
    status, text = _get(base_url + "/metrics")
    if status != 200:
        raise RuntimeError(f"{base_url}/metrics answered {status}: {text[:300]}")
    found = {"running": 0.0, "waiting": 0.0, "generated": 0.0}
    for line in text.splitlines():
        match = _METRIC.match(line.strip())
        if not match:
            continue
        name, value = match.group(1), float(match.group(3))
        if name == "vllm:num_requests_running":
            found["running"] += value
        elif name == "vllm:num_requests_waiting":
            found["waiting"] += value
        elif name == "vllm:generation_tokens_total":
            found["generated"] += value
    return found


def wait_idle(base_url: str, timeout: float = 300.0) -> dict[str, float]:
    """Wait until the engine holds no running or waiting request; the last metrics read."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = engine_metrics(base_url)
        if metrics["running"] == 0 and metrics["waiting"] == 0 or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


def decided_lines(log: Path, request_id: str) -> list[dict]:
    """The routing log's "decided" lines of one HTTP request: vLLM's id is cmpl-<request id>-<prompt index>-<8>."""
    if not Path(log).exists():
        return []
    prefix = f"cmpl-{request_id}-0-"
    lines = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    return [line for line in lines if line["event"] == "decided" and line["req_id"].startswith(prefix)]


# --- the checks ----------------------------------------------------------------------------------------------
def _gap(top: dict | None) -> float | None:
    """The two best log-probabilities' difference at one step (None: not returned)."""
    if not top or len(top) < 2:
        return None
    best = sorted(top.values(), reverse=True)
    return best[0] - best[1]


def compare(request: LoadRequest, loaded: Outcome, alone: Outcome) -> dict | None:
    """None if the loaded outcome agrees with the request served alone (equal tokens; for a cancelled stream, a
    prefix), else what differs, with the greedy margin where they first part."""
    if loaded.cancelled:
        agree = alone.tokens[: len(loaded.tokens)] == loaded.tokens and len(loaded.tokens) <= len(alone.tokens)
    else:
        agree = loaded.tokens == alone.tokens and loaded.finish_reason == alone.finish_reason
    if agree:
        return None
    first = next(
        (i for i, (a, b) in enumerate(zip(loaded.tokens, alone.tokens)) if a != b),
        min(len(loaded.tokens), len(alone.tokens)),
    )
    return {
        "request_id": loaded.request_id,
        "kind": request.kind,
        "cancelled": loaded.cancelled,
        "first_difference": first,
        "loaded": loaded.tokens,
        "alone": alone.tokens,
        "loaded_finish": loaded.finish_reason,
        "alone_finish": alone.finish_reason,
        "alone_margin_there": _gap(alone.top_logprobs[first] if first < len(alone.top_logprobs) else None),
    }


def expected_settings(request: LoadRequest) -> tuple[str | None, float | None]:
    """(forced, threshold) as the routing log must record them for this request."""
    xargs = request.xargs
    threshold = xargs.get("routertune_threshold")
    return xargs.get("routertune_force"), float(threshold) if threshold is not None else None


@dataclass
class MemoryCriterion:
    """Memory is back when final <= idle + max(fraction * idle, absolute_mib)."""

    fraction: float = 0.05
    absolute_mib: float = 64.0

    def allowance(self, idle: int) -> int:
        return int(max(self.fraction * idle, self.absolute_mib * MIB))

    def text(self) -> str:
        return (
            f"final RSS of the server's process tree (after the load, engine idle, median of 7 samples over "
            f"3 s) <= idle RSS (measured the same way after a warm-up round) + max({self.fraction:.0%} of "
            f"idle, {self.absolute_mib:g} MiB)"
        )


def refused_as_expected(request: LoadRequest, outcome: Outcome) -> bool:
    """A malformed request was refused naming its key: HTTP 400, or (streamed) HTTP 200 then an error event with
    code 400 and no tokens."""
    if request.stream:
        refused = outcome.status == 200 and outcome.error_code == 400 and not outcome.tokens
    else:
        refused = outcome.status == 400
    return refused and outcome.param == request.expect_param and request.expect_param in (outcome.error or "")


def run_load_test(
    base_url: str,
    model: str,
    mix: list[LoadRequest],
    *,
    log: Path,
    server_pid: int,
    concurrency: int,
    warmup: list[LoadRequest],
    prefix: str = "load",
    criterion: MemoryCriterion | None = None,
) -> dict:
    """Warm up, measure idle memory, run `mix` with `concurrency` in flight (sampling memory), let it settle,
    replay each distinct request alone, check; returns the summary (and per-request detail under "detail")."""
    criterion = criterion or MemoryCriterion()
    started = time.perf_counter()
    warm = drive(base_url, [(f"{prefix}-warm-{i}", r) for i, r in enumerate(warmup)], concurrency)
    warm_failures = [
        asdict(o)
        for o, r in zip(warm, warmup)
        if (not refused_as_expected(r, o) if r.expect_param else o.status != 200 or o.error)
    ]
    before = wait_idle(base_url)
    idle = settled_rss(server_pid)

    ids = [f"{prefix}-{i}" for i in range(len(mix))]
    load_started = time.perf_counter()
    with MemorySampler(server_pid) as sampler:
        outcomes = drive(base_url, list(zip(ids, mix)), concurrency)
    load_s = time.perf_counter() - load_started
    after = wait_idle(base_url)
    final = settled_rss(server_pid)
    peak = max(sampler.peak, idle, final)

    # every distinct admissible request once more, alone
    distinct: dict[str, LoadRequest] = {}
    for request in mix:
        if request.expect_param is None:
            distinct.setdefault(request.key, request)
    alone_ids = {key: f"{prefix}-alone-{k}" for k, key in enumerate(distinct)}
    alone_started = time.perf_counter()
    alone = {}
    for key, request in distinct.items():
        full = LoadRequest(request.kind, request.body, request.stream, None, None)  # read to the end
        alone[key] = drive(base_url, [(alone_ids[key], full)], 1)[0]
    alone_s = time.perf_counter() - alone_started

    errors, wrong_refusals, mismatches, decision_mismatches, settings_mismatches = [], [], [], [], []
    refused = refused_in_stream = 0
    completed = cancelled = 0
    for request, outcome in zip(mix, outcomes):
        if request.expect_param is not None:
            if refused_as_expected(request, outcome):
                refused += 1
                refused_in_stream += request.stream
            else:
                wrong_refusals.append(asdict(outcome) | {"expected_param": request.expect_param})
            if decided_lines(log, outcome.request_id):
                wrong_refusals.append({"request_id": outcome.request_id, "reached_the_engine": True})
            continue
        if outcome.status != 200 or outcome.error or (not outcome.cancelled and outcome.finish_reason is None):
            errors.append(asdict(outcome))
            continue
        cancelled += outcome.cancelled
        completed += not outcome.cancelled
        reference = alone[request.key]
        if reference.status != 200:
            errors.append(asdict(reference) | {"alone_of": outcome.request_id})
            continue
        differs = compare(request, outcome, reference)
        if differs:
            mismatches.append(differs)
        mine, theirs = decided_lines(log, outcome.request_id), decided_lines(log, reference.request_id)
        if len(mine) != 1 or len(theirs) != 1 or mine[0]["decisions"] != theirs[0]["decisions"]:
            decision_mismatches.append(
                {
                    "request_id": outcome.request_id,
                    "kind": request.kind,
                    "loaded": [line["decisions"] for line in mine],
                    "alone": [line["decisions"] for line in theirs],
                }
            )
        for line in mine:
            if (line["forced"], line["threshold"]) != expected_settings(request):
                settings_mismatches.append(
                    {
                        "request_id": outcome.request_id,
                        "asked": request.xargs,
                        "logged": {"forced": line["forced"], "threshold": line["threshold"]},
                    }
                )
    score_diffs = []
    for request, outcome in zip(mix, outcomes):
        if request.expect_param is None and outcome.status == 200 and request.key in alone:
            mine, theirs = decided_lines(log, outcome.request_id), decided_lines(log, alone[request.key].request_id)
            if len(mine) == 1 and len(theirs) == 1:
                score_diffs += [
                    abs(v - theirs[0]["scores"][k]) for k, v in mine[0]["scores"].items() if k in theirs[0]["scores"]
                ]

    # still serving: /health, and a normal request equal to its alone run
    health, _ = _get(base_url + "/health")
    probe_request = next(r for r in distinct.values() if r.kind == "routers" and not r.stream)
    probe = drive(base_url, [(f"{prefix}-after", probe_request)], 1)[0]
    probe_ok = probe.status == 200 and probe.tokens == alone[probe_request.key].tokens
    end_metrics = wait_idle(base_url)
    end_rss = settled_rss(server_pid)

    received = sum(len(o.tokens) for o in outcomes if o.status == 200)
    left_unread = sum(r.body["max_tokens"] - len(o.tokens) for r, o in zip(mix, outcomes) if o.cancelled)
    mix_counts: dict[str, int] = {}
    for request in mix:
        mix_counts[request.kind] = mix_counts.get(request.kind, 0) + 1
    lengths = [len(r.body["prompt"]) for r in mix]
    streamed = [r for r in mix if r.stream and r.expect_param is None]
    memory_ok = final <= idle + criterion.allowance(idle)
    return {
        "requests": len(mix),
        "completed": completed,
        "cancelled": cancelled,
        "errors": len(errors),
        "refused_400": refused,
        "refused_400_in_stream": refused_in_stream,
        "wrong_refusals": len(wrong_refusals),
        "mismatches_vs_alone": len(mismatches),
        "decision_mismatches": len(decision_mismatches),
        "settings_mismatches": len(settings_mismatches),
        "distinct_requests": len(distinct),
        "concurrency": concurrency,
        "warmup": {"requests": len(warmup), "failures": len(warm_failures)},
        "mix": {
            "settings": mix_counts,
            "streamed": len(streamed),
            "cancel_requested": sum(1 for r in streamed if r.cancel_after),
            "repeated_requests": len(mix) - len(distinct) - sum(1 for r in mix if r.expect_param),
            "prompt_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
            "max_tokens": sorted({r.body["max_tokens"] for r in mix}),
            "thresholds": sorted({r.xargs["routertune_threshold"] for r in mix if r.kind == "threshold"}),
            "skip_sets": len({json.dumps(r.xargs.get("routertune_skip_layers")) for r in mix if r.kind == "skip_set"}),
        },
        "generated_tokens": sum(len(o.tokens) for o in outcomes if o.status == 200),
        "router_score_max_abs_diff_vs_alone": max(score_diffs, default=0.0),
        "engine": {
            "before_load": before,
            "after_load": after,
            "end": end_metrics,
            "generated_during_load": after["generated"] - before["generated"],
            "received_during_load": received,
            # what the engine would have generated for the cancelled streams had it not aborted them
            "cancelled_streams_left_unread": left_unread,
            "idle_after_load": after["running"] == 0 and after["waiting"] == 0,
        },
        "memory": {
            "idle_mib": idle / MIB,
            "peak_mib": peak / MIB,
            "final_mib": final / MIB,
            "end_mib": end_rss / MIB,
            "final_minus_idle_mib": (final - idle) / MIB,
            "samples_during_load": len(sampler.samples),
            "criterion": criterion.text(),
            "allowance_mib": criterion.allowance(idle) / MIB,
            "returned_to_idle": memory_ok,
        },
        "still_serving": {"health": health, "normal_request_equal_to_alone": probe_ok, "server_alive": None},
        "wall_s": {"load": load_s, "alone_replay": alone_s, "total": time.perf_counter() - started},
        "detail": {
            "errors": errors,
            "wrong_refusals": wrong_refusals,
            "mismatches": mismatches,
            "decision_mismatches": decision_mismatches,
            "settings_mismatches": settings_mismatches,
            "warmup_failures": warm_failures,
            "requests": [
                {
                    "request_id": o.request_id,
                    "kind": r.kind,
                    "stream": r.stream,
                    "cancel_after": r.cancel_after,
                    "prompt_tokens": len(r.body["prompt"]),
                    "max_tokens": r.body["max_tokens"],
                    "xargs": r.xargs,
                    "status": o.status,
                    "tokens": o.tokens,
                    "finish_reason": o.finish_reason,
                    "cancelled": o.cancelled,
                    "seconds": round(o.seconds, 3),
                }
                for r, o in zip(mix, outcomes)
            ],
        },
    }


def passed(result: dict) -> list[str]:
    """What failed (empty: the load test passed)."""
    problems = []
    for key in ("errors", "wrong_refusals", "mismatches_vs_alone", "decision_mismatches", "settings_mismatches"):
        if result[key]:
            problems.append(f"{key}: {result[key]}")
    if result["warmup"]["failures"]:
        problems.append(f"warm-up failures: {result['warmup']['failures']}")
    if not result["engine"]["idle_after_load"]:
        problems.append(f"the engine still holds requests after the load: {result['engine']['after_load']}")
    engine = result["engine"]
    unread = engine["generated_during_load"] - engine["received_during_load"]
    if unread > 0.5 * engine["cancelled_streams_left_unread"]:
        problems.append(
            f"the engine generated {unread:g} tokens no client read; the {result['cancelled']} cancelled "
            f"streams would have left {engine['cancelled_streams_left_unread']} (not aborted?)"
        )
    if result["still_serving"]["health"] != 200 or not result["still_serving"]["normal_request_equal_to_alone"]:
        problems.append(f"not serving after the load: {result['still_serving']}")
    if not result["memory"]["returned_to_idle"]:
        problems.append(f"memory: {result['memory']}")
    return problems

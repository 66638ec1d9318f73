"""Serving as vLLM users serve: `routertune serve EXPORT` starts vLLM's OpenAI-compatible server (its normal
multi-process engine) on a tiny routed export, and per-request routing settings travel over HTTP as flat
`vllm_xargs` keys. Checked on one server: the routers' own decisions, `routertune_force` = run / skip / skip_set
(+ `routertune_skip_layers`) and `routertune_threshold`, each against an independent reference (the plain
Hugging Face model with the skipped attention outputs zeroed, tests/reference.py) and against the routing
log; malformed settings answered 400 naming the key, and the server still serving afterwards.

Also: the same settings parsed without an engine, `routertune serve`'s refusals, and `LLM.generate` raising
ValueError for a malformed setting while its engine keeps serving.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reference import SkipReference
from routertune import RoutedModel, RouterConfig
from routertune.routing.state import Forcing
from routertune.serve.requests import RequestSettings, check_request_args, forcing_of, parse_settings
from tiny_lm import tiny_tokenizer

LAYERS = [1, 2, 3]
NEW_TOKENS = 12
PROMPT = "The quick brown fox jumps over"
MIN_MARGIN = 0.02  # every router score lies this far from its threshold (vLLM and HF differ ~1e-6)
SERVER_ENV = dict(
    VLLM_CPU_KVCACHE_SPACE="1",
    VLLM_CPU_OMP_THREADS_BIND="nobind",
    OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
)


def _needs_vllm():
    pytest.importorskip("vllm", reason="needs the routertune[serve] extra (vLLM)")


# --- the settings without an engine ----------------------------------------------------------------------
def test_flat_and_nested_settings_parse_alike():
    flat = {"routertune_force": "skip_set", "routertune_skip_layers": [1, "3"], "other_extension": "x"}
    assert parse_settings(flat, LAYERS) == RequestSettings(Forcing("skip_set", frozenset({1, 3})), None)
    assert parse_settings({"routertune": {"force": "skip_set", "skip_layers": [1, 3]}}, LAYERS) == parse_settings(
        flat, LAYERS
    )
    assert parse_settings({"routertune_threshold": 0.25}) == RequestSettings(None, 0.25)
    assert parse_settings({"routertune": {"threshold": 0.25}}) == RequestSettings(None, 0.25)
    assert parse_settings({"other_extension": 1}) is None and parse_settings(None) is None
    assert forcing_of(SimpleNamespace(extra_args={"routertune_force": "skip"})) == Forcing("skip")


@pytest.mark.parametrize(
    "extra, key, says",
    [
        ({"routertune_force": "sometimes"}, "routertune_force", "['run', 'skip', 'skip_set']"),
        ({"routertune_force": 1}, "routertune_force", "['run', 'skip', 'skip_set']"),
        ({"routertune_force": "skip_set"}, "routertune_skip_layers", "needs routertune_skip_layers"),
        (
            {"routertune_force": "skip_set", "routertune_skip_layers": [0]},
            "routertune_skip_layers",
            "routes layers [1, 2, 3]",
        ),
        ({"routertune_force": "skip_set", "routertune_skip_layers": "1,2"}, "routertune_skip_layers", "JSON list"),
        ({"routertune_force": "skip_set", "routertune_skip_layers": [1.5]}, "routertune_skip_layers", "not a layer"),
        ({"routertune_skip_layers": [1]}, "routertune_skip_layers", "only with routertune_force='skip_set'"),
        ({"routertune_force": "skip", "routertune_skip_layers": [1]}, "routertune_skip_layers", "only with"),
        ({"routertune_threshold": 1.5}, "routertune_threshold", "strictly between 0 and 1"),
        ({"routertune_threshold": 0}, "routertune_threshold", "strictly between 0 and 1"),
        ({"routertune_threshold": "0.3"}, "routertune_threshold", "strictly between 0 and 1"),
        ({"routertune_threshold": float("nan")}, "routertune_threshold", "strictly between 0 and 1"),
        ({"routertune_threshold": 0.3, "routertune_force": "run"}, "routertune_threshold", "only when the routers"),
        ({"routertune_treshold": 0.3}, "routertune_treshold", "routertune reads"),
        ({"routertune": {"force": "run"}, "routertune_threshold": 0.3}, "routertune", "not both"),
        ({"routertune": {"force": "sometimes"}}, "routertune_force", "skip_set"),
        ({"routertune": "run"}, "routertune", "expected"),
    ],
)
def test_malformed_settings_are_refused_naming_the_key(extra, key, says):
    with pytest.raises(ValueError) as caught:
        check_request_args(SimpleNamespace(extra_args=extra), LAYERS)
    assert caught.value.key == key and says in str(caught.value), str(caught.value)


def test_a_model_without_routers_takes_no_routing_settings():
    from routertune.serve.requests import routed_layers_of

    check_request_args(SimpleNamespace(extra_args={"other": 1}), None)
    with pytest.raises(ValueError, match="no routers"):
        check_request_args(SimpleNamespace(extra_args={"routertune_force": "run"}), None)

    def layers(section):
        config = SimpleNamespace(num_hidden_layers=4, get_text_config=lambda: SimpleNamespace(num_hidden_layers=4))
        if section is not None:
            config.routertune = section
        return routed_layers_of(SimpleNamespace(hf_config=config))

    assert layers(None) is None
    assert layers({"static_skip": [1, 2], "router_config": RouterConfig(layers=[1, 2]).to_dict()}) is None
    assert layers({"router_config": RouterConfig(layers=LAYERS).to_dict()}) == LAYERS


def test_free_kv_refuses_only_the_settings_that_could_run_a_never_run_layer():
    never_run = {"layers": [2], "score_bound": 0.25}

    def check(extra):
        check_request_args(SimpleNamespace(extra_args=extra), LAYERS, never_run)

    for extra, key in (
        ({"routertune_force": "run"}, "routertune_force"),
        ({"routertune_force": "skip_set", "routertune_skip_layers": [1]}, "routertune_skip_layers"),
        ({"routertune_threshold": 0.25}, "routertune_threshold"),  # a score may equal the bound: it would run
        ({"routertune_threshold": 0.1}, "routertune_threshold"),
    ):
        with pytest.raises(ValueError) as caught:
            check(extra)
        assert caught.value.key == key and "--free-kv" in str(caught.value), str(caught.value)
    for extra in (
        None,
        {"routertune_force": "skip"},
        {"routertune_force": "skip_set", "routertune_skip_layers": [2]},
        {"routertune_force": "skip_set", "routertune_skip_layers": [1, 2]},
        {"routertune_threshold": 0.2500001},
    ):
        check(extra)


def test_free_kv_finds_the_layers_whose_trust_region_caps_the_score_below_the_threshold():
    from routertune.serve.config import ServeRouting
    from routertune.serve.export import NEVER_RUN_MARGIN, never_run_layers

    def region(prior, high):
        return torch.tensor([prior, -math.inf, high])

    config = RouterConfig(layers=[1, 2, 3, 4], threshold=0.5, layer_thresholds={4: 0.9})
    state = {
        "layers.1.router.trust_region": region(-1.0, 0.0),  # capped at sigmoid(-1) ~ 0.27 < 0.5: never runs
        "layers.2.router.trust_region": region(-1.0, 1.0),  # capped at exactly 0.5: a score may reach it
        "layers.3.router.trust_region": region(-5.0, math.inf),  # no cap
        "layers.4.router.trust_region": region(1.0, 0.0),  # capped at 0.73 < its own threshold 0.9
    }
    found = never_run_layers(state, config)
    assert found["layers"] == [1, 4]
    assert found["score_bound"] == pytest.approx(1 / (1 + math.exp(-1.0)) + NEVER_RUN_MARGIN, abs=1e-12)
    # the served scores never exceed the bound: the router's own bounded logit, on inputs far outside
    from routertune.routing.router import Router

    router = Router(8)
    with torch.no_grad():
        router.weight.normal_(0, 10)
    router.set_trust_region(-1.0, -math.inf, 0.0)
    with torch.no_grad():
        scores = router(torch.randn(1000, 8) * 100)
    cap = 1 / (1 + math.exp(1.0))  # sigmoid(-1): layer 1's bound before the margin
    assert cap - 1e-6 < float(scores.max()) <= cap + NEVER_RUN_MARGIN  # reached (the region binds), never passed
    assert never_run_layers({k: region(0.0, math.inf) for k in state}, config) is None
    # the section round-trips, and is refused malformed
    serving = ServeRouting(config, never_run=found)
    assert ServeRouting.from_dict(serving.to_dict()).no_kv_layers() == [1, 4]
    with pytest.raises(ValueError, match="never_run"):
        ServeRouting.from_dict({**serving.to_dict(), "never_run": {"layers": [7], "score_bound": 0.3}})


# --- a tiny routed export ---------------------------------------------------------------------------------
def _tiny_model() -> LlamaForCausalLM:
    """A llama small enough to serve in seconds, with heads vLLM's CPU attention takes (head size 32)."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def _scores(routed: RoutedModel, ids: torch.Tensor) -> dict[int, float]:
    with torch.no_grad(), routed.recording() as calls:
        routed(input_ids=ids, use_cache=False)
    return {layer: float(calls[-1].scores[layer][0]) for layer in LAYERS}


def _place(score: float, run: bool) -> float:
    """A threshold MIN_MARGIN or more from `score` on the side that gives the wanted decision."""
    return score - MIN_MARGIN * 2 if run else score + MIN_MARGIN * 2


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """Routers whose export thresholds skip layers 1 and 3 and run layer 2 for PROMPT; a request threshold
    that decides differently; the greedy tokens and decisions of every setting from the reference."""
    from routertune.serve.export import ExportJob, export

    model, tokenizer = _tiny_model(), tiny_tokenizer()
    base = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    routed = RoutedModel(model, RouterConfig(layers=LAYERS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for router in routed.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 2 / math.sqrt(128))
            router.bias.zero_()
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    # place the export's per-layer thresholds one layer at a time (a layer's score depends on earlier decisions)
    wanted = {1: False, 2: True, 3: False}
    thresholds = {layer: 1e-6 for layer in LAYERS}
    for layer in LAYERS:
        routed.set_threshold(0.5, dict(thresholds))
        thresholds[layer] = _place(_scores(routed, ids)[layer], wanted[layer])
        assert 0 < thresholds[layer] < 1, thresholds
    routed.set_threshold(0.5, thresholds)
    routers = tmp_path_factory.mktemp("routers")
    routed.save_pretrained(routers)
    # a request threshold whose decisions are neither the export's nor all-run / all-skip, far from every score
    request_threshold = None
    for t in [k / 100 for k in range(3, 98)]:
        routed.set_threshold(t)
        scores = _scores(routed, ids)
        runs = {layer: scores[layer] >= t for layer in LAYERS}
        if (
            runs != wanted
            and 0 < sum(runs.values()) < len(LAYERS)
            and min(abs(s - t) for s in scores.values()) > MIN_MARGIN
        ):
            request_threshold = t
            break
    assert request_threshold is not None, "no request threshold splits the layers differently; change the seed"
    routed.set_threshold(0.5, thresholds)

    reference = SkipReference(routed)
    mask = torch.ones_like(ids)

    def run(skip=None, threshold=None):
        saved = dict(reference.thresholds)
        if threshold is not None:
            reference.thresholds = {layer: threshold for layer in LAYERS}
        try:
            out = reference.generate(
                ids,
                mask,
                skip=skip,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
        finally:
            reference.thresholds = saved
        # greedy steps whose two best logits nearly tie would make the comparison a coin toss
        gaps = [float((lambda top: top[0] - top[1])(step[0].topk(2).values)) for step in out.scores]
        assert min(gaps) > 1e-3, f"a near tie in the reference's greedy choice ({min(gaps):.2e}); change the seed"
        return {
            "tokens": out.sequences[0, ids.shape[1] :].tolist(),
            "decisions": {layer: bool(reference.decisions[layer][0]) for layer in LAYERS},
        }

    expected = {
        "routers": run(),
        "run": run(skip=set()),
        "skip": run(skip=set(LAYERS)),
        "skip_set": run(skip={2, 3}),  # neither the routers' set ({1, 3}) nor all
        "threshold": run(threshold=request_threshold),
    }
    assert expected["routers"]["decisions"] == wanted
    tokens = [tuple(v["tokens"]) for v in expected.values()]
    assert len(set(tokens)) == len(tokens), "two settings give the same tokens: the check could not tell them apart"
    out = tmp_path_factory.mktemp("serve") / "routed"
    export(ExportJob(output=str(out), routers=str(routers), model=str(base)))
    return dict(export=out, prompt=ids[0].tolist(), expected=expected, threshold=request_threshold)


# --- `routertune serve`'s command line --------------------------------------------------------------------
def _serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "routertune.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, **SERVER_ENV),
    )


@pytest.mark.slow
@pytest.mark.serve
def test_serve_adds_what_routed_serving_needs_and_refuses_what_cannot_work(tiny_export, tmp_path):
    _needs_vllm()
    from routertune.serve.engine import ServeJob, server_command

    export = str(tiny_export["export"])
    # the command as printed (routertune's own flags may follow EXPORT; the rest go to vLLM untouched)
    done = _serve_cli(export, "--port", "8123", "--routing-log", str(tmp_path / "log.jsonl"), "--dry-run")
    assert done.returncode == 0, done.stderr[-3000:]
    line = done.stdout.strip().splitlines()[-1]
    assert (
        f"-m vllm.entrypoints.openai.api_server --model {export} --port 8123 --enforce-eager "
        "--no-enable-prefix-caching --no-enable-chunked-prefill --max-model-len 2048 "
        "--max-num-batched-tokens 2048" in line
    ), line
    assert f"ROUTERTUNE_SERVE_LOG={tmp_path / 'log.jsonl'}" in line
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in line

    def command(*flags, **job):
        return server_command(ServeJob(export=job.pop("export", export), **job), list(flags))

    assert command("--max-model-len=512").argv[-6:] == [
        "--max-model-len=512",
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--no-enable-chunked-prefill",
        "--max-num-batched-tokens",
        "512",
    ]
    kept = command("--enforce-eager", "--max-num-batched-tokens", "4096", "--max_model_len", "1024")
    assert kept.added == ["--no-enable-prefix-caching", "--no-enable-chunked-prefill"]
    with pytest.raises(ValueError) as refused:
        command(
            "--enable-prefix-caching",
            "--enable_chunked_prefill",
            "--no-enforce-eager",
            "--max-model-len",
            "1k",
            "--max-num-batched-tokens",
            "256",
            "--speculative-config",
            '{"method": "ngram"}',
        )
    for flag in (
        "--enable-prefix-caching",
        "--enable-chunked-prefill",
        "--max-num-batched-tokens 256 below --max-model-len 1000",
        "--speculative-config",
    ):
        assert flag in str(refused.value), (flag, str(refused.value))
    assert "--no-enforce-eager" not in str(refused.value)  # compiling is fine (the routed layers are opaque ops)
    with pytest.raises(ValueError, match="drop --model"):
        command("--model", export)
    with pytest.raises(ValueError, match="does not accept"):
        command("--no-such-vllm-flag")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        command(export=str(tmp_path / "missing"))
    # a folder without routers (the static export's case) is served as given, and takes no routing log
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"architectures": ["DeciLMForCausalLM"]}))
    assert command("--enable-prefix-caching", export=str(plain)).added == []
    with pytest.raises(ValueError, match="not a routed export"):
        command(export=str(plain), routing_log=str(tmp_path / "log.jsonl"))
    # a static drop served by the routed classes (families other than llama): eager mode, nothing else forced
    (plain / "config.json").write_text(
        json.dumps({"architectures": ["RoutertuneQwen2ForCausalLM"], "routertune": {"static_skip": [1, 2]}})
    )
    static = command("--enable-prefix-caching", export=str(plain))
    assert static.added == ["--enforce-eager"] and not static.routed
    assert command("--no-enforce-eager", export=str(plain)).added == []  # compiled, the routed layers opaque ops
    # a decode-only export keeps vLLM's prefix caching and chunked prefill (and any token budget); eager still
    (plain / "config.json").write_text(
        json.dumps({"architectures": ["RoutertuneLlamaForCausalLM"], "routertune": {"decode_only": True}})
    )
    decode_only = command("--enable-prefix-caching", "--max-num-batched-tokens", "64", export=str(plain))
    assert decode_only.added == ["--enforce-eager"] and decode_only.routed
    assert command(export=str(plain)).added == ["--enforce-eager"]
    assert command("--no-enforce-eager", export=str(plain)).added == []


# --- the HTTP server --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    """One `routertune serve` for every HTTP check; its process group is killed whatever happens."""
    _needs_vllm()
    folder = tmp_path_factory.mktemp("server")
    port, log = _free_port(), folder / "routing.jsonl"
    output = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "routertune.cli",
            "serve",
            str(tiny_export["export"]),
            "--routing-log",
            str(log),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--seed",
            "0",
            # compiled (vLLM's default): the routed layers are opaque custom ops inside the compiled graph, so
            # every check below also checks that their per-request routing runs at every step
            "--no-enforce-eager",
        ],
        stdout=output,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, **SERVER_ENV),
        start_new_session=True,
    )  # its own process group: the engine process goes with it
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"the server exited ({proc.returncode}):\n" + (folder / "server.log").read_text()[-4000:]
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, (folder / "server.log").read_text()[-4000:]
            time.sleep(2)
        yield SimpleNamespace(port=port, log=log, server_log=folder / "server.log", proc=proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        output.close()


def _complete(server, tiny_export, request_id: str, xargs: dict | None = None) -> tuple[int, dict]:
    body = {
        "model": str(tiny_export["export"]),
        "prompt": tiny_export["prompt"],
        "max_tokens": NEW_TOKENS,
        "min_tokens": NEW_TOKENS,
        "temperature": 0.0,
        "return_token_ids": True,
        "request_id": request_id,
    }
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return _post(server.port, body)


def _decided(server, response_id: str) -> dict:
    """The routing log's line for a response: vLLM's request id is the response id + "-<prompt index>-<8 chars>"."""
    lines = [json.loads(line) for line in server.log.read_text().splitlines()]
    mine = [line for line in lines if line["event"] == "decided" and line["req_id"].startswith(response_id + "-0-")]
    assert len(mine) == 1, (response_id, lines)
    return mine[0]


@pytest.mark.slow
@pytest.mark.serve
def test_http_per_request_routing_settings(server, tiny_export):
    expected = tiny_export["expected"]
    cases = [
        ("routers", None, None, None),
        ("run", {"routertune_force": "run"}, "run", None),
        ("skip", {"routertune_force": "skip"}, "skip", None),
        ("skip_set", {"routertune_force": "skip_set", "routertune_skip_layers": [2, 3]}, "skip_set", None),
        ("threshold", {"routertune_threshold": tiny_export["threshold"]}, None, tiny_export["threshold"]),
    ]
    for name, xargs, forced, threshold in cases:
        status, body = _complete(server, tiny_export, f"rt-{name}", xargs)
        assert status == 200, (name, body)
        assert body["id"] == f"cmpl-rt-{name}"
        assert body["choices"][0]["token_ids"] == expected[name]["tokens"], name
        line = _decided(server, body["id"])
        assert {int(k): v for k, v in line["decisions"].items()} == expected[name]["decisions"], (name, line)
        assert line["forced"] == forced and line["threshold"] == threshold, (name, line)

    malformed = [
        ({"routertune_force": "sometimes"}, "routertune_force", "'run', 'skip', 'skip_set'"),
        (
            {"routertune_force": "skip_set", "routertune_skip_layers": [0, 2]},
            "routertune_skip_layers",
            "routes layers [1, 2, 3]",
        ),
        ({"routertune_force": "skip_set"}, "routertune_skip_layers", "needs routertune_skip_layers"),
        ({"routertune_skip_layers": [2]}, "routertune_skip_layers", "only with routertune_force='skip_set'"),
        ({"routertune_threshold": 1.5}, "routertune_threshold", "strictly between 0 and 1"),
        ({"routertune_threshold": "high"}, "routertune_threshold", "strictly between 0 and 1"),
    ]
    for k, (xargs, key, says) in enumerate(malformed):
        status, body = _complete(server, tiny_export, f"rt-bad-{k}", xargs)
        assert status == 400, (xargs, status, body)
        assert body["error"]["param"] == key and key in body["error"]["message"] and says in body["error"]["message"], (
            body
        )
        assert server.proc.poll() is None
    # the engine still serves, and the refused requests never reached it
    status, body = _complete(server, tiny_export, "rt-after", None)
    assert status == 200 and body["choices"][0]["token_ids"] == expected["routers"]["tokens"], body
    assert {int(k): v for k, v in _decided(server, body["id"])["decisions"].items()} == expected["routers"]["decisions"]
    assert "cmpl-rt-bad" not in server.log.read_text()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=10) as response:
        assert response.status == 200


# --- LLM.generate -----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.serve
def test_llm_generate_raises_value_error_and_keeps_serving(tiny_export, tmp_path):
    _needs_vllm()
    request = {
        "model": str(tiny_export["export"]),
        "engine": {"max_model_len": 512},
        "max_tokens": NEW_TOKENS,
        "prompts": [tiny_export["prompt"]],
        "log": str(tmp_path / "routing.jsonl"),
        "refused_extra_args": [
            {"routertune_force": "sometimes"},
            {"routertune_threshold": 2.0},
            {"routertune": {"force": "skip_set", "skip_layers": [9]}},
        ],
        "extra_args": {"routertune": {"force": "skip_set", "skip_layers": [2, 3]}},
    }
    (tmp_path / "request.json").write_text(json.dumps(request))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", **SERVER_ENV)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "routertune.serve.engine",
            str(tmp_path / "request.json"),
            str(tmp_path / "result.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    refused = result["refused"]
    assert all(r is not None and r["value_error"] for r in refused), refused
    assert "routertune_force" in refused[0]["message"] and "routertune_threshold" in refused[1]["message"]
    assert "[9] are not routed" in refused[2]["message"]
    # the nested form still works, and the engine served after the refusals
    assert result["tokens"][0] == tiny_export["expected"]["skip_set"]["tokens"]


# --- under load (issue 24, part 5) -------------------------------------------------------------------------
LOAD_TEXTS = [
    "Routers decide per request which attention sublayers run; the rest of the model stays frozen.",
    "A server under load batches many requests into one step, and each must keep its own decisions.",
    "Streams that the client closes early are aborted by the engine, which frees their slots for others.",
    "Malformed settings are refused before the engine sees them, and the server keeps serving the rest.",
    "Memory should come back to where it was once the requests are done and the engine is idle again.",
]


@pytest.mark.slow
@pytest.mark.serve
@pytest.mark.skipif(
    not os.environ.get("ROUTERTUNE_LOAD_TEST"),
    reason="about a minute of load on the shared server; ROUTERTUNE_LOAD_TEST=1 runs it (suite time)",
)
def test_http_under_load(server, tiny_export):
    """routertune.serve.load on the module's server (the same run benchmarks/serve_load.py does on the default
    model, smaller): 70 requests, 8 in flight, mixed prompt lengths and settings, streams, cancelled streams,
    malformed ones; every response equals the request served alone and every decision that request's alone.
    Independently of the load's own comparison, the reference prompt's five settings, sent inside the load, give
    the Hugging Face reference's tokens and decisions."""
    from routertune.serve.load import build_mix, completion, decided_lines, passed, run_load_test, text_prompts

    model, tokenizer, expected = str(tiny_export["export"]), tiny_tokenizer(), tiny_export["expected"]
    prompts = text_prompts(tokenizer, LOAD_TEXTS * 2, [6, 12, 24, 48, 96, 160, 240, 300])
    settings = {
        "routers": None,
        "run": {"routertune_force": "run"},
        "skip": {"routertune_force": "skip"},
        "skip_set": {"routertune_force": "skip_set", "routertune_skip_layers": [2, 3]},
        "threshold": {"routertune_threshold": tiny_export["threshold"]},
    }
    pinned = [
        completion(
            name,
            model,
            tiny_export["prompt"],
            NEW_TOKENS,
            xargs,
            min_tokens=NEW_TOKENS,
            stream=name in ("skip", "threshold"),
        )
        for name, xargs in settings.items()
    ]
    mix = build_mix(
        model, prompts, LAYERS, distinct=52, repeats=7, pinned=pinned, max_tokens=(8, 16), cancel_max_tokens=96
    )
    warmup = build_mix(
        model, prompts[::-1], LAYERS, distinct=8, repeats=0, seed=1, max_tokens=(8, 16), cancel_max_tokens=96
    )
    result = run_load_test(
        f"http://127.0.0.1:{server.port}",
        model,
        mix,
        log=server.log,
        server_pid=server.proc.pid,
        concurrency=8,
        warmup=warmup,
        prefix="load",
    )
    assert passed(result) == [], (passed(result), {k: v for k, v in result.items() if k != "detail"})
    assert server.proc.poll() is None
    # the load was the load asked for
    assert result["requests"] == 72 and result["refused_400"] == 8 and result["refused_400_in_stream"] == 3
    assert result["errors"] == 0
    assert result["completed"] + result["cancelled"] + result["refused_400"] == result["requests"]
    assert result["cancelled"] >= 3 and result["mix"]["streamed"] >= 15 and result["mix"]["repeated_requests"] >= 7
    assert set(result["mix"]["settings"]) == {"routers", "run", "skip", "skip_set", "threshold", "malformed"}
    assert result["mix"]["prompt_tokens"]["max"] == 300 and result["engine"]["cancelled_streams_left_unread"] >= 100
    # the reference's prompt inside the load: its tokens and decisions are the reference's
    seen = set()
    for entry in result["detail"]["requests"]:
        if (
            entry["prompt_tokens"] == len(tiny_export["prompt"])
            and entry["max_tokens"] == NEW_TOKENS
            and entry["kind"] in expected
            and not entry["cancel_after"]
        ):
            assert entry["tokens"] == expected[entry["kind"]]["tokens"], entry
            (decided,) = decided_lines(server.log, entry["request_id"])
            assert {int(k): v for k, v in decided["decisions"].items()} == expected[entry["kind"]]["decisions"]
            seen.add(entry["kind"])
    assert seen == set(expected), seen


def test_load_checks_tell_a_difference(tmp_path):
    """The load test's own comparisons, on constructed outcomes: a changed token, a cancelled stream that is
    not a prefix, another request's log line (an id that only starts alike) are all told apart."""
    from routertune.serve.load import Outcome, compare, completion, decided_lines

    request = completion("routers", "m", [5, 6, 7], 4)
    alone = Outcome("a", 200, [1, 2, 3, 4], [{"token_id:1": -0.1, "token_id:9": -2.0}] * 4, "length")
    assert compare(request, Outcome("x", 200, [1, 2, 3, 4], finish_reason="length"), alone) is None
    differs = compare(request, Outcome("x", 200, [1, 2, 9, 4], finish_reason="length"), alone)
    assert differs["first_difference"] == 2 and differs["alone_margin_there"] == pytest.approx(1.9)
    assert compare(request, Outcome("x", 200, [1, 2, 3], finish_reason="stop"), alone) is not None
    assert compare(request, Outcome("x", 200, [1, 2], cancelled=True), alone) is None
    assert compare(request, Outcome("x", 200, [1, 3], cancelled=True), alone) is not None
    log = tmp_path / "log.jsonl"
    log.write_text(
        "".join(
            json.dumps({"event": "decided", "req_id": f"cmpl-{rid}-0-abcd1234", "decisions": {}}) + "\n"
            for rid in ("load-10", "load-1", "load-1-alone")
        )
    )
    assert [line["req_id"] for line in decided_lines(log, "load-1")] == ["cmpl-load-1-0-abcd1234"]

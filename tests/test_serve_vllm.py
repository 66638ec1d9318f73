"""Routed serving inside a real vLLM engine equals our reference path (RoutedModel.generate), on the default
model in fp32: same greedy tokens and the same per-request decisions for a batch whose decisions differ row by
row, also when a small KV cache forces vLLM to preempt and recompute requests.

The reference is transformers' generate through RoutedModel (gather/scatter of the running rows, a
RoutedCache); the served side is vLLM's own model class, kernels, scheduler and paged KV cache with the
routertune plugin. The two share only the router weights and thresholds. Each engine runs in its own process
(routertune.serve.engine), as vLLM is used in production.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="needs the routertune[serve] extra (vLLM)")

from routertune import RoutedModel, RouterConfig  # noqa: E402
from routertune.base_model import load_model_and_tokenizer  # noqa: E402
from routertune.serve.export import ExportJob, export  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.serve]

ROUTED_LAYERS = [11, 14, 17, 20, 23, 26, 28]
# a layer whose trust region caps its score below its threshold: no prompt runs it, and `export --free-kv`
# serves it without a KV cache
NEVER_RUN = 11
NEW_TOKENS = 32
BIAS = 0.75  # |bias| of every router (logit units)
MIN_MARGIN = 2e-3  # every router score lies at least this far from its threshold (numerics differ ~1e-6)
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why each is prime.",
    "Translate 'good morning' into Spanish.",
    "Summarise the plot of Hamlet in one sentence, please, for a child who likes stories.",
    "def add(a, b):",
]


def _chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def _scores(routed: RoutedModel, batch: list[list[int]], layer: int) -> list[float]:
    """Router scores at `layer` for each prompt alone (what a decision is taken from)."""
    out = []
    for ids in batch:
        with torch.no_grad(), routed.recording() as calls:
            routed(input_ids=torch.tensor([ids]), use_cache=False)
        out.append(float(calls[-1].scores[layer][0]))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Seeded routers whose per-layer thresholds split the prompts (mixed decisions at every routed layer),
    placed in the widest gap between scores so no decision is a numerical coin toss; then exported."""
    model, tokenizer = load_model_and_tokenizer()
    routed = RoutedModel(model, RouterConfig(layers=ROUTED_LAYERS))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in routed.routers.values():
            router.weight.copy_(
                torch.randn(router.weight.shape, generator=gen) * 4 / math.sqrt(router.weight.shape[-1])
            )
            # non-zero biases of either sign (trained routers carry one): a server that dropped them would
            # shift every score of a layer and, as checked below, flip decisions
            router.bias.copy_(torch.randn(router.bias.shape, generator=gen).sign() * BIAS)
    prompts = [_chat_ids(tokenizer, p) for p in PROMPTS]
    # layers not yet placed run for everyone (threshold ~0); a layer's scores depend only on earlier layers
    thresholds = {layer: 1e-6 for layer in ROUTED_LAYERS}
    routed.routers[NEVER_RUN].set_trust_region(-2.0, -math.inf, 0.0)  # score <= sigmoid(-2) ~ 0.12
    thresholds[NEVER_RUN] = 0.5
    margins = {}
    bias_flips = 0
    for layer in ROUTED_LAYERS:
        if layer == NEVER_RUN:
            continue
        routed.set_threshold(0.5, dict(thresholds))
        raw = _scores(routed, prompts, layer)
        scores = sorted(raw)
        gaps = [(scores[k + 1] - scores[k], k) for k in range(len(scores) - 1)]
        width, k = max(gaps)
        thresholds[layer] = (scores[k] + scores[k + 1]) / 2
        margins[layer] = width / 2
        bias = routed.routers[layer].bias.item()
        without_bias = [torch.sigmoid(torch.logit(torch.tensor(x, dtype=torch.float64)) - bias).item() for x in raw]
        bias_flips += sum((a >= thresholds[layer]) != (b >= thresholds[layer]) for a, b in zip(raw, without_bias))
    # the last routed layer gets a trust region that keeps every prompt's score above its threshold
    # (logit(threshold) + 0.1 at least), where its own weights split the prompts: a server that ignored the
    # region would skip that layer for some of them
    last = ROUTED_LAYERS[-1]
    raw_runs = [x >= thresholds[last] for x in _scores(routed, prompts, last)]
    assert 0 < sum(raw_runs) < len(raw_runs)
    floor = math.log(thresholds[last] / (1 - thresholds[last]))
    routed.routers[last].set_trust_region(floor + 1.0, -0.9, math.inf)
    margins[last] = min(x - thresholds[last] for x in _scores(routed, prompts, last))
    routed.set_threshold(0.5, thresholds)
    assert min(margins.values()) > MIN_MARGIN, margins
    assert all(r.bias.item() != 0 for r in routed.routers.values())
    assert bias_flips > 0, "without their biases the routers would take the same decisions: raise BIAS"
    routers_dir = tmp_path_factory.mktemp("routers")
    routed.save_pretrained(routers_dir)

    # the reference: one batch through RoutedModel.generate (left padding), greedy
    tokenizer.padding_side = "left"
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cache = routed.new_cache()
    with torch.no_grad():
        out = routed.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            cache=cache,
            pad_token_id=pad,
        )
    eos = tokenizer.eos_token_id
    reference = []
    for row in out[:, width:].tolist():
        reference.append(row[: row.index(eos) + 1] if eos in row else row)
    decisions = {layer: cache.decisions[layer].tolist() for layer in ROUTED_LAYERS}
    serve_dir = tmp_path_factory.mktemp("serve") / "routed"
    export(ExportJob(output=str(serve_dir), routers=str(routers_dir)))
    free_kv_dir = serve_dir.parent / "free-kv"
    report = export(ExportJob(output=str(free_kv_dir), routers=str(routers_dir), free_kv=True))
    assert report.never_run == [NEVER_RUN]
    return dict(
        prompts=prompts,
        reference=reference,
        decisions=decisions,
        serve_dir=serve_dir,
        free_kv_dir=free_kv_dir,
        eos=eos,
        routed=routed,
        routers_dir=routers_dir,
        tokenizer=tokenizer,
        thresholds=thresholds,
    )


def _serve(setup, tmp_path, folder="serve_dir", refused=(), later_rounds=(), **engine) -> dict:
    request = {
        "model": str(setup[folder]),
        "refused_extra_args": list(refused),
        "engine": engine,
        "max_tokens": NEW_TOKENS,
        "prompts": setup["prompts"],
        "log": str(tmp_path / "routing.jsonl"),
        "later_rounds": list(later_rounds),
    }
    (tmp_path / "request.json").write_text(json.dumps(request))
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    proc = subprocess.run(
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
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / "result.json").read_text())


def _check(setup, result) -> None:
    decided = {line["prompt_sha1"]: line for line in result["log"] if line["event"] == "decided"}
    from routertune.serve.requests import prompt_sha1

    for row, prompt in enumerate(setup["prompts"]):
        line = decided[prompt_sha1(prompt)]
        served = {int(k): v for k, v in line["decisions"].items()}
        expected = {layer: bool(setup["decisions"][layer][row]) for layer in ROUTED_LAYERS}
        assert served == expected, (row, served, expected)
        assert result["tokens"][row] == setup["reference"][row], row
    # the batch really mixes decisions row by row, at every routed layer but the last, whose trust region
    # runs it for every prompt, and the never-run one
    for layer in ROUTED_LAYERS[:-1]:
        if layer != NEVER_RUN:
            assert 0 < sum(setup["decisions"][layer]) < len(setup["prompts"]), layer
    assert all(setup["decisions"][ROUTED_LAYERS[-1]])
    assert not any(setup["decisions"][NEVER_RUN])


def test_mixed_batches_and_preemption_keep_decisions_and_tokens(setup, tmp_path):
    # 9 blocks of 32 tokens (one is held back) for 6 requests growing to ~60-80 tokens each: several requests
    # share each step (a routed layer runs on a subset of them), and vLLM must preempt and recompute some
    result = _serve(setup, tmp_path, max_model_len=256, block_size=32, num_gpu_blocks_override=9)
    recomputed = [line for line in result["log"] if line["event"] == "recomputed"]
    assert recomputed, "the small KV cache did not force a preemption; shrink it"
    assert result["routed_layers_profile"]["calls_subset"] > 0, "no step mixed running and skipping requests"
    _check(setup, result)


def test_requests_served_alone_skip_whole_layers_exactly(setup, tmp_path):
    # one request per step: every layer it skips is skipped by the whole step, which then also skips the
    # layer's input norm (attention.RoutedLayer, vLLM's native no-op form); the tokens must not change.
    # Served from the --free-kv export: the never-run layer has no KV cache at all, the others keep theirs,
    # and settings that could run it are refused at admission (the engine keeps serving)
    refused = [
        {"routertune_force": "run"},
        {"routertune_force": "skip_set", "routertune_skip_layers": [14]},
        {"routertune_threshold": 0.1},
        {"routertune_force": "skip_set", "routertune_skip_layers": [NEVER_RUN, 14]},
        {"routertune_threshold": 0.2},
    ]
    result = _serve(setup, tmp_path, "free_kv_dir", refused, max_model_len=512, max_num_seqs=1)
    _check(setup, result)
    assert not [line for line in result["log"] if line["event"] == "recomputed"]
    assert result["routed_layers_profile"]["layers_no_op"] > 0
    assert [layer.split(".")[2] for layer in result["kv_cache_layers"]] == sorted(
        str(i) for i in range(30) if i != NEVER_RUN
    ), result["kv_cache_layers"]
    assert [r is not None and r["value_error"] for r in result["refused"]] == [True, True, True, False, False]
    assert "--free-kv" in result["refused"][0]["message"] and "[11]" in result["refused"][1]["message"]


def _decode_only_reference(routed, prompt: list[int], eos: int) -> tuple[list[int], dict[int, bool], dict[int, float]]:
    """RoutedModel.generate under decode-only routing (the never-run layer skipped in the prefill too): tokens,
    decisions and scores."""
    cache = routed.new_cache()
    with torch.no_grad(), routed.decode_only({NEVER_RUN}), routed.recording() as calls:
        out = routed.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, cache=cache)
    row = out[0, len(prompt) :].tolist()
    scores = {layer: float(s[0]) for layer, s in calls[0].scores.items()}
    return row[: row.index(eos) + 1] if eos in row else row, {k: bool(v[0]) for k, v in cache.decisions.items()}, scores


@pytest.fixture(scope="module")
def decode_only_setup(setup):
    """A chat's two turns: the prompts, then each prompt + its reference answer + a follow-up question (the
    answer's blocks were computed with skips, so they must not be prefix-cache hits); the decode-only
    reference of both, and the `--decode-only --free-kv` export of the same routers."""
    routed, tokenizer, eos = setup["routed"], setup["tokenizer"], setup["eos"]
    follow_up = tokenizer.encode("<|im_start|>user\nAnd why is that?<|im_end|>\n<|im_start|>assistant\n")
    first = [_decode_only_reference(routed, p, eos) for p in setup["prompts"]]
    second_prompts = [p + answer + follow_up for p, (answer, _, _) in zip(setup["prompts"], first)]
    second = [_decode_only_reference(routed, p, eos) for p in second_prompts]
    margins = [
        abs(score - setup["thresholds"][layer]) for _, _, scores in first + second for layer, score in scores.items()
    ]
    assert min(margins) > 1e-4, "a decode-only score lies within float32 reach of its threshold"
    folder = setup["serve_dir"].parent / "decode-only"
    report = export(ExportJob(output=str(folder), routers=str(setup["routers_dir"]), free_kv=True, decode_only=True))
    assert report.decode_only and report.never_run == [NEVER_RUN]
    return dict(folder=folder, first=first, second_prompts=second_prompts, second=second)


def test_decode_only_with_prefix_caching_chunked_prefill_and_preemption(setup, decode_only_setup, tmp_path):
    """vLLM's defaults on (prefix caching, chunked prefill) with a decode-only export: a 64-token budget splits
    the second turn's prompts (73-93 tokens) into chunks, a second turn finds its first-turn prompt in the
    prefix cache and repeated prompts find each other, a small KV cache forces a preemption; every served token
    and decision equals RoutedModel.generate under decode-only routing, and no second-turn prompt finds the
    first turn's answer blocks in the cache (they were computed with skips)."""
    ref = decode_only_setup
    second = ref["second_prompts"]
    repeats = [second[-1], second[-2]]  # asked again at the end of the second round: prefix-cache hits
    result = _serve(
        dict(setup, decode_only_dir=ref["folder"]),
        tmp_path,
        "decode_only_dir",
        later_rounds=[second + repeats],
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=64,
        max_model_len=192,
        block_size=32,
        num_gpu_blocks_override=10,
    )
    assert result["tokens"] == [answer for answer, _, _ in ref["first"]]
    assert result["later_tokens"][0] == [answer for answer, _, _ in ref["second"] + ref["second"][::-1][:2]]
    from routertune.serve.requests import prompt_sha1

    decided: dict[str, list[dict]] = {}
    for line in result["log"]:
        if line["event"] == "decided":
            decided.setdefault(line["prompt_sha1"], []).append(line)
    for prompt, (_, decisions, _) in zip(setup["prompts"] + second, ref["first"] + ref["second"]):
        for line in decided[prompt_sha1(prompt)]:
            assert {int(k): v for k, v in line["decisions"].items()} == decisions
    # a second turn hits at most its first-turn prompt's full blocks, never a block holding the answer (without
    # the prompt-only caching rule the block of prompt tail + answer would hit too); repeats hit their twin
    turn_hits = [decided[prompt_sha1(p)][0]["prefix_cached"] for p in second]
    for prompt, cached in zip(setup["prompts"], turn_hits):
        assert cached <= len(prompt) // 32 * 32, (len(prompt), turn_hits)
    assert any(turn_hits), turn_hits
    assert all(decided[prompt_sha1(p)][1]["prefix_cached"] >= 32 for p in repeats)
    assert [line for line in result["log"] if line["event"] == "recomputed"], "no preemption; shrink the KV cache"
    assert result["routed_layers_profile"]["calls_subset"] > 0
    # decisions differ between requests at some layer
    runs = [d for _, d, _ in ref["first"] + ref["second"]]
    assert any(0 < sum(d[layer] for d in runs) < len(runs) for layer in ROUTED_LAYERS if layer != NEVER_RUN)

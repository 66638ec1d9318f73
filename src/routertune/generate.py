"""`routertune generate`: greedy completions with trained routers, and which routed layers each prompt ran.

Library functions: they take dataclasses and return dataclasses; only the CLI prints.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from routertune.base_model import load_model_and_tokenizer
from routertune.model import RoutedModel


@dataclass
class GenerateJob:
    prompts: list[str]
    routers: str | None = field(default=None, metadata={"help": "folder written by `routertune train`"})
    model: str | None = field(default=None, metadata={"help": "base model (default: embedded SmolLM2-135M-Instruct)"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache folder of the converted default model"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate per prompt"})
    threshold: float | None = field(default=None, metadata={"help": "override the decision threshold in (0, 1)"})
    force: str | None = field(default=None, metadata={"help": "force 'run' (dense) or 'skip' on every routed layer"})
    chat: bool = field(default=True, metadata={"help": "wrap prompts in the tokenizer's chat template"})


@dataclass
class Generation:
    prompt: str
    completion: str
    runs: dict[int, bool]  # routed layer -> ran for this prompt (sequence routing)
    token_run_fraction: dict[int, float] | None = None  # token routing: routed layer -> share of tokens that ran it


def generate(job: GenerateJob) -> list[Generation]:
    """Greedy completions with routers; reports, per prompt, which routed layers ran."""
    if not job.prompts:
        raise ValueError("no prompts given")
    model, tokenizer = load_model_and_tokenizer(job.model, cache_dir=job.cache_dir)
    if job.routers is None:
        raise ValueError("pass --routers FOLDER (written by `routertune train`)")
    routed = RoutedModel.from_pretrained(model, job.routers)
    if job.threshold is not None:
        routed.set_threshold(job.threshold)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        if job.chat
        else p
        for p in job.prompts
    ]
    tokenizer.padding_side = "left"  # batched generation continues every row from its last real token
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not job.chat)
    empty = [i for i, n in enumerate(inputs["attention_mask"].sum(1).tolist()) if n == 0]
    if empty:  # without a token there is nothing to route on or continue from (the tokenizer adds no BOS)
        which = f"prompt {empty[0]} is" if len(empty) == 1 else f"prompts {', '.join(map(str, empty))} are"
        raise ValueError(
            f"{which} empty: it tokenizes to no token. Pass non-empty text, or use chat mode (drop "
            "--no-chat), whose template adds its own tokens around an empty message."
        )
    cache = routed.new_cache()
    with (
        torch.no_grad(),
        routed.forced(job.force) if job.force else contextlib.nullcontext(),
        routed.recording() as calls,
    ):
        output = routed.generate(
            **inputs,
            max_new_tokens=job.max_new_tokens,
            do_sample=False,
            cache=cache,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    completions = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    if routed.router_config.unit == "token":
        ran, seen = _token_counts(calls, len(job.prompts))
        return [
            Generation(
                prompt=p,
                completion=c.strip(),
                runs={layer: bool(n[row]) for layer, n in ran.items()},
                token_run_fraction={layer: float(n[row]) / max(int(seen[row]), 1) for layer, n in ran.items()},
            )
            for row, (p, c) in enumerate(zip(job.prompts, completions))
        ]
    return [
        Generation(
            prompt=p, completion=c.strip(), runs={layer: bool(d[row]) for layer, d in sorted(cache.decisions.items())}
        )
        for row, (p, c) in enumerate(zip(job.prompts, completions))
    ]


def _token_counts(calls, batch: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per row: how many of its tokens ran each token-routed layer, and how many real tokens it fed."""
    ran: dict[int, torch.Tensor] = {}
    seen = torch.zeros(batch, dtype=torch.long)
    for call in calls:
        for layer, runs in call.token_runs.items():
            ran[layer] = ran.get(layer, torch.zeros(batch, dtype=torch.long)) + runs.sum(1).cpu()
        if call.token_runs:
            steps = next(iter(call.token_runs.values())).shape[1]
            if call.attention_mask is not None:
                seen += call.attention_mask[:, -steps:].sum(1).cpu()
            else:
                seen += steps
    return dict(sorted(ran.items())), seen

"""Held-out perplexity and greedy-generation fidelity of a routed model, scored through :class:`RoutedLM`
(so the routing convention and the skip accounting are the harness path's own)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from routertune.eval import tasks
from routertune.eval.harness import RoutedLM, ScoredRow

PERPLEXITY_SOURCES = ("lambada", "boolq")


def heldout_texts(source: str, n: int) -> list[str]:
    """Held-out passages: LAMBADA (kept out of the router-tuning mix) or BoolQ's Wikipedia passages."""
    if source == "lambada":
        from routertune.train import data

        return data.lambada_passages(n)
    if source == "boolq":
        seen, passages = set(), []
        for passage in tasks.load_split("boolq", "validation")["passage"]:
            if passage not in seen:
                seen.add(passage)
                passages.append(passage)
            if len(passages) >= n:
                break
        return passages
    raise ValueError(f"unknown perplexity source {source!r}; available: {', '.join(PERPLEXITY_SOURCES)}")


@dataclass
class Perplexity:
    source: str
    texts: int
    tokens: int  # scored tokens
    nll: float  # mean negative log-likelihood per scored token
    ppl: float
    skip: dict


def perplexity(lm: RoutedLM, texts: Sequence[str], source: str = "", max_tokens: int = 512) -> Perplexity:
    """Token-level perplexity of the second half of each text given the first half, routed on the first half
    (the plain-text convention of training: the first half is the prompt the router decides from)."""
    rows = []
    for text in texts:
        ids = lm.tok_encode(text)[:max_tokens]
        if len(ids) < 2:
            continue
        half = max(1, len(ids) // 2)
        rows.append(ScoredRow(ids, len(ids) - half, half, f"perplexity:{source}"))
    if not rows:
        raise ValueError("no text long enough to score (need at least 2 tokens)")
    lm.stats.pop(f"perplexity:{source}", None)
    scored = lm.score(rows)
    tokens = sum(r.n_cont for r in rows)
    nll = -sum(s for s, _ in scored) / tokens
    return Perplexity(
        source=source,
        texts=len(rows),
        tokens=tokens,
        nll=nll,
        ppl=math.exp(nll),
        skip=lm.stats[f"perplexity:{source}"].summary(),
    )


@dataclass
class Fidelity:
    prompts: int
    max_new_tokens: int
    token_agreement: float  # same token at the same position, over the longer of the two completions
    exact_match: float  # completions identical
    prefix_agreement: float  # length of the common prefix over the dense completion's length
    skip: dict


def generation_fidelity(
    lm: RoutedLM, reference: Sequence[list[int]], prompts: Sequence[list[int]], max_new_tokens: int
) -> Fidelity:
    """Compare greedy completions of `lm` with `reference` (the dense model's greedy completions)."""
    lm.stats.pop("generation", None)
    candidate = lm.greedy(prompts, max_new_tokens)
    agree, exact, prefix = 0.0, 0, 0.0
    for ref, cand in zip(reference, candidate):
        longest = max(len(ref), len(cand), 1)
        agree += sum(a == b for a, b in zip(ref, cand)) / longest
        exact += int(ref == cand)
        common = 0
        for a, b in zip(ref, cand):
            if a != b:
                break
            common += 1
        prefix += common / max(len(ref), 1)
    n = max(len(reference), 1)
    return Fidelity(
        prompts=len(reference),
        max_new_tokens=max_new_tokens,
        token_agreement=agree / n,
        exact_match=exact / n,
        prefix_agreement=prefix / n,
        skip=lm.stats["generation"].summary(),
    )

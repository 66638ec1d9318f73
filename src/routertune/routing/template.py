"""Pool decisions over what varies in a chat prompt, not over its template's fixed tokens.

A chat model's prompt opens with the same tokens every time (a default system prompt, the user turn's
marker) and closes with the same ones (end of turn, the assistant's marker). Pooled into a sequence router's
mean, those fixed tokens weigh the most in short prompts, where they may pull the decisions of different
prompts together (measured on SmolLM2: docs/evaluation.md#what-the-trust-region-costs-adaptivity-on-chat-prompts,
where it changed little). With `RouterConfig.fixed_template = [head, tail]` (token ids, found from the
tokenizer's chat template by `fixed_template_ids`), a prompt that starts with `head` is pooled without it,
and one that ends with `tail` without that; a prompt without them (plain text) is pooled whole. The rule
reads only the prompt's token ids, so the Hugging Face path and the vLLM plugin apply it alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def fixed_template_ids(tokenizer) -> list[list[int]] | None:
    """[head, tail]: the token ids a one-turn chat prompt always starts and ends with under this tokenizer's
    chat template (generation prompt included), found by rendering two different user messages and keeping
    what they share at each end. None when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(text: str) -> list[int]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    # two messages that share no first or last word, so no token of either reaches into the template's
    a, b = render("Alpha beta gamma delta."), render("Which river is longest?")
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    return [a[:head], a[len(a) - tail :] if tail else []]


def content_span(ids: Sequence[int], fixed: Sequence[Sequence[int]] | None) -> tuple[int, int]:
    """(start, end) of the tokens a prompt's decisions pool over: all of them, less the fixed head if the
    prompt starts with it and the fixed tail if it ends with it (each only when something is left)."""
    start, end = 0, len(ids)
    if not fixed:
        return start, end
    head, tail = list(fixed[0]), list(fixed[1])
    if head and len(ids) > len(head) and list(ids[: len(head)]) == head:
        start = len(head)
    if tail and end - start > len(tail) and list(ids[end - len(tail) :]) == tail:
        end -= len(tail)
    return start, end


def content_mask(
    input_ids: torch.Tensor, mask: torch.Tensor | None, fixed: Sequence[Sequence[int]] | None
) -> torch.Tensor | None:
    """The pooling mask (B, M) with each row's fixed template tokens taken out. `mask` covers the first M
    columns of `input_ids` (B, T >= M); a row's pooled tokens are its 1s (left or right padding), and the
    rule of `content_span` applies to them."""
    if not fixed or input_ids is None or input_ids.dim() != 2:
        return mask
    if mask is None:
        mask = torch.ones_like(input_ids)
    out = mask.clone()
    ids = input_ids[:, : mask.shape[1]].tolist()
    for row, (row_ids, row_mask) in enumerate(zip(ids, mask.tolist())):
        where = [j for j, m in enumerate(row_mask) if m]
        start, end = content_span([row_ids[j] for j in where], fixed)
        for j in where[:start] + where[end:]:
            out[row, j] = 0
    return out

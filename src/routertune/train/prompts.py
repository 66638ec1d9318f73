"""Prompt token ids for calibration, static-drop importance and generation fidelity: held-out (or training)
records of the default tuning mix, or a user's records, as the model sees them at inference."""

from __future__ import annotations


def chat_prompts(
    tokenizer, split: str = "heldout", n: int = 64, max_tokens: int = 512, records: list[dict] | None = None
) -> list[list[int]]:
    """Prompt token ids (chat template with generation prompt) of held-out records of the default mix (or of
    `records`), longest prompts cut to their last `max_tokens` tokens."""
    from routertune.train import data

    if records is None:
        records = data.default_records(split, n=n)
    prompts = []
    for record in records[:n]:
        record = data.normalize_record(record)
        if "messages" in record:
            text = tokenizer.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(record["text"])["input_ids"]
            ids = ids[: max(1, len(ids) // 2)]
        prompts.append(ids[-max_tokens:])
    return prompts

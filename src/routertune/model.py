"""RoutedModel: a frozen Hugging Face causal LM with MindSkip routers, with forward, generate, statistics and
router-only checkpoints (router_config.json + routers.safetensors)."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from routertune.base_model import portable_name
from routertune.routing import inject
from routertune.routing import state as routing
from routertune.routing.cache import RoutedCache, cache_kwarg
from routertune.routing.router import load_router
from routertune.routing.token_cache import TokenRoutedCache
from routertune.routing.token_routing import TokenRoutedSublayer
from routertune.train import lora

from .config import CONFIG_NAME, BaseModelIdentity, RouterConfig
from .files import atomic_write, write_json

WEIGHTS_NAME = "routers.safetensors"


class RoutedModel(nn.Module):
    """Wraps (never forks) a causal LM. Only the routers are trainable.

    >>> routed = RoutedModel(base_model, RouterConfig())          # attention routing, paper's layers
    >>> out = routed.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=20)
    """

    def __init__(self, base_model: nn.Module, config: RouterConfig | None = None):
        super().__init__()
        # our own copy: the identity and resolved layers written below belong to this model, and a config object
        # reused for another model must not carry them there (its routers would then load onto this one)
        config = copy.deepcopy(config) if config is not None else RouterConfig()
        self.base_model = base_model
        identity = model_identity(base_model)
        if config.base_model is None:
            config.base_model = identity
        self.router_config = config
        wrapper_cls, self._cache_cls = _unit_classes(config)
        inject.add_routers(base_model, config, wrapper_cls, self._cache_cls)
        config.layers = sorted(inject.routed_sublayers(base_model))
        inject.set_trainable(base_model)
        self.eval()  # like a loaded Hugging Face model: inference until .train() is called

    # -- basic properties --------------------------------------------------------------------------------
    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def routed_layers(self) -> list[int]:
        return list(self.router_config.layers)

    @property
    def routers(self) -> dict[int, nn.Module]:
        return {idx: w.router for idx, w in inject.routed_sublayers(self.base_model).items()}

    def train(self, mode: bool = True) -> RoutedModel:
        """Training mode for the routers only: the frozen base stays in eval mode (no dropout), so executed
        layers reproduce it exactly."""
        super().train(mode)
        self.base_model.eval()
        for wrapper in inject.routed_sublayers(self.base_model).values():
            wrapper.training = mode
            wrapper.router.train(mode)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- running -------------------------------------------------------------------------------------------
    def forward(self, *args, routing_mask: torch.Tensor | None = None, **kwargs):
        """The base model's forward. `routing_mask` (B, T) chooses the tokens decisions are pooled over
        (default: the attention mask); training passes the prompt tokens, as generation decides from them.
        A row without a real token is refused (outside decode steps, whose rows the prefill checked)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() == 0:
            prompt = kwargs.get("input_ids", args[0] if args else None)
            _refuse_empty_prompts(
                prompt if prompt is not None else kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
            )
        with routing.pool_over(routing_mask):
            return self.base_model(*args, **kwargs)

    def new_cache(self) -> RoutedCache:
        """A fresh KV cache of the kind this model's routing unit needs (RoutedCache or TokenRoutedCache)."""
        return self._cache_cls(config=self.base_model.config)

    def generate(self, *args, **kwargs):
        """transformers' generate (greedy, sampling, beam search) with a RoutedCache unless one is given.
        Pass `cache=routed.new_cache()` to read the decisions afterwards (`cache.decisions`).

        Prompts must be left-padded, and the prompt is prefilled whole (decisions pool over all of it):
        right padding and `prefill_chunk_size` are refused. `use_cache` and `prefill_chunk_size` are read as
        generate reads them: keyword, else `generation_config`, else the model's generation config."""
        config = kwargs.get("generation_config") or self.base_model.generation_config
        setting = lambda name, default: kwargs[name] if name in kwargs else getattr(config, name, default)  # noqa: E731
        if setting("prefill_chunk_size", None) is not None:
            raise ValueError(
                f"prefill_chunk_size={setting('prefill_chunk_size', None)} is not supported by routed models: "
                "routing decisions pool over the whole prompt, and a chunk cannot see the tokens after it. "
                "Pass prefill_chunk_size=None to prefill the whole prompt at once."
            )
        prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if prompt is None:
            prompt = kwargs.get("inputs_embeds")
        _refuse_right_padding(
            prompt, kwargs.get("attention_mask"), setting("pad_token_id", None), setting("eos_token_id", None)
        )
        if not setting("use_cache", True):
            # without a cache every step re-reads the whole sequence: keep deciding from the prompt columns of
            # each step's attention mask (generate expands it for beams and infers it from pad tokens)
            if prompt is None:
                raise ValueError("routed generation decides from the prompt: pass input_ids (or inputs_embeds)")
            with routing.pool_over(prompt.shape[1]):
                return self.base_model.generate(*args, **kwargs)
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs["cache"] = self.new_cache()
        key = cache_kwarg(self.base_model)
        if key != "cache" and kwargs.get("cache") is not None:
            kwargs[key] = kwargs.pop("cache")  # transformers < 5.20
        return self.base_model.generate(*args, **kwargs)

    @staticmethod
    def forced(mode: str = "run", skip_layers=()):
        """Context manager forcing decisions: "run" (dense), "skip" (all routed sublayers), or
        "skip_set" with `skip_layers`."""
        return routing.forced(mode, skip_layers)

    @staticmethod
    def decode_only(prefill_skip=()):
        """Context manager for decode-only routing: generate (one prompt at a time) prefills the prompt with
        every routed layer running except `prefill_skip`, decides from that prefill, and skips only for the
        generated tokens. What `routertune export --decode-only` serves in vLLM (with prefix caching and
        chunked prefill on; its `prefill_skip` is the export's never-run layers, `--free-kv`)."""
        return routing.decode_only(prefill_skip)

    def set_threshold(self, threshold: float, layer_thresholds: dict[int, float] | None = None) -> None:
        """Change the decision threshold (global and optionally per layer) in place; validated like the config."""
        checked = RouterConfig(
            granularity=self.router_config.granularity,
            layers=self.router_config.layers,
            threshold=threshold,
            layer_thresholds=layer_thresholds,
        )
        self.router_config.threshold = checked.threshold
        self.router_config.layer_thresholds = checked.layer_thresholds

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[routing.RoutingCall]]:
        """Collect the routing calls (scores, decisions, training gates) of forwards run inside the block."""
        with routing.record() as calls:
            yield calls

    def unwrap(self) -> nn.Module:
        """Remove the routers and return the base model, exactly as it was."""
        for param in self.base_model.parameters():
            param.requires_grad_(True)
        return inject.remove_routers(self.base_model)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def router_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for idx, r in self.routers.items():
            state[f"layers.{idx}.router.weight"] = r.weight.detach().cpu().contiguous()
            state[f"layers.{idx}.router.bias"] = r.bias.detach().cpu().contiguous()
            state[f"layers.{idx}.router.trust_region"] = r.trust_region.detach().cpu().contiguous()
        return state

    def load_router_state_dict(self, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Copy router weights in. Files written before routers had a trust region (no `.trust_region` keys)
        load without one, and those written before they had a bias (no `.bias` keys) with bias 0."""
        expected = set(self.router_state_dict())
        trust = {k for k in expected if k.endswith(".trust_region")}
        bias = {k for k in expected if k.endswith(".bias")}
        if set(state) not in (expected, expected - trust, expected - trust - bias):
            raise ValueError(
                f"{source} holds keys {sorted(set(state) ^ expected)} that do not match the routed "
                f"layers {self.routed_layers}"
            )
        with torch.no_grad():
            for idx, router in self.routers.items():
                load_router(router, state, f"layers.{idx}.router")

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write router_config.json + routers.safetensors (kilobytes), each atomically; with LoRA layers,
        also adapter_config.json + lora.safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.router_state_dict()
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp))
        if lora.has_lora(self.base_model):
            lora.save_lora(self.base_model, directory)
        # the config goes last: a folder with router_config.json is complete
        write_json(directory / CONFIG_NAME, self.router_config.to_dict())
        return directory

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike, **overrides) -> RoutedModel:
        """Attach saved routers to `base_model`; refused with the differing fields if it is another base."""
        config = RouterConfig.load(directory)
        for key, value in overrides.items():
            setattr(config, key, value)
        config = RouterConfig.from_dict({k: v for k, v in config.to_dict().items()})
        expected, actual = config.base_model, model_identity(base_model)
        if expected is not None:
            problems = expected.mismatches(actual)
            if problems:
                raise ValueError(
                    f"the routers in {directory} belong to another base model ({expected.name_or_path or 'unnamed'}): "
                    + "; ".join(problems)
                    + ". Load them onto the model they were trained on."
                )
        with_lora = lora.inject_saved_lora(base_model, Path(directory))
        routed = cls(base_model, config)
        if with_lora:
            lora.load_lora_weights(base_model, Path(directory))
        weights_path = Path(directory) / WEIGHTS_NAME
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path} not found next to {CONFIG_NAME}")
        routed.load_router_state_dict(load_file(str(weights_path)), str(weights_path))
        return routed


def _unit_classes(config: RouterConfig):
    """The sublayer wrapper and KV cache of the routing unit: sequence routing keeps its own path untouched."""
    if config.unit == "token":
        return functools.partial(TokenRoutedSublayer, router_config=config), TokenRoutedCache
    return None, RoutedCache


def _refuse_right_padding(prompt, attention_mask, pad_token_id, eos_token_id) -> None:
    """Generation continues each row after its last column, so a padded row must end with its last real token.
    Plain transformers only warns and continues after the padding; here that is refused. Without a mask the
    padding is read from the pad token, as generate infers its mask. An empty prompt is named as such first
    (its row is all padding, which would read as right padding)."""
    _refuse_empty_prompts(prompt, attention_mask, pad_token_id, eos_token_id)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        padded_end = not bool(attention_mask[:, -1].all())
    elif isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and pad_token_id is not None:
        eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        padded_end = pad_token_id not in eos and bool((prompt[:, -1] == pad_token_id).any())
    else:
        return
    if padded_end:
        raise ValueError(
            "right-padded prompts cannot be generated from: every row must end with its last real token. "
            "Pad on the left (tokenizer.padding_side = 'left') before calling generate."
        )


def _refuse_empty_prompts(prompt, attention_mask, pad_token_id=None, eos_token_id=None) -> None:
    """A prompt without a real token has nothing to pool a decision over or to continue from: refused, naming
    the rows. Read from the 2-D attention mask, else (generate's inference) from rows of pad tokens only."""
    rows = None
    if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 and prompt.shape[1] == 0:
        rows = list(range(prompt.shape[0]))
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        real = (
            attention_mask.bool().any(1)
            if attention_mask.shape[1]
            else attention_mask.new_zeros(attention_mask.shape[0], dtype=torch.bool)
        )
        if not bool(real.all()):  # one host sync per prompt batch
            rows = (~real).nonzero().flatten().tolist()
    elif isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and pad_token_id is not None:
        eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        if pad_token_id not in eos:
            padding = (prompt == pad_token_id).all(1)
            if bool(padding.any()):
                rows = padding.nonzero().flatten().tolist()
    if rows:
        which = f"prompt {rows[0]} is" if len(rows) == 1 else f"prompts {', '.join(map(str, rows))} are"
        raise ValueError(
            f"{which} empty (no real token, only padding): routing decides from the prompt's tokens and "
            "generation continues from its last one. Give every prompt at least one token (non-empty text, or "
            "a chat template, which adds its own), or leave the empty ones out of the batch."
        )


def model_identity(model: nn.Module) -> BaseModelIdentity:
    """Type, depth, width and a weight fingerprint: a hash of the first values of every base weight, rounded
    to bfloat16 so the same weights loaded in float32 or bfloat16 match."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if inject.is_trainable(name) or param.device.type == "meta":
                continue
            name = name.replace(".base_layer", "")  # the same weights whether or not routers are attached
            digest.update(name.encode())
            sample = param.detach().reshape(-1)[:64].to(torch.bfloat16).float().cpu()
            digest.update(sample.numpy().tobytes())
    cfg = model.config
    return BaseModelIdentity(
        model_type=cfg.model_type,
        num_hidden_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        fingerprint=digest.hexdigest()[:16],
        name_or_path=portable_name(model),
    )

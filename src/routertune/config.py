"""RouterConfig: which sublayers are routed and how decisions are taken; saved as router_config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

GRANULARITIES = ("attention", "mlp", "block")
UNITS = ("sequence", "token")
CONFIG_NAME = "router_config.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BaseModelIdentity:
    """What a set of routers was trained on, so loading onto another base can be refused."""

    model_type: str
    num_hidden_layers: int
    hidden_size: int
    fingerprint: str
    name_or_path: str = ""

    def mismatches(self, other: BaseModelIdentity) -> list[str]:
        """Human-readable differences (name_or_path is informative only: the same weights may live anywhere)."""
        fields = ("model_type", "num_hidden_layers", "hidden_size", "fingerprint")
        return [
            f"{name}: routers were trained for {getattr(self, name)!r}, this model has {getattr(other, name)!r}"
            for name in fields
            if getattr(self, name) != getattr(other, name)
        ]


@dataclass
class RouterConfig:
    """How a model is routed. Every field is checked in `__post_init__`; problems are gathered and raised once."""

    granularity: str = field(
        default="attention",
        metadata={"help": "sublayer routed per sequence: attention (MindSkip), mlp, or block"},
    )
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "routed layer indices; default: the last N layers before the final one, N = half the layers"},
    )
    threshold: float = field(
        default=0.5, metadata={"help": "a sublayer runs for a sequence when its router score >= threshold"}
    )
    layer_thresholds: dict[int, float] | None = field(
        default=None, metadata={"help": "per-layer thresholds overriding `threshold` (set by calibration)"}
    )
    base_model: BaseModelIdentity | None = field(
        default=None, metadata={"help": "identity of the base model; filled in when routers are attached"}
    )
    unit: str = field(
        default="sequence",
        metadata={
            "help": "what a decision covers: sequence (one per prompt, MindSkip) or token (each token's own router "
            "decides at each routed layer, Mixture-of-Depths style)"
        },
    )
    token_top_k: float | None = field(
        default=None,
        metadata={
            "help": "token unit only: run a fixed fraction of each sequence's prompt tokens at every routed layer "
            "(top-k by score) instead of comparing scores with the threshold"
        },
    )
    token_sink: int = field(
        default=1,
        metadata={
            "help": "token unit only: the first N real tokens of each sequence run every token-routed layer whatever "
            "their router says (attention sinks: later tokens put much of their attention there); 0 lets the "
            "routers decide for them too"
        },
    )

    fixed_template: list[list[int]] | None = field(
        default=None,
        metadata={
            "help": "sequence unit only: [head, tail], the token ids every prompt of the chat template starts and "
            "ends with; a prompt that starts (ends) with them pools its decisions without them, so the routers "
            "read what varies (set by `routertune train --pool content`; routertune.routing.template)"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.base_model, dict):
            self.base_model = BaseModelIdentity(**self.base_model)
        if self.layer_thresholds is not None:
            self.layer_thresholds = {int(k): float(v) for k, v in self.layer_thresholds.items()}
        problems = []
        if self.granularity not in GRANULARITIES:
            problems.append(f"granularity={self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if self.unit not in UNITS:
            problems.append(f"unit={self.unit!r} is not one of {', '.join(UNITS)}")
        if self.token_top_k is not None:
            if self.unit != "token":
                problems.append(f"token_top_k={self.token_top_k!r} needs unit='token' (sequence routing has no top-k)")
            if not isinstance(self.token_top_k, (int, float)) or not 0.0 < float(self.token_top_k) <= 1.0:
                problems.append(f"token_top_k={self.token_top_k!r} must lie in (0, 1]: the fraction of tokens that run")
        if isinstance(self.token_sink, bool) or not isinstance(self.token_sink, int) or self.token_sink < 0:
            problems.append(
                f"token_sink={self.token_sink!r} must be an integer >= 0: how many leading tokens always run"
            )
        if self.fixed_template is not None:
            ok = (
                isinstance(self.fixed_template, (list, tuple))
                and len(self.fixed_template) == 2
                and all(isinstance(part, (list, tuple)) for part in self.fixed_template)
                and all(isinstance(i, int) and not isinstance(i, bool) for part in self.fixed_template for i in part)
            )
            if not ok:
                problems.append(
                    f"fixed_template={self.fixed_template!r} must be [head token ids, tail token ids] "
                    "(routertune.routing.template.fixed_template_ids(tokenizer) finds them)"
                )
            elif self.unit != "sequence":
                problems.append("fixed_template needs unit='sequence': token routers read each token, not a mean")
            else:
                self.fixed_template = [list(part) for part in self.fixed_template]
        problems += _threshold_problems("threshold", self.threshold)
        for layer, value in (self.layer_thresholds or {}).items():
            problems += _threshold_problems(f"layer_thresholds[{layer}]", value)
        if self.layers is not None:
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                problems.append(f"layers={self.layers!r} must be a list of integer layer indices")
            elif len(set(self.layers)) != len(self.layers):
                problems.append(f"layers={self.layers!r} holds duplicates; list each layer once")
            else:
                self.layers = sorted(self.layers)
        if problems:
            raise ValueError("Invalid RouterConfig: " + "; ".join(problems))

    def threshold_for(self, layer: int) -> float:
        if self.layer_thresholds and layer in self.layer_thresholds:
            return self.layer_thresholds[layer]
        return self.threshold

    def resolved_layers(self, num_hidden_layers: int) -> list[int]:
        """The routed layers for a model of this depth, checked against it."""
        layers = self.layers if self.layers is not None else default_routed_layers(num_hidden_layers)
        bad = [i for i in layers if not 0 <= i < num_hidden_layers]
        if bad:
            raise ValueError(
                f"layers {bad} are out of range: this model has {num_hidden_layers} layers, "
                f"so indices must lie in 0..{num_hidden_layers - 1}"
            )
        if not layers:
            raise ValueError("no layers to route: pass at least one layer index")
        return list(layers)

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.layer_thresholds is not None:
            out["layer_thresholds"] = {str(k): v for k, v in self.layer_thresholds.items()}
        out["format_version"] = FORMAT_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict) -> RouterConfig:
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"router config format {version} is newer than this routertune understands ({FORMAT_VERSION}); "
                "upgrade routertune"
            )
        if data.get("unit") == "token" and "token_sink" not in data:
            data["token_sink"] = 0  # token routers saved before the field existed: the behaviour they were fitted with
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown router config fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def load(cls, directory: str | Path) -> RouterConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {directory} a folder written by save_pretrained?")
        return cls.from_dict(json.loads(path.read_text()))


def _threshold_problems(name: str, value: float) -> list[str]:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        return [f"{name}={value!r} must lie strictly between 0 and 1 (router scores are sigmoids)"]
    return []


def default_routed_layers(num_hidden_layers: int) -> list[int]:
    """The paper's rule: the last N = L // 2 layers before the final layer, which always stays dense.

    For 32 layers this gives 15..30, as in the paper's Llama-3-8B setting.
    """
    n = num_hidden_layers // 2
    last = num_hidden_layers - 1
    return list(range(last - n, last))

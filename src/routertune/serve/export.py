"""``routertune export``: a folder vLLM serves with the plugin installed (no vLLM needed to write it).

* routed (``--routers DIR``): the base model's files unchanged (weights hard-linked when possible), with
  config.json naming the routed architecture (``RoutertuneLlamaForCausalLM``, ...) and carrying the router
  config under ``routertune``; router weights in ``routertune/routers.safetensors``, a sub-folder, because
  vLLM loads every top-level ``*.safetensors`` as model weights.
* static (``--static K``): the K least important attention layers (1 - cos on calibration text, as
  ``routertune eval --static-drop``; among the routers' routed layers when ``--routers`` is given, so "routed
  forced to static's set" is comparable) dropped for every request. For llama (``NATIVE_STATIC_FAMILIES``):
  vLLM's native form, a Nemotron-NAS (DeciLM) config whose dropped layers are no-op attention, and weights
  without those layers' attention. For the other served families, whose layers DeciLM (Llama's attention)
  would load wrongly or not at all, and for a drop of layer 0 (DeciLM's no-op first layer has no residual yet
  and fails): the routed export's form, the base model's files unchanged and a routing section with
  ``static_skip``, so the routed class skips those layers for every request (no routers).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..config import CONFIG_NAME, RouterConfig, default_routed_layers
from . import static as static_drop
from .config import ARCH_PREFIX, CONFIG_KEY, ROUTERS_DIR, ROUTERS_FILE, VLLM_ARCHITECTURES, ServeRouting

_MARKER = "routertune_export.json"
# families whose static drop vLLM's DeciLM serves exactly: it is Llama's attention and MLP. Not the others:
# vLLM's Llama loader skips Qwen2's q/k/v biases without a word (wrong tokens), refuses Qwen3's q/k norms,
# fails on Gemma 3's per-layer-type RoPE (and lacks its extra norms); Mistral has its own vLLM class (a tiny
# Mistral came out exact through DeciLM too, but nothing keeps the two classes alike), so it keeps it
NATIVE_STATIC_FAMILIES = ("llama",)
_SKIP = {"config.json", _MARKER}


@dataclass
class ExportJob:
    """What `routertune export` writes; every field is a CLI flag."""

    output: str = field(default="", metadata={"help": "folder to write (vllm.LLM(OUTPUT) / vllm serve OUTPUT load it)"})
    routers: str | None = field(
        default=None,
        metadata={"help": "trained routers (a folder from `routertune train` or `calibrate`); needed unless --static"},
    )
    static: int | None = field(
        default=None,
        metadata={
            "help": "export a static drop of this many attention layers instead of the routers (vLLM's native "
            "DeciLM form for llama, the routed class forced to the set otherwise)"
        },
    )
    static_order: str | None = field(
        default=None,
        metadata={
            "help": "with --static K: which K layers. A static_order.json (or its folder) searched on this model: "
            "its first K; 'cos': the K least important by 1 - cos on calibration text (static drop's classic rule). "
            "Default: the order searched on KL to the dense model (routertune.train.static_order) over the tuning "
            "data, cached under --cache-dir (minutes per layer on a CPU the first time); on the default model it "
            "beats 1 - cos by 33-46%% in KL at 3 layers (docs/evaluation.md#searched-static-order)"
        },
    )
    model: str | None = field(
        default=None,
        metadata={"help": "base model: local HF folder or hub id; default: embedded SmolLM2-135M-Instruct"},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "cache folder of the converted default model"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing export in OUTPUT"})
    free_kv: bool = field(
        default=False,
        metadata={
            "help": "routed export: serve the routed layers the routers can never run at their thresholds (a trust "
            "region caps the score below it, as `--trust-up 0` does for the prior's skipped layers) with no KV "
            "cache, so the server holds more tokens, as native static drop does; requests that could run them "
            "(routertune_force run, a skip set without them, a threshold at or below their score bound) are refused"
        },
    )

    decode_only: bool = field(
        default=False,
        metadata={
            "help": "routed export: prefill every prompt densely (the never-run layers of --free-kv aside) and route "
            "only the generated tokens, deciding from that prefill; a prompt's K/V then does not depend on the "
            "request, so vLLM's prefix caching and chunked prefill stay on (docs/serving.md#decode-only-routing-export---decode-only)"
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if not self.output:
            problems.append("--output is required: the folder to write")
        if self.routers is None and self.static is None:
            problems.append("pass --routers DIR (routed export) or --static K (native static drop), or both")
        if self.static is not None and self.static < 1:
            problems.append(f"static={self.static} must be >= 1 layers")
        if self.free_kv and (self.static is not None or self.routers is None):
            problems.append("--free-kv applies to a routed export (--routers DIR without --static)")
        if self.decode_only and (self.static is not None or self.routers is None):
            problems.append("--decode-only applies to a routed export (--routers DIR without --static)")
        if self.static_order is not None and self.static is None:
            problems.append("--static-order chooses the layers of --static K; pass --static K too")
        if problems:
            raise ValueError("Invalid export: " + "; ".join(problems))


@dataclass
class ExportReport:
    output: str
    architecture: str
    routed_layers: list[int] | None = None
    dropped_layers: list[int] | None = None
    importance: dict[int, float] | None = None  # 1 - cos per candidate layer (--static-order cos)
    order: list[int] | None = None  # the searched static order the dropped layers were taken from
    never_run: list[int] | None = None  # --free-kv: the routed layers served without KV cache
    decode_only: bool = False


def export(job: ExportJob) -> ExportReport:
    from routertune.base_model import load_model_and_tokenizer, resolve_model_path

    from ..model import RoutedModel

    source = Path(resolve_model_path(job.model, job.cache_dir))
    out = _prepare_output(Path(job.output), job.overwrite)
    model, tokenizer = load_model_and_tokenizer(str(source))
    model_type = model.config.model_type
    if model_type not in VLLM_ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} has no vLLM serving row; served families: "
            f"{', '.join(sorted(VLLM_ARCHITECTURES))}"
        )
    router_config = None
    if job.routers is not None:
        if (Path(job.routers) / "adapter_config.json").is_file():
            raise ValueError(
                f"{job.routers} holds LoRA layers too; merge them into the base model first "
                "(vLLM serving takes the routers only)"
            )
        # checks the routers belong to this base model (refused with the differing fields otherwise)
        routed = RoutedModel.from_pretrained(model, job.routers)
        router_config = routed.router_config
        if router_config.granularity != "attention":
            raise ValueError(f"vLLM serving routes attention only; {job.routers} routes {router_config.granularity!r}")
        if router_config.unit != "sequence":
            raise ValueError(
                f"vLLM serving takes one decision per request (unit='sequence'); {job.routers} holds "
                f"{router_config.unit}-level routers, which serve through RoutedModel.generate only"
            )
        router_state = routed.router_state_dict()
        model = routed.unwrap()
    config = json.loads((source / "config.json").read_text())

    if job.static is not None:
        candidates = (
            router_config.layers if router_config is not None else default_routed_layers(model.config.num_hidden_layers)
        )
        if job.static > len(candidates):
            raise ValueError(f"--static {job.static}: only {len(candidates)} candidate layers ({candidates})")
        dropped, scores, order = _static_layers(job, model, tokenizer, candidates)
        recorded = (
            {"order": order} if order is not None else {"importance": {str(k): v for k, v in sorted(scores.items())}}
        )
        if model_type in NATIVE_STATIC_FAMILIES and 0 not in dropped:
            _write_static(source, out, config, model.config, dropped, recorded)
            architecture = static_drop.ARCHITECTURE
        else:
            architecture = ARCH_PREFIX + VLLM_ARCHITECTURES[model_type][0]
            _link_files(source, out)
            config["architectures"] = [architecture]
            config[CONFIG_KEY] = ServeRouting.static(dropped).to_dict()
            config["routertune_static"] = {"dropped_layers": dropped, **recorded}
            _finish(
                out,
                config,
                {"kind": "static", "served_as": "routed", "dropped_layers": dropped, "base_model": str(source)},
            )
        return ExportReport(
            str(out),
            architecture,
            dropped_layers=dropped,
            importance={i: scores[i] for i in candidates} if scores else None,
            order=order,
        )

    arch = VLLM_ARCHITECTURES[model_type][0]
    _link_files(source, out)
    (out / ROUTERS_DIR).mkdir(exist_ok=True)
    from safetensors.torch import save_file

    save_file(router_state, str(out / ROUTERS_FILE))
    (out / ROUTERS_DIR / CONFIG_NAME).write_text(json.dumps(router_config.to_dict(), indent=2))
    config["architectures"] = [ARCH_PREFIX + arch]
    never_run = never_run_layers(router_state, router_config) if job.free_kv else None
    if job.free_kv and never_run is None:
        raise ValueError(
            f"--free-kv: no routed layer of {job.routers} is capped below its threshold (routers without a trust "
            "region, or one that lets every layer run); nothing to free. Export without --free-kv"
        )
    serving = ServeRouting(
        RouterConfig.from_dict(router_config.to_dict()), never_run=never_run, decode_only=job.decode_only
    )
    if never_run is not None:
        serving.format_version = 3  # older routertune versions would allocate and run these layers
    if job.decode_only:
        serving.format_version = 4  # older routertune versions would route the prefill
    config[CONFIG_KEY] = serving.to_dict()
    _finish(out, config, {"kind": "routed", "routers": str(job.routers), "base_model": str(source)})
    return ExportReport(
        str(out),
        ARCH_PREFIX + arch,
        routed_layers=list(router_config.layers),
        never_run=never_run["layers"] if never_run else None,
        decode_only=job.decode_only,
    )


# a layer counts as never run only if its score bound lies this far below the threshold: the served score is
# computed in float32, the bound in float64, and the two may round apart by an ulp or so
NEVER_RUN_MARGIN = 1e-6


def never_run_layers(router_state: dict, router_config: RouterConfig) -> dict | None:
    """{"layers", "score_bound"} of the routed layers no input can run: a router's trust region keeps its logit
    at or below prior + high (routing.router.bounded_logit), so its score never exceeds sigmoid(prior + high);
    a layer whose bound lies below its threshold is skipped by every request at the export's thresholds.
    None when there is none."""
    layers, bounds = [], []
    for i in router_config.layers:
        region = router_state.get(f"layers.{i}.router.trust_region")
        if region is None:
            continue
        prior, _, high = (float(x) for x in region.tolist())
        if not math.isfinite(high):
            continue
        logit = prior + high
        bound = 1 / (1 + math.exp(-logit)) if logit > -700 else 0.0  # math.exp overflows past ~709
        if bound + NEVER_RUN_MARGIN < router_config.threshold_for(i):
            layers.append(i)
            bounds.append(bound + NEVER_RUN_MARGIN)
    return {"layers": layers, "score_bound": max(bounds)} if layers else None


def _static_layers(
    job: ExportJob, model, tokenizer, candidates: list[int]
) -> tuple[list[int], dict[int, float] | None, list[int] | None]:
    """The layers --static K drops: (dropped, 1 - cos scores or None, searched order or None)."""
    import torch

    if job.static_order == "cos":
        from routertune.bench.variants import calibration_batches
        from routertune.routing import static_drop as baselines

        with torch.no_grad():
            importance = baselines.attention_importance(model, calibration_batches(model, tokenizer))
        return importance.least_important(job.static, candidates), importance.scores, None
    from routertune.train import static_order

    # searched over the candidates: the routers' layers with --routers (so forced-to-static is comparable), else
    # the layers an export routes by default
    found = static_order.order_for(
        model, tokenizer, job.static, job.static_order, job.cache_dir, list(candidates), print
    )
    if len(found.order) < job.static:
        raise ValueError(
            f"--static {job.static}: the searched order holds {len(found.order)} layers ({found.order}); extend "
            "the search or drop fewer layers"
        )
    dropped = sorted(found.order[: job.static])
    strays = [i for i in dropped if i not in candidates]
    if strays:
        raise ValueError(f"--static-order: layers {strays} are not among the candidates {candidates}")
    return dropped, None, list(found.order)


def _write_static(source: Path, out: Path, config: dict, model_config, dropped: list[int], recorded: dict) -> None:
    from safetensors.torch import load_file, save_file

    _link_files(source, out, weights=False)
    prefixes = tuple(f"model.layers.{i}.{part}" for i in dropped for part in ("self_attn.", "input_layernorm."))
    for weights in sorted(source.glob("*.safetensors")):
        state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith(prefixes)}
        save_file(state, str(out / weights.name), metadata={"format": "pt"})
    index = source / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not k.startswith(prefixes)}
        (out / index.name).write_text(json.dumps(data, indent=2))
    kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    config["model_type"] = static_drop.MODEL_TYPE
    config["architectures"] = [static_drop.ARCHITECTURE]
    config["block_configs"] = static_drop.block_configs(
        model_config.num_hidden_layers,
        dropped,
        model_config.num_attention_heads,
        kv_heads,
        model_config.intermediate_size,
    )
    config["routertune_static"] = {"dropped_layers": dropped, **recorded}
    _finish(out, config, {"kind": "static", "dropped_layers": dropped, "base_model": str(source)})


def _prepare_output(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()):
        if not (out / _MARKER).is_file():
            raise FileExistsError(f"{out} exists and is not a routertune export; choose another --output")
        if not overwrite:
            raise FileExistsError(f"{out} holds an export already; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _link_files(source: Path, out: Path, weights: bool = True) -> None:
    """Every file of the base model folder but config.json (weights hard-linked when on the same disk)."""
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name in _SKIP:
            continue
        if path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
            if not weights:
                continue
            try:
                os.link(path, out / path.name)
                continue
            except OSError:
                pass
        shutil.copy2(path, out / path.name)


def _finish(out: Path, config: dict, marker: dict) -> None:
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / _MARKER).write_text(json.dumps(marker, indent=2))

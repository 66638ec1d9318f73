"""The `importance` objective: routers fitted to predict, from the prompt, how much each attention sublayer
matters for this input.

Static attention drop ("What Matters in Transformers?") ranks attention sublayers by their *average*
importance, 1 - cos(h, h + attention(norm(h))), and drops the least important for every input. The same
quantity varies from input to input: code, fiction and encyclopaedic text lean on different layers. This
objective fits each router, by ridge regression in closed form, to predict that per-input importance from
what the router sees at inference (its layer's normed input, mean-pooled over the prompt):

    logit_l(x) = w_l . pool(x) + b_l  ~  (log importance_l(x) - c) / d

- b_l carries the layer's average importance, so with w = 0 the routers are exactly a static drop ordered
  by importance; the weights add the per-input part on top of it, shrunk by the ridge penalty (chosen on
  held-out records) wherever the prompt does not predict it.
- c is set so that at the default threshold 0.5 the routers run the target capacity on the training prompts:
  the capacity target is met by the fit itself, no threshold is set afterwards.
- d (the spread of the layers' mean log importance) puts logits on a scale where the threshold is a usable
  dial: sweeping it moves through the layers from the least to the most important, per input.

Token routers (RouterConfig(unit="token")) are fitted the same way per token: each sampled token's own normed
input predicts that token's log importance (TOKENS_PER_RECORD real tokens per record, the same at every layer,
never the always-run sink tokens),
and c sets the target capacity over (token, layer) pairs.

One dense forward over the training records gives every feature and target; there is no gradient descent,
so the fit is deterministic, cannot collapse, and costs one pass over the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from routertune.calibrate import nearest_share_cut
from routertune.model import RoutedModel
from routertune.routing import arch, inject
from routertune.routing.router import bounded_logit, masked_mean
from routertune.routing.template import content_mask

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # penalty, relative to the mean feature variance x N
TOKENS_PER_RECORD = 8  # token routers: real tokens sampled per record (the same ones at every layer)


@dataclass
class ImportanceFit:
    """What the fit chose and how well the per-input part predicts held-out importance."""

    layers: list[int]
    ridge: float  # chosen penalty (relative)
    shrink: float  # scale of the per-input part (1: the ridge fit; 0: the static prior alone)
    target: str  # absolute (log importance) or relative (minus the input's mean over the routed layers)
    heldout_r2: dict[str, float]  # per chosen penalty: mean over layers of held-out R^2 of log importance
    offset: float  # c
    scale: float  # d
    mean_log_importance: dict[int, float]  # per layer, training records
    train_capacity: float  # fraction of (record, layer) pairs that run at threshold 0.5 on the training prompts
    records: int
    notes: list[str] = field(default_factory=list)
    trust: tuple[float | None, float | None] = (None, None)  # (down, up) bound on the per-input part, in sd
    prior_order: list[int] | None = None  # layers the prior skips first (a searched static order), if given


@torch.no_grad()
def collect(
    routed: RoutedModel, batches: Sequence[dict[str, torch.Tensor]], progress: Callable[[int], None] | None = None
) -> tuple[dict, dict]:
    """Dense forward over `batches` (input_ids, attention_mask, optional prompt_mask). Returns, per routed
    layer, the pooled router inputs (N, H) float64 and the log importance per sequence (N,) float64:
    log of the mean over the sequence's real tokens of 1 - cos(h, h + attention(norm(h)))."""
    model = routed.base_model
    if routed.router_config.granularity != "attention":
        raise ValueError(
            f"the importance objective fits attention routers (MindSkip); granularity "
            f"{routed.router_config.granularity!r} needs --objective lm or distill"
        )
    token = getattr(routed.router_config, "unit", "sequence") == "token"
    generator = torch.Generator().manual_seed(0)
    blocks = arch.blocks_of(model)
    wrappers = inject.routed_sublayers(model)
    features: dict[int, list[torch.Tensor]] = {i: [] for i in wrappers}
    targets: dict[int, list[torch.Tensor]] = {i: [] for i in wrappers}
    residual: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def save_residual(idx):
        def hook(module, args, kwargs):
            residual[idx] = args[0] if args else kwargs["hidden_states"]

        return hook

    def record(idx):
        def hook(module, args, kwargs, output):
            normed = args[0] if args else kwargs["hidden_states"]  # (B, T, H): what the router reads
            h = residual.pop(idx).float()
            attn = (output[0] if isinstance(output, tuple) else output).float()
            gap = 1 - torch.nn.functional.cosine_similarity(h, h + attn, dim=-1)  # (B, T)
            if token:
                # token routers read each token's own input: one sample per (sampled) token, no pooling
                pick = current["pick"]
                features[idx].append(normed[pick].double().cpu())
                targets[idx].append(gap[pick].clamp_min(1e-8).log().double().cpu())
                return
            features[idx].append(masked_mean(normed, current["pool"]).double().cpu())
            mask = current["mask"]
            per_seq = (gap * mask).sum(-1) / mask.sum(-1).clamp_min(1)
            targets[idx].append(per_seq.clamp_min(1e-8).log().double().cpu())

        return hook

    handles = []
    for idx, wrapper in wrappers.items():
        handles.append(blocks[idx].register_forward_pre_hook(save_residual(idx), with_kwargs=True))
        handles.append(wrapper.register_forward_hook(record(idx), with_kwargs=True))
    try:
        with routed.forced("run"):
            for batch in batches:
                mask = batch["attention_mask"]
                pool = batch.get("prompt_mask")
                current["mask"] = mask.float()
                pool = pool if pool is not None else mask
                # the features are what the routers will pool: without a chat template's fixed tokens, if set
                current["pool"] = content_mask(batch["input_ids"], pool, routed.router_config.fixed_template)
                if token:
                    # the sink tokens run whatever the router says, so they are no data for the fit
                    decided = mask.bool() & (mask.cumsum(1) > routed.router_config.token_sink)
                    current["pick"] = _sample_tokens(decided, TOKENS_PER_RECORD, generator)
                routed(
                    input_ids=batch["input_ids"],
                    attention_mask=mask,
                    routing_mask=pool,  # the routed forward takes the template out itself
                    use_cache=False,
                    logits_to_keep=1,
                )
                if progress:  # records done: the pass takes minutes at ~1,000 records
                    progress(int(batch["input_ids"].shape[0]))
    finally:
        for handle in handles:
            handle.remove()
    return ({i: torch.cat(v) for i, v in features.items()}, {i: torch.cat(v) for i, v in targets.items()})


def _sample_tokens(real: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(B, T) bool: up to k real tokens of each row, uniformly at random (seeded), for a token-level fit
    whose memory does not grow with sequence length."""
    noise = torch.rand(real.shape, generator=generator).to(real.device).masked_fill(~real, -1.0)
    top = noise.topk(min(k, real.shape[1]), dim=1)
    pick = torch.zeros_like(real)
    pick.scatter_(1, top.indices, top.values >= 0)
    return pick


def _capacity_offset(flat: torch.Tensor, target: float) -> float:
    """An offset c whose share of values >= c is nearest `target`, placed halfway between two distinct values
    so that no training record sits on the decision boundary. A quantile would do for distinct values, but a
    trust region piles many inputs of a layer onto one bound, and a quantile landing on such a pile counts all
    of it: the share is chosen as calibration chooses it (calibrate.nearest_share_cut)."""
    runs_low, skips_high, _ = nearest_share_cut(flat, target)
    if runs_low is None:  # none runs
        return skips_high + 0.5
    if skips_high is None:  # every value runs
        return runs_low - 0.5
    return (runs_low + skips_high) / 2


def _ridge(x: torch.Tensor, y: torch.Tensor, penalty: float) -> tuple[torch.Tensor, float]:
    """Ridge regression with an unpenalised intercept: returns (w (H,), b)."""
    mu, y_mean = x.mean(0), y.mean()
    xc = x - mu
    gram = xc.T @ xc
    lam = penalty * float(gram.diagonal().mean()) * 1.0
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ (y - y_mean))
    return w, float(y_mean - mu @ w)


def _r2(x, y, w, b) -> float:
    pred = x @ w + b
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / total if total > 0 else 0.0


TARGETS = ("absolute", "relative")


def relative_to_input(y: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Each record's log importance minus that record's mean over the routed layers (plus the overall mean, so
    each layer keeps its average): what is left says which layers matter *more or less than usual* for this
    input, not how much attention matters for it overall. Fitted to this, routers reorder the layers per input
    but skip about the same number of layers for every input."""
    stacked = torch.stack([y[i] for i in sorted(y)])  # (layers, N)
    level = stacked.mean(0)
    return {i: y[i] - level + level.mean() for i in y}


def fit_routers(
    routed: RoutedModel,
    train_batches,
    heldout_batches,
    target_capacity: float,
    shrink: float = 1.0,
    target: str = "absolute",
    trust: tuple[float | None, float | None] = (None, None),
    progress: Callable[[int], None] | None = None,
    prior_order: Sequence[int] | None = None,
) -> ImportanceFit:
    """Fit every router of `routed` in place (weights, bias, trust region) and return what was chosen.
    `progress` gets the records of each batch of the dense pass (training, then held-out) as it finishes.

    `shrink` scales the per-input part around the training mean (logit = prior + shrink * w.(x - mean)):
    1 keeps the ridge fit, 0 leaves the static prior alone. Held-out R^2 on the tuning mix cannot choose it:
    text far from that mix (code, for one) is where a per-input prediction extrapolates.

    `trust` = (down, up) bounds that part, in standard deviations of it over the training records: an input
    may lower a layer's logit below the prior by at most down sd and raise it by at most up sd (None or inf:
    unbounded; unbounded both ways here, while `routertune train` defaults to (inf, 0) for sequence routers).
    The capacity offset is set on the bounded logits, so the target is still met, in steps where a bound piles
    inputs up.

    `prior_order` (layers, first skipped first: a searched static order, routertune.train.static_order) makes
    the prior skip in that order instead of by mean importance: the layers' prior values are handed out again,
    the lowest to the order's first layer and so on, the layers outside it keeping their own ranking after it.
    The per-input part and its trust region are unchanged, so with shrink 0 the routers are exactly that static
    order, and otherwise an input moves a layer only as far as its fitted prediction says."""
    if not 0.0 <= target_capacity <= 1.0:
        raise ValueError(f"target_capacity={target_capacity} must lie in [0, 1]")
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink={shrink} must lie in [0, 1]")
    if len(trust) != 2 or any(k is not None and not k >= 0 for k in trust):
        raise ValueError(f"trust={trust!r} must be (down, up), each None or >= 0 standard deviations")
    trust = tuple(None if k is None or math.isinf(k) else float(k) for k in trust)  # None: unbounded
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {', '.join(TARGETS)}")
    routed_layers = sorted(routed.routers)
    if prior_order is not None:
        prior_order = [int(i) for i in prior_order]
        strays = [i for i in prior_order if i not in routed_layers]
        if strays or len(set(prior_order)) != len(prior_order):
            raise ValueError(
                f"prior_order={prior_order} must list distinct routed layers; {strays or 'repeats'} "
                f"{'are' if len(strays) != 1 else 'is'} not among them (routed: {routed_layers}): search the order "
                "over the routed layers, or route the layers it names"
            )
    x_train, y_train = collect(routed, train_batches, progress)
    layers = sorted(x_train)
    n = int(next(iter(x_train.values())).shape[0])
    if n < 2:
        raise ValueError(f"the importance fit needs at least 2 training records, got {n}")
    notes = []
    x_held, y_held = collect(routed, heldout_batches, progress) if heldout_batches else ({}, {})
    if target == "relative":
        y_train = relative_to_input(y_train)
        y_held = relative_to_input(y_held) if y_held else y_held
    r2 = {}
    if x_held and int(next(iter(x_held.values())).shape[0]) >= 2:
        for penalty in RIDGE_GRID:
            fits = {i: _ridge(x_train[i], y_train[i], penalty) for i in layers}
            r2[str(penalty)] = sum(_r2(x_held[i], y_held[i], *fits[i]) for i in layers) / len(layers)
        ridge = float(max(RIDGE_GRID, key=lambda p: r2[str(p)]))
    else:
        ridge = 1.0
        notes.append("no held-out records: ridge penalty left at 1.0")
    fits = {}
    for i in layers:
        w, b = _ridge(x_train[i], y_train[i], ridge)
        mu = x_train[i].mean(0)
        # logit at the mean feature stays the layer's mean log importance; the slope is scaled by `shrink`
        fits[i] = (shrink * w, b + (1.0 - shrink) * float(mu @ w))
    means = {i: float(y_train[i].mean()) for i in layers}
    spread = float(torch.tensor(list(means.values())).std()) if len(layers) > 1 else 1.0
    scale = spread if spread > 1e-6 else 1.0
    # the trust region around each layer's prior (its prediction at the mean input), in the fit's units
    bounds = {}
    for i in layers:
        prior = float(x_train[i].mean(0) @ fits[i][0]) + fits[i][1]
        sd = float((x_train[i] @ fits[i][0] + fits[i][1] - prior).std()) if n > 1 else 0.0
        down, up = trust
        bounds[i] = (prior, -math.inf if down is None else -down * sd, math.inf if up is None else up * sd)
    if prior_order:
        fits, bounds = reordered_priors(fits, bounds, prior_order)
    # c: the quantile of predicted log importance over (record, layer) pairs below which (1 - target) skip
    predicted = torch.stack([bounded_logit(x_train[i] @ fits[i][0] + fits[i][1], *bounds[i]) for i in layers])
    flat = predicted.flatten()
    if target_capacity >= 1.0:
        offset = float(flat.min()) - 1.0
    elif target_capacity <= 0.0:
        offset = float(flat.max()) + 1.0
    else:
        offset = _capacity_offset(flat, target_capacity)
    with torch.no_grad():
        for i in layers:
            w, b = fits[i]
            router = routed.routers[i]
            router.weight.copy_((w / scale).to(router.weight.dtype).view_as(router.weight))
            router.bias.copy_(torch.tensor([(b - offset) / scale], dtype=router.bias.dtype))
            prior, low, high = bounds[i]
            if math.isinf(low) and math.isinf(high):
                router.set_trust_region(0.0, -math.inf, math.inf)  # no region (one fitted earlier is cleared)
            else:
                router.set_trust_region((prior - offset) / scale, low / scale, high / scale)
    capacity = float((predicted >= offset).double().mean())
    return ImportanceFit(
        layers=layers,
        ridge=ridge,
        shrink=shrink,
        target=target,
        heldout_r2=r2,
        offset=offset,
        scale=scale,
        mean_log_importance=means,
        train_capacity=capacity,
        records=n,
        notes=notes,
        trust=tuple(trust),
        prior_order=list(prior_order) if prior_order else None,
    )


def reordered_priors(fits: dict, bounds: dict, order: Sequence[int]) -> tuple[dict, dict]:
    """The fits and trust regions with each layer's prior moved so that the priors rank the layers as `order`
    (first = lowest prior = skipped first), then the other layers in their own prior ranking. The prior values
    themselves are kept (handed out again), so their spread, and with it the threshold's scale, is unchanged."""
    values = sorted(bounds[i][0] for i in bounds)
    rest = sorted((i for i in bounds if i not in order), key=lambda i: bounds[i][0])
    new_fits, new_bounds = {}, {}
    for value, i in zip(values, [*order, *rest]):
        prior, low, high = bounds[i]
        w, b = fits[i]
        new_fits[i] = (w, b + value - prior)
        new_bounds[i] = (value, low, high)
    return new_fits, new_bounds

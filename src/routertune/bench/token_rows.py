"""Benchmark rows for token routing: prefill and decode speed of token-routed attention against the dense model
and against sequence routing at the same executed fraction, with achieved / ideal.

The sequence side is bench's ``routed_static_set`` (the RoutedModel with its routers forced to skip static
drop's k of the n routed layers: an executed fraction of 1 - k/n of the routed attention sublayers). The token
side is a token-routed RoutedModel in top-k mode running that same fraction of every sequence's tokens at
every routed layer (synthetic seeded routers, or trained ones from ``--token-routers`` switched to top-k at
that fraction, so both sides do the same amount of attention work and the comparison is of the mechanisms).
Decode tokens run where they reach the prompt's cut-off score, so their executed fraction is measured, not set.

Ideal speed-up = analytic matmul FLOPs of the reference / FLOPs of token routing for the same work, counted
from the decisions actually taken: a running token pays its q, k, v, o projections and attends to the tokens
that ran before it at that layer (plus itself); a skipping one pays nothing there; MLPs and logits as dense.
Timing follows bench: warm-up first, variants interleaved in rotating order, paired medians.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from routertune.bench.clocks import Clock
from routertune.bench.config import BenchConfig
from routertune.bench.flops import FlopCounter
from routertune.bench.measure import decode_step, kv_bytes, prefill, random_ids, rotated
from routertune.bench.variants import Variant, VariantSet, shared_copy, synthetic_routers
from routertune.config import RouterConfig
from routertune.model import RoutedModel
from routertune.routing import state as routing
from routertune.routing.token_cache import TokenRoutedCache
from routertune.stats import median, paired_ratio, paired_ratio_ci

TOKEN_PREFILL_IDEAL_TARGET = 0.8  # achieved / ideal for token-routed prefill at the target length
TOKEN_TARGET_LENGTH = 2048


@dataclass
class TokenRow:
    phase: str  # "prefill" or "decode"
    length: int  # prefill length, or the prompt before decoding
    new_tokens: int  # decode steps (0 for prefill)
    batch: int
    token_executed_fraction: float  # executed (token, routed layer) pairs / all of them (timed work)
    sequence_executed_fraction: float  # the same for the sequence-routing side
    dense_s: float  # medians (prefill: per call; decode: per step)
    sequence_s: float
    token_s: float
    speedup_vs_dense: float  # paired median of dense / token
    speedup_vs_dense_ci: list[float]
    speedup_vs_sequence: float  # paired median of sequence / token
    speedup_vs_sequence_ci: list[float]
    sequence_speedup_vs_dense: float
    ideal_vs_dense: float  # dense FLOPs / token FLOPs
    ideal_vs_sequence: float  # sequence FLOPs / token FLOPs
    achieved_over_ideal: float  # speedup_vs_dense / ideal_vs_dense
    token_kv_bytes: int
    token_kv_bytes_expected: int  # dense KV bytes x executed fraction over all layers (exact integers)
    token_kv_equal: bool


@dataclass
class TokenBench:
    description: str
    fraction: float  # top-k fraction of the token side = executed fraction of the sequence side
    rows: list[TokenRow] = field(default_factory=list)
    prefill_ideal_target: float = TOKEN_PREFILL_IDEAL_TARGET
    prefill_ideal_length: int | None = None
    prefill_ideal: dict[str, float] = field(default_factory=dict)  # "B=1" -> achieved/ideal at that length
    met: bool | None = None


def token_variant(model, vs: VariantSet, cfg: BenchConfig) -> tuple[Variant, float, str]:
    """The token-routed variant at the sequence side's executed fraction."""
    n, k = len(vs.routed_layers), len(vs.static_layers)
    fraction = 1 - k / n
    if cfg.token_routers is not None:
        routed = RoutedModel.from_pretrained(shared_copy(model), cfg.token_routers)
        if routed.router_config.unit != "token" or routed.router_config.granularity != "attention":
            raise ValueError(
                f"--token-routers {cfg.token_routers} holds {routed.router_config.unit}-level "
                f"{routed.router_config.granularity} routers; token bench needs token-level attention routers"
            )
        if routed.routed_layers != vs.routed_layers:
            raise ValueError(
                f"--token-routers route layers {routed.routed_layers}, the bench's sequence side "
                f"routes {vs.routed_layers}; train both on the same layers"
            )
        routed.router_config.token_top_k = fraction
        source = f"trained token routers from {cfg.token_routers}, top-k at fraction {fraction:.3f}"
    else:
        routed = RoutedModel(
            shared_copy(model), RouterConfig(unit="token", layers=vs.routed_layers, token_top_k=fraction)
        )
        synthetic_routers(routed, cfg.seed)
        source = f"synthetic seeded token routers (seed {cfg.seed}), top-k at fraction {fraction:.3f}"
    config = model.config
    variant = Variant(
        "token",
        routed,
        lambda: TokenRoutedCache(config=config),
        None,
        description=f"token-routed RoutedModel ({source})",
    )
    variant.cache_key = vs.variants[0].cache_key
    return variant, fraction, source


def token_flops(
    flops: FlopCounter,
    start: int,
    end: int,
    batch: int,
    runs: dict[int, torch.Tensor],
    prior: dict[int, torch.Tensor],
    logit_positions: int,
) -> int:
    """FLOPs of `batch` rows processing positions start..end-1 where, at token-routed layer l, runs[l] (B, T)
    says which tokens ran and prior[l] (B,) how many had run there before `start`."""
    tokens = end - start
    total = batch * tokens * flops.num_layers * flops.mlp() + batch * logit_positions * flops.lm_head()
    per_key = 4 * flops.num_heads * flops.head_dim
    for layer in range(flops.num_layers):
        if layer not in runs:
            total += batch * (tokens * flops.attention_projections() + flops.attention_scores(layer, start, end))
            continue
        ran = runs[layer].long().sum(1)  # (B,)
        for before, n in zip(prior[layer].tolist(), ran.tolist()):
            # the j-th token to run this layer attends to j keys (the ones that ran, itself included); a window
            # caps it (an upper bound: keys that ran inside the window are at most that many)
            keys = sum(min(j, flops.windows[layer] or j) for j in range(before + 1, before + n + 1))
            total += n * flops.attention_projections() + per_key * keys
    return total


def _routed_pairs(runs: dict[int, torch.Tensor]) -> tuple[int, int]:
    executed = sum(int(r.sum()) for r in runs.values())
    return executed, sum(r.numel() for r in runs.values())


def _collect(calls) -> dict[int, torch.Tensor]:
    """(B, T) decisions per token-routed layer over the calls, concatenated along time."""
    out: dict[int, list[torch.Tensor]] = {}
    for call in calls:
        for layer, runs in call.token_runs.items():
            out.setdefault(layer, []).append(runs.cpu())
    return {layer: torch.cat(parts, dim=1) for layer, parts in out.items()}


def bench_token_prefill(
    vs: VariantSet,
    token: Variant,
    length: int,
    batch: int,
    cfg: BenchConfig,
    flops: FlopCounter,
    device,
    clock: Clock,
    seed: int,
    recorded_warm_up: bool = False,
) -> TokenRow:
    """One prefill row: dense, sequence and token routing interleaved, `cfg.repeats` times.
    `recorded_warm_up`: the untimed runs that record the token side's decisions and both KV byte counts are
    those variants' warm-up, so with `cfg.warmup` 1 only the sequence side runs once more (a lean run for a
    starved machine); otherwise every variant gets `cfg.warmup` (at least one) warm-up runs of its own."""
    dense, sequence = vs.variants[0], _by_name(vs, "routed_static_set")
    ids = random_ids(flops.vocab_size, batch, length, seed, device)
    pair = [dense, sequence, token]
    with routing.record() as calls:
        _, cache = prefill(token, ids)
    runs = _collect(calls)
    token_kv = kv_bytes(cache)
    _, dense_cache = prefill(dense, ids)
    dense_kv = kv_bytes(dense_cache)
    del cache, dense_cache
    for v in pair:
        already = 1 if recorded_warm_up and v is not sequence else 0
        for _ in range(max(cfg.warmup, 1) - already):
            prefill(v, ids)
    times = {v.name: [] for v in pair}
    for r in range(cfg.repeats):
        for v in rotated(pair, r):
            _, seconds, _ = clock(lambda: prefill(v, ids))
            times[v.name].append(seconds)
    n_layers = flops.num_layers
    seq_exec = [0 if layer in sequence.skip_layers else batch for layer in range(n_layers)]
    dense_flops = flops.forward(0, length, [batch] * n_layers, batch, 1)
    seq_flops = flops.forward(0, length, seq_exec, batch, 1)
    zeros = {layer: torch.zeros(batch, dtype=torch.long) for layer in runs}
    tok_flops = token_flops(flops, 0, length, batch, runs, zeros, 1)
    return _row(
        "prefill", length, 0, batch, times, runs, vs, dense_flops, seq_flops, tok_flops, token_kv, dense_kv, n_layers
    )


def bench_token_decode(
    vs: VariantSet, token: Variant, batch: int, cfg: BenchConfig, flops: FlopCounter, device, clock: Clock, seed: int
) -> TokenRow:
    dense, sequence = vs.variants[0], _by_name(vs, "routed_static_set")
    prompt, steps = cfg.decode_prompt, cfg.decode_tokens
    ids = random_ids(flops.vocab_size, batch, prompt, seed, device)
    pair = [dense, sequence, token]
    state = {}
    prior = None
    for v in pair:
        with routing.record() as calls:
            out, cache = prefill(v, ids)
        if v is token:
            prior = {layer: r.long().sum(1) for layer, r in _collect(calls).items()}
        next_ids = out.logits[:, -1:].argmax(-1)
        warm = copy.deepcopy(cache)
        warm_ids = next_ids
        for _ in range(max(cfg.warmup, 1) * 2):
            warm_ids = decode_step(v, warm, warm_ids)
        del warm
        state[v.name] = [cache, next_ids]
    times = {v.name: [] for v in pair}
    token_calls = []
    for i in range(steps):
        for v in rotated(pair, i):
            cache, next_ids = state[v.name]
            with routing.record() as calls:
                state[v.name][1], seconds, _ = clock(lambda: decode_step(v, cache, next_ids))
            if v is token:
                token_calls.extend(calls)
            times[v.name].append(seconds)
    runs = _collect(token_calls)
    token_kv, dense_kv = kv_bytes(state["token"][0]), kv_bytes(state[dense.name][0])
    n_layers = flops.num_layers
    seq_exec = [0 if layer in sequence.skip_layers else batch for layer in range(n_layers)]
    dense_flops = flops.forward(prompt, prompt + steps, [batch] * n_layers, batch, steps)
    seq_flops = flops.forward(prompt, prompt + steps, seq_exec, batch, steps)
    tok_flops = token_flops(flops, prompt, prompt + steps, batch, runs, prior, steps)
    # the cache after decode holds the prompt's and the decoded tokens' executed pairs
    stored = {layer: int(prior[layer].sum()) + int(runs[layer].sum()) for layer in runs}
    return _row(
        "decode",
        prompt,
        steps,
        batch,
        times,
        runs,
        vs,
        dense_flops,
        seq_flops,
        tok_flops,
        token_kv,
        dense_kv,
        n_layers,
        stored=stored,
    )


def _by_name(vs: VariantSet, name: str) -> Variant:
    return next(v for v in vs.variants if v.name == name)


def _row(
    phase,
    length,
    new_tokens,
    batch,
    times,
    runs,
    vs,
    dense_flops,
    seq_flops,
    tok_flops,
    token_kv,
    dense_kv,
    n_layers,
    stored=None,
) -> TokenRow:
    """`runs`: the timed work's decisions (executed fraction); `stored`: tokens holding K/V per token layer."""
    executed, pairs = _routed_pairs(runs)
    n_routed, k = len(vs.routed_layers), len(vs.static_layers)
    if stored is None:
        stored = {layer: int(r.sum()) for layer, r in runs.items()}
    # KV: every stored (token, layer) pair holds the same bytes; dense holds every position at every layer
    per_position = _bytes_per_position(vs)
    positions = dense_kv // (n_layers * batch * per_position)
    expected = per_position * ((n_layers - len(stored)) * batch * positions + sum(stored.values()))
    dense_t, seq_t, tok_t = times[vs.variants[0].name], times["routed_static_set"], times["token"]
    speed = paired_ratio(dense_t, tok_t)
    ideal = dense_flops / tok_flops
    return TokenRow(
        phase=phase,
        length=length,
        new_tokens=new_tokens,
        batch=batch,
        token_executed_fraction=executed / pairs if pairs else float("nan"),
        sequence_executed_fraction=1 - k / n_routed,
        dense_s=median(dense_t),
        sequence_s=median(seq_t),
        token_s=median(tok_t),
        speedup_vs_dense=speed,
        speedup_vs_dense_ci=paired_ratio_ci(dense_t, tok_t),
        speedup_vs_sequence=paired_ratio(seq_t, tok_t),
        speedup_vs_sequence_ci=paired_ratio_ci(seq_t, tok_t),
        sequence_speedup_vs_dense=paired_ratio(dense_t, seq_t),
        ideal_vs_dense=ideal,
        ideal_vs_sequence=seq_flops / tok_flops,
        achieved_over_ideal=speed / ideal,
        token_kv_bytes=token_kv,
        token_kv_bytes_expected=expected,
        token_kv_equal=token_kv == expected,
    )


def _bytes_per_position(vs) -> int:
    """K + V bytes of one token at one layer."""
    model = vs.variants[0].model
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    return 2 * cfg.num_key_value_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def run_token_bench(
    model, vs: VariantSet, cfg: BenchConfig, flops: FlopCounter, device, clock: Clock, note
) -> TokenBench:
    if any(w for w in flops.windows):
        raise ValueError(
            "the token bench compares KV bytes and FLOPs on full-attention models; this model has "
            "sliding-window layers (token layers keep every executed token and mask the window)"
        )
    token, fraction, source = token_variant(model, vs, cfg)
    result = TokenBench(description=token.description, fraction=fraction)
    cap = cfg.prefill_token_cap()
    for offset, batch in enumerate(cfg.batch_sizes):
        for length in cfg.lengths:
            if cap is not None and batch * length > cap:
                continue
            note(f"token prefill L={length} B={batch}")
            result.rows.append(
                bench_token_prefill(
                    vs, token, length, batch, cfg, flops, device, clock, cfg.seed + 300 + offset * 1000 + length
                )
            )
        note(f"token decode B={batch}")
        result.rows.append(bench_token_decode(vs, token, batch, cfg, flops, device, clock, cfg.seed + 400 + batch))
    lengths = sorted({r.length for r in result.rows if r.phase == "prefill"})
    target = TOKEN_TARGET_LENGTH if TOKEN_TARGET_LENGTH in lengths else (lengths[-1] if lengths else None)
    result.prefill_ideal_length = target
    result.prefill_ideal = {
        f"B={r.batch}": r.achieved_over_ideal for r in result.rows if r.phase == "prefill" and r.length == target
    }
    if result.prefill_ideal:
        result.met = min(result.prefill_ideal.values()) >= TOKEN_PREFILL_IDEAL_TARGET
    return result


def token_table(token: dict) -> list[str]:
    """Markdown rows of the token section of a bench JSON (for the CLI and the report)."""
    lines = [
        f"\nToken routing ({token['description']}):",
        "| phase | L | new | B | executed (token / seq) | dense s | seq s | token s | x dense | x seq | "
        "ideal x dense | achieved/ideal | KV = executed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in token["rows"]:
        lines.append(
            f"| {r['phase']} | {r['length']} | {r['new_tokens']} | {r['batch']} | "
            f"{r['token_executed_fraction']:.3f} / {r['sequence_executed_fraction']:.3f} | {r['dense_s']:.4f} | "
            f"{r['sequence_s']:.4f} | {r['token_s']:.4f} | {r['speedup_vs_dense']:.2f} | "
            f"{r['speedup_vs_sequence']:.2f} | {r['ideal_vs_dense']:.2f} | {r['achieved_over_ideal']:.2f} | "
            f"{'yes' if r['token_kv_equal'] else 'NO'} |"
        )
    if token.get("prefill_ideal"):
        lines.append(
            f"token prefill achieved/ideal at L={token['prefill_ideal_length']}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in token["prefill_ideal"].items())
            + f" (target >= {token['prefill_ideal_target']}: {'met' if token['met'] else 'NOT met'})"
        )
    return lines

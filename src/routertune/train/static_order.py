"""A searched static drop order: the attention sublayers whose removal costs the least KL to the dense model,
found by search on the tuning data instead of ranked by 1 - cos importance.

Greedy: start from the empty set and add, one at a time, the candidate layer whose attention output zeroed
(static_drop.zeroed_attention's semantics) raises the mean per-token KL(dense || variant) the least. The result
is an ORDER: its first k layers are the k-layer drop set. Optionally a beam of width B keeps the B best sets
of each size (each reached through its cheapest chain of nested sets), and a swap refinement improves the
chain afterwards without making any of its sets worse.

Cost: the dense log-probabilities are computed once; a set is evaluated from the cached hidden state
entering the earliest layer where it differs from the set whose hidden states are cached (a candidate added
to the current set: from the candidate's own layer), so a late candidate costs a few layers. Rows of a batch
may carry different sets (per-row masks on the attention outputs), which the per-input oracles of
routertune.eval.headroom use.

The result is cached as a small JSON (written atomically after every step) keyed by the settings, the model
and a fingerprint of the scored tokens, so an interrupted search continues and a finished one is returned.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from routertune.base_model import default_cache_dir, portable_name
from routertune.files import write_json
from routertune.routing import arch
from routertune.routing.static_drop import droppable_layers

FORMAT = 1
RESULT_NAME = "static_order.json"


# --- data ------------------------------------------------------------------------------------------------------
@dataclass
class ScoreBatch:
    """Right-padded rows and, per named mask, the positions whose next-token KL counts (B, T bool)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    masks: dict[str, torch.Tensor]  # name -> (B, T) bool: position t counts (it predicts token t + 1)


def score_batches(
    rows: Sequence[tuple[list[int], dict[str, list[bool]]]], pad_id: int, batch_size: int = 8
) -> tuple[list[ScoreBatch], list[list[int]]]:
    """Batches of (token ids, {mask name: per-position flags}) rows, longest first (little padding). Returns the
    batches and, per batch, the row indices it holds."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    names = sorted({name for _, masks in rows for name in masks})
    batches, index = [], []
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        width = max(len(rows[i][0]) for i in chosen)
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chosen), width), dtype=torch.long)
        masks = {name: torch.zeros((len(chosen), width), dtype=torch.bool) for name in names}
        for b, i in enumerate(chosen):
            tokens, flags = rows[i]
            ids[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            attention[b, : len(tokens)] = 1
            for name, values in flags.items():
                if len(values) != len(tokens):
                    raise ValueError(f"row {i}: mask {name!r} has {len(values)} flags for {len(tokens)} tokens")
                masks[name][b, : len(tokens)] = torch.tensor(values, dtype=torch.bool)
        batches.append(ScoreBatch(ids, attention, masks))
        index.append(chosen)
    return batches, index


def tuning_rows(
    tokenizer, n_records: int = 32, max_length: int = 256, plain_text: float = 0.5, records: list[dict] | None = None
) -> list[tuple[list[int], dict[str, list[bool]]]]:
    """The tuning data as the routers' training sees it: the default mix's training records (`plain_text` of
    them rendered as plain text, as `routertune train` does), tokenized by data.encode_record at
    `max_length`; the KL counts where the training loss does (the response tokens: position t predicts
    labelled token t + 1). Never held-out text."""
    from routertune.train import data

    if records is None:
        records = data.mix_forms(data.default_records("train", n=n_records), plain_text)
    rows = []
    for example in data.encode_records(records[:n_records], tokenizer, max_length)[0]:
        labelled = [label != data.IGNORE_INDEX for label in example.labels]
        rows.append((example.input_ids, {"kl": labelled[1:] + [False]}))
    if not rows:
        raise ValueError("no tuning records to search on (n_records must be >= 1)")
    return rows


# --- the evaluator -----------------------------------------------------------------------------------------------
class LayerEvaluator:
    """KL(dense || variant) sums per row and mask of one batch, where the variant zeroes the attention output of
    a per-row set of layers. Holds the hidden states entering every layer under one committed per-row state
    (initially dense) and runs only from the earliest layer where an evaluated set differs from it."""

    def __init__(self, model: nn.Module, batch: ScoreBatch):
        self.model = model
        self.spec = arch.arch_spec(model)
        self.blocks = arch.blocks_of(model)
        self.num_layers = len(self.blocks)
        decoder = arch.decoder_of(model)
        self.norm = getattr(decoder, "norm", None)
        self.head = model.get_output_embeddings()
        if self.norm is None or self.head is None:
            raise ValueError(
                f"{type(model).__name__}: no final norm / output embeddings found; the layer "
                "evaluator needs a decoder with `.norm` and an LM head"
            )
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.batch = batch
        rows = batch.input_ids.shape[0]
        union = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
        for mask in batch.masks.values():
            union |= mask
        self.where = union.nonzero(as_tuple=True)  # (rows, positions) whose logits are computed
        self.row_of = self.where[0]
        self.mask_at = {name: mask[self.where] for name, mask in batch.masks.items()}  # (N,) bool per mask
        self.rows = rows
        self.keep: dict[int, torch.Tensor] = {}  # layer -> (B,) bool: attention output kept on this row
        self._hooks = []
        self.inputs: list[torch.Tensor | None] = [None] * self.num_layers  # hidden state entering each layer
        self.kwargs: list[dict] = [{}] * self.num_layers
        self.state: list[frozenset] = [frozenset()] * rows
        self._dense()

    # the dense pass: layer inputs, the per-layer call arguments, dense log-probabilities at the scored positions
    @torch.inference_mode()
    def _dense(self) -> None:
        captured: dict[int, tuple] = {}

        def capture(idx):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                captured[idx] = (hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}, args[1:])

            return hook

        handles = [block.register_forward_pre_hook(capture(i), with_kwargs=True) for i, block in enumerate(self.blocks)]
        try:
            self.model(
                input_ids=self.batch.input_ids,
                attention_mask=self.batch.attention_mask,
                use_cache=False,
                logits_to_keep=1,
            )
        finally:
            for h in handles:
                h.remove()
        for i in range(self.num_layers):
            hidden, kwargs, extra_args = captured[i]
            if extra_args:
                raise ValueError(
                    f"{type(self.blocks[i]).__name__} receives positional arguments besides the hidden "
                    "states; the layer evaluator replays keyword arguments only"
                )
            self.inputs[i] = hidden.detach()
            self.kwargs[i] = kwargs
        final = self._run(0, [frozenset()] * self.rows, store=False)
        self.dense_logp = self._logp(final)  # (N, V)
        self.dense_p = self.dense_logp.exp()

    def _install(self) -> None:
        for idx, block in enumerate(self.blocks):
            attention = getattr(block, self.spec.attention)
            attention = getattr(attention, "base_layer", attention)

            def zero(module, args, output, idx=idx):
                keep = self.keep.get(idx)
                if keep is None:
                    return output
                first = output[0] if isinstance(output, tuple) else output
                first = torch.where(keep.view(-1, *([1] * (first.dim() - 1))), first, torch.zeros_like(first))
                return (first, *output[1:]) if isinstance(output, tuple) else first

            self._hooks.append(attention.register_forward_hook(zero))

    def _remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.inference_mode()
    def _run(self, start: int, sets: Sequence[frozenset], store: bool) -> torch.Tensor:
        """Hidden states after the last layer, from the cached input of layer `start` with `sets` zeroed."""
        hidden = self.inputs[start]
        self._install()
        try:
            for idx in range(start, self.num_layers):
                if store:
                    self.inputs[idx] = hidden
                dropped = [idx in s for s in sets]
                self.keep = {idx: ~torch.tensor(dropped, dtype=torch.bool)} if any(dropped) else {}
                out = self.blocks[idx](hidden, **self.kwargs[idx])
                hidden = out[0] if isinstance(out, tuple) else out
        finally:
            self.keep = {}
            self._remove()
        return hidden

    def _logp(self, final: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(final[self.where])).float()  # (N, V)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.log_softmax(logits, dim=-1)

    def _start(self, sets: Sequence[frozenset]) -> int:
        diffs = [min(s ^ c) for s, c in zip(sets, self.state) if s != c]
        return min(diffs, default=self.num_layers - 1)

    @torch.inference_mode()
    def evaluate(self, sets: Sequence[Iterable[int]]) -> dict[str, torch.Tensor]:
        """Per mask, (B,) float64 summed KL(dense || variant) over the row's positions, the variant zeroing
        `sets[b]`'s attention outputs on row b."""
        sets = [frozenset(s) for s in sets]
        if len(sets) != self.rows:
            raise ValueError(f"{len(sets)} sets for {self.rows} rows")
        logq = self._logp(self._run(self._start(sets), sets, store=False))
        kl = (self.dense_p * (self.dense_logp - logq)).sum(-1).double()  # (N,)
        out = {}
        for name, at in self.mask_at.items():
            sums = torch.zeros(self.rows, dtype=torch.float64)
            sums.index_add_(0, self.row_of[at], kl[at])
            out[name] = sums
        return out

    def commit(self, sets: Sequence[Iterable[int]]) -> None:
        """Cache the layer inputs under `sets` (later evaluations run from where they differ from these)."""
        sets = [frozenset(s) for s in sets]
        start = self._start(sets)
        if any(s != c for s, c in zip(sets, self.state)):
            self._run(start, sets, store=True)
        self.state = sets

    def tokens(self, name: str) -> torch.Tensor:
        return self.batch.masks[name].sum(-1).double()


class SetScorer:
    """Mean per-token KL of one drop set applied to every row of every batch (the static-drop objective)."""

    def __init__(self, model: nn.Module, batches: Sequence[ScoreBatch], mask: str = "kl"):
        self.evaluators = [LayerEvaluator(model, b) for b in batches]
        self.mask = mask
        self.tokens = float(sum(float(e.tokens(mask).sum()) for e in self.evaluators))
        if self.tokens == 0:
            raise ValueError(f"no scored positions (mask {mask!r}) in the data")
        self.evaluations = 0

    def kl(self, layers: Iterable[int]) -> float:
        layers = frozenset(layers)
        self.evaluations += 1
        total = sum(float(e.evaluate([layers] * e.rows)[self.mask].sum()) for e in self.evaluators)
        return total / self.tokens

    def commit(self, layers: Iterable[int]) -> None:
        layers = frozenset(layers)
        for e in self.evaluators:
            e.commit([layers] * e.rows)


# --- the search --------------------------------------------------------------------------------------------------
@dataclass
class OrderSettings:
    """Everything that shapes the order (with the model and the data fingerprint, the cache key)."""

    max_count: int = 12
    beam: int = 1
    swaps: bool = False
    candidates: list[int] | None = None  # default: static_drop.droppable_layers
    n_records: int = 32
    max_length: int = 256
    plain_text: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if self.max_count < 1:
            problems.append(f"max_count={self.max_count} must be >= 1")
        if self.beam < 1:
            problems.append(f"beam={self.beam} must be >= 1")
        if self.n_records < 1 or self.max_length < 2:
            problems.append(f"n_records={self.n_records} must be >= 1 and max_length={self.max_length} >= 2")
        if not 0 <= self.plain_text <= 1:
            problems.append(f"plain_text={self.plain_text} must lie in [0, 1]")
        if problems:
            raise ValueError("Invalid static order settings: " + "; ".join(problems))

    def key(self) -> dict:
        """The settings a stored search must share to be continued. max_count is left out without swaps: a
        greedy or beam search to more layers extends the same chain (its stored steps stay valid)."""
        out = asdict(self)
        if not self.swaps:
            out.pop("max_count")
        return out


@dataclass
class StaticOrder:
    order: list[int]  # nested: the first k layers are the k-layer set
    kl: list[float]  # mean per-token KL of the first k layers, k = 1..len(order)
    best_sets: list[dict] = field(default_factory=list)  # per k: {"layers", "kl"}, the best k-set found
    settings: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    beam_state: list[dict] = field(default_factory=list)  # the last step's beam (resume)
    swaps_done: bool = False
    evaluations: int = 0
    seconds: float = 0.0
    finished: bool = False

    def first(self, k: int) -> list[int]:
        if not 0 <= k <= len(self.order):
            raise ValueError(f"the searched order holds {len(self.order)} layers; cannot take {k}")
        return sorted(self.order[:k])

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, payload: dict) -> StaticOrder:
        if payload.get("format") != FORMAT:
            raise ValueError(f"static order file format {payload.get('format')!r}, expected {FORMAT}")
        return cls(**{k: v for k, v in payload.items() if k != "format"})


def search(
    scorer: Callable[[frozenset], float],
    candidates: Sequence[int],
    max_count: int,
    beam: int = 1,
    commit: Callable[[frozenset], None] | None = None,
    previous: StaticOrder | None = None,
    on_step: Callable[[StaticOrder], None] | None = None,
) -> StaticOrder:
    """Greedy (beam=1) or beam search of a nested order over `candidates`.

    Every set in the beam keeps its cheapest chain of nested sets (the sum of the KLs of its prefixes); the
    B lowest-KL sets of each size are expanded by one candidate each. The returned order is the chain, among
    the final beam, with the lowest summed KL over its sizes; `best_sets` holds, per size, the lowest-KL set
    seen. With B >= C(n, k) for every k the beam holds every set, so both are exact (exhaustive).
    Ties go to the lower layer index (greedy) / the lexicographically smaller sorted set."""
    candidates = sorted(set(candidates))
    if max_count > len(candidates):
        raise ValueError(f"max_count={max_count} exceeds the {len(candidates)} candidate layers")
    result = previous or StaticOrder([], [])
    if not result.beam_state:
        result.beam_state = [{"chain": [], "kls": [], "cost": 0.0}]
    start_size = len(result.beam_state[0]["chain"])
    for _size in range(start_size + 1, max_count + 1):
        children: dict[frozenset, dict] = {}
        for parent in result.beam_state:
            parent_set = frozenset(parent["chain"])
            if commit is not None:
                commit(parent_set)
            for layer in candidates:
                if layer in parent_set:
                    continue
                child = parent_set | {layer}
                kl = children[child]["kl"] if child in children else scorer(child)
                cost = parent["cost"] + kl
                known = children.get(child)
                if known is None or cost < known["cost"] - 1e-15:
                    children[child] = {
                        "chain": parent["chain"] + [layer],
                        "kls": parent["kls"] + [kl],
                        "cost": cost,
                        "kl": kl,
                    }
        ranked = sorted(children.items(), key=lambda item: (item[1]["kl"], sorted(item[0])))
        best_set, best = ranked[0]
        result.best_sets.append({"layers": sorted(best_set), "kl": best["kl"]})
        result.beam_state = [{k: v for k, v in entry.items() if k != "kl"} for _, entry in ranked[:beam]]
        chosen = min(result.beam_state, key=lambda e: (e["cost"], e["chain"]))
        result.order, result.kl = list(chosen["chain"]), list(chosen["kls"])
        if on_step is not None:
            on_step(result)
    return result


def refine_swaps(
    scorer: Callable[[frozenset], float],
    candidates: Sequence[int],
    result: StaticOrder,
    commit: Callable[[frozenset], None] | None = None,
    max_passes: int = 3,
) -> StaticOrder:
    """Improve the chain by moves that make none of its nested sets worse and at least one better: swapping
    two adjacent layers (changes one set) or replacing a layer by one outside the chain (changes every set
    from its position on). Repeated until a pass finds no move (at most `max_passes`)."""
    order, kls = list(result.order), list(result.kl)

    def chain_kls(chain: list[int], since: int) -> list[float]:
        out = kls[:since]
        for k in range(since, len(chain)):
            layers = frozenset(chain[: k + 1])
            if commit is not None:
                commit(frozenset(chain[:k]))
            out.append(scorer(layers))
        return out

    for _ in range(max_passes):
        improved = False
        moves = [("swap", i, None) for i in range(len(order) - 1)]
        moves += [("replace", i, x) for i in range(len(order)) for x in candidates if x not in order]
        for kind, i, x in moves:
            if kind == "replace" and x in order:
                continue
            trial = list(order)
            if kind == "swap":
                trial[i], trial[i + 1] = trial[i + 1], trial[i]
            else:
                trial[i] = x
            new = chain_kls(trial, i)
            if all(a <= b + 1e-15 for a, b in zip(new, kls)) and any(a < b - 1e-12 for a, b in zip(new, kls)):
                order, kls, improved = trial, new, True
        if not improved:
            break
    result.order, result.kl, result.swaps_done = order, kls, True
    for k, value in enumerate(kls):
        if value < result.best_sets[k]["kl"]:
            result.best_sets[k] = {"layers": sorted(order[: k + 1]), "kl": value}
    return result


# --- identity, cache, driver -------------------------------------------------------------------------------------
def model_identity(model: nn.Module) -> dict:
    """Name, layer count and a sha256 over the parameters (the same weights under another path match)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            if param.dtype != torch.bfloat16
            else param.float().numpy().tobytes()
        )
    return {
        "name": portable_name(model),
        "model_type": model.config.model_type,
        "num_hidden_layers": int(model.config.num_hidden_layers),
        "sha256": digest.hexdigest(),
    }


def data_fingerprint(rows: Sequence[tuple[list[int], dict[str, list[bool]]]]) -> dict:
    digest = hashlib.sha256()
    for tokens, masks in rows:
        digest.update(json.dumps([tokens, {k: [int(v) for v in m] for k, m in sorted(masks.items())}]).encode())
    return {
        "rows": len(rows),
        "tokens": sum(len(t) for t, _ in rows),
        "scored": sum(sum(m.get("kl", [])) for _, m in rows),
        "sha256": digest.hexdigest(),
    }


def searched_order(
    model: nn.Module,
    tokenizer,
    settings: OrderSettings | None = None,
    path: str | Path | None = None,
    on_mismatch: str = "refuse",
    batch_size: int = 8,
    records: list[dict] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> StaticOrder:
    """The searched static order of `model` on the tuning data (see tuning_rows), cached in `path` (a JSON
    file; None = no cache). A stored search with the same settings, model and data is returned, or continued
    where it stopped; one with other settings is refused (on_mismatch="refuse", the error names what
    differs) or replaced (on_mismatch="recompute")."""
    if on_mismatch not in ("refuse", "recompute"):
        raise ValueError(f"on_mismatch={on_mismatch!r} is not one of refuse, recompute")
    settings = settings or OrderSettings()
    num_layers = int(model.config.num_hidden_layers)
    candidates = settings.candidates if settings.candidates is not None else droppable_layers(num_layers)
    bad = [c for c in candidates if not 0 <= c < num_layers]
    if bad:
        raise ValueError(f"candidate layers {bad} do not exist in a {num_layers}-layer model")
    rows = tuning_rows(tokenizer, settings.n_records, settings.max_length, settings.plain_text, records)
    identity, fingerprint = model_identity(model), data_fingerprint(rows)
    previous = None
    if path is not None and Path(path).exists():
        stored = StaticOrder.from_json(json.loads(Path(path).read_text()))
        differ = _differences(stored, settings, identity, fingerprint)
        if differ and on_mismatch == "refuse":
            raise ValueError(
                f"{path} holds a search with other {'; '.join(differ)}; pass the same settings, "
                "another path, or on_mismatch='recompute' to replace it"
            )
        if not differ:
            previous = stored
    if previous is not None and (
        len(previous.order) >= settings.max_count and (previous.swaps_done or not settings.swaps)
    ):
        log(f"static order: {path} holds the finished search")
        return _truncated(previous, settings.max_count)
    if previous is not None:
        log(f"static order: continuing {path} from {len(previous.order)} layers")
        if previous.swaps_done:  # more layers than the refined chain: search again from the beam state
            previous.swaps_done = False
    started = time.perf_counter()
    spent = previous.seconds if previous else 0.0
    evaluated = previous.evaluations if previous else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches, _ = score_batches(rows, pad, batch_size)
    scorer = SetScorer(model, batches)
    result = previous or StaticOrder(
        [], [], settings=settings.key() | {"max_count": settings.max_count}, model=identity, data=fingerprint
    )
    result.settings = settings.key() | {"max_count": settings.max_count}
    result.finished = False

    def save(r: StaticOrder) -> None:
        r.evaluations = evaluated + scorer.evaluations
        r.seconds = spent + time.perf_counter() - started
        log(f"static order: {len(r.order)} layers {r.order} KL {r.kl[-1]:.5f} ({r.seconds:.0f}s)")
        if path is not None:
            write_json(path, r.to_json())

    result = search(scorer.kl, candidates, settings.max_count, settings.beam, scorer.commit, result, save)
    if settings.swaps:
        result = refine_swaps(scorer.kl, candidates, result, scorer.commit)
    result.finished = True
    save(result)
    return _truncated(result, settings.max_count)


def _truncated(result: StaticOrder, count: int) -> StaticOrder:
    if len(result.order) <= count:
        return result
    copy = StaticOrder.from_json(result.to_json())
    copy.order, copy.kl, copy.best_sets = copy.order[:count], copy.kl[:count], copy.best_sets[:count]
    return copy


def _differences(stored: StaticOrder, settings: OrderSettings, identity: dict, fingerprint: dict) -> list[str]:
    out = []
    theirs = {k: v for k, v in stored.settings.items() if k in settings.key()}
    if theirs != settings.key():
        out.append(
            "settings ("
            + ", ".join(
                f"{k} {theirs.get(k)!r} there, {v!r} here" for k, v in settings.key().items() if theirs.get(k) != v
            )
            + ")"
        )
    if stored.model != identity:
        out.append(
            f"model ({stored.model.get('name')!r} sha256 {stored.model.get('sha256', '')[:12]} there, "
            f"{identity['name']!r} sha256 {identity['sha256'][:12]} here)"
        )
    if stored.data != fingerprint:
        out.append(f"data (fingerprint {stored.data.get('sha256', '')[:12]} there, {fingerprint['sha256'][:12]} here)")
    return out


def read_order(path: str | Path, identity: dict, flag: str = "the static order file") -> StaticOrder:
    """A stored search from `path` (a static_order.json or the folder holding one), refused unless it was
    searched on the model whose `model_identity` is `identity` and holds at least one layer."""
    path = Path(path)
    path = path if path.suffix == ".json" else path / RESULT_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{flag}: no {path}; pass the folder or file a static order search wrote, or leave it out to search here"
        )
    found = StaticOrder.from_json(json.loads(path.read_text()))
    if found.model.get("sha256") != identity["sha256"]:
        raise ValueError(
            f"{flag} {path} was searched on another model ({found.model.get('name')!r}, sha256 "
            f"{found.model.get('sha256', '')[:12]}), not this one (sha256 {identity['sha256'][:12]}); pass that "
            "model's search or leave it out to search here"
        )
    if not found.order:
        raise ValueError(f"{flag} {path} holds no layer yet; let the search run or leave it out")
    return found


SHIPPED = Path(__file__).with_name("orders")  # searches shipped with the package (the embedded default model's)


def shipped_order(identity: dict) -> StaticOrder | None:
    """A search shipped with routertune for the model whose weights hash to identity["sha256"], if any."""
    for path in sorted(SHIPPED.glob("*.json")):
        found = StaticOrder.from_json(json.loads(path.read_text()))
        if found.model.get("sha256") == identity["sha256"]:
            return found
    return None


def order_for(
    model: nn.Module,
    tokenizer,
    count: int,
    path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    candidates: list[int] | None = None,
    log: Callable[[str], None] = lambda s: None,
    flag: str = "--static-order",
) -> StaticOrder:
    """The searched static order of `model`, at least `count` layers long where searched here: read from `path`
    when given; else the search shipped with routertune for these weights when its settings are these; else
    searched on the tuning data (16 records of at most 128 tokens, as plain text when the tokenizer has no chat
    template) and cached under `cache_dir` (default: the routertune cache), continued there when longer is
    needed."""
    identity = model_identity(model)
    if path is not None:
        return read_order(path, identity, flag=flag)
    if candidates is not None and list(candidates) == droppable_layers(int(model.config.num_hidden_layers)):
        candidates = None  # the default candidates: the same search (and cache key) as passing none
    plain = 0.5 if getattr(tokenizer, "chat_template", None) else 1.0
    settings = OrderSettings(max_count=count, n_records=16, max_length=128, plain_text=plain, candidates=candidates)
    shipped = shipped_order(identity)
    if shipped is not None and len(shipped.order) >= count:
        fingerprint = data_fingerprint(tuning_rows(tokenizer, settings.n_records, settings.max_length, plain))
        if not _differences(shipped, settings, identity, fingerprint):
            log(f"static order: the search shipped for this model: {shipped.order}")
            return shipped
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(json.dumps(settings.key(), sort_keys=True).encode()).hexdigest()[:8]
    cached = root / "static_order" / f"{identity['sha256'][:16]}-{key}.json"
    log(f"static order: searching {count} layers on the tuning data (cached in {cached})")
    return searched_order(model, tokenizer, settings, cached, on_mismatch="recompute", log=log)


def run_static_order(
    output: str | Path,
    model: str | None = None,
    cache_dir: str | None = None,
    settings: OrderSettings | None = None,
    on_mismatch: str = "refuse",
    log: Callable[[str], None] = print,
) -> StaticOrder:
    """CLI-free driver: load the base model (default SmolLM2-135M-Instruct) and search (or continue, or
    return) the order cached in `output` (a folder: static_order.json, or a .json path)."""
    from routertune.base_model import load_model_and_tokenizer

    path = Path(output)
    if path.suffix != ".json":
        path = path / RESULT_NAME
    loaded, tokenizer = load_model_and_tokenizer(model, cache_dir=cache_dir)
    loaded.eval()
    return searched_order(loaded, tokenizer, settings, path, on_mismatch, log=log)

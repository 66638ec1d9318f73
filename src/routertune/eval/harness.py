"""The lm-evaluation-harness LM for routed models, and harness runs.

The harness is the engine: :class:`RoutedLM` is an ``lm_eval`` LM (a ``TemplateLM``, so tokenisation of
context/continuation pairs is the harness's own) and the tasks are the harness's configs reading local data
(:mod:`routertune.eval.tasks`). What routertune adds is how a request is scored:

* **Routed on the context alone.** A loglikelihood request (context, continuation) is scored with routing
  decisions pooled over its context tokens only, as in generation (prefill decides, decode reuses). All
  choices of one item share their context, so every choice runs at the same depth. When the choices of one
  item differ inside the context (WinoGrande puts the option in the context), the decision is pooled over the
  part of the context they share, so here too every choice runs at the same depth. When truncation to the
  model's length cuts into that shared part (differently per choice), the item decides once on it, alone,
  and every choice is scored with those decisions.
* **Shared prefix, packed.** The routed prefix of an item runs once. By default an item is one packed row:
  its prefix, then the rest of each request (continuation, and any unshared context tail) one after the
  other, under a block attention mask (each rest sees the prefix and itself) and with each rest's positions
  continuing the prefix's. Where that mask cannot be used (an attention kernel that takes no custom mask,
  or a row longer than the model's sliding window) the prefix is prefilled once into a RoutedCache and the
  rests run against the expanded cache. Both are the same computation as one forward over context +
  continuation with the decisions pooled over the prefix (tests/test_evaluate.py checks it), at a fraction
  of the cost for multiple-choice tasks. Logits are computed only where a token is scored.
* **Accounting.** Every prefill's decisions are counted per task: per-layer skip rates and the fraction of
  all attention sublayers skipped.

Baselines (dense, static drop, random drop) run through the same class: a plain model, or a model whose
droppable layers are routed and forced to skip a fixed set.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import modeling_utils

from routertune.eval import tasks
from routertune.routing import inject
from routertune.routing import state as routing
from routertune.routing.cache import RoutedCache, cache_kwarg

log = logging.getLogger(__name__)

# transformers 5.20+ take a (B, T) boolean logits_to_keep (each row its own positions, output flattened);
# earlier releases index the sequence axis with it as given
_BOOLEAN_LOGITS_TO_KEEP = hasattr(modeling_utils, "slice_logits_to_keep")

try:  # the harness is a dependency, but keep `import routertune.eval.harness` cheap and its absence explicit
    from lm_eval.api.model import TemplateLM
except ModuleNotFoundError:  # pragma: no cover - exercised only without lm-eval installed
    TemplateLM = object  # type: ignore[misc,assignment]


def _require_harness() -> None:
    if TemplateLM is object:
        raise tasks.TaskError(
            "evaluation runs on lm-evaluation-harness, which is not installed; install it with: pip install lm-eval"
        )


# ---------------------------------------------------------------------------------------------------------
# skip accounting


@dataclass
class SkipStats:
    """Decisions counted over prefills (one per item): how often each routed layer ran."""

    num_layers: int
    sequences: int = 0
    runs: dict[int, int] = field(default_factory=dict)  # layer -> sequences that ran it

    def add(self, decisions: dict[int, torch.Tensor], rows: torch.Tensor | None = None) -> None:
        n = None
        for layer, ran in decisions.items():
            ran = ran if rows is None else ran[rows]
            self.runs[layer] = self.runs.get(layer, 0) + int(ran.sum())
            n = int(ran.numel())
        if n is None:  # no routed layers: a dense model
            n = int(rows.numel()) if rows is not None else 0
        self.sequences += n

    def merge(self, other: SkipStats) -> None:
        self.sequences += other.sequences
        for layer, count in other.runs.items():
            self.runs[layer] = self.runs.get(layer, 0) + count

    @property
    def layer_skip_rate(self) -> dict[int, float]:
        return (
            {layer: 1 - count / self.sequences for layer, count in sorted(self.runs.items())} if self.sequences else {}
        )

    @property
    def routed_capacity(self) -> float | None:
        """Executed fraction of the routed sublayers (what calibration targets)."""
        if not self.sequences or not self.runs:
            return None
        return sum(self.runs.values()) / (self.sequences * len(self.runs))

    @property
    def skip_ratio(self) -> float:
        """Skipped fraction of ALL the model's sublayers of the routed kind (e.g. all attention sublayers)."""
        if not self.sequences:
            return 0.0
        skipped = sum(self.sequences - count for count in self.runs.values())
        return skipped / (self.sequences * self.num_layers)

    def summary(self) -> dict:
        return {
            "sequences": self.sequences,
            "skip_ratio": self.skip_ratio,
            "routed_capacity": self.routed_capacity,
            "layer_skip_rate": {str(k): v for k, v in self.layer_skip_rate.items()},
        }


# ---------------------------------------------------------------------------------------------------------
# the harness LM


@dataclass
class ScoredRow:
    """One scored request: input tokens, how many of the last targets are scored, how many leading tokens the
    routing decision is pooled over, and the task it belongs to."""

    tokens: list[int]  # context + continuation (already left-truncated to the model's length)
    n_cont: int  # scored tokens at the end
    n_route: int  # leading tokens the decisions are pooled over (1 <= n_route <= len(tokens) - 1)
    task: str = ""
    # the tokens the decisions come from when they are not the first n_route of `tokens`: an item's shared
    # context that truncation cut into (each choice loses a different number of leading tokens)
    route: tuple[int, ...] | None = None

    @property
    def n_ctx(self) -> int:
        return len(self.tokens) - self.n_cont


class RoutedLM(TemplateLM):
    """An ``lm_eval`` LM for a causal LM with or without routers.

    ``model`` is a Hugging Face causal LM (with routers attached by :class:`routertune.RoutedModel`, or plain);
    ``skip_layers`` forces those routed layers to skip for every input (static / random drop baselines) and
    the other routed layers to run. ``batch_tokens`` bounds the padded tokens of one forward.
    ``share_prefix=False`` runs every request on its own (one forward over context + continuation);
    ``packed=False`` shares the prefix through a KV cache instead of a packed row (both for tests/debugging).
    """

    backend = "causal"

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        skip_layers: Iterable[int] | None = None,
        batch_tokens: int = 4096,
        max_batch: int = 64,
        max_length: int | None = None,
        share_prefix: bool = True,
        packed: bool = True,
        progress: bool = True,
    ):
        _require_harness()
        super().__init__()
        if hasattr(model, "base_model") and hasattr(model, "router_config"):  # a RoutedModel
            model = model.base_model
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.skip_layers = frozenset(int(i) for i in skip_layers) if skip_layers is not None else None
        if self.skip_layers is not None:
            routed = set(inject.routed_sublayers(model))
            if not self.skip_layers <= routed:
                raise ValueError(
                    f"cannot force-skip layers {sorted(self.skip_layers - routed)}: they are not routed "
                    f"(routed: {sorted(routed)})"
                )
        if batch_tokens < 1 or max_batch < 1:
            raise ValueError(f"batch_tokens={batch_tokens} and max_batch={max_batch} must be >= 1")
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        self._max_length = max_length
        self.share_prefix = share_prefix
        self.packed = packed
        self.progress = progress
        self.num_layers = int(model.config.num_hidden_layers)
        self.stats: dict[str, SkipStats] = defaultdict(lambda: SkipStats(self.num_layers))
        self.forward_seconds = 0.0

    # -- harness properties ----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # as the harness's HFLM: BOS if the tokenizer has one, else EOS
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        from lm_eval.models.utils import resolve_max_length

        return resolve_max_length(self.model.config, self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As the harness's HFLM (default tokenizer special tokens unless the string starts with BOS)."""
        from lm_eval.models.utils import has_bos_prefix

        kwargs_ = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kwargs_["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kwargs_)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        return {
            "model_type": self.model.config.model_type,
            "num_hidden_layers": self.num_layers,
            "routed_layers": sorted(inject.routed_sublayers(self.model)),
            "skip_layers": sorted(self.skip_layers) if self.skip_layers is not None else None,
        }

    # -- requests ---------------------------------------------------------------------------------------
    def _encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The harness's TemplateLM.loglikelihood encoding (empty context -> prefix token)."""
        if context == "":
            continuation_enc = self.tok_encode(continuation, add_special_tokens=False)
            if self.prefix_token_id != continuation_enc[0]:
                return [self.prefix_token_id], continuation_enc
            return continuation_enc[:1], continuation_enc[1:]
        return self._encode_pair(context, continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encoded = [self._encode(*req.args) for req in requests]
        items = [(getattr(req, "task_name", None), getattr(req, "doc_id", None)) for req in requests]
        rows = self._rows(encoded, items, [str(getattr(req, "task_name", "") or "") for req in requests])
        return self.score(rows, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Token-level entry point of TemplateLM: each request is routed on its own context."""
        encoded = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        rows = self._rows(encoded, [None] * len(encoded), [""] * len(encoded))
        return self.score(rows, disable_tqdm=disable_tqdm)

    def _rows(self, encoded, items, task_names) -> list[ScoredRow]:
        """Rows routed on their context, or, for the requests of one item, all on the item's routing context:
        the context prefix they share before truncation (the first request's context when they share none).
        Rows are truncated one by one, as the harness's HFLM does; a row whose truncation cut into the routing
        context keeps it in `route`, so every choice of an item runs at the same depth, always."""
        limit = self.max_length + 1
        rows = []
        for (ctx, cont), task in zip(encoded, task_names):
            if not cont:
                raise ValueError("a loglikelihood request has an empty continuation")
            tokens = (ctx + cont)[-limit:]
            n_cont = min(len(cont), len(tokens) - 1)
            rows.append(ScoredRow(tokens, n_cont, max(1, len(tokens) - n_cont), task))
        by_item: dict[tuple, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            if item is not None and item[1] is not None:
                by_item[item].append(index)
        for members in by_item.values():
            if len(members) < 2:
                continue
            contexts = [encoded[i][0] for i in members]
            shared = _common_prefix(contexts)
            route = (contexts[0][:shared] if shared else contexts[0])[-self.max_length :]
            for i in members:
                row = rows[i]
                if route and len(route) <= row.n_ctx and row.tokens[: len(route)] == route:
                    row.n_route = len(route)
                elif route:
                    row.route = tuple(route)
        return rows

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text loglikelihood in the harness's rolling windows. There is no prompt here, so each window
        is routed on the whole window."""
        from lm_eval import utils as lm_utils

        rows, owner = [], []
        for index, req in enumerate(requests):
            (string,) = req.args
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            for ctx, cont in windows:
                tokens = ctx + cont
                rows.append(ScoredRow(tokens, len(cont), len(tokens) - 1, str(getattr(req, "task_name", "") or "")))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self.score(rows, disable_tqdm=disable_tqdm)):
            totals[index] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation (decisions from the prompt, reused while decoding), batched, cut at the stop
        strings. A prompt keeps its last max_length - max_gen_toks tokens, as the harness's HFLM does."""
        prompts, stops, budgets = [], [], []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            if max_new >= self.max_length:
                raise ValueError(
                    f"max_gen_toks={max_new} leaves no room for the prompt within the model's "
                    f"max_length {self.max_length}; lower max_gen_toks or raise max_length"
                )
            prompts.append(self.tok_encode(context)[-(self.max_length - max_new) :])
            stops.append([until] if isinstance(until, str) else list(until))
            budgets.append(max_new)
        outputs: list[str] = [""] * len(requests)
        by_budget: dict[int, list[int]] = defaultdict(list)  # one greedy() call per distinct max_gen_toks
        for index, budget in enumerate(budgets):
            by_budget[budget].append(index)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        for budget, members in by_budget.items():
            for index, new in zip(members, self.greedy([prompts[i] for i in members], max_new_tokens=budget)):
                text = self.tok_decode(new)
                for stop in stops[index]:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                outputs[index] = text
            bar.update(len(members))
        bar.close()
        return outputs

    # -- scoring ---------------------------------------------------------------------------------------------
    def _forcing(self):
        if self.skip_layers is None:
            return contextlib.nullcontext()
        return routing.forced("skip_set", self.skip_layers)

    @torch.inference_mode()
    def score(self, rows: Sequence[ScoredRow], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the scored tokens, whether each was the argmax) for every row."""
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        # a plain model takes no decisions, so a routing context kept apart changes nothing for it
        elsewhere = [i for i, r in enumerate(rows) if r.route is not None and inject.is_routed(self.model)]
        own = [i for i, r in enumerate(rows) if r.route is None or not inject.is_routed(self.model)]
        shared = [i for i in own if self.share_prefix and rows[i].n_route <= rows[i].n_ctx]
        full = [i for i in own if not (self.share_prefix and rows[i].n_route <= rows[i].n_ctx)]
        bar = tqdm(total=len(rows), desc="loglikelihood", disable=disable_tqdm or not self.progress)
        started = time.perf_counter()
        with self._forcing():
            if shared:
                self._score_shared(rows, shared, results, bar)
            if full:
                self._score_full(rows, full, results, bar)
            if elsewhere:
                self._score_full(rows, elsewhere, results, bar, self._decide_routes(rows, elsewhere))
        self.forward_seconds += time.perf_counter() - started
        bar.close()
        return results  # type: ignore[return-value]

    def _decide_routes(self, rows, indices) -> dict[tuple, dict[int, torch.Tensor]]:
        """Decisions of each distinct (task, route) of `rows`, each route run alone (left-padded batches);
        counted once per route, i.e. once per item."""
        keys = sorted({(rows[i].task, rows[i].route) for i in indices}, key=lambda k: -len(k[1]))
        decided = {}
        for batch in budget_batches(keys, lambda k: len(k[1]), self.batch_tokens, self.max_batch):
            width = max(len(k[1]) for k in batch)
            ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for g, (_, route) in enumerate(batch):
                ids[g, width - len(route) :] = torch.tensor(route)
                mask[g, width - len(route) :] = 1
            with routing.record() as calls:
                self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    use_cache=False,
                    logits_to_keep=1,
                )
            self._count(calls, [k[0] for k in batch])
            for g, key in enumerate(batch):
                decided[key] = {layer: runs[g] for layer, runs in calls[-1].decisions.items()}
        return decided

    def _score_full(self, rows, indices, results, bar, decided=None) -> None:
        """One forward per row over context + continuation, decisions pooled over the first n_route tokens,
        or, with `decided` ({(task, route): {layer: decision}}), the decisions taken on each row's route: a
        fresh RoutedCache holding them before the forward is what the routed layers use."""
        order = sorted(indices, key=lambda i: -len(rows[i].tokens))
        for batch in budget_batches(order, lambda i: len(rows[i].tokens) - 1, self.batch_tokens, self.max_batch):
            width = max(len(rows[i].tokens) - 1 for i in batch)
            ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            route = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                inp = rows[i].tokens[:-1]
                ids[b, : len(inp)] = torch.tensor(inp)
                mask[b, : len(inp)] = 1
                route[b, : rows[i].n_route] = 1
            keep = torch.zeros((len(batch), width), dtype=torch.bool)
            for b, i in enumerate(batch):
                n_in = len(rows[i].tokens) - 1
                keep[b, n_in - rows[i].n_cont : n_in] = True
            if decided is None:
                with routing.record() as calls, routing.pool_over(route.to(self.device)):
                    logits = _kept_logits(
                        self.model,
                        keep.to(self.device),
                        input_ids=ids.to(self.device),
                        attention_mask=mask.to(self.device),
                        use_cache=False,
                    )
                self._count(calls, [rows[i].task for i in batch])
            else:
                cache = RoutedCache(config=self.model.config)
                chosen = [decided[(rows[i].task, rows[i].route)] for i in batch]
                for layer in chosen[0]:
                    cache.set_decision(layer, torch.stack([d[layer] for d in chosen]))  # (B,)
                logits = _kept_logits(
                    self.model,
                    keep.to(self.device),
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    cache=cache,
                    use_cache=True,
                )
            index = _kept_index(keep)
            for b, i in enumerate(batch):
                n_in = len(rows[i].tokens) - 1
                at = index[b, n_in - rows[i].n_cont : n_in].to(logits.device)
                results[i] = _score_positions(logits[at], rows[i].tokens[-rows[i].n_cont :])
            bar.update(len(batch))

    def _score_shared(self, rows, indices, results, bar) -> None:
        """Rows grouped by routed prefix: each group one packed row where the block mask can be used, else
        the prefix prefilled once into a RoutedCache."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in indices:
            groups[(rows[i].task, tuple(rows[i].tokens[: rows[i].n_route]))].append(i)
        mask_kind, limit = self._packing()

        def packed_length(key):  # the prefix, then every member's rest
            return len(key[1]) + sum(len(rows[i].tokens) - 1 - rows[i].n_route for i in groups[key])

        # a packed row's mask is T x T: very long rows (many requests sharing one prefix) take the cache path
        limit = min(limit, max(self.batch_tokens, self.max_length))
        packable = [k for k in groups if mask_kind is not None and packed_length(k) <= limit]
        if packable:
            keys = sorted(packable, key=lambda k: -packed_length(k))
            # packed rows vary in length more than requests do; at most ~15% padding costs a few more forwards
            for batch in budget_batches(keys, packed_length, self.batch_tokens, self.max_batch, min_fill=0.85):
                self._run_packed(rows, [groups[k] for k in batch], [k[0] for k in batch], results, mask_kind)
                bar.update(sum(len(groups[k]) for k in batch))
        chosen = set(packable)
        cached = {k: v for k, v in groups.items() if k not in chosen}
        if cached:
            self._score_cached(rows, cached, results, bar)

    def _packing(self) -> tuple[str | None, float]:
        """How a block attention mask is given to this model's attention kernel (None: it takes no custom
        mask), and the longest packed row it is exact for: inside a sliding window the window masks nothing,
        so the block mask alone is the model's own mask restricted to each request."""
        if not self.packed or _token_routed(self.model):
            # token routing builds each layer's mask from which tokens wrote K/V: no block mask on top
            return None, 0
        kind = {"sdpa": "bool", "eager": "additive"}.get(getattr(self.model.config, "_attn_implementation", None))
        window = getattr(self.model.config, "sliding_window", None)
        return kind, (window if isinstance(window, int) and window > 0 else math.inf)

    def _run_packed(self, rows, members: list[list[int]], task_names: list[str], results, mask_kind: str) -> None:
        """One forward over packed rows: prefix, then each member's rest at the positions that continue the
        prefix; each rest attends to the prefix and to itself. Decisions pool over the prefix only, so every
        member runs at the depth its context decides."""
        device = self.device
        layouts = []  # per group: (tokens, segment ids, positions, prefix length, [(member, rest start, rest length)])
        for group in members:
            n_prefix = rows[group[0]].n_route
            tokens, segments, positions, spans = (
                list(rows[group[0]].tokens[:n_prefix]),
                [0] * n_prefix,
                list(range(n_prefix)),
                [],
            )
            for j, i in enumerate(group, start=1):
                rest = rows[i].tokens[n_prefix:-1]
                spans.append((i, len(tokens), len(rest)))
                tokens += rest
                segments += [j] * len(rest)
                positions += range(n_prefix, n_prefix + len(rest))
            layouts.append((tokens, segments, positions, n_prefix, spans))
        width = max(len(layout[0]) for layout in layouts)
        ids = torch.full((len(layouts), width), self._pad_id, dtype=torch.long)
        segment = torch.full((len(layouts), width), -1, dtype=torch.long)  # padding: its own segment
        position = torch.zeros((len(layouts), width), dtype=torch.long)
        route = torch.zeros((len(layouts), width), dtype=torch.long)
        keep = torch.zeros((len(layouts), width), dtype=torch.bool)
        for g, (tokens, segments, positions, n_prefix, spans) in enumerate(layouts):
            ids[g, : len(tokens)] = torch.tensor(tokens)
            segment[g, : len(tokens)] = torch.tensor(segments)
            position[g, : len(tokens)] = torch.tensor(positions)
            route[g, :n_prefix] = 1
            for i, start, n_rest in spans:
                keep[g, _scored_positions(rows[i], n_prefix, start, n_rest)] = True
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        # a query sees earlier keys of the prefix (segment 0) or of its own segment; padding only sees the
        # prefix and padding, which keeps its (unused) outputs finite
        allowed = causal & ((segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None]))
        mask = allowed[:, None]  # (B, 1, T, T)
        if mask_kind == "additive":
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        with routing.record() as calls, routing.pool_over(route.to(device)):
            flat = _kept_logits(
                self.model,
                keep.to(device),
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=position.to(device),
                use_cache=False,
            )
        self._count(calls, task_names)
        index = _kept_index(keep)
        for g, (_, _, _, n_prefix, spans) in enumerate(layouts):
            for i, start, n_rest in spans:
                at = index[g, _scored_positions(rows[i], n_prefix, start, n_rest)].to(flat.device)
                results[i] = _score_positions(flat[at], rows[i].tokens[-rows[i].n_cont :])

    def _score_cached(self, rows, groups: dict[tuple, list[int]], results, bar) -> None:
        """Prefill each distinct routed prefix once (left-padded batch, RoutedCache), then run every row's rest
        (context tail + continuation minus its last token) against the expanded cache."""
        keys = sorted(groups, key=lambda k: -len(k[1]))

        def cost(key):
            rest = max(len(rows[i].tokens) - 1 - rows[i].n_route for i in groups[key])
            return max(len(key[1]), len(groups[key]) * max(rest, 1))

        for batch in budget_batches(keys, cost, self.batch_tokens, self.max_batch):
            self._run_shared(rows, [groups[k] for k in batch], [k[0] for k in batch], results)
            bar.update(sum(len(groups[k]) for k in batch))

    def _run_shared(self, rows, members: list[list[int]], task_names: list[str], results) -> None:
        device = self.device
        n_groups = len(members)
        prefixes = [rows[m[0]].tokens[: rows[m[0]].n_route] for m in members]
        width = max(len(p) for p in prefixes)
        ids = torch.full((n_groups, width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((n_groups, width), dtype=torch.long)
        for g, prefix in enumerate(prefixes):  # left padding: every prefix ends at the last column
            ids[g, width - len(prefix) :] = torch.tensor(prefix)
            mask[g, width - len(prefix) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = _new_cache(self.model)
        with routing.record() as calls:
            out = self.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self._count(calls, task_names)
        last = out.logits[:, -1]  # (G, V): predicts the token after each prefix; `cache` now holds the prefixes

        flat = [i for m in members for i in m]
        owner = torch.tensor([g for g, m in enumerate(members) for _ in m])
        rests = [rows[i].tokens[rows[i].n_route : -1] for i in flat]  # (rest of context) + continuation[:-1]
        rest_width = max(len(r) for r in rests)
        step_logits = None
        if rest_width > 0:
            if len(flat) != n_groups or not torch.equal(owner, torch.arange(n_groups)):
                cache.batch_select_indices(owner.to(device))
            rest_ids = torch.full((len(flat), rest_width), self._pad_id, dtype=torch.long)
            rest_mask = torch.zeros((len(flat), rest_width), dtype=torch.long)
            for r, rest in enumerate(rests):
                rest_ids[r, : len(rest)] = torch.tensor(rest, dtype=torch.long)
                rest_mask[r, : len(rest)] = 1
            full_mask = torch.cat([mask[owner], rest_mask], dim=1)  # (R, width + rest_width)
            rest_pos = mask[owner].sum(-1, keepdim=True) + torch.arange(rest_width)  # continue each prefix
            keep = torch.zeros((len(flat), rest_width), dtype=torch.bool)
            for r, i in enumerate(flat):  # rest positions whose logits are scored
                keep[r, max(0, len(rests[r]) - rows[i].n_cont) : len(rests[r])] = True
            step_logits = _kept_logits(
                self.model,
                keep.to(device),
                input_ids=rest_ids.to(device),
                attention_mask=full_mask.to(device),
                position_ids=rest_pos.to(device),
                cache=cache,
                use_cache=True,
            )
            index = _kept_index(keep)
        for r, i in enumerate(flat):
            row = rows[i]
            # logits at input positions n_route-1 .. len(tokens)-2; the scored ones are the last n_cont
            seq = last[owner[r]].unsqueeze(0)
            if step_logits is not None and rests[r]:
                kept = index[r, max(0, len(rests[r]) - row.n_cont) : len(rests[r])].to(step_logits.device)
                seq = torch.cat([seq, step_logits[kept]], dim=0)
            results[i] = _score_positions(seq[-row.n_cont :], row.tokens[-row.n_cont :])

    def _count(self, calls, task_names: list[str]) -> None:
        decisions = calls[-1].decisions if calls else {}  # a model without routers records no calls
        if calls and calls[-1].token_runs:
            # token routing: every real token of a prefill is one unit (skip rates are token shares)
            call = calls[-1]
            runs = call.token_runs
            first = next(iter(runs.values()))
            real = (
                call.attention_mask[:, -first.shape[1] :].bool()
                if call.attention_mask is not None
                else torch.ones(first.shape, dtype=torch.bool, device=first.device)
            )
            for g, task in enumerate(task_names):
                self.stats[task].add({k: v[g][real[g]].cpu() for k, v in runs.items()})
            return
        for g, task in enumerate(task_names):
            self.stats[task].add({k: v[g : g + 1].cpu() for k, v in decisions.items()}, torch.arange(1))

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eot_token_id

    # -- generation -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def greedy(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy completions (token ids, up to and including EOS) of token prompts, batched with left
        padding; routed models decide from the prompt and reuse the decision while decoding."""
        outputs: list[list[int]] = [None] * len(prompts)  # type: ignore[list-item]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        eos = self.tokenizer.eos_token_id
        with self._forcing():
            for batch in budget_batches(
                order, lambda i: len(prompts[i]) + max_new_tokens, self.batch_tokens, self.max_batch
            ):
                width = max(len(prompts[i]) for i in batch)
                ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for b, i in enumerate(batch):
                    ids[b, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                    mask[b, width - len(prompts[i]) :] = 1
                kwargs = dict(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self._pad_id,
                )
                if inject.is_routed(self.model):
                    kwargs[cache_kwarg(self.model)] = _new_cache(self.model)
                with routing.record() as calls:
                    generated = self.model.generate(**kwargs)[:, width:]
                prefill = [c for c in calls if c.past_length == 0]
                self._count(prefill[:1], ["generation"] * len(batch))
                for b, i in enumerate(batch):
                    tokens = generated[b].tolist()
                    if eos is not None and eos in tokens:
                        tokens = tokens[: tokens.index(eos) + 1]
                    outputs[i] = tokens
        return outputs


def _token_routed(model: nn.Module) -> bool:
    from routertune.routing.token_routing import TokenRoutedSublayer

    return any(isinstance(w, TokenRoutedSublayer) for w in inject.routed_sublayers(model).values())


def _new_cache(model: nn.Module):
    """The KV cache a routed model's sublayers need: the token cache for token routing, else a RoutedCache."""
    from routertune.routing.token_cache import TokenRoutedCache

    return TokenRoutedCache(config=model.config) if _token_routed(model) else RoutedCache(config=model.config)


def _score_positions(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    target = torch.tensor(targets, device=logits.device)
    total = float(logprobs.gather(-1, target.unsqueeze(-1)).sum())
    greedy = bool((logprobs.argmax(-1) == target).all())
    return total, greedy


def _scored_positions(row: ScoredRow, n_prefix: int, start: int, n_rest: int) -> list[int]:
    """Columns of a packed row whose logits score `row`: the prefix's last column, then the columns of the
    row's rest (whose logits predict the next token of the rest, and finally the last token); the last
    n_cont of those."""
    return ([n_prefix - 1] + list(range(start, start + n_rest)))[-row.n_cont :]


def _kept_index(keep: torch.Tensor) -> torch.Tensor:
    """(B, T) -> index of each kept position in the flattened logits that ``logits_to_keep=keep`` returns."""
    return keep.flatten().long().cumsum(0).sub(1).view(keep.shape)


def _kept_logits(model, keep: torch.Tensor, **kwargs) -> torch.Tensor:
    """The logits at the True positions of ``keep`` (B, T), flattened row by row: (N, V), the LM head run only
    there (with a 49k vocabulary it would otherwise cost more than the model)."""
    if _BOOLEAN_LOGITS_TO_KEEP:
        return model(logits_to_keep=keep, **kwargs).logits  # already (N, V)
    # transformers before 5.20 (the releases vLLM pins) slice logits_to_keep as positions shared by every row:
    # keep the union of the rows' positions, then pick each row's own (same order as the boolean slice)
    columns = keep.any(dim=0).nonzero().squeeze(-1)  # (K,)
    logits = model(logits_to_keep=columns, **kwargs).logits  # (B, K, V)
    return logits[keep[:, columns]]


def _common_prefix(sequences: list[list[int]]) -> int:
    n = min(len(s) for s in sequences)
    for position in range(n):
        token = sequences[0][position]
        if any(s[position] != token for s in sequences[1:]):
            return position
    return n


def budget_batches(items: list, cost, budget: int, max_batch: int, min_fill: float = 0.0) -> list[list]:
    """Consecutive batches whose padded cost (largest item cost x batch size) stays within budget; items are
    expected sorted by decreasing cost, so the first item of a batch is its largest. With `min_fill`, an item
    costing less than that fraction of the batch's largest starts a new batch (bounds the padding)."""
    batches, current, largest = [], [], 0
    for item in items:
        c = max(int(cost(item)), 1)
        if current and (
            max(largest, c) * (len(current) + 1) > budget or len(current) >= max_batch or c < min_fill * largest
        ):
            batches.append(current)
            current, largest = [], 0
        current.append(item)
        largest = max(largest, c)
    if current:
        batches.append(current)
    return batches


# ---------------------------------------------------------------------------------------------------------
# harness runs


@dataclass
class TaskScore:
    name: str
    metrics: dict[str, float]  # acc, acc_norm
    stderr: dict[str, float]
    samples: int  # items scored
    headline: str  # the paper's metric for this task
    shots: int
    skip: dict  # SkipStats.summary()


@dataclass
class HarnessReport:
    tasks: dict[str, TaskScore]
    skip_ratio: float  # skipped fraction of all sublayers of the routed kind, over every item
    layer_skip_rate: dict[str, float]
    seconds: float
    limit: int | None
    harness_version: str

    def average(self) -> float:
        values = [t.metrics[t.headline] for t in self.tasks.values()]
        return sum(values) / len(values) if values else math.nan


def run_harness(
    lm: RoutedLM,
    task_names: Sequence[str],
    *,
    shots: str | int = "zero",
    limit: int | None = None,
    seed: int = 0,
    bootstrap_iters: int = 1000,
) -> HarnessReport:
    """Run tasks through ``lm_eval.simple_evaluate`` with the local-data task configs."""
    _require_harness()
    import lm_eval

    names = tasks.check_task_names(task_names)
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or omitted for the full sets)")
    from lm_eval.tasks import TaskManager

    lm.stats.clear()
    started = time.perf_counter()
    with quiet_harness():
        built = tasks.build_tasks(names, shots)
        out = lm_eval.simple_evaluate(
            # an empty TaskManager: the tasks come built, and indexing every harness YAML takes ~25 s
            model=lm,
            tasks=built,
            task_manager=TaskManager(include_defaults=False),
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    seconds = time.perf_counter() - started
    results = {**out.get("results", {}), **out.get("groups", {})}
    n_samples = out.get("n-samples", {})
    scores: dict[str, TaskScore] = {}
    total = SkipStats(lm.num_layers)
    for name in names:
        entry = results[name]
        metrics, stderr = {}, {}
        for key, value in entry.items():
            if "," not in key or key.startswith("alias"):
                continue
            metric, _filter = key.split(",", 1)
            if metric.endswith("_stderr"):
                stderr[metric[: -len("_stderr")]] = _number(value)
            elif isinstance(value, (int, float)):
                metrics[metric] = float(value)
        stats = SkipStats(lm.num_layers)
        for task_name, task_stats in lm.stats.items():
            if task_name == name or (name == "mmlu" and task_name.split("::")[-1].startswith("mmlu_")):
                stats.merge(task_stats)
        total.merge(stats)
        if name == "mmlu":
            samples = sum(v.get("effective", 0) for k, v in n_samples.items() if k.split("::")[-1].startswith("mmlu_"))
        else:
            samples = n_samples.get(name, {}).get("effective", 0)
        spec = tasks.TASKS[name]
        scores[name] = TaskScore(
            name=name,
            metrics=metrics,
            stderr=stderr,
            samples=int(samples),
            headline=spec.paper_metric if spec.paper_metric in metrics else "acc",
            shots=int(tasks.shots_for(name, shots) or 0),
            skip=stats.summary(),
        )
    return HarnessReport(
        tasks=scores,
        skip_ratio=total.skip_ratio,
        layer_skip_rate={str(k): v for k, v in total.layer_skip_rate.items()},
        seconds=seconds,
        limit=limit,
        harness_version=getattr(lm_eval, "__version__", "unknown"),
    )


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@contextlib.contextmanager
def quiet_harness():
    """The harness logs a warning per task about custom datasets and default aggregations; keep them out of
    the way unless asked for (routertune -v)."""
    logger = logging.getLogger("lm_eval")
    previous = logger.level
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)

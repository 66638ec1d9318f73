"""A KV cache that stores nothing for skipped (layer, sequence) pairs.

A routed layer's cache holds only the rows of the sequences that execute it, in batch order; a layer every
sequence skips holds nothing at all. The per-sequence decisions taken at prefill live here, with the
request, and are reused by every decode step. Batch reshuffles (beam search, row selection) re-map both.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


class RoutedCache(DynamicCache):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decisions: dict[int, torch.Tensor] = {}  # layer -> (B,) bool, taken at prefill
        # layer -> (the decision it was counted from, sequences that run, their rows or None)
        self._plans: dict[int, tuple[torch.Tensor, int, torch.Tensor | None]] = {}
        # decode-only routing (routing.state.decode_only) prefilled every layer: a layer skipped in decode then
        # holds the prompt alone, so lengths come from the longest layer of a kind
        self.prefill_dense = False

    # --- decisions -------------------------------------------------------------------------------
    def decision(self, layer: int) -> torch.Tensor | None:
        return self.decisions.get(layer)

    def set_decision(self, layer: int, runs: torch.Tensor) -> None:
        """Store (B,) bool decisions for `layer`. Set before the prefill, they are used instead of the routers'
        (the harness scores rows with decisions taken on another text)."""
        self.decisions[layer] = runs

    def run_plan(self, layer: int, runs: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """(how many sequences run `layer`, their row indices when some but not all do) for the decision
        `runs`: counted once per decision and reused by every decode step. Keyed by the decision tensor
        itself, so a new decision or a batch reshuffle (which makes new tensors) is counted afresh."""
        plan = self._plans.get(layer)
        if plan is None or plan[0] is not runs:
            n_run = int(runs.sum())
            rows = runs.nonzero().squeeze(-1) if 0 < n_run < runs.shape[0] else None  # (n_run,)
            plan = (runs, n_run, rows)
            self._plans[layer] = plan
        return plan[1], plan[2]

    # --- lengths: a layer that holds no tokens (every sequence skips it, or a row selection emptied it) cannot
    # say how long the sequence is, so ask a layer that holds tokens: one of the same kind (sliding or full)
    # when there is one, else any. When every layer of a kind is empty, no layer of that kind runs, so the
    # other kind's sizes only shape a mask nobody reads.
    def _representative(self, layer_idx: int) -> int:
        if layer_idx >= len(self.layers):
            return layer_idx
        if self.prefill_dense:
            kind = type(self.layers[layer_idx])
            same_kind = [idx for idx, layer in enumerate(self.layers) if _holds_tokens(layer) and type(layer) is kind]
            return max(same_kind, key=lambda idx: super(RoutedCache, self).get_seq_length(idx), default=layer_idx)
        if _holds_tokens(self.layers[layer_idx]):
            return layer_idx
        kind = type(self.layers[layer_idx])
        holding = [idx for idx, layer in enumerate(self.layers) if _holds_tokens(layer)]
        same_kind = [idx for idx in holding if type(self.layers[idx]) is kind]
        return (same_kind or holding or [layer_idx])[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._representative(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._representative(layer_idx))

    # --- batch reshuffles ----------------------------------------------------------------------------
    def _select_rows(self, rows: torch.Tensor) -> None:
        """New batch row i is old row rows[i]; re-map decisions and each layer's stored rows.

        A layer with a decision stores K/V for the rows that ran it under attention and block routing, but for
        every row under MLP routing (the decision is the MLP's; the layer's attention runs for all). The cache
        is not told the granularity, so it reads which from the stored row count: all B rows, or the n_run that
        ran (when every row runs the two coincide, and so do both selections)."""
        for idx, layer in enumerate(self.layers):
            runs = self.decisions.get(idx)
            if layer.get_seq_length() == 0 or layer.keys is None:
                continue  # nothing stored (every row skipped it, or not reached yet)
            stored = layer.keys.shape[0]
            if runs is None or stored == runs.shape[0]:  # every row is stored (dense layer, or MLP routing)
                layer.batch_select_indices(rows.to(layer.keys.device))
                continue
            if stored != int(runs.sum()):
                raise RuntimeError(
                    f"layer {idx} stores K/V for {stored} rows, but its decision has {runs.shape[0]} rows of "
                    f"which {int(runs.sum())} ran: the cache no longer matches its decisions. Use one fresh "
                    "RoutedCache per batch of prompts."
                )
            new_runs = runs[rows.to(runs.device)]
            # position of each old row among the stored (executed) rows
            stored_pos = torch.cumsum(runs.long(), 0) - 1  # (B_old,)
            local = stored_pos[rows.to(runs.device)][new_runs]
            layer.batch_select_indices(local.to(layer.keys.device))
        self.decisions = {idx: runs[rows.to(runs.device)] for idx, runs in self.decisions.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = next(iter(self.decisions.values())).shape[0] if self.decisions else None
        if batch is None:
            return super().batch_repeat_interleave(repeats)
        self._select_rows(torch.arange(batch).repeat_interleave(repeats))

    # --- accounting --------------------------------------------------------------------------------
    def kv_elements(self) -> int:
        """Number of cached key + value elements over all layers."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized and layer.keys is not None:
                total += layer.keys.numel() + layer.values.numel()
        return total

    def kv_bytes(self) -> int:
        total = 0
        for layer in self.layers:
            if layer.is_initialized and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total


def _holds_tokens(layer) -> bool:
    # an emptied layer keeps is_initialized (and a sliding layer its stale token count) but has no rows
    return layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0


def cache_kwarg(model) -> str:
    """The keyword a model's forward and generate take the KV cache under: `cache` from transformers 5.20 on,
    `past_key_values` before (the versions vLLM pins)."""
    forward = getattr(model, "forward", model)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"

"""KV cache for token routing: a token-routed layer stores K/V only for the tokens that executed it.

Different rows keep different numbers of tokens at such a layer, and different layers keep different numbers
of tokens for one row, so a rectangular (B, heads, T, d) tensor cannot hold them without padding. A
`TokenLayer` keeps them packed instead: one (heads, N, d) tensor over all rows, where N is exactly the number
of executed (row, token) pairs, plus per-token bookkeeping (row, rank within the row, time step). For an
attention call it lays the rows it needs out as a padded (B', heads, S, d) view (S = the longest row) and
reports which slots are real, so the caller builds the per-layer mask. With one row the packed tensor *is*
that view and nothing is copied beyond the concatenation a DynamicCache does too.

Dense layers (and every layer of an MLP-routed model) keep transformers' own cache layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicSlidingWindowLayer

_CROP_REFUSED = (
    "a token-routed cache cannot be cropped (assisted / speculative decoding): each row holds a "
    "different number of tokens per layer. Generate without an assistant model."
)


@dataclass
class KeyLayout:
    """What an attention call at a token-routed layer sees, for the rows it runs (B' rows)."""

    past: torch.Tensor  # (B',) tokens each row had stored before this call
    valid: torch.Tensor | None  # (B', S) real key slots; None when every slot is real
    times: torch.Tensor | None  # (B', S) time step of each key slot (for sliding windows); None if not needed
    width: int  # S


class TokenLayer(CacheLayerMixin):
    """Packed K/V of one token-routed layer (see the module docstring)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, sliding_window: int | None = None):
        super().__init__()
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.seen = 0  # time steps processed so far: the same for every row, stored or not
        self.counts: torch.Tensor | None = None  # (B,) tokens stored per row
        self.rows: torch.Tensor | None = None  # (N,) row of each stored token
        self.slots: torch.Tensor | None = None  # (N,) rank of each stored token within its row (time order)
        self.times: torch.Tensor | None = None  # (N,) time step of each stored token
        self._pending: tuple | None = None  # what the next update() stores: (rows, query_valid, query_times)

    # -- set-up ---------------------------------------------------------------------------------------------
    def start(self, batch: int, device: torch.device) -> None:
        if self.counts is None:
            self.counts = torch.zeros(batch, dtype=torch.long, device=device)
            self.rows = torch.zeros(0, dtype=torch.long, device=device)
            self.slots = torch.zeros(0, dtype=torch.long, device=device)
            self.times = torch.zeros(0, dtype=torch.long, device=device)
        elif self.counts.shape[0] != batch:
            raise ValueError(
                f"the token cache holds {self.counts.shape[0]} sequences but this step has {batch}; "
                "use one cache per batch of prompts"
            )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        heads, dim = key_states.shape[1], key_states.shape[-1]
        self.keys = key_states.new_zeros((heads, 0, dim))
        self.values = value_states.new_zeros((heads, 0, value_states.shape[-1]))
        self.is_initialized = True

    # -- one attention call -------------------------------------------------------------------------------------
    def plan(
        self,
        rows: torch.Tensor | None,
        query_valid: torch.Tensor | None,
        query_times: torch.Tensor,
        n_new: torch.Tensor,
        need_times: bool,
    ) -> KeyLayout:
        """Announce the next update: `rows` (B',) the batch rows that run (None = all), `query_valid` (B', R)
        which gathered query slots are real tokens (None = all), `query_times` (B', R), `n_new` (B',) real
        queries per row. Returns the key layout the attention will see, to build its mask from."""
        past = self.counts if rows is None else self.counts.index_select(0, rows)  # (B',)
        total = past + n_new
        width = int(total.max())
        uniform = bool((total == width).all())
        valid = None
        if not uniform:
            valid = torch.arange(width, device=total.device)[None, :] < total[:, None]  # (B', S)
        times = None
        if need_times:
            times = self._times_layout(rows, past, width, query_valid, query_times)
        self._pending = (rows, query_valid, query_times, past, width)
        return KeyLayout(past=past, valid=valid, times=times, width=width)

    def _times_layout(self, rows, past, width, query_valid, query_times) -> torch.Tensor:
        b = past.shape[0]
        out = torch.full((b * width,), -(1 << 40), dtype=torch.long, device=past.device)
        sel, local = self._select(rows)
        if sel is None or sel.numel():
            old_times = self.times if sel is None else self.times[sel]
            out.index_copy_(0, local * width + (self.slots if sel is None else self.slots[sel]), old_times)
        new_rows, new_slots = self._new_positions(past, query_valid, query_times.shape[1])
        new_times = query_times.reshape(-1) if query_valid is None else query_times[query_valid]
        out.index_copy_(0, new_rows * width + new_slots, new_times)
        return out.view(b, width)

    def _select(self, rows: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Stored tokens belonging to `rows` (None = all of them) and their row index among `rows`."""
        if rows is None:
            return None, self.rows
        inverse = torch.full((self.counts.shape[0],), -1, dtype=torch.long, device=rows.device)
        inverse[rows] = torch.arange(rows.shape[0], device=rows.device)
        local = inverse[self.rows]
        sel = (local >= 0).nonzero().squeeze(-1)
        return sel, local[sel]

    @staticmethod
    def _new_positions(past, query_valid, width_q) -> tuple[torch.Tensor, torch.Tensor]:
        """(local row, slot) of every new real token, in the packed order of update()."""
        b = past.shape[0]
        local = torch.arange(b, device=past.device)[:, None].expand(b, width_q)  # (B', R)
        slots = past[:, None] + torch.arange(width_q, device=past.device)[None, :]  # (B', R)
        if query_valid is None:
            return local.reshape(-1), slots.reshape(-1)
        return local[query_valid], slots[query_valid]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states (B', heads, R, d) of the gathered queries: store the real ones, return the padded keys and
        values of these rows (B', heads, S, d) in slot order."""
        if self._pending is None:
            raise RuntimeError("a token-routed layer's cache was updated without a plan (call it through the model)")
        rows, query_valid, query_times, past, width = self._pending
        self._pending = None
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, r, _ = key_states.shape
        # (heads, B', R, d) -> real tokens only, grouped by row then time: (heads, n, d)
        new_k = key_states.transpose(0, 1)
        new_v = value_states.transpose(0, 1)
        if query_valid is None:
            new_k, new_v = new_k.reshape(new_k.shape[0], b * r, -1), new_v.reshape(new_v.shape[0], b * r, -1)
        else:
            new_k, new_v = new_k[:, query_valid], new_v[:, query_valid]
        local_rows, new_slots = self._new_positions(past, query_valid, r)
        global_rows = local_rows if rows is None else rows[local_rows]
        new_times = query_times.reshape(-1) if query_valid is None else query_times[query_valid]
        self.keys = torch.cat([self.keys, new_k], dim=1)
        self.values = torch.cat([self.values, new_v], dim=1)
        self.rows = torch.cat([self.rows, global_rows])
        self.slots = torch.cat([self.slots, new_slots])
        self.times = torch.cat([self.times, new_times])
        self.counts = self.counts.index_add(0, global_rows, torch.ones_like(global_rows))
        if self.counts.shape[0] == 1:
            # one row: packed order is slot order, so the packed tensor is the padded view
            return self.keys.unsqueeze(0), self.values.unsqueeze(0)
        return self._padded(rows, b, width)

    def _padded(self, rows, b, width) -> tuple[torch.Tensor, torch.Tensor]:
        sel, local = self._select(rows)
        keys = self.keys if sel is None else self.keys[:, sel]
        values = self.values if sel is None else self.values[:, sel]
        slots = self.slots if sel is None else self.slots[sel]
        flat = local * width + slots  # (n,)
        heads, dim = keys.shape[0], keys.shape[-1]
        k = keys.new_zeros((heads, b * width, dim)).index_copy_(1, flat, keys)
        v = values.new_zeros((heads, b * width, values.shape[-1])).index_copy_(1, flat, values)
        # (heads, B'*S, d) -> (B', heads, S, d)
        return (k.view(heads, b, width, dim).transpose(0, 1), v.view(heads, b, width, -1).transpose(0, 1))

    def advance(self, steps: int) -> None:
        self.seen += steps

    # -- sizes (the model asks them to build positions and its own masks) -----------------------------------
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def stored_tokens(self) -> int:
        return 0 if self.rows is None else int(self.rows.numel())

    # -- batch reshuffles: new row i is old row indices[i] ---------------------------------------------------------
    def _reselect(self, indices: torch.Tensor) -> None:
        if self.counts is None:
            return
        indices = indices.to(self.counts.device)
        new_counts = self.counts.index_select(0, indices)
        if self.is_initialized and self.rows.numel():
            width = int(self.counts.max())
            b_old = self.counts.shape[0]
            k, v = self._padded(None, b_old, width)  # (B, heads, S, d)
            times = torch.zeros(b_old * width, dtype=torch.long, device=self.times.device)
            times.index_copy_(0, self.rows * width + self.slots, self.times)
            valid = torch.arange(width, device=indices.device)[None, :] < new_counts[:, None]  # (B_new, S)
            k = k.index_select(0, indices).transpose(0, 1)[:, valid]  # (heads, n, d)
            v = v.index_select(0, indices).transpose(0, 1)[:, valid]
            self.keys, self.values = k.contiguous(), v.contiguous()
            self.times = times.view(b_old, width).index_select(0, indices)[valid]
            b_new = indices.shape[0]
            self.rows = torch.arange(b_new, device=indices.device)[:, None].expand(b_new, width)[valid]
            self.slots = torch.arange(width, device=indices.device)[None, :].expand(b_new, width)[valid]
        else:
            empty = torch.zeros(0, dtype=torch.long, device=self.counts.device)
            self.rows, self.slots, self.times = empty, empty.clone(), empty.clone()
        self.counts = new_counts

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reselect(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reselect(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.counts is not None:
            self._reselect(torch.arange(self.counts.shape[0], device=self.counts.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(_CROP_REFUSED)

    def reset(self) -> None:
        self.__init__(self.sliding_window)


class TokenRoutedCache(DynamicCache):
    """A DynamicCache whose token-routed layers become `TokenLayer`s the first time they run (their index and
    window come from the model); dense layers are transformers' own. Per-layer routing state that is not K/V
    (the top-k cut-off score of each row) lives here too, with the request."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cutoffs: dict[int, torch.Tensor] = {}  # layer -> (B,) float32 score a decode token must reach

    def token_layer(self, layer_idx: int) -> TokenLayer:
        while len(self.layers) <= layer_idx:
            self.layers.append(self.layer_class_to_replicate())  # only without a config
        layer = self.layers[layer_idx]
        if not isinstance(layer, TokenLayer):
            if layer.is_initialized and layer.get_seq_length() > 0:
                raise ValueError(f"layer {layer_idx} already holds dense K/V; use a fresh cache")
            window = layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None
            layer = TokenLayer(window)
            self.layers[layer_idx] = layer
        return layer

    # the model builds its masks from a layer of each kind (full / sliding); a token layer's own sizes are those
    # of a full layer, so point dense masks at a dense layer of the same kind when there is one
    def _representative(self, layer_idx: int) -> int:
        if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], TokenLayer):
            sliding = self.layers[layer_idx].is_sliding
            for idx, layer in enumerate(self.layers):
                if not isinstance(layer, TokenLayer) and getattr(layer, "is_sliding", False) == sliding:
                    return idx
        return layer_idx

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._representative(layer_idx))

    # -- batch reshuffles also move the cut-offs ------------------------------------------------------------------
    def _move_cutoffs(self, indices: torch.Tensor) -> None:
        self.cutoffs = {k: v.index_select(0, indices.to(v.device)) for k, v in self.cutoffs.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._move_cutoffs(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._move_cutoffs(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.cutoffs = {k: v.repeat_interleave(repeats, dim=0) for k, v in self.cutoffs.items()}

    # -- accounting ------------------------------------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        # refuse before any layer is touched (transformers < 5.20 crops the dense layers first, and fails on an
        # empty one with a TypeError instead of this message)
        if any(isinstance(layer, TokenLayer) for layer in self.layers):
            raise NotImplementedError(_CROP_REFUSED)
        super().crop(tokens_to_remove)

    def stored_tokens(self) -> dict[int, int]:
        """Tokens holding K/V at each token-routed layer (summed over rows)."""
        return {idx: layer.stored_tokens() for idx, layer in enumerate(self.layers) if isinstance(layer, TokenLayer)}

    def kv_elements(self) -> int:
        """Number of cached key + value elements over all layers (padding never counted: none is stored)."""
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

"""Analytic matmul FLOPs of a decoder-only model: the denominator of bench's ideal speed-ups."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlopCounter:
    """Matmul FLOPs (2 per multiply-add) of a decoder-only model with a gated MLP.

    Per token and layer: attention projections q, k, v, o; attention scores Q K^T and the weighted sum A V over
    the causal context (capped by a sliding window where the layer has one); MLP gate, up and down. Plus the
    LM head for every position whose logits are computed.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    windows: tuple[int | None, ...]  # per layer: attention window in tokens, None = full causal context

    @classmethod
    def from_config(cls, config) -> FlopCounter:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        n_layers = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types[:n_layers])
        elif window is not None and getattr(config, "use_sliding_window", True):
            windows = (window,) * n_layers
        else:
            windows = (None,) * n_layers
        return cls(
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            windows=windows,
        )

    @property
    def num_layers(self) -> int:
        return len(self.windows)

    def attention_projections(self) -> int:
        """Per token per layer: q and o (heads x head_dim wide), k and v (kv_heads x head_dim wide)."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return 2 * self.hidden_size * (2 * q + 2 * kv)

    def attention_scores(self, layer: int, start: int, end: int) -> int:
        """Scores and weighted sum for query positions start..end-1 (0-based) of one sequence in one layer:
        position p attends to min(p + 1, window) keys, 2 x 2 x heads x head_dim FLOPs per (query, key)."""
        keys = sum_min(start + 1, end, self.windows[layer])
        return 4 * self.num_heads * self.head_dim * keys

    def mlp(self) -> int:
        return 2 * 3 * self.hidden_size * self.intermediate_size

    def lm_head(self) -> int:
        return 2 * self.hidden_size * self.vocab_size

    def forward(self, start: int, end: int, executed: list[int], batch: int, logit_positions: int) -> int:
        """FLOPs of `batch` sequences processing positions start..end-1, where `executed[layer]` of them run
        that layer's attention, with `logit_positions` logits per sequence."""
        if len(executed) != self.num_layers:
            raise ValueError(f"executed has {len(executed)} layers, the model {self.num_layers}")
        tokens = end - start
        total = batch * tokens * self.num_layers * self.mlp()
        for layer, n_run in enumerate(executed):
            total += n_run * (tokens * self.attention_projections() + self.attention_scores(layer, start, end))
        return total + batch * logit_positions * self.lm_head()


def sum_min(first: int, last: int, cap: int | None) -> int:
    """sum(min(n, cap) for n in first..last), in closed form."""
    if last < first:
        return 0
    if cap is None or last <= cap:
        return (first + last) * (last - first + 1) // 2
    if first > cap:
        return cap * (last - first + 1)
    return (first + cap) * (cap - first + 1) // 2 + cap * (last - cap)

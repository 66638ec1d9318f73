"""What decode-only routing (`routertune export --decode-only`) needs beyond the routed attention itself.

In decode-only mode a prompt is prefilled with every routed layer running (the never-run layers of
`--free-kv` aside), so its K/V are a function of its tokens alone, like a dense model's: vLLM's prefix cache
may share them between requests whatever their routing settings, and chunked prefill may split them. The
routers decide from the prompt before the first generated token is computed, and the decisions apply to the
generated tokens only. Two pieces make that hold inside vLLM:

* ``PromptProjections``: a decision needs the mean of the router's input over the whole prompt, but a chunk
  sees part of it and a prefix-cache hit computes none of the cached part. The router is linear before its
  sigmoid, so the mean of its projection ``w . x`` per token is all it needs (``sigmoid(b + mean_t w . x_t)``,
  equal to the Hugging Face path's ``sigmoid(w . mean_t x_t + b)`` up to float32 rounding). Each prompt token's
  projection per routed layer is stored at the token's KV-cache slot when the token is prefilled: a block's
  slots hold its projections exactly as long as they hold its K/V, so a prefix-cache hit finds both.
* ``install_prompt_only_caching``: blocks are cached for reuse only up to the request's prompt. Blocks that
  hold generated tokens were computed with skips (and hold no K/V at skipped layers), so a later prompt that
  contains them (the next turn of a chat) must prefill them afresh instead of hitting them.
"""

from __future__ import annotations

import torch

_HOOKED = "_routertune_hooked"
_PROMPT_ONLY = "_routertune_prompt_only"


class PromptProjections:
    """Per KV-cache slot and routed layer: the router's projection ``w . x`` (float32) of the prompt token held
    at that slot, shared by the routed layers of one model and sized from the first KV cache it sees."""

    def __init__(self, layers: list[int]):
        self.columns = {layer: j for j, layer in enumerate(layers)}
        self.table: torch.Tensor | None = None  # (num_blocks * block_size, len(layers))
        self.block_size = 0
        self.layout_checked = False  # check_layout passed once (the block layout is the process's)

    def bind(self, kv_cache: torch.Tensor) -> None:
        """Size the table from a layer's KV cache ([num_blocks, kv_heads, block_size, 2 * head_size] on CPU)."""
        if self.table is not None:
            return
        if kv_cache.dim() != 4:
            raise NotImplementedError(
                f"decode-only routing reads vLLM's CPU KV-cache layout [blocks, heads, block_size, 2 * head]; this "
                f"backend's cache has shape {tuple(kv_cache.shape)}"
            )
        num_blocks, block_size = int(kv_cache.shape[0]), int(kv_cache.shape[2])
        self.block_size = block_size
        self.table = torch.zeros(num_blocks * block_size, len(self.columns), dtype=torch.float32)

    def write(self, layer: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        self.table[slots.long(), self.columns[layer]] = values.float()

    def slots_of(self, block_row: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The slots of positions start..stop-1 of a request whose block table row is `block_row`."""
        positions = torch.arange(start, stop)
        blocks = block_row.index_select(0, positions // self.block_size).long()
        return blocks * self.block_size + positions % self.block_size

    def mean(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        return self.table[slots, self.columns[layer]].mean()

    def check_layout(self, block_row: torch.Tensor, start: int, stop: int, slot_mapping: torch.Tensor) -> None:
        """Refuse a block layout this reading of the block table does not reproduce (once per process): the
        slots it computes for this step's tokens must be the ones vLLM writes K/V to."""
        expected = self.slots_of(block_row, start, stop)
        if not torch.equal(expected, slot_mapping.long()):
            raise NotImplementedError(
                "decode-only routing: the KV-cache slots read from the block table do not match vLLM's slot mapping "
                "(a kernel block size other than the cache's?); serve this export without --decode-only"
            )


def install_prompt_only_caching() -> None:
    """Wrap vLLM's scheduler so that, for a decode-only export, only full prompt blocks enter the prefix cache
    (KVCacheCoordinator.cache_blocks capped at the prompt's length). Once per process; other models untouched."""
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
    from vllm.v1.core.sched.scheduler import Scheduler

    original_cache = KVCacheCoordinator.cache_blocks
    if getattr(original_cache, _HOOKED, False):
        return

    def cache_blocks(self, request, num_computed_tokens: int) -> None:
        if getattr(self, _PROMPT_ONLY, False):
            num_computed_tokens = min(num_computed_tokens, request.num_prompt_tokens)
        return original_cache(self, request, num_computed_tokens)

    original_init = Scheduler.__init__

    def __init__(self, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        if is_decode_only(vllm_config.model_config):
            setattr(self.kv_cache_manager.coordinator, _PROMPT_ONLY, True)

    for wrapper, original in ((cache_blocks, original_cache), (__init__, original_init)):
        setattr(wrapper, _HOOKED, True)
        wrapper.__wrapped__ = original
    KVCacheCoordinator.cache_blocks = cache_blocks
    Scheduler.__init__ = __init__


def is_decode_only(model_config) -> bool:
    from .requests import routed_section

    routing = routed_section(model_config)
    return routing is not None and routing.decode_only

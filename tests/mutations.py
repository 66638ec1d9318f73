"""Mutation check: break the code on purpose, one mutant at a time, and see that a test fails.

    python tests/mutations.py                 # every mutant against its tests (a few minutes)
    python tests/mutations.py --full         # every mutant against the whole non-slow suite (slower)
    python tests/mutations.py --only NAME... # some mutants
    make mutants

Each mutant replaces one exact piece of source (it must occur exactly once, so a mutant that no longer
applies is reported, never silently skipped) in a copy of src/, and runs pytest on that copy (PYTHONPATH
wins over the editable install). A mutant is caught when pytest fails; a survivor means no test notices that
break. The script first runs the same tests on the unmutated copy: they must pass. Exit status 1 when any
mutant survives or does not apply. Only the script prints; it writes nothing in the repository.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/routertune
    old: str
    new: str
    tests: tuple[str, ...]  # test files (relative to tests/) that should catch it
    why: str = ""
    slow: bool = False  # its tests are marked slow (vLLM engines): run them instead of deselecting them


GENERATE = ("test_generate_modes.py", "test_reference.py", "test_routing.py")
ROUTING = ("test_routing.py", "test_reference.py", "test_model.py")
HARNESS = ("test_harness_edges.py", "test_evaluate.py")

MUTANTS = [
    # --- the three the issue-10 review found surviving ---------------------------------------------------
    Mutant(
        "representative_disabled",
        "routing/cache.py",
        "    def _representative(self, layer_idx: int) -> int:\n",
        "    def _representative(self, layer_idx: int) -> int:\n        return layer_idx\n",
        ("test_generate_modes.py",),
        "empty layers report length 0",
    ),
    Mutant(
        "no_batch_repeat_interleave_override",
        "routing/cache.py",
        "    def batch_repeat_interleave(self, repeats: int) -> None:",
        "    def _unused_batch_repeat_interleave(self, repeats: int) -> None:",
        ("test_generate_modes.py",),
        "DynamicCache's version repeats rows but not decisions",
    ),
    Mutant(
        "count_row0_only",
        "eval/harness.py",
        "self.stats[task].add({k: v[g : g + 1].cpu()",
        "self.stats[task].add({k: v[0:1].cpu()",
        HARNESS,
        "skip statistics counted from the first row of every batch",
    ),
    # --- the issue-10 bugs, put back -------------------------------------------------------------------------
    Mutant(
        "uncached_pools_ones_like_prompt",
        "model.py",
        "with routing.pool_over(prompt.shape[1]):",
        "with routing.pool_over(kwargs.get('attention_mask', torch.ones_like(prompt))):",
        GENERATE,
        "bugs 1 and 4: a fixed (B, T) mask, all ones without a mask",
    ),
    Mutant(
        "chunked_prefill_allowed",
        "model.py",
        'if setting("prefill_chunk_size", None) is not None:',
        "if False:",
        ("test_generate_modes.py",),
        "bug 2",
    ),
    Mutant(
        "representative_same_kind_only",
        "routing/cache.py",
        "return (same_kind or holding or [layer_idx])[0]",
        "return (same_kind or [layer_idx])[0]",
        ("test_generate_modes.py",),
        "bug 3: every sliding layer skipped",
    ),
    Mutant(
        "emptied_layer_holds_tokens",
        "routing/cache.py",
        "return layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0",
        "return layer.is_initialized",
        ("test_generate_modes.py",),
        "bug 3: a layer emptied by batch_select_indices",
    ),
    Mutant(
        "use_cache_from_kwargs_only",
        "model.py",
        'if not setting("use_cache", True):',
        'if not kwargs.get("use_cache", True):',
        ("test_generate_modes.py",),
        "bug 5",
    ),
    Mutant(
        "item_routes_per_choice_after_truncation",
        "eval/harness.py",
        "                elif route:\n                    row.route = tuple(route)\n",
        "",
        HARNESS,
        "bug 6: truncated choices route on their own contexts",
    ),
    Mutant(
        "route_decisions_not_given",
        "eval/harness.py",
        "cache.set_decision(layer, torch.stack([d[layer] for d in chosen]))  # (B,)",
        "pass",
        HARNESS,
        "bug 6: rows whose routing context was cut decide on their own",
    ),
    Mutant(
        "generate_until_truncation_unchecked",
        "eval/harness.py",
        "if max_new >= self.max_length:",
        "if False:",
        HARNESS,
        "max_gen_toks >= max_length keeps the whole prompt",
    ),
    Mutant(
        "right_padding_allowed",
        "model.py",
        "    if padded_end:\n",
        "    if False:\n",
        ("test_generate_modes.py",),
        "right-padded generation accepted silently",
    ),
    Mutant(
        "misaligned_output_flags_allowed",
        "routing/inject.py",
        "        _refuse_misaligned_outputs(arguments, model.config, first_wrapper.granularity, forcing)\n",
        "",
        ("test_generate_modes.py",),
        "short attention weights / missing hidden states",
    ),
    # --- the core invariants ------------------------------------------------------------------------------------
    Mutant(
        "pool_over_padding",
        "routing/router.py",
        "    if mask is None:\n        return x.mean(dim=1)",
        "    if True:\n        return x.mean(dim=1)",
        ROUTING,
        "decisions depend on padding",
    ),
    Mutant(
        "decode_redecides",
        "routing/inject.py",
        "            if stored is not None:\n",
        "            if False:\n",
        ROUTING,
        "decode ignores the prefill decisions",
    ),
    Mutant(
        "reshuffle_keeps_old_decisions",
        "routing/cache.py",
        "        self.decisions = {idx: runs[rows.to(runs.device)] for idx, runs in self.decisions.items()}",
        "        pass",
        GENERATE,
        "beam reorder moves K/V but not decisions",
    ),
    Mutant(
        "reshuffle_selects_all_rows",
        "routing/cache.py",
        "local = stored_pos[rows.to(runs.device)][new_runs]",
        "local = rows.to(runs.device)[: int(new_runs.sum())]",
        GENERATE + HARNESS,
        "a routed layer's stored rows are selected as if every row ran",
    ),
    Mutant(
        "stale_run_plan",
        "routing/cache.py",
        "if plan is None or plan[0] is not runs:",
        "if plan is None:",
        GENERATE + HARNESS,
        "the row subset is not recounted after a reshuffle",
    ),
    Mutant(
        "scatter_to_wrong_rows",
        "routing/inject.py",
        "index_copy(0, rows, main)",
        "index_copy(0, rows.flip(0), main)",
        ROUTING,
        "subset outputs land on the wrong rows",
    ),
    Mutant(
        "skipped_block_zeroed",
        "routing/inject.py",
        'return hidden_states if self.granularity == "block" else torch.zeros_like(hidden_states)',
        "return torch.zeros_like(hidden_states)",
        ROUTING,
        "a skipped block drops the residual",
    ),
    Mutant(
        "subset_kwargs_not_selected",
        "routing/inject.py",
        '_BATCHED_KWARGS = ("attention_mask", "position_ids", "position_embeddings")',
        '_BATCHED_KWARGS = ("position_ids", "position_embeddings")',
        ROUTING,
        "running rows see the whole batch's attention mask",
    ),
    Mutant(
        "threshold_strict",
        "routing/inject.py",
        "runs = scores.detach() >= threshold",
        "runs = scores.detach() > threshold",
        ROUTING + ("test_train.py",),
        "zero-initialised routers (score 0.5) must run",
    ),
    Mutant(
        "no_gradient_through_gate",
        "routing/router.py",
        "        return grad_output, None",
        "        return torch.zeros_like(grad_output), None",
        ("test_model.py", "test_train.py"),
        "the straight-through estimator passes no gradient",
    ),
    Mutant(
        "everything_trainable",
        "routing/inject.py",
        "param.requires_grad_(is_trainable(name))",
        "param.requires_grad_(True)",
        ("test_model.py",),
        "the base model is not frozen",
    ),
    # --- token routing's sink tokens ---------------------------------------------------------------------------
    Mutant(
        "sinks_counted_per_call",
        "routing/token_routing.py",
        "if mask is not None and mask.shape[1] >= call.past_length + steps:",
        "if False:",
        ("test_token_routing.py",),
        "sinks counted from each call's start: every decode step forces a token",
    ),
    Mutant(
        "sinks_ignored",
        "routing/token_routing.py",
        "                runs = runs | sinks\n",
        "                pass\n",
        ("test_token_routing.py",),
        "the first tokens skip like any other",
    ),
    Mutant(
        "fit_samples_sinks",
        "train/importance.py",
        "(mask.cumsum(1) > routed.router_config.token_sink)",
        "(mask.cumsum(1) > 0)",
        ("test_token_routing.py",),
        "the fit learns from tokens the router never decides",
    ),
    Mutant(
        "sink_gate_learns",
        "routing/token_routing.py",
        "gate = torch.where(sinks, torch.ones_like(gate), gate)",
        "gate = gate",
        ("test_token_routing.py",),
        "the router gets a gradient for tokens it does not decide",
    ),
    # --- the trust region of the importance fit --------------------------------------------------------------
    Mutant(
        "trust_region_ignored",
        "routing/router.py",
        "return torch.sigmoid(bounded_logit(self.proj(pooled.float()).squeeze(-1), *self.trust_region))",
        "return torch.sigmoid(self.proj(pooled.float()).squeeze(-1))",
        ("test_trust_region.py",),
        "the router scores as if it had no region",
    ),
    Mutant(
        "trust_region_not_loaded",
        "routing/router.py",
        "router.set_trust_region(*(float(v) for v in region))",
        "pass",
        ("test_trust_region.py",),
        "saved routers lose their region on load",
    ),
    Mutant(
        "trust_bound_not_in_sd",
        "train/importance.py",
        "else -down * sd, math.inf",
        "else -down, math.inf",
        ("test_trust_region.py",),
        "the bound taken in logit units, not standard deviations of the part",
    ),
    Mutant(
        "capacity_on_unbounded_logits",
        "train/importance.py",
        "predicted = torch.stack([bounded_logit(x_train[i] @ fits[i][0] + fits[i][1], *bounds[i]) for i in layers])",
        "predicted = torch.stack([x_train[i] @ fits[i][0] + fits[i][1] for i in layers])",
        ("test_trust_region.py",),
        "the capacity offset set before the region, so the target is missed",
    ),
    Mutant(
        "capacity_offset_on_a_record",
        "train/importance.py",
        "    return (runs_low + skips_high) / 2\n",
        "    return runs_low\n",
        ("test_trust_region.py",),
        "the offset sits on a training record (or a pile of them), decided by rounding",
    ),
    Mutant(
        "resume_rescores_finished_settings",
        "eval/tradeoff.py",
        "if variant.name in stored:",
        "if False:",
        ("test_tradeoff.py",),
        "--resume measures again what the stored run finished",
    ),
    Mutant(
        "resume_accepts_other_settings",
        "eval/tradeoff.py",
        "        check_resumable(previous, result)\n",
        "",
        ("test_tradeoff.py",),
        "a stored run whose settings no longer match is mixed into this one",
    ),
    Mutant(
        "resume_ignores_the_routers_fingerprint",
        "eval/tradeoff.py",
        '    for key in ("routers_sha256", "num_layers",',
        '    for key in ("num_layers",',
        ("test_tradeoff.py",),
        "routers retrained into the same folder are mixed with the stored run's",
    ),
    # --- five correctness defects of the independent review (MLP reshuffle, token cut-off, ties, config, empty) --
    Mutant(
        "mlp_reshuffle_selects_subset_rows",
        "routing/cache.py",
        "if runs is None or stored == runs.shape[0]:",
        "if runs is None:",
        ("test_generate_modes.py", "test_reference.py"),
        "MLP routing stores every row's K/V, but a reshuffle selects them as if only the running rows were stored",
    ),
    Mutant(
        "top_k_cutoff_counts_sinks",
        "routing/token_routing.py",
        "        cutoff = _decode_cutoff(scores, ranked, sinks, k)\n",
        "        cutoff = top.values.gather(1, (k - 1).clamp_min(0)[:, None]).squeeze(1)\n",
        ("test_token_routing.py::test_top_k_decode_cutoff_is_the_lowest_non_sink_score_that_ran",),
        "the k-th score counting the sinks' +inf: when they fill every place no generated token runs again",
    ),
    Mutant(
        "tied_scores_counted_one_by_one",
        "calibrate.py",
        "    distinct, counts = torch.unique_consecutive(flat.sort(descending=True).values, return_counts=True)\n",
        "    distinct = flat.sort(descending=True).values\n    counts = torch.ones_like(distinct, dtype=torch.long)\n",
        ("test_calibrate.py", "test_trust_region.py"),
        "the old quantile: a cut inside a pile of tied scores sits on the pile, and the whole pile runs",
    ),
    Mutant(
        "off_target_thresholds_saved",
        "calibrate.py",
        "        if not job.accept_off_target:\n",
        "        if False:\n",
        ("test_calibrate.py",),
        "calibration saves thresholds far from the target without a word",
    ),
    Mutant(
        "caller_config_stamped",
        "model.py",
        "config = copy.deepcopy(config) if config is not None else RouterConfig()",
        "config = config if config is not None else RouterConfig()",
        ("test_model.py::test_one_config_for_two_models_leaves_each_its_own_identity",),
        "a config reused for a second model carries the first one's identity and layers there",
    ),
    Mutant(
        "empty_prompt_reads_as_right_padding",
        "model.py",
        "    _refuse_empty_prompts(prompt, attention_mask, pad_token_id, eos_token_id)\n",
        "",
        ("test_generate_modes.py::test_empty_prompts_are_refused_by_index_with_the_fix",),
        "an empty prompt in a left-padded batch is called right padding",
    ),
    Mutant(
        "forward_takes_empty_prompts",
        "model.py",
        'if cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() == 0:',
        "if False:",
        ("test_generate_modes.py::test_empty_prompts_are_refused_by_index_with_the_fix",),
        "a forward pools an empty row over nothing (and a lone one crashes)",
    ),
    Mutant(
        "cli_empty_prompt_without_the_chat_hint",
        "generate.py",
        "    if empty:  # without a token",
        "    if False:  # without a token",
        ("test_generate_modes.py::test_cli_generate_refuses_an_empty_prompt",),
        "`routertune generate --no-chat \"\"` is refused without saying that chat mode works",
    ),
    # --- serving: per-request routing settings checked at admission, flat vllm_xargs keys (routertune serve) ----
    # slow: they start vLLM's OpenAI server / an engine (tests/test_serve_http.py), minutes each
    Mutant(
        "serve_admission_check_removed",
        "serve/plugin.py",
        "    requests.install_admission_check()",
        "    pass",
        ("test_serve_http.py::test_http_per_request_routing_settings",),
        "a malformed routing setting reaches the engine: no HTTP 400 (the engine died of it before the fix)",
        slow=True,
    ),
    Mutant(
        "serve_flat_threshold_ignored",
        "serve/requests.py",
        "thresholds.append(settings.threshold if settings is not None else None)",
        "thresholds.append(None)",
        ("test_serve_http.py::test_http_per_request_routing_settings",),
        "routertune_threshold accepted but the export's thresholds decide",
        slow=True,
    ),
    Mutant(
        "serve_flat_keys_not_read",
        "serve/requests.py",
        "if isinstance(k, str) and k.startswith(FLAT_PREFIX)}",
        "if False}",
        ("test_serve_http.py",),
        "only the nested extra_args form is read; vllm_xargs keys are ignored",
    ),
    # --- results never record a machine path (base_model.portable_name) --------------------------------------
    Mutant(
        "portable_name_keeps_home",
        "base_model.py",
        'return "~" + name[len(home) :]',
        "return name",
        ("test_models.py",),
        "router files and results carry this machine's home folder",
    ),
    # --- serving under load: the load test's own comparisons (serve/load.py) ----------------------------------
    Mutant(
        "load_compares_lengths_only",
        "serve/load.py",
        "agree = loaded.tokens == alone.tokens and",
        "agree = len(loaded.tokens) == len(alone.tokens) and",
        ("test_serve_http.py",),
        "a loaded response with other tokens of the same length counted as equal",
    ),
    Mutant(
        "load_log_prefix_too_loose",
        "serve/load.py",
        'prefix = f"cmpl-{request_id}-0-"',
        'prefix = f"cmpl-{request_id}"',
        ("test_serve_http.py",),
        "request abc reads the decisions of request abc1",
    ),
    # --- serving: export --static for every family (DeciLM for llama only; the routed classes forced to the set) -----
    # (tests/test_serve_static_vllm.py, slow, serves each family's export in vLLM against the zeroed plain model)
    Mutant(
        "static_every_family_as_decilm",
        "serve/export.py",
        "if model_type in NATIVE_STATIC_FAMILIES and 0 not in dropped:",
        "if 0 not in dropped:",
        ("test_serve.py",),
        "qwen2/qwen3/gemma3/mistral written as Llama-shaped DeciLM (vLLM fails or drops weights)",
    ),
    Mutant(
        "static_layer_0_as_decilm",
        "serve/export.py",
        "if model_type in NATIVE_STATIC_FAMILIES and 0 not in dropped:",
        "if model_type in NATIVE_STATIC_FAMILIES:",
        ("test_serve.py",),
        "DeciLM's no-op first layer has no residual yet: the engine fails at the first step",
    ),
    Mutant(
        "served_static_set_ignored",
        "serve/attention.py",
        "        if self.static is not None:\n            return [self.static.runs(self.layer_idx)]",
        "        if False:\n            return [self.static.runs(self.layer_idx)]",
        ("test_serve.py",),
        "a static export's layers decided per request (no router: it crashes, or runs them)",
    ),
    # --- issue 23: the searched static order (train/static_order.py) and the per-input headroom (eval/headroom.py) --
    Mutant(
        "static_order_picks_max",
        "train/static_order.py",
        'ranked = sorted(children.items(), key=lambda item: (item[1]["kl"], sorted(item[0])))',
        'ranked = sorted(children.items(), key=lambda item: (-item[1]["kl"], sorted(item[0])))',
        ("test_static_order.py",),
        "the greedy adds the layer that raises KL the most",
    ),
    Mutant(
        "static_order_runs_from_after_the_change",
        "train/static_order.py",
        "diffs = [min(s ^ c) for s, c in zip(sets, self.state) if s != c]",
        "diffs = [min(s ^ c) + 1 for s, c in zip(sets, self.state) if s != c]",
        ("test_static_order.py",),
        "a candidate evaluated from the cache one layer too late: its own zeroing is lost",
    ),
    Mutant(
        "static_order_resume_restarts",
        "train/static_order.py",
        "        if not differ:\n            previous = stored\n",
        "",
        ("test_static_order.py",),
        "a stored search is searched again from scratch",
    ),
    Mutant(
        "oracle_takes_the_last_candidate",
        "eval/headroom.py",
        "if layer not in chains[i] and values[i] < best[i]:",
        "if layer not in chains[i]:",
        ("test_headroom.py",),
        "the per-text oracle ignores the KL",
    ),
    Mutant(
        "routed_half_overlaps_scored",
        "eval/headroom.py",
        'return {"route": [t < half - 1 for t in range(n)]',
        'return {"route": [t < half for t in range(n)]',
        ("test_headroom.py",),
        "the routed half's KL counts the first scored position",
    ),
    Mutant(
        "budget_never_gives_the_top_count",
        "eval/headroom.py",
        "for m in range(min(top, total - used) + 1):",
        "for m in range(min(top, total - used)):",
        ("test_headroom.py",),
        "the allocation misses allocations that use the longest prefix",
    ),
    Mutant(
        "gap_share_measures_routers_to_oracle",
        "eval/headroom.py",
        'share = float((ms - mr) / gap) if gap > 0 else float("nan")',
        'share = float((mr - mo) / gap) if gap > 0 else float("nan")',
        ("test_headroom.py",),
        "the share left open reported as the share closed",
    ),
    # --- issue 25: a demo that never goes silent (routertune.progress events; tests/test_demo.py listens) -----------
    Mutant(
        "accuracy_items_progress_silent",
        "eval/tradeoff.py",
        "                if progress:\n                    progress(len(chunk))\n",
        "                pass\n",
        ("test_demo.py",),
        "a setting of the accuracy runs takes minutes at full size with no count moving",
    ),
    Mutant(
        "agreement_progress_silent",
        "eval/tradeoff.py",
        "        bar.update(1)\n    bar.close()\n    return out\n",
        "    bar.close()\n    return out\n",
        ("test_demo.py",),
        "greedy agreement runs every setting with no count moving",
    ),
    Mutant(
        "importance_fit_progress_silent",
        "train/importance.py",
        "                    progress(int(batch[\"input_ids\"].shape[0]))\n",
        "                    pass\n",
        ("test_demo.py",),
        "the training stage's dense pass (minutes at 1,000 records) shows nothing",
    ),
    Mutant(
        "prior_order_reversed",
        "train/importance.py",
        "for value, i in zip(values, [*order, *rest]):",
        "for value, i in zip(values, [*rest, *order]):",
        ("test_prior_order.py",),
        "the searched order's layers get the highest priors: skipped last instead of first",
    ),
    Mutant(
        "prior_order_ignored",
        "train/importance.py",
        "        new_fits[i] = (w, b + value - prior)\n",
        "        new_fits[i] = (w, b)\n",
        ("test_prior_order.py",),
        "the trust regions follow the order but the routers' own biases keep the 1 - cos ranking",
    ),
    Mutant(
        "mixed_workload_searched_against_static",
        "eval/mixed_workload.py",
        'for kind, prefix in (("static", "static"), ("searched", "searched static"), ("routers", "routers"))',
        'for kind, prefix in (("static", "static"), ("searched", "static"), ("routers", "routers"))',
        ("test_tradeoff.py::test_mixed_workload_pools_texts_and_interpolates_at_the_pooled_skip",),
        "the mixed stream's searched-order baseline is really 1 - cos static drop",
    ),
    Mutant(
        "export_static_takes_the_orders_tail",
        "serve/export.py",
        "    dropped = sorted(found.order[: job.static])\n",
        "    dropped = sorted(found.order[-job.static :])\n",
        ("test_serve.py::test_static_export_drops_the_searched_orders_first_layers_or_1_minus_cos_on_request",),
        "export --static drops the searched order's last K layers, the costliest it found",
    ),
    Mutant(
        "fixed_template_ignored_in_hf",
        "routing/inject.py",
        "        if fixed and past_length == 0:",
        "        if False:",
        ("test_template.py",),
        "routers trained with --pool content decide from whole prompts in RoutedModel",
    ),
    Mutant(
        "fixed_template_ignored_in_vllm",
        "serve/attention.py",
        "            spans = [batch.requests[i].pool_span(self.fixed_template) for i in pending]",
        "            spans = [(0, batch.requests[i].prompt_len) for i in pending]",
        ("test_serve.py::test_a_fixed_chat_template_is_pooled_without",),
        "the served routers decide from whole prompts though trained without the template",
    ),
    Mutant(
        "fixed_template_ignored_in_the_fit",
        "train/importance.py",
        'current["pool"] = content_mask(batch["input_ids"], pool, routed.router_config.fixed_template)',
        'current["pool"] = pool',
        ("test_template.py",),
        "the importance fit regresses on whole-prompt features that the routers will not see",
    ),
    Mutant(
        "free_kv_keeps_the_kv_cache",
        "serve/models.py",
        "                attention.attn.get_kv_cache_spec = _no_kv_cache_spec",
        "                pass",
        ("test_serve_vllm.py::test_requests_served_alone_skip_whole_layers_exactly",),
        "--free-kv exports still give their never-run layers a KV cache (no memory saved)",
        slow=True,
    ),
    Mutant(
        "free_kv_admits_settings_that_run_a_never_run_layer",
        "serve/requests.py",
        "    if settings.threshold is not None and settings.threshold <= bound:",
        "    if settings.threshold is not None and settings.threshold < 0:",
        ("test_serve_http.py::test_free_kv_refuses_only_the_settings_that_could_run_a_never_run_layer",),
        "a request's low threshold would run a layer that has no KV cache",
    ),
    Mutant(
        "free_kv_bound_ignores_the_threshold_margin",
        "serve/export.py",
        "        if bound + NEVER_RUN_MARGIN < router_config.threshold_for(i):",
        "        if bound <= router_config.threshold_for(i):",
        ("test_serve_http.py::test_free_kv_finds_the_layers_whose_trust_region_caps_the_score_below_the_threshold",),
        "a layer whose score can reach its threshold exactly would be served without KV cache",
    ),
    Mutant(
        "decode_only_caches_answer_blocks",
        "serve/decode_only.py",
        "            num_computed_tokens = min(num_computed_tokens, request.num_prompt_tokens)",
        "            pass",
        ("test_serve_vllm.py::test_decode_only_with_prefix_caching_chunked_prefill_and_preemption",),
        "a chat's next turn would reuse answer blocks computed with skipped layers",
        slow=True,
    ),
    Mutant(
        "decode_only_routes_the_prompt",
        "serve/attention.py",
        "            counts.append(query if run or run is None else prompt_here[i])",
        "            counts.append(query if run or run is None else 0)",
        ("test_serve_vllm.py::test_decode_only_with_prefix_caching_chunked_prefill_and_preemption",),
        "a recomputed (preempted) request would skip its prompt tokens too",
        slow=True,
    ),
    Mutant(
        "decode_only_pools_the_last_chunk",
        "serve/attention.py",
        "                a, b = req.pool_span(self.fixed_template)",
        "                a, b = req.pool_span(self.fixed_template); a = max(a, b - 16)",
        ("test_serve_vllm.py::test_decode_only_with_prefix_caching_chunked_prefill_and_preemption",),
        "decisions would pool part of the prompt only",
        slow=True,
    ),
    Mutant(
        "decode_only_prefill_follows_the_decision",
        "routing/inject.py",
        "        if call.prefill_skip is not None and call.past_length == 0:",
        "        if call.prefill_skip is not None and call.past_length < 0:",
        ("test_decode_only.py",),
        "the Hugging Face decode-only path would route the prompt's prefill",
    ),
    Mutant(
        "compiled_routed_layers_traced",
        "serve/models.py",
        "            if compiled:\n",
        "            if False:\n",
        ("test_serve_http.py",),
        "under vLLM's compilation the routed layers' per-request Python would be traced once and baked in",
        slow=True,
    ),
]


def _run_pytest(src: Path, tests: list[str], timeout: int, slow: bool = False) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    markers = [] if slow else ["-m", "not slow"]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", *markers, "-p", "no:cacheprovider", *tests]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - started, "timeout"
    lines = [l for l in done.stdout.splitlines() if l.startswith("FAILED") or l.startswith("ERROR")]
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()[-200:]
    return done.returncode, time.perf_counter() - started, (lines[0] if lines else last)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="run the whole non-slow suite for every mutant")
    parser.add_argument("--only", nargs="*", help="mutant names to run")
    parser.add_argument(
        "--timeout", type=int, default=3600, help="seconds per pytest run (a shared, busy machine is slow)"
    )
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}; known: {[m.name for m in MUTANTS]}")

    def tests_for(mutant: Mutant | None) -> list[str]:
        if args.full or mutant is None and args.full:
            return ["tests"]
        files = sorted({t for m in ([mutant] if mutant else chosen) for t in m.tests})
        return [f"tests/{t}" for t in files]

    with tempfile.TemporaryDirectory(prefix="routertune-mutants-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        code, seconds, detail = _run_pytest(src, tests_for(None), args.timeout, any(m.slow for m in chosen))
        verdict = "passes" if code == 0 else "TIMED OUT (raise --timeout)" if code == -1 else "FAILS"
        print(f"baseline (no mutation): {verdict} in {seconds:.0f}s")
        if code != 0:
            print(f"  {detail}\nfix the suite before judging mutants")
            return 1
        survivors, broken = [], []
        for mutant in chosen:
            path = src / "routertune" / mutant.file
            original = path.read_text() if path.exists() else ""
            count = original.count(mutant.old)
            if count != 1 or mutant.old == mutant.new:
                print(f"{mutant.name:40s} DOES NOT APPLY ({count} matches in {mutant.file})")
                broken.append(mutant.name)
                continue
            path.write_text(original.replace(mutant.old, mutant.new))
            try:
                code, seconds, detail = _run_pytest(src, tests_for(mutant), args.timeout, mutant.slow)
            finally:
                path.write_text(original)
            caught = code not in (0, 5, -1)  # 5: no tests collected; -1: timed out, so unknown
            verdict = "caught" if caught else "TIMED OUT" if code == -1 else "SURVIVED"
            print(f"{mutant.name:40s} {verdict} in {seconds:4.0f}s  {detail if caught else '(' + mutant.why + ')'}")
            if not caught:
                survivors.append(mutant.name)
    print(
        f"\n{len(chosen) - len(survivors) - len(broken)}/{len(chosen)} mutants caught"
        + (f"; survivors or timed out: {', '.join(survivors)}" if survivors else "")
        + (f"; not applicable: {', '.join(broken)}" if broken else "")
    )
    return 1 if survivors or broken else 0


if __name__ == "__main__":
    sys.exit(main())

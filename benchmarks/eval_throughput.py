"""Evaluation throughput on CPU: the harness path (RoutedLM.loglikelihood on the harness's own requests)
against a plain batched forward of the plain Hugging Face model over exactly the same token sequences, at one
torch thread, interleaved in one run. Writes JSON.

    python benchmarks/eval_throughput.py        # -> benchmarks/results/eval_throughput/eval_throughput.json

The requests are the ones lm-evaluation-harness builds for the tasks (zero-shot, routertune's offline task
configs), `--limit` items each. Each request is context + continuation, cut to the model's length as the
harness LM cuts it; "tokens" below are the tokens of all requests, so tokens/s of the two paths count the same
work to be done. The plain forward is what an evaluator without routertune does: requests sorted by length,
right-padded batches under the same padded-token budget, logits only at the scored positions. The harness
path is timed end to end (tokenisation, grouping, forwards, scoring); it runs each item's context once.

Times are CPU seconds of this process (time.process_time) next to wall seconds: on a shared machine the
wall clock mostly measures the neighbours. Both paths give the same log-probabilities (the largest
difference is recorded); with routers or static drop the harness path also skips what they skip.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from routertune.base_model import load_model_and_tokenizer
from routertune.eval import tasks
from routertune.eval.evaluate import Setting, prepared_lm
from routertune.eval.harness import RoutedLM, SkipStats, budget_batches, quiet_harness
from routertune.train.prompts import chat_prompts

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_ROUTERS = RESULTS / "routers" / "default"


def harness_requests(task_names: list[str], limit: int) -> list:
    """The loglikelihood Instances the harness builds for these tasks (first `limit` documents each)."""
    requests = []
    for task in tasks.build_tasks(task_names, "zero"):
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        requests += [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    return requests


@torch.inference_mode()
def plain_forward(model, rows, pad_id: int, batch_tokens: int, max_batch: int) -> list[float]:
    """Sum of log-probabilities of each row's continuation: one forward of the plain model per batch of
    length-sorted, right-padded rows, logits only at the scored positions."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    out = [0.0] * len(rows)
    for batch in budget_batches(order, lambda i: len(rows[i].tokens) - 1, batch_tokens, max_batch):
        width = max(len(rows[i].tokens) - 1 for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        keep = torch.zeros((len(batch), width), dtype=torch.bool)
        targets = []
        for b, i in enumerate(batch):
            n_in = len(rows[i].tokens) - 1
            ids[b, :n_in] = torch.tensor(rows[i].tokens[:-1])
            mask[b, :n_in] = 1
            keep[b, n_in - rows[i].n_cont : n_in] = True
            targets += rows[i].tokens[-rows[i].n_cont :]
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        logprobs = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), -1)
        picked = logprobs.gather(-1, torch.tensor(targets)[:, None])[:, 0].tolist()
        start = 0
        for i in batch:  # kept positions come back row by row, in order
            out[i] = sum(picked[start : start + rows[i].n_cont])
            start += rows[i].n_cont
    return out


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.process_time() - cpu, time.perf_counter() - wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa", "hellaswag"])
    parser.add_argument("--limit", type=int, default=100, help="items per task")
    parser.add_argument("--routers", default=str(DEFAULT_ROUTERS), help="routers folder ('none' to leave out)")
    parser.add_argument(
        "--static-drop", type=int, default=8, help="static drop of K attention sublayers (0: leave out)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds (the best of each is kept)")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--output", default=str(RESULTS / "eval_throughput" / "eval_throughput.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer()
    with quiet_harness():
        requests = harness_requests(args.tasks, args.limit)
    lm_kwargs = dict(batch_tokens=args.batch_tokens, max_batch=args.max_batch, progress=False)
    probe = RoutedLM(model, tokenizer, **lm_kwargs)
    # the harness LM's own encoding and grouping (private helpers), so both paths get the same sequences
    encoded = [probe._encode(*req.args) for req in requests]
    rows = probe._rows(
        encoded, [(req.task_name, req.doc_id) for req in requests], [req.task_name for req in requests]
    )  # exactly the sequences the harness path scores
    tokens = sum(len(r.tokens) for r in rows)
    print(
        f"{len(requests)} requests, {len(rows)} rows, {tokens} tokens ({', '.join(args.tasks)}, "
        f"{args.limit} items each)",
        flush=True,
    )

    settings = [Setting("dense")]
    if args.static_drop:
        settings.append(Setting("static", drop=args.static_drop))
    if args.routers.lower() != "none":
        settings.append(Setting("routers", routers=args.routers))
    calibration = chat_prompts(tokenizer, "train", 32, 256) if args.static_drop else None

    runs: dict[str, list[dict]] = {"plain forward": []}
    details: dict[str, dict] = {}
    command = "python benchmarks/eval_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def best(name):
        entries = runs[name]
        cpu = min(e["cpu_s"] for e in entries)
        wall = min(e["wall_s"] for e in entries)
        return {
            "cpu_s": cpu,
            "wall_s": wall,
            "tokens_per_s_cpu": tokens / cpu,
            "tokens_per_s_wall": tokens / wall,
            "runs": entries,
            **details.get(name, {}),
        }

    def write(complete: bool) -> dict:
        """The JSON so far (rewritten after every measurement, so an interrupted run keeps what it measured)."""
        results = {name: best(name) for name in runs if runs[name]}
        plain_cpu = results["plain forward"]["cpu_s"]
        for entry in results.values():
            entry["time_ratio_vs_plain"] = entry["cpu_s"] / plain_cpu  # harness time / plain time (<= 1.5 wanted)
        summary = {"plain_tokens_per_s": results["plain forward"]["tokens_per_s_cpu"]}
        dense = results.get("harness: dense")
        if dense is not None:
            summary.update(
                {
                    "harness_dense_tokens_per_s": dense["tokens_per_s_cpu"],
                    "ratio_harness_over_plain_time": dense["time_ratio_vs_plain"],
                    "target_ratio": 1.5,
                    "met": dense["time_ratio_vs_plain"] <= 1.5,
                    "same_scores": dense["max_abs_logprob_diff_vs_plain"] < 1e-3,
                }
            )
        out = {
            "what": "harness loglikelihood path vs a plain batched forward over the same token sequences, 1 thread",
            "command": command,
            "complete": complete,
            "model": str(getattr(model.config, "name_or_path", "")) or "SmolLM2-135M-Instruct",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "tasks": args.tasks,
            "limit": args.limit,
            "requests": len(requests),
            "tokens": tokens,
            "batch_tokens": args.batch_tokens,
            "max_batch": args.max_batch,
            "repeats": args.repeats,
            "clock": "process CPU time (best of the rounds); wall time alongside",
            "summary": summary,
            "results": results,
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
        return summary

    plain_forward(model, rows[:8], probe._pad_id, args.batch_tokens, args.max_batch)  # warm-up, untimed
    for round_ in range(args.repeats):
        # each round: the plain forward, then every harness setting right after it
        reference, cpu, wall = timed(
            lambda: plain_forward(model, rows, probe._pad_id, args.batch_tokens, args.max_batch)
        )
        runs["plain forward"].append({"cpu_s": cpu, "wall_s": wall})
        print(f"[{round_}] plain forward: {cpu:.1f} s CPU ({tokens / cpu:.0f} tokens/s)", flush=True)
        write(False)
        for setting in settings:
            with prepared_lm(setting, model, tokenizer, calibration, **lm_kwargs) as (lm, info):
                got, cpu, wall = timed(lambda: lm.loglikelihood(requests, disable_tqdm=True))
                name = f"harness: {setting.name}"
                runs.setdefault(name, []).append({"cpu_s": cpu, "wall_s": wall})
                total = SkipStats(lm.num_layers)
                for stats in lm.stats.values():
                    total.merge(stats)
                # the same model as the plain forward only when dense: then the scores must agree
                diff = max(abs(a - b[0]) for a, b in zip(reference, got)) if setting.kind == "dense" else None
                details[name] = {
                    "skip_ratio": total.skip_ratio,
                    "dropped": info.dropped,
                    "max_abs_logprob_diff_vs_plain": diff,
                }
            print(
                f"[{round_}] {name}: {cpu:.1f} s CPU ({tokens / cpu:.0f} tokens/s), skip {total.skip_ratio:.3f}",
                flush=True,
            )
            write(False)
    summary = write(True)
    print(json.dumps(summary, indent=2))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Served throughput on a chat workload with a long shared system prompt (issue 24, part 3): what decode-only
routing (`routertune export --decode-only`, prefix caching and chunked prefill on) buys against whole-prompt
routing (which must turn both off) and against dense vLLM with and without prefix caching.

Workload: one system prompt of about --system-tokens tokens (Wikipedia passages) shared by --requests distinct
short user questions (chat template), all submitted at once, --new-tokens greedy tokens each (ignore_eos). Before
the timed batch each engine answers one warm-up request with the system prompt (one token): a server that has
been up a while holds it in its prefix cache; an engine without prefix caching gains nothing from it.

Variants (every engine eager, fp32, one thread, its engine core in the measuring process):

* ``dense``              vLLM's LlamaForCausalLM on the base model, no prefix caching, no chunked prefill;
* ``dense_prefix``       the same with prefix caching and chunked prefill on (vLLM's defaults but compilation);
* ``routed``             the routed export (whole-prompt decisions: prefix caching and chunked prefill off);
* ``routed_decode_only`` the `--decode-only --free-kv` export with prefix caching and chunked prefill on.

Throughput = new tokens / engine CPU seconds of the timed batch; every variant once per round, engines started
afresh each round in rotating order; ratios per round against ``dense_prefix`` and ``dense`` (the round is the
pairing unit), and their mean over rounds.

    OMP_NUM_THREADS=1 python benchmarks/serve_chat.py --rounds 3

Writes benchmarks/results/serve-chat/serve_chat.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROUTERS = ROOT / "benchmarks" / "results" / "routers" / "searched-prior-shrink1"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "serve-chat"
QUESTIONS = [
    "Summarise the passage in two sentences.",
    "What is the main topic of the text?",
    "List three facts the passage states.",
    "Which people are mentioned, and why?",
    "Explain the passage to a ten-year-old.",
    "What happened first, according to the text?",
    "Give the passage a short title.",
    "Which places does the passage mention?",
    "What question does the passage leave open?",
    "Write one quiz question about the passage.",
    "Is there a number in the passage? What does it measure?",
    "What would be a good follow-up topic to read about?",
    "Rewrite the first sentence in simpler words.",
    "What is surprising in this passage?",
    "Which sentence is the most important, and why?",
    "Translate the first sentence into French.",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def system_prompt(tokenizer, tokens: int) -> str:
    from routertune.eval.tradeoff import domain_texts

    parts, total = [], 0
    for text in domain_texts("wikipedia", 64):
        parts.append(text)
        total += len(tokenizer(text)["input_ids"])
        if total >= tokens:
            break
    return "Answer questions about these passages.\n\n" + "\n\n".join(parts)


def chat(tokenizer, system: str, question: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": question}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


def run_engine(request: dict, workdir: Path) -> dict:
    (workdir / "request.json").write_text(json.dumps(request))
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="2",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "routertune.serve.engine", str(workdir / "request.json"), str(workdir / "result.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads((workdir / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routers", default=str(DEFAULT_ROUTERS))
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    from routertune.base_model import load_model_and_tokenizer, resolve_model_path
    from routertune.serve.export import ExportJob, export

    model, tokenizer = load_model_and_tokenizer()
    num_layers = model.config.num_hidden_layers
    del model
    system = system_prompt(tokenizer, args.system_tokens)
    prompts = [chat(tokenizer, system, QUESTIONS[i % len(QUESTIONS)] + f" ({i})") for i in range(args.requests)]
    warmup = [chat(tokenizer, system, "Hello.")]
    work = Path(tempfile.mkdtemp(prefix="serve_chat_"))
    whole_dir, decode_dir = work / "routed", work / "decode-only"
    export(ExportJob(output=str(whole_dir), routers=args.routers))
    report = export(ExportJob(output=str(decode_dir), routers=args.routers, decode_only=True, free_kv=True))
    base = str(resolve_model_path(None, None))
    prefix_on = {"enable_prefix_caching": True, "enable_chunked_prefill": True}
    variants = {
        "dense": (base, {}),
        "dense_prefix": (base, prefix_on),
        "routed": (str(whole_dir), {}),
        "routed_decode_only": (str(decode_dir), prefix_on),
    }
    log(
        f"{len(prompts)} requests of {len(prompts[0])}-{max(map(len, prompts))} prompt tokens; never-run {report.never_run}"
    )
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            model, engine = variants[name]
            workdir = work / f"{name}-{round_}"
            workdir.mkdir()
            request = {
                "model": model,
                "engine": {"max_model_len": 2048, **engine},
                "max_tokens": args.new_tokens,
                "prompts": prompts,
                "warmup": warmup,
                "ignore_eos": True,
                "log": str(workdir / "routing.jsonl") if name.startswith("routed") else None,
            }
            result = run_engine(request, workdir)
            new = sum(len(t) for t in result["tokens"])
            decided = [line for line in result["log"] if line["event"] == "decided"]
            routed_layers = len(decided[0]["decisions"]) if decided else 0
            skipped = [sum(not v for v in line["decisions"].values()) for line in decided]
            entry = {
                "round": round_,
                "cpu_s": result["generate_cpu_s"],
                "wall_s": result["generate_s"],
                "new_tokens": new,
                "throughput": new / result["generate_cpu_s"],
                "prefix_cached": [line["prefix_cached"] for line in decided],
                "skip_share": sum(skipped) / len(skipped) / num_layers if skipped else 0.0,
                "routed_layers": routed_layers,
            }
            runs[name].append(entry)
            log(f"round {round_} {name}: {entry['throughput']:.1f} tok/cpu-s ({entry['cpu_s']:.1f} s)")
    ratios = {}
    for baseline in ("dense_prefix", "dense"):
        for name in names:
            per_round = [runs[name][r]["throughput"] / runs[baseline][r]["throughput"] for r in range(args.rounds)]
            ratios[f"{name}/{baseline}"] = {"per_round": per_round, "mean": sum(per_round) / len(per_round)}
    result = {
        "routers": str(Path(args.routers).resolve().relative_to(ROOT))
        if Path(args.routers).resolve().is_relative_to(ROOT)
        else args.routers,
        "requests": args.requests,
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "never_run": report.never_run,
        "runs": runs,
        "throughput_ratios": ratios,
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_chat.json").write_text(json.dumps(result, indent=2) + "\n")
    for key, value in ratios.items():
        log(f"{key}: {value['mean']:.3f} per round {[round(x, 3) for x in value['per_round']]}")


if __name__ == "__main__":
    main()

"""Served benchmark: routed attention inside a real vLLM engine against vLLM's dense and native static drop.

Variants (one vLLM engine process each for dense, static and routed, all alive at once and driven in turn, so
machine drift hits every variant alike; the routed variants share one engine and differ per request):

* ``dense``              vLLM's own LlamaForCausalLM on the base model folder;
* ``static``             vLLM's native static attention drop (``routertune export --static K``: Nemotron-NAS /
                         DeciLM with no-op attention in the K least important routed layers);
* ``routed_static_set``  the routed export with every request forced to skip static's layers
                         (``SamplingParams.extra_args``), so its gain over dense vs static's is our overhead;
* ``routed``             the routed export, routers taking their own per-request decisions;
* ``routed_all_run``     the routed export forced to run every layer (routing machinery, nothing skipped);
* ``routed_compiled``    with ``--routed-compiled``: the routed export with vLLM's compilation on (the routed
                         layers are opaque custom ops inside the compiled graph), routers deciding;
* ``dense_default``      with ``--vllm-default``: vLLM's LlamaForCausalLM on the base model as a plain ``vllm serve``
                         runs it (prefix caching, chunked prefill and compilation on; only fp32 and the seed held
                         equal); its prefix cache is reset before every run, so a repeat does not find the previous
                         repeat's prompts cached.

With ``--rounds N`` the engines are started afresh N times and every setting's repeats run in each round: how
fast one engine process runs varies from process to process (here by about +-5%, as the routed engine forced to
run everything shows against dense), more than the gap between routed-forced and native static, so one set of
processes is one draw of that variation. The paired figures then also come per round.

Per setting (prompt tokens, concurrent requests): all requests are submitted at once to ``LLM.generate``
(greedy, ``ignore_eos``) and the engine is stepped until they finish. The clock is the engine process's CPU
time: on the shared 2-core development machine a nice'd engine spends most wall time waiting for a core, so
wall figures (kept under ``wall``) measure the neighbours. Throughput = new tokens / CPU seconds of the run;
TTFT = CPU seconds from submission to a request's first token; TPOT = CPU seconds between its first and last
token / (new tokens - 1); medians over requests and repeats, variants in rotating order. The summary and
the targets' statistics are routertune.serve.bench (pure Python, tested on constructed runs).
Ideal speed-up = analytic FLOPs of dense / of the variant for the same requests (routertune.bench.flops.FlopCounter:
attention projections, scores over the causal context, MLP, one LM-head row per generated token), using each
request's served decisions from the routing log.

    python benchmarks/serve_bench.py --routers benchmarks/results/routers/lm-0.5 \
        --output benchmarks/results/serve_bench.json

Every engine runs eagerly with one thread (``OMP_NUM_THREADS=1``), in fp32, nice'd by the caller.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from routertune.serve.bench import against_vllm_default, pooled_entry, targets_of

ROOT = Path(__file__).resolve().parent.parent
ISSUE_PROMPTS, ISSUE_CONCURRENCY = (128, 512, 2048), (1, 8, 32)  # the grid the issue asks for


# ---------------------------------------------------------------------------------------------------------
# the engine worker (a spawned process holding one vLLM engine)
def _worker(conn, model: str, engine: dict, env: dict) -> None:
    os.environ.update(env)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from routertune.serve import attention
    from routertune.serve.engine import engine_kwargs

    if engine.pop("vllm_defaults", False):
        # what a user gets without routertune: vLLM's own defaults, dtype and seed held equal to the others
        llm = LLM(model, dtype="float32", seed=0, **engine)
    else:
        llm = LLM(model, **engine_kwargs(**engine))
    counter = [0]
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            break
        params = SamplingParams(
            temperature=0.0, max_tokens=message["max_tokens"], ignore_eos=True, extra_args=message.get("extra_args")
        )
        engine = llm.llm_engine
        llm.reset_prefix_cache()  # a repeat must not find the previous repeat's prompts cached
        ids = []
        for prompt in message["prompts"]:
            counter[0] += 1
            ids.append(f"bench-{counter[0]}")
            engine.add_request(ids[-1], TokensPrompt(prompt_token_ids=prompt), params)
        # step the engine ourselves: the process CPU time (and wall time) when each request's first and last
        # tokens come out
        attention.reset_profile()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        first, last, tokens = {}, {}, {}
        while engine.has_unfinished_requests():
            outputs = engine.step()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            for out in outputs:
                n = len(out.outputs[0].token_ids)
                if n and out.request_id not in first:
                    first[out.request_id] = (cpu, wall)
                last[out.request_id], tokens[out.request_id] = (cpu, wall), n
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        conn.send(
            {
                "cpu_s": cpu,
                "wall_s": wall,
                "routed_layers_profile": attention.reset_profile(),
                "requests": [
                    {
                        "new_tokens": tokens[r],
                        "ttft_cpu_s": first[r][0],
                        "ttft_wall_s": first[r][1],
                        "tpot_cpu_s": (last[r][0] - first[r][0]) / max(1, tokens[r] - 1),
                        "tpot_wall_s": (last[r][1] - first[r][1]) / max(1, tokens[r] - 1),
                    }
                    for r in ids
                ],
            }
        )


class Engine:
    def __init__(self, name: str, model: str, engine: dict, env: dict):
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, model, engine, env), daemon=True)
        self.started = time.perf_counter()
        self.process.start()

    def wait_ready(self) -> None:
        if self.conn.recv() != "ready":
            raise RuntimeError(f"engine {self.name} failed to start")
        self.load_s = time.perf_counter() - self.started

    def run(self, prompts, max_tokens, extra_args=None) -> dict:
        self.conn.send({"prompts": prompts, "max_tokens": max_tokens, "extra_args": extra_args})
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=60)


# ---------------------------------------------------------------------------------------------------------
def chat_prompts(tokenizer, length: int, count: int, offset: int) -> list[list[int]]:
    """`count` chat prompts of exactly `length` tokens: held-out user turns of the offline mix (the kind of
    text the routers were tuned on), concatenated and cut to fit the chat template."""
    from routertune.train.data import default_records

    sentinel = "\u2063"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": sentinel}], add_generation_prompt=True, tokenize=False
    )
    head, tail = rendered.split(sentinel)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    records = default_records("heldout")
    body = length - len(head_ids) - len(tail_ids)
    prompts, r = [], offset
    for _ in range(count):
        content: list[int] = []
        while len(content) < body:
            text = records[r % len(records)]["messages"][0]["content"]
            content += tokenizer("\n\n" + text, add_special_tokens=False)["input_ids"]
            r += 1
        prompts.append(head_ids + content[:body] + tail_ids)
    return prompts


def flops_of(counter, prompt_len: int, new_tokens: int, executed: list[int]) -> tuple[int, int]:
    """(prefill, decode) FLOPs of one request: prefill over the prompt with one logit row, then new_tokens - 1
    single-token steps."""
    prefill = counter.forward(0, prompt_len, executed, 1, 1)
    decode = sum(counter.forward(prompt_len + t, prompt_len + t + 1, executed, 1, 1) for t in range(new_tokens - 1))
    return prefill, decode


def against_default_by_setting(results: list[dict]) -> dict:
    """Every variant against vLLM's default dense engine, per setting (runs of one setting pooled, each round
    of each run its own engine draw); empty without --vllm-default."""
    groups: dict[str, list[dict]] = {}
    for e in results:
        if "dense_default" in e["variants"]:
            groups.setdefault(f"{e['prompt_tokens']}x{e['concurrent']}", []).append(e)
    return {k: against_vllm_default(pooled_entry(g)) for k, g in groups.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", default=str(ROOT / "benchmarks/results/routers/lm-0.5"))
    parser.add_argument(
        "--static", type=int, default=None, help="layers static drop removes (default: half the routed layers)"
    )
    parser.add_argument(
        "--settings", default="2048x1,512x1,512x8,128x1,128x8,128x32", help="comma-separated PROMPT_TOKENSxCONCURRENT"
    )
    parser.add_argument("--repeats", default="2048x1=3", help="extra repeats per setting, e.g. 2048x1=3 (default 1)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="start fresh engine processes this many times; every setting's repeats run in each",
    )
    parser.add_argument("--kv-space-gib", type=int, default=1)
    parser.add_argument(
        "--vllm-default",
        action="store_true",
        help="also run dense_default: the base model under vLLM's own defaults (prefix caching, chunked "
        "prefill, compilation), the engine a user runs without routertune",
    )
    parser.add_argument(
        "--routed-compiled",
        action="store_true",
        help="also run routed_compiled: the routed export with vLLM's compilation on (no enforce_eager; the routed "
        "layers are opaque custom ops in the compiled graph)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="run only these variants (default: all of the above that apply), e.g. dense routed routed_compiled "
        "dense_default",
    )
    parser.add_argument("--work-dir", default=None, help="where the exports go (default: a temporary folder)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/serve_bench.json"))
    parser.add_argument(
        "--summarise",
        nargs="+",
        default=None,
        metavar="PARTIAL_JSON",
        help="no measuring: merge the per-setting results of (interrupted) runs, *.partial.json, "
        "and write the output JSON with the targets",
    )
    args = parser.parse_args(argv)
    if args.summarise:
        results, runs = [], {}
        for path in args.summarise:  # *.partial.json (a list of settings) or a whole output JSON
            data = json.loads(Path(path).read_text())
            if isinstance(data, dict):
                results += data["settings"]
                runs[path] = {k: v for k, v in data.items() if k not in ("settings", "targets", "not_measured")}
            else:
                results += data
        out = {
            "schema": "routertune.serve_bench/1",
            "merged_from": args.summarise,
            "runs": runs,
            "command": "python benchmarks/serve_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "settings": results,
            "targets": targets_of(results),
            "against_vllm_default": against_default_by_setting(results),
            "not_measured": [
                f"{p}x{c}"
                for p in ISSUE_PROMPTS
                for c in ISSUE_CONCURRENCY
                if not any(e["prompt_tokens"] == p and e["concurrent"] == c for e in results)
            ],
        }
        Path(args.output).write_text(json.dumps(out, indent=2))
        print(json.dumps(out["targets"], indent=2))
        return 0

    from transformers import AutoConfig

    from routertune.base_model import load_tokenizer, resolve_model_path
    from routertune.bench.flops import FlopCounter
    from routertune.config import RouterConfig
    from routertune.serve.attention import PROFILE_ENV
    from routertune.serve.export import ExportJob, export
    from routertune.serve.requests import LOG_ENV, prompt_sha1

    started_all = time.perf_counter()
    load_start = os.getloadavg()
    settings = [tuple(int(x) for x in s.split("x")) for s in args.settings.split(",")]
    repeats = {
        tuple(int(x) for x in k.split("x")): int(v)
        for k, v in (item.split("=") for item in args.repeats.split(",") if item)
    }
    router_config = RouterConfig.load(args.routers)
    k = args.static or max(1, math.floor(0.5 * len(router_config.layers) + 0.5))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="routertune-serve-bench-"))
    base = resolve_model_path(None)
    routed_dir, static_dir = work / "routed", work / "static"
    export(ExportJob(output=str(routed_dir), routers=args.routers, overwrite=True))
    # speed only: which K layers matters little, and 1 - cos needs no search (K = 14 would take minutes a layer)
    static_report = export(
        ExportJob(output=str(static_dir), routers=args.routers, static=k, static_order="cos", overwrite=True)
    )
    # (both exports take ~20 s each; they are rewritten every run so they always match --routers)
    static_layers = static_report.dropped_layers
    tokenizer = load_tokenizer(base)
    config = AutoConfig.from_pretrained(base)
    counter = FlopCounter.from_config(config)
    num_layers = config.num_hidden_layers

    max_len = max(p for p, _ in settings) + args.new_tokens + 8
    log_path = work / "routing.jsonl"
    log_path.unlink(missing_ok=True)
    env = {
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(args.kv_space_gib),
        PROFILE_ENV: "1",
    }
    engine = {"max_model_len": max_len, "disable_log_stats": False}
    variants = {
        "dense": ("dense", None),
        "static": ("static", None),
        "routed_static_set": ("routed", {"routertune": {"force": "skip_set", "skip_layers": static_layers}}),
        "routed": ("routed", None),
        "routed_all_run": ("routed", {"routertune": {"force": "run"}}),
    }
    if args.vllm_default:
        variants["dense_default"] = ("dense_default", None)
    if args.routed_compiled:
        variants["routed_compiled"] = ("routed_compiled", None)
    if args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; known: {sorted(variants)}")
        variants = {name: variants[name] for name in args.variants}
    prompts_of = {
        setting: chat_prompts(tokenizer, setting[0], setting[1], offset=i * 97) for i, setting in enumerate(settings)
    }
    names_of = {
        setting: list(variants) if setting == settings[0] else [v for v in variants if v != "routed_all_run"]
        for setting in settings
    }
    runs_of = {setting: {name: [] for name in names_of[setting]} for setting in settings}
    rounds_of = {setting: [] for setting in settings}  # the round of each repeat
    engine_load_s = []
    for round_index in range(args.rounds):
        # fresh engine processes each round: how fast a process runs varies from process to process by more
        # than the gaps measured here (the "forced to run all" variant against dense shows it), so the
        # rounds sample that variation instead of betting on one draw
        starts = {
            "dense": lambda: Engine("dense", base, engine, env),
            "static": lambda: Engine("static", str(static_dir), engine, env),
            "routed": lambda: Engine("routed", str(routed_dir), engine, dict(env, **{LOG_ENV: str(log_path)})),
            "dense_default": lambda: Engine("dense_default", base, dict(engine, vllm_defaults=True), env),
            "routed_compiled": lambda: Engine(
                "routed_compiled",
                str(routed_dir),
                dict(engine, enforce_eager=False),
                dict(env, **{LOG_ENV: str(log_path.with_suffix(".compiled.jsonl"))}),
            ),
        }
        used = {eng for eng, _ in variants.values()}
        engines = {name: start() for name, start in starts.items() if name in used}
        for e in engines.values():  # started together, loading in parallel
            e.wait_ready()
        engine_load_s.append({n: e.load_s for n, e in engines.items()})
        # warm-up: every engine and routed mode once, untimed
        warm = chat_prompts(tokenizer, 256, 2, offset=10_000)
        for eng, extra in variants.values():
            engines[eng].run(warm, 4, extra)
        for setting in settings:
            names, runs = names_of[setting], runs_of[setting]
            for _ in range(repeats.get(setting, 1)):
                rep = len(rounds_of[setting])
                order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate between repeats
                for name in order:
                    eng, extra = variants[name]
                    runs[name].append(engines[eng].run(prompts_of[setting], args.new_tokens, extra))
                rounds_of[setting].append(round_index)
            print(
                f"[serve-bench] round {round_index + 1}/{args.rounds}: {setting[0]}x{setting[1]} measured", flush=True
            )
        for e in engines.values():
            e.close()

    results = []
    for length, concurrent in settings:
        prompts, names, runs = (
            prompts_of[(length, concurrent)],
            names_of[(length, concurrent)],
            runs_of[(length, concurrent)],
        )
        n_rep = len(rounds_of[(length, concurrent)])
        # served decisions of the routers' own mode, per prompt (from the routing log)
        own = {}
        for line in (json.loads(x) for x in log_path.read_text().splitlines()):
            if line["event"] == "decided" and line["forced"] is None:
                own[line["prompt_sha1"]] = {int(k): v for k, v in line["decisions"].items()}
        executed_by = {
            "dense": lambda _p: [1] * num_layers,
            "dense_default": lambda _p: [1] * num_layers,
            "static": lambda _p: [0 if i in static_layers else 1 for i in range(num_layers)],
            "routed_static_set": lambda _p: [0 if i in static_layers else 1 for i in range(num_layers)],
            "routed_all_run": lambda _p: [1] * num_layers,
            "routed": lambda p: [0 if own[prompt_sha1(p)].get(i, True) is False else 1 for i in range(num_layers)],
        }
        executed_by["routed_compiled"] = executed_by["routed"]
        flops = {}
        for name in names:
            pre = dec = 0
            for p in prompts:
                a, b = flops_of(counter, len(p), args.new_tokens, executed_by[name](p))
                pre, dec = pre + a, dec + b
            flops[name] = (pre, dec)
        entry = {
            "prompt_tokens": length,
            "concurrent": concurrent,
            "new_tokens": args.new_tokens,
            "repeats": n_rep,
            "round_of_repeat": rounds_of[(length, concurrent)],
            "variants": {},
        }
        n_new = args.new_tokens
        for name in names:
            r = runs[name]
            cpu = statistics.median(x["cpu_s"] for x in r)
            wall = statistics.median(x["wall_s"] for x in r)
            entry["variants"][name] = {
                # CPU clock (the engine process's CPU time; the machine is shared, wall time includes waiting)
                "throughput_tok_s": concurrent * n_new / cpu,
                "ttft_s": statistics.median(q["ttft_cpu_s"] for x in r for q in x["requests"]),
                "tpot_s": statistics.median(q["tpot_cpu_s"] for x in r for q in x["requests"]),
                "cpu_s_all": [x["cpu_s"] for x in r],
                # wall clock, for reference only on a shared machine
                "wall": {
                    "throughput_tok_s": concurrent * n_new / wall,
                    "ttft_s": statistics.median(q["ttft_wall_s"] for x in r for q in x["requests"]),
                    "tpot_s": statistics.median(q["tpot_wall_s"] for x in r for q in x["requests"]),
                    "wall_s_all": [x["wall_s"] for x in r],
                },
                "flops_prefill": flops[name][0],
                "flops_decode": flops[name][1],
            }
            if variants[name][0] == "routed":
                # wall seconds inside the routed attention sublayers, summed over repeats: routing code vs
                # vLLM's attention, and how many layer calls ran dense / on a subset / not at all
                entry["variants"][name]["routed_layers_profile"] = {
                    key: sum(x["routed_layers_profile"][key] for x in r) for key in r[0]["routed_layers_profile"]
                }
        dense = entry["variants"]["dense"]
        for name in names:
            v = entry["variants"][name]
            v["speedup_throughput"] = v["throughput_tok_s"] / dense["throughput_tok_s"]
            v["speedup_ttft"] = dense["ttft_s"] / v["ttft_s"]
            v["speedup_tpot"] = dense["tpot_s"] / v["tpot_s"]
            d_total, v_total = sum(flops["dense"]), sum(flops[name])
            v["ideal_throughput"] = d_total / v_total
            v["ideal_ttft"] = flops["dense"][0] / flops[name][0]
            v["ideal_tpot"] = flops["dense"][1] / flops[name][1]
            for metric in ("throughput", "ttft", "tpot"):
                v[f"achieved_over_ideal_{metric}"] = v[f"speedup_{metric}"] / v[f"ideal_{metric}"]
        if "routed" in names:
            entry["routed_skip_ratio"] = 1 - sum(sum(executed_by["routed"](p)) for p in prompts) / (
                num_layers * len(prompts)
            )
        # where the time goes: the analytic FLOP shares of dense, per phase
        full, no_attention = (counter.forward(0, length, [e] * num_layers, 1, 1) for e in (1, 0))
        entry["dense_attention_flop_share_prefill"] = 1 - no_attention / full
        full, no_attention = (
            counter.forward(length + n_new // 2, length + n_new // 2 + 1, [e] * num_layers, 1, 1) for e in (1, 0)
        )
        entry["dense_attention_flop_share_decode"] = 1 - no_attention / full
        results.append(entry)
        Path(args.output).with_suffix(".partial.json").write_text(json.dumps(results, indent=2))
        print(
            f"[serve-bench] {length}x{concurrent}: "
            + "  ".join(
                f"{n} {entry['variants'][n]['throughput_tok_s']:.1f} tok/s (x{entry['variants'][n]['speedup_throughput']:.3f}, "
                f"ideal x{entry['variants'][n]['ideal_throughput']:.3f})"
                for n in names
            ),
            flush=True,
        )

    targets = targets_of(results)
    import vllm

    out = {
        "schema": "routertune.serve_bench/1",
        "command": "python benchmarks/serve_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "engine": {
            "vllm": vllm.__version__,
            "mode": "eager, fp32, 1 OMP thread per engine, in-process engine core (dense_default: vLLM's own "
            "defaults, fp32; routed_compiled: compiled, the routed layers as opaque custom ops)",
            "clock": "process CPU time of the engine process (the 2-core machine is shared: wall time there "
            "mostly measures waiting for a core); wall figures kept under 'wall'",
            "prefix_caching": False,
            "chunked_prefill": False,
            "max_model_len": max_len,
            "kv_cache_gib_per_engine": args.kv_space_gib,
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_avg_start_end": [load_start, os.getloadavg()],
        },
        "routers": args.routers,
        "routed_layers": router_config.layers,
        "threshold": router_config.threshold,
        "static_layers": static_layers,
        "static_importance": static_report.importance,
        "engine_load_s": engine_load_s,
        "not_measured": [f"{p}x{c}" for p in ISSUE_PROMPTS for c in ISSUE_CONCURRENCY if (p, c) not in settings],
        "settings": results,
        "targets": targets,
        "against_vllm_default": against_default_by_setting(results),
        "seconds": time.perf_counter() - started_all,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(json.dumps(targets, indent=2))
    print(f"written to {args.output} in {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

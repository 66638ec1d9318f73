"""Load test of `routertune serve` over loopback HTTP (issue 24, part 5): routertune.serve.load on a fresh server.

Starts `routertune serve EXPORT --routing-log LOG` (vLLM's OpenAI-compatible server, its normal multi-process
engine, fp32), sends a warm-up round, then the load: `--distinct` drawn requests (prompts of 8 to 384 tokens cut
from the held-out chat texts, the routers deciding / routertune_force run, skip, skip_set with random layers /
routertune_threshold), `--repeats` repeated ones, the malformed ones, every third streamed and every other
streamed one closed by the client after 2-4 chunks, at most `--concurrency` in flight. Then every distinct request
again alone, on the same server, and the checks (see routertune.serve.load). Memory is the resident set of the
server's process tree (API server + engine core), sampled every 0.2 s.

    routertune export --routers benchmarks/results/routers/default --output serve-default
    python benchmarks/serve_load.py --export serve-default \
        --output benchmarks/results/serve-load/serve_load.json

The server runs with one thread (OMP_NUM_THREADS=1) and a 1 GiB KV cache; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = [8, 16, 32, 48, 64, 96, 128, 192, 256, 320, 384]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(export: str, log: Path, server_log: Path, max_model_len: int, kv_gib: int):
    port = _free_port()
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE=str(kv_gib),
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    output = open(server_log, "w")  # noqa: SIM115 - the server writes it until stop; main closes it
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "routertune.cli",
            "serve",
            export,
            "--routing-log",
            str(log),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-model-len",
            str(max_model_len),
            "--seed",
            "0",
        ],
        stdout=output,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 1200
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{server_log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return proc, port, output
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not come up:\n{server_log.read_text()[-4000:]}")
        time.sleep(2)


def stop_server(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _portable(argv: list[str]) -> list[str]:
    """The command as recorded: the export and work folders by their names (no machine paths in results)."""
    out = []
    for arg in argv:
        path = Path(arg)
        out.append(
            arg if not path.is_absolute() else (str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name)
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="a routed folder from `routertune export --routers DIR`")
    parser.add_argument("--distinct", type=int, default=52, help="drawn distinct requests")
    parser.add_argument("--repeats", type=int, default=8, help="drawn requests sent a second time in the load")
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-space-gib", type=int, default=1)
    parser.add_argument("--work-dir", default=None, help="routing log and server log (default: a temporary folder)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/serve-load/serve_load.json"))
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from routertune.serve.config import CONFIG_KEY, ServeRouting
    from routertune.serve.load import build_mix, passed, run_load_test, text_prompts
    from routertune.train.data import default_records

    export = str(Path(args.export).resolve())
    config = json.loads((Path(export) / "config.json").read_text())
    if CONFIG_KEY not in config or config[CONFIG_KEY].get("static_skip") is not None:
        raise SystemExit(f"{args.export} is not a routed export; write one with routertune export --routers DIR")
    routed_layers = ServeRouting.from_dict(config[CONFIG_KEY]).router_config.resolved_layers(
        int(config["num_hidden_layers"])
    )
    tokenizer = AutoTokenizer.from_pretrained(export)
    texts = [r["messages"][0]["content"] for r in default_records("heldout")[:200]]
    prompts = text_prompts(tokenizer, texts, LENGTHS)
    mix = build_mix(export, prompts, routed_layers, distinct=args.distinct, repeats=args.repeats, seed=args.seed)
    warm_prompts = text_prompts(tokenizer, texts[::-1], LENGTHS)
    warmup = build_mix(export, warm_prompts, routed_layers, distinct=args.concurrency, repeats=0, seed=args.seed + 1)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="serve-load-"))
    work.mkdir(parents=True, exist_ok=True)
    log, server_log = work / "routing.jsonl", work / "server.log"
    log.unlink(missing_ok=True)
    started = time.perf_counter()
    proc, port, output = start_server(export, log, server_log, args.max_model_len, args.kv_space_gib)
    start_s = time.perf_counter() - started
    try:
        result = run_load_test(
            f"http://127.0.0.1:{port}",
            export,
            mix,
            log=log,
            server_pid=proc.pid,
            concurrency=args.concurrency,
            warmup=warmup,
        )
        result["still_serving"]["server_alive"] = proc.poll() is None
    finally:
        stop_server(proc)
        output.close()
    made = Path(export) / "routertune_export.json"  # what routertune export wrote: its routers and base model
    made = json.loads(made.read_text()) if made.is_file() else {}
    model = made.get("base_model") or config.get("_name_or_path") or "the export's base model"
    out = {
        "schema": "routertune.serve_load/1",
        "command": "python benchmarks/serve_load.py " + " ".join(_portable(sys.argv[1:] if argv is None else argv)),
        "export": {
            "architectures": config.get("architectures"),
            "routed_layers": routed_layers,
            "num_hidden_layers": config["num_hidden_layers"],
            "base_model": Path(str(model)).name,
            "routers": made.get("routers"),
            "fingerprint": config[CONFIG_KEY]["router_config"].get("base_model", {}).get("fingerprint"),
        },
        "server": {
            "flags": f"--dtype float32 --max-model-len {args.max_model_len} --seed 0 (+ what routertune serve adds)",
            "kv_cache_gib": args.kv_space_gib,
            "start_s": start_s,
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "1"),
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        **result,
    }
    out["problems"] = passed(out)
    if not out["still_serving"]["server_alive"]:
        out["problems"].append("the server process exited during the load test")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    summary = {
        k: out[k]
        for k in (
            "requests",
            "completed",
            "cancelled",
            "errors",
            "refused_400",
            "mismatches_vs_alone",
            "decision_mismatches",
            "settings_mismatches",
            "concurrency",
            "memory",
            "wall_s",
            "engine",
            "problems",
        )
    }
    print(json.dumps(summary, indent=2))
    return 1 if out["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

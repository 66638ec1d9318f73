"""`routertune bench`'s settings: `BenchConfig` (every field is a CLI flag)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BenchConfig:
    """What `routertune bench` measures; every field is a CLI flag. Fields left at None take the defaults
    named in their help (smaller ones with --quick)."""

    model: str | None = field(
        default=None, metadata={"help": "local HF folder or hub id; default: embedded SmolLM2-135M-Instruct"}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "cache folder of the converted default model"})
    routers: str | None = field(
        default=None,
        metadata={
            "help": "trained routers (folder from `routertune train`) for the `routed` variant; default: seeded random synthetic routers"
        },
    )
    lengths: list[int] | None = field(
        default=None, metadata={"help": "prefill lengths in tokens; default 128 512 2048 4096 (16 32 with --quick)"}
    )
    batch_sizes: list[int] | None = field(
        default=None, metadata={"help": "batch sizes for prefill and decode; default 1 8 (1 2 with --quick)"}
    )
    max_prefill_tokens: int | None = field(
        default=None,
        metadata={
            "help": "skip (and list) prefill settings with more tokens (length x batch); default 2048 on CPU, no limit on CUDA"
        },
    )
    decode_prompt: int | None = field(
        default=None, metadata={"help": "prompt tokens before decoding; default 512 (16 with --quick)"}
    )
    decode_tokens: int | None = field(
        default=None, metadata={"help": "new tokens decoded; default 128 (4 with --quick)"}
    )
    repeats: int | None = field(
        default=None, metadata={"help": "timed prefill repeats per setting (median); default 3 (1 with --quick)"}
    )
    warmup: int | None = field(
        default=None, metadata={"help": "untimed warm-up runs per variant and setting; default 1"}
    )
    overhead_repeats: int | None = field(
        default=None, metadata={"help": "repeats of the routing-overhead prefill pair; default 20 (2 with --quick)"}
    )
    overhead_steps: int | None = field(
        default=None, metadata={"help": "decode steps of the routing-overhead pair; default 256 (4 with --quick)"}
    )
    skip_fraction: float = field(
        default=0.5, metadata={"help": "static drop skips round(fraction x routed layers) attention layers"}
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    memory: bool = field(
        default=True, metadata={"help": "measure peak memory (profiled warm-up run on CPU, allocator peak on CUDA)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random token ids and synthetic routers"})
    quick: bool = field(default=False, metadata={"help": "tiny settings for a smoke test (seconds on a small model)"})
    clock: str = field(
        default="wall",
        metadata={
            "help": "CPU device: the clock medians and speed-ups use, wall (perf_counter) or cpu (process CPU time; with --threads 1 it leaves out time spent waiting for a core on a shared machine). Both are recorded. CUDA always uses events"
        },
    )
    steady_malloc: bool = field(
        default=True,
        metadata={
            "help": "glibc: keep freed memory mapped (mallopt, process-wide) so a run pays no page faults that depend on what ran before it"
        },
    )
    compile: str | None = field(
        default=None,
        metadata={
            "help": "torch.compile every variant with this backend (e.g. inductor); graph breaks at routing decisions are expected; the first call of each setting (compilation included) is reported apart as first_call_s. Default: eager"
        },
    )
    output: str | None = field(default=None, metadata={"help": "write the results JSON here"})
    token_routing: bool = field(
        default=False,
        metadata={
            "help": "also measure token-level routing (prefill and decode rows against dense and against sequence routing at the same executed fraction; see routertune.bench.token_rows)"
        },
    )
    token_routers: str | None = field(
        default=None,
        metadata={
            "help": "with --token-routing: trained token-level routers (run in top-k mode at the sequence side's fraction); default: seeded synthetic ones"
        },
    )

    def __post_init__(self) -> None:
        q = self.quick
        defaults = dict(
            lengths=[16, 32] if q else [128, 512, 2048, 4096],
            batch_sizes=[1, 2] if q else [1, 8],
            decode_prompt=16 if q else 512,
            decode_tokens=4 if q else 128,
            repeats=1 if q else 3,
            warmup=1,
            overhead_repeats=2 if q else 20,
            overhead_steps=4 if q else 256,
        )
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        problems = []
        for name in ("decode_prompt", "decode_tokens", "repeats", "overhead_repeats", "overhead_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.warmup < 0:
            problems.append(f"warmup={self.warmup} must be >= 0")
        if not self.lengths or any(n < 1 for n in self.lengths):
            problems.append(f"lengths={self.lengths} must be positive token counts")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            problems.append(f"batch_sizes={self.batch_sizes} must be positive")
        if not 0.0 < self.skip_fraction < 1.0:
            problems.append(f"skip_fraction={self.skip_fraction} must lie strictly between 0 and 1")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"device={self.device!r} must be cpu or cuda")
        if self.clock not in ("wall", "cpu"):
            problems.append(f"clock={self.clock!r} must be wall or cpu")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads={self.threads} must be >= 1")
        if problems:
            raise ValueError("Invalid bench config: " + "; ".join(problems))

    def prefill_token_cap(self) -> int | None:
        if self.max_prefill_tokens is not None:
            return self.max_prefill_tokens
        return None if self.device.startswith("cuda") else 2048

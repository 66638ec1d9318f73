"""Clocks and memory probes: timing one call (CUDA events, or wall and process CPU time), the peak memory
of one call, and the allocator setting that makes repeated runs pay the same page faults."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
import time
from collections.abc import Callable

import torch


class Clock:
    """Times one call. CUDA: events around the call, then synchronize. CPU: wall-clock (perf_counter) and the
    process's CPU time (process_time) together; with one thread the CPU time leaves out the time the process
    waited for a core, which on a shared machine is the other jobs' doing, not ours.

    Returns (output, primary seconds, {"wall": s, "cpu": s or None}); `primary` names the clock the
    medians and speed-ups use ("wall" or "cpu"; CUDA always uses its events)."""

    def __init__(self, device: torch.device, primary: str = "wall"):
        self.cuda = device.type == "cuda"
        self.device = device
        self.primary = "wall" if self.cuda else primary

    def __call__(self, fn: Callable):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
            return out, seconds, {"wall": seconds, "cpu": None}
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return out, (cpu if self.primary == "cpu" else wall), {"wall": wall, "cpu": cpu}


def measure_peak(fn: Callable, device: torch.device, enabled: bool = True):
    """(fn(), peak bytes allocated during the call above what was live before it; None if not measured).

    CUDA: the caching allocator's peak. CPU: every CPU allocation and free recorded by the PyTorch profiler,
    replayed in order (exact tensor bytes, including temporaries freed inside an op)."""
    if not enabled:
        return fn(), None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, int(torch.cuda.max_memory_allocated(device) - base)
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover - very old or stripped torch
        return fn(), None
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with quiet_stderr():  # Kineto logs a line on every start and stop
        prof.start()
    try:
        out = fn()
    finally:
        with quiet_stderr():
            prof.stop()
    try:
        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
    except Exception:  # pragma: no cover - private profiler API changed
        return out, None
    running = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        running += size
        peak = max(peak, running)
    return out, int(peak)


def steady_malloc() -> str | None:
    """glibc only, process-wide: allocations up to 32 MiB come from the heap and freed memory is not handed
    back to the system, so after the warm-up a run touches no fresh pages. Without this, how many page faults a
    run pays (up to ~15% of a prefill here) depends on what the previous run freed, i.e. on the order of the
    variants. Returns what was set, or None where it does not apply."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt(m_mmap_threshold, 32 << 20) != 1 or mallopt(m_trim_threshold, 1 << 30) != 1:
        return None  # pragma: no cover
    return "glibc mallopt: mmap threshold 32 MiB, trim threshold 1 GiB"


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (C++ logging) for a moment."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # pragma: no cover - no real stderr
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)

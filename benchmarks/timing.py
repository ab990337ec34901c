"""Timing helpers: compile time apart, warm-up, block_until_ready, median of repeats."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax


def measure(fn: Callable[[], object], *, budget_s: float, max_repeats: int = 50,
            sync: Callable[[object], object] = jax.block_until_ready) -> dict:
    """Times ``fn()``: the first call apart (tracing and compilation for jitted code), one
    warm-up, then repeats within ``budget_s`` (at least 3, at most ``max_repeats``).

    Returns:
      ``{"first_call_ms", "median_ms", "min_ms", "repeats"}``.
    """
    start = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - start
    start = time.perf_counter()
    sync(fn())  # warm-up
    one = time.perf_counter() - start
    repeats = int(max(3, min(max_repeats, budget_s / max(one, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return {
        "first_call_ms": first * 1e3,
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "repeats": repeats,
    }


def machine() -> dict:
    """What the figures were measured on."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name()
    except ImportError:
        info["torch"] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

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
    result = measure_alternating({"fn": (fn, sync)}, budget_s=budget_s,
                                 max_repeats=max_repeats)["fn"]
    if isinstance(result, Exception):
        raise result
    return result


def measure_alternating(fns: dict[str, tuple[Callable[[], object], Callable[[object], object]]],
                        *, budget_s: float, max_repeats: int = 50) -> dict[str, dict | Exception]:
    """Times several ``(fn, sync)`` as ``measure`` does, their repeats in turn (a, b, a, b, ...):
    a drift in the machine's speed then reaches each alike, which a ratio between them needs.

    Args:
      fns: name -> ``(fn, sync)``; ``sync`` waits for ``fn()``'s result.
      budget_s: seconds for the repeats of all of them together.
      max_repeats: the most repeats of each (at least 3).

    Returns:
      name -> ``measure``'s dict, or the exception its first call or warm-up raised (out of
      memory, a backend refusing the size): the others are still timed.
    """
    results, one = {}, {}
    for name, (fn, sync) in fns.items():
        try:
            start = time.perf_counter()
            sync(fn())
            first = time.perf_counter() - start
            start = time.perf_counter()
            sync(fn())  # warm-up
            one[name] = time.perf_counter() - start
            results[name] = {"first_call_ms": first * 1e3}
        except Exception as e:  # noqa: BLE001 (reported to the caller, per function)
            results[name] = e
    repeats = int(max(3, min(max_repeats, budget_s / max(sum(one.values()), 1e-9))))
    times = {name: [] for name in one}
    for _ in range(repeats):
        for name in one:
            fn, sync = fns[name]
            start = time.perf_counter()
            sync(fn())
            times[name].append(time.perf_counter() - start)
    for name, samples in times.items():
        results[name].update(median_ms=statistics.median(samples) * 1e3,
                             min_ms=min(samples) * 1e3, repeats=repeats)
    return results


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

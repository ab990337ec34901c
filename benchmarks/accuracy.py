"""Accuracy of the L1 network with both weights 1: relative error against the float64 sum.

For each length T and seed, the L1 norm of T standard-normal float32 numbers by each method
(and by "auto", which picks one from T and the backend), with the time of one warm call.
This is what decides where "auto" switches to the parallel scan on a CPU.

    python benchmarks/accuracy.py                          # T = 1e3 ... 1e8
    python benchmarks/accuracy.py --lengths 1000 1000000   # a few lengths

Writes ``accuracy.json`` and ``accuracy.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import machine  # noqa: E402

from rnnjax import L1Norm, ReLUCell  # noqa: E402
from rnnjax.core.recurrence import resolve_method  # noqa: E402
from rnnjax.app.folders import write_atomically  # noqa: E402

METHODS = ("sequential", "parallel", "auto")
UNIT_WEIGHTS = {"params": {"cell": {"W_ih": jnp.ones((1, 1)), "W_hh": jnp.ones((1, 1))}}}
TARGET = 1e-6


def measure(lengths, seeds, bar=None) -> list[dict]:
    """One row per (length, seed, method); advances ``bar`` (a tqdm) by one per row if given."""
    rows = []
    forwards = {m: jax.jit(L1Norm(method=m).apply) for m in METHODS}
    with tqdm(total=len(lengths) * len(seeds) * len(METHODS), unit="run", disable=bar is not None) as own:
        bar = bar or own
        for length in lengths:
            for seed in seeds:
                xs = np.random.default_rng(seed).standard_normal((1, length), dtype=np.float32)
                exact = np.abs(xs.astype(np.float64)).sum()
                device_xs = jnp.asarray(xs)
                for method in METHODS:
                    forwards[method](UNIT_WEIGHTS, device_xs).block_until_ready()  # compile
                    start = time.perf_counter()
                    predicted = float(forwards[method](UNIT_WEIGHTS, device_xs)[0])
                    rows.append({"time": length, "seed": seed, "method": method,
                                 "picked": resolve_method(ReLUCell(1), method, time=length),
                                 "relative_error": abs(predicted - exact) / exact,
                                 "ms": (time.perf_counter() - start) * 1e3})
                    bar.update()
                del xs, device_xs
    return rows


def markdown(rows, info) -> str:
    out = [f"Machine: {info['cpu']}, {info['cpu_count']} cores ({info['backend']}); "
           f"jax {info['jax']}; {info['date']}.", ""] + table(rows)
    return "\n".join(out) + "\n"


def table(rows) -> list[str]:
    """The markdown table of ``measure``'s rows: worst error per length and method."""
    out = ["Largest relative error of the L1 norm over the seeds, float32, both weights 1 "
           f"(target {TARGET:g}); median ms of one call in brackets.", "",
           "| T | sequential | parallel | auto (picks) |", "|---|---|---|---|"]
    for length in sorted({r["time"] for r in rows}):
        cells = []
        for method in METHODS:
            mine = [r for r in rows if r["time"] == length and r["method"] == method]
            worst = max(r["relative_error"] for r in mine)
            ms = float(np.median([r["ms"] for r in mine]))
            mark = "" if worst <= TARGET else " ✗"
            picked = f", {mine[0]['picked']}" if method == "auto" else ""
            cells.append(f"{worst:.1e}{mark} ({ms:.3g} ms{picked})")
        out.append(f"| {length:.0e} | " + " | ".join(cells) + " |")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1000, 4096, 10_000, 30_000, 100_000, 10**6, 10**7, 10**8])
    parser.add_argument("--seeds", type=int, default=5, help="sequences per length (1 from 1e7 on)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / jax.default_backend())
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for length in args.lengths:
        rows += measure([length], range(args.seeds if length < 10**7 else 1))
    info = machine()
    table = markdown(rows, info)
    report = json.dumps({"machine": info, "target": TARGET, "results": rows}, indent=1)
    write_atomically(args.out / "accuracy.json", lambda f: f.write(report), mode="w")
    write_atomically(args.out / "accuracy.md", lambda f: f.write(table), mode="w")
    print(table)


if __name__ == "__main__":
    main()

"""What compensation costs: ``precision="compensated"`` (the default) against ``"plain"``.

The L1-norm network (``L1Norm``: ``|x|`` into a bias-free ``ReLUCell(1)``, the final state; MSE
against the exact norms, Adam 0.1) at each precision and method, forward pass and training step
(forward, backward, Adam update), at T = 1e4 and 1e6, batch 1 and 8, float32. Each pair is
timed in alternation, call by call (``timing.measure_alternating``: the first call, which
compiles, apart; a warm-up; the median of repeats, each ``block_until_ready``), so that the
ratio sees the same machine. Each forward row also records the relative error of the L1 norm
(``W_ih = W_hh = 1``) of its own N(0, 1) inputs and of the constant 0.1, against ``math.fsum``.

    python benchmarks/precision.py                       # ~5 minutes on 2 CPU cores
    python benchmarks/precision.py --lengths 10000 --batches 1

Writes ``precision.json`` and ``precision.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import machine, measure_alternating  # noqa: E402

from rnnjax import L1Norm  # noqa: E402
from rnnjax.app.folders import write_atomically  # noqa: E402
from rnnjax.training.data import Batch  # noqa: E402
from rnnjax.training.fit import init_state, make_train_step  # noqa: E402

PRECISIONS = ("compensated", "plain")
MODES = ("forward", "train")


def closures(method, precision, xs, targets):
    """``(forward, train step, norm)``: the jitted forward pass and training step of
    ``L1Norm(method, precision)`` from a random init, and its forward pass with both weights 1
    on other inputs."""
    model = L1Norm(method=method, precision=precision)
    batch = Batch(jnp.asarray(xs), jnp.full((xs.shape[0],), xs.shape[1], jnp.int32), jnp.asarray(targets))
    optimizer = optax.adam(0.1)
    state = init_state(model, optimizer, jax.random.key(3), batch)
    step = make_train_step(model, optimizer)
    forward = jax.jit(model.apply)
    ones = {"params": {"cell": {"W_ih": jnp.ones((1, 1)), "W_hh": jnp.ones((1, 1))}}}
    return (lambda: forward(state.params, batch.xs, batch.lengths),
            lambda: step(state, batch),
            lambda x: forward(ones, jnp.asarray(x), None))


def relative_error(norm, xs) -> float:
    exact = np.array([math.fsum(np.abs(row.astype(np.float64))) for row in xs])
    return float(np.max(np.abs(np.asarray(norm(xs), np.float64) - exact) / exact))


def measure_row(method, time, batch, budget):
    """The forward and train rows of one (method, T, batch), each precision timed in turn."""
    xs = np.random.default_rng(0).standard_normal((batch, time), dtype=np.float32)
    targets = np.abs(xs.astype(np.float64)).sum(axis=1).astype(np.float32)
    built = {p: closures(method, p, xs, targets) for p in PRECISIONS}
    rows = []
    for i, mode in enumerate(MODES):
        timed = measure_alternating({p: (built[p][i], jax.block_until_ready) for p in PRECISIONS}, budget_s=budget)
        row = {"method": method, "mode": mode, "time": time, "batch": batch,
               **{f"{p}_ms": timed[p]["median_ms"] for p in PRECISIONS},
               **{f"{p}_first_call_ms": timed[p]["first_call_ms"] for p in PRECISIONS},
               "repeats": timed["plain"]["repeats"]}
        row["ratio"] = row["compensated_ms"] / row["plain_ms"]
        if mode == "forward":
            constant = np.full((batch, time), 0.1, np.float32)
            for p in PRECISIONS:
                row[f"{p}_error_normal"] = relative_error(built[p][2], xs)
                row[f"{p}_error_constant"] = relative_error(built[p][2], constant)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows, info) -> str:
    lines = [f"# Compensated against plain ({info.get('cpu', '')}, {info.get('backend', '')})", "",
             "L1Norm, float32. Median ms of alternated repeats; ratio = compensated / plain. Errors "
             "(forward rows): the L1 norm (W = 1) of the row's N(0, 1) inputs / of the constant 0.1, "
             "relative to math.fsum.", "",
             "| method | mode | T | batch | plain ms | compensated ms | ratio | error plain | error compensated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        errors = {p: (f"{r[f'{p}_error_normal']:.1e} / {r[f'{p}_error_constant']:.1e}"
                      if f"{p}_error_normal" in r else "") for p in PRECISIONS}
        lines.append(f"| {r['method']} | {r['mode']} | {r['time']:.0e} | {r['batch']} | {r['plain_ms']:.3g} "
                     f"| {r['compensated_ms']:.3g} | {r['ratio']:.2f} | {errors['plain']} | {errors['compensated']} |")
    return "\n".join(lines + ["", "Machine: " + json.dumps(info)]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--methods", nargs="+", default=["parallel", "sequential"])
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of repeats per pair")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cpu")
    args = parser.parse_args(argv)
    rows = [row for method in args.methods for time in args.lengths for batch in args.batches
            for row in measure_row(method, time, batch, args.budget)]
    info = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    report = json.dumps({"machine": info, "results": rows}, indent=1) + "\n"
    write_atomically(args.out / "precision.json", lambda f: f.write(report), mode="w")
    write_atomically(args.out / "precision.md", lambda f: f.write(table(rows, info)), mode="w")


if __name__ == "__main__":
    main()

"""The ``rnnjax`` command: ``demo``, ``train`` and ``eval``. Logic lives in ``rnnjax.runs``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

from rnnjax import runs
from rnnjax.recurrence import METHODS

__all__ = ["main"]

DEMO_SEED_TRIES = 20


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2."""

    def error(self, message):
        self.exit(2, f"rnnjax: error: {message}\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; received {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number; received {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**31); received {text}")
    return value


def _weights(params) -> str:
    w = params["params"]["cell"]
    return f"W_ih = {float(w['W_ih'][0, 0]):.9g}, W_hh = {float(w['W_hh'][0, 0]):.9g}"


def _train_until_live(task: str, first_seed: int, **settings):
    """Trains from ``first_seed``; on a dead ReLU says so and draws again from the next seed."""
    for seed in range(first_seed, first_seed + DEMO_SEED_TRIES):
        result = runs.train_task(task, seed=seed, **settings)
        if result.stop_reason != "dead":
            return seed, result
        print(f"  seed {seed}: init {_weights(result.initial_params)}: a dead ReLU (inputs are "
              f">= 0, so W_ih <= 0 keeps every gradient 0); trying seed {seed + 1}")
    raise ValueError(f"{DEMO_SEED_TRIES} seeds in a row gave a dead ReLU; try another --seed")


def _describe(result) -> str:
    reasons = {
        "weights": "both weights within tolerance of 1",
        "loss": "loss under tolerance",
        "budget": "step budget spent, NOT converged",
        "dead": "dead ReLU: every gradient is 0",
    }
    return f"{result.steps} steps ({reasons[result.stop_reason]})"


def _count_table(params, key) -> None:
    held_out = runs.TASKS["count"].batch(key, 4, 5)  # seed 003's test set: 4 sequences of 5
    predicted, exact = runs.count_check(params, held_out.xs)
    print("  held-out sequences: input bits | exact running count | predicted")
    for x, target, out in zip(np.asarray(held_out.xs), exact, predicted):
        bits = " ".join(str(int(v)) for v in x)
        counts = " ".join(str(int(v)) for v in target)
        print(f"    {bits} | {counts} | " + " ".join(f"{v:.4f}" for v in out))
    print(f"  largest error: {np.abs(predicted - exact).max():.2e}")


def demo(args) -> None:
    start = time.perf_counter()
    print("L1 norm of variable-length sequences (seed 000): Adam lr 0.1, a fresh batch of 8 "
          "each step, lengths 1..10")
    seed, result = _train_until_live("l1", args.seed)
    print(f"  seed {seed}: init {_weights(result.initial_params)}")
    print(f"  trained {_describe(result)}: {_weights(result.state.params)}")
    params = result.state.params
    checks = [("[3, -5, 7, -2]", np.array([3.0, -5.0, 7.0, -2.0]))]
    checks.append(("10,000 N(0,1) steps", np.random.default_rng(seed).standard_normal(10_000)))
    for name, sequence in checks:
        predicted, exact, error = runs.l1_check(params, sequence)
        print(f"  {name}: predicted {predicted:.9g}, exact {exact:.9g}, relative error {error:.1e}")

    print("Running counts of binary sequences (seed 003): Adam lr 0.1, a fresh batch of 8 "
          "sequences of length 5 each step")
    seed, result = _train_until_live("count", args.seed)
    print(f"  seed {seed}: init {_weights(result.initial_params)}")
    print(f"  trained {_describe(result)}: {_weights(result.state.params)}")
    _count_table(result.state.params, jax.random.key(seed + 10_000))
    print(f"demo took {time.perf_counter() - start:.1f} s on {jax.default_backend()}")


def train(args) -> None:
    settings = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
                "length": args.max_length, "tol": args.tol}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)  # fail before training, not after
    result = runs.train_task(args.task, seed=args.seed, progress=True, **settings)
    print(f"{args.task}: seed {args.seed}, init {_weights(result.initial_params)}")
    print(f"trained {_describe(result)}: {_weights(result.state.params)}, "
          f"final loss {result.history['loss'][-1]:.3g}")
    if args.out:
        paths = runs.save_run(args.out, args.task, {"seed": args.seed, **settings}, result)
        print("wrote " + ", ".join(str(p) for p in paths))
    if result.stop_reason == "dead":
        print("the ReLU is dead at this init (W_ih <= 0): train again with another --seed")


def evaluate(args) -> None:
    params = runs.load_params(args.params, args.task)
    if args.input:
        sequence = runs.read_sequence(args.input)
    else:
        rng = np.random.default_rng(args.seed)
        sequence = rng.standard_normal(args.length) if args.task == "l1" else rng.integers(0, 2, args.length)
    if args.task == "l1":
        predicted, exact, error = runs.l1_check(params, sequence, args.method)
        print(f"length {sequence.size}: predicted {predicted:.9g}, exact {exact:.9g} (float64), "
              f"relative error {error:.2e}")
        return
    predicted, exact = runs.count_check(params, sequence[None], args.method)
    print(f"length {sequence.size}: final count predicted {predicted[0, -1]:.6g}, exact "
          f"{exact[0, -1]:.6g}; largest error over all steps {np.abs(predicted - exact).max():.2e}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rnnjax", description="Bias-free ReLU RNNs in JAX: the two seed tasks.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = commands.add_parser("demo", help="train both seed networks and check them (under a minute)")
    p.add_argument("--seed", type=_seed, default=0, help="first seed to try (default 0)")
    p.set_defaults(run=demo)

    p = commands.add_parser("train", help="train one network; save weights, metrics and a plot")
    p.add_argument("task", choices=sorted(runs.TASKS))
    p.add_argument("--steps", type=_positive_int, help="step budget (default 5000)")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate (default 0.1; b2 is 0.9999)")
    p.add_argument("--batch-size", type=_positive_int, help="sequences in the batch (default 8)")
    p.add_argument("--max-length", type=_positive_int,
                   help="longest sequence (l1, default 10) or every sequence's length (count, default 5)")
    p.add_argument("--seed", type=_seed, default=0, help="fixes the init and every batch (default 0)")
    p.add_argument("--tol", type=_positive_float, default=1e-9,
                   help="stop once both weights are within TOL of 1 (default 1e-9: exactly 1.0 "
                        "in float32, which long sequences need)")
    p.add_argument("--out", help="folder for params.msgpack, metrics.json and training.png")
    p.set_defaults(run=train)

    p = commands.add_parser("eval", help="run a trained network on a sequence")
    p.add_argument("task", choices=sorted(runs.TASKS))
    p.add_argument("--params", required=True, help="a folder written by 'rnnjax train --out'")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--length", type=_positive_int, help="draw a random sequence this long")
    source.add_argument("--input", help="a .npy, .csv or .txt file of numbers")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random sequence (default 0)")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="'parallel' sums in tree order: use it from ~1e5 steps on")
    p.set_defaults(run=evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for bad input, with one line on stderr)."""
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"rnnjax: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("rnnjax: error: out of memory; try a shorter sequence", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

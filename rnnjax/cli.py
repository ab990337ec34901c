"""The ``rnnjax`` command: ``demo``, ``train``, ``eval`` and ``sweep``. Logic lives in
``rnnjax.tasks``, ``rnnjax.inputs``, ``rnnjax.runs`` and ``rnnjax.sweep_runs``.

Exit status: 0 done; 1 a run that did not converge (dead, diverged or out of budget: its files
are saved and say so), or a sweep in which no seed converged; 2 bad input (one line on stderr);
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import re
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

from rnnjax import __version__, inputs, runs, sweep_runs, tasks
from rnnjax.devices import device_mesh
from rnnjax.recipes import RECIPES
from rnnjax.recurrence import METHODS
from rnnjax.sweep import summarize as sweep_summary
from rnnjax.train import CONVERGED, SEED_LIMIT, STOP_REASONS

__all__ = ["main", "script"]

EVAL_MAX_LENGTH = 10**8  # 1e8 numbers: 0.8 GB in float64 for the reference, more in float32 copies


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2."""

    def error(self, message):
        self.exit(2, f"rnnjax: error: {_one_line(message)}\n")


def _integer(low: int, high: int, what: str):
    def parse(text: str) -> int:
        value = int(text) if re.fullmatch(r"[0-9]{1,30}", text) else None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what}; received {_quote(text)}")
        return value

    return parse


_positive_int = _integer(1, 2**31 - 1, "a positive integer")
_count = _integer(0, 2**31 - 1, "an integer >= 0")
_seed = _integer(0, SEED_LIMIT - 1, "a seed in [0, 2**31)")
_length = _integer(1, EVAL_MAX_LENGTH, f"a length from 1 to {EVAL_MAX_LENGTH:,}")


def _number(accept, what: str):
    """A parser of numbers for which ``accept(value)`` holds, as ``_integer`` is of integers."""
    def parse(text: str) -> float:
        try:
            value = inputs.parse_number(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {what}; received {_quote(text)}")
        return value

    return parse


# A learning rate is used in float32: below its smallest normal number it is 0, and nothing moves.
_learning_rate = _number(lambda lr: runs.LR_RANGE[0] <= lr <= runs.LR_RANGE[1],
                         f"a learning rate from {runs.LR_RANGE[0]:.4g} to {runs.LR_RANGE[1]:.4g} (float32's range)")
# A distance to the target weight 1: a weight of 0 is never within.
_tolerance = _number(lambda tol: 0 < tol < 1, "a tolerance in (0, 1)")


def _all_dead(first_seed: int, count: int) -> str:
    """Why ``train`` gave up: ``count`` dead inits in a row from ``first_seed``."""
    seeds = f"seed {first_seed}" if count == 1 else f"{count} seeds in a row from {first_seed}"
    if first_seed + count < SEED_LIMIT:
        return f"{seeds} gave a dead init; try another --seed"
    return f"{seeds} gave a dead init and no seed is left below 2**31; try a lower --seed"


def _quote(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a path; received ''")
    return text


def _one_line(message: str) -> str:
    """Escapes line breaks and other unprintable characters, so a message is one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


def _weights(task: str, settings: dict, params) -> str:
    """The numbers the task watches, of the weights the network computes with: "W_ih = 1, W_hh = 1"."""
    numbers = tasks.watched(task, tasks.network_params(settings, params))
    ordered = sorted(numbers.items(), key=lambda item: item[0].endswith("W_hh"))  # W_hh last
    return ", ".join(f"{name.rsplit('/', 1)[-1]} = {value:.9g}" for name, value in ordered)


def _print_dead(task: str, seed: int, result, settings: dict) -> None:
    """One line on why the init of ``seed`` cannot be trained."""
    spec = tasks.TASKS[task]
    seen_at_init = result.steps == 0 or spec.dead_at_init is None
    reason = spec.dead_reason if seen_at_init else "a dead ReLU: every gradient is 0"
    print(f"  seed {seed}: init {_weights(task, settings, result.initial_params)}: {reason}; trying seed {seed + 1}")


def _describe(result) -> str:
    return f"{result.steps} steps ({STOP_REASONS[result.stop_reason]})"


@contextlib.contextmanager
def _ctrl_c(*, polled: bool):
    """While active, every Ctrl-C is recorded, so that none is ever lost (a library may catch the
    KeyboardInterrupt it raises, e.g. in a garbage-collector callback). With ``polled`` the first
    press only sets the flag, which training polls before each step, and a second one raises;
    otherwise each press raises KeyboardInterrupt, as usual. Yields a function: pressed or not."""
    pressed = threading.Event()
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started with Ctrl-C ignored (nohup, &)
        yield pressed.is_set
        return

    def handler(signum, frame):
        again = pressed.is_set()
        pressed.set()
        if again or not polled:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _count_table(params, key) -> None:
    held_out = tasks.TASKS["count"].batch(key, 4, 5)  # seed 003's test set: 4 sequences of 5
    predicted, exact = tasks.count_check(params, held_out.xs)
    print("  held-out sequences: input bits | exact running count | predicted")
    for x, target, out in zip(np.asarray(held_out.xs), exact, predicted):
        bits = " ".join(str(int(v)) for v in x)
        counts = " ".join(str(int(v)) for v in target)
        print(f"    {bits} | {counts} | " + " ".join(f"{v:.4f}" for v in out))
    print(f"  largest error: {np.abs(predicted - exact).max():.2e}")


def _demo_run(task: str, first_seed: int, recipe: str):
    """Trains ``task`` as ``train`` does and prints how; returns ``(seed, network weights, result)``."""
    settings = tasks.task_settings(task, recipe=recipe)
    seed, result = tasks.train_until_live(task, first_seed=first_seed, settings=settings,
                                          on_dead=lambda seed, result: _print_dead(task, seed, result, settings))
    print(f"  seed {seed}: init {_weights(task, settings, result.initial_params)}")
    print(f"  trained {_describe(result)}: {_weights(task, settings, result.state.params)}")
    if result.stop_reason not in CONVERGED:
        print(f"rnnjax: error: the {task} network did not converge from seed {seed}", file=sys.stderr)
    return seed, tasks.network_params(settings, result.state.params), result


def demo(args) -> int:
    start = time.perf_counter()
    print(f"Recipe {args.recipe}: {RECIPES[args.recipe].summary}")
    print("L1 norm of variable-length sequences (seed 000), lengths 1..10")
    seed, params, result = _demo_run("l1", args.seed, args.recipe)
    if result.stop_reason not in CONVERGED:
        return 1
    checks = [("[3, -5, 7, -2]", np.array([3.0, -5.0, 7.0, -2.0]))]
    checks.append(("10,000 N(0,1) steps", np.random.default_rng(seed).standard_normal(10_000)))
    for name, sequence in checks:
        predicted, exact, error = tasks.l1_check(params, sequence)
        print(f"  {name}: predicted {predicted:.9g}, exact {exact:.9g}, relative error {error:.1e}")

    print("Running counts of binary sequences (seed 003), 8 sequences of length 5 a batch")
    seed, params, result = _demo_run("count", args.seed, args.recipe)
    if result.stop_reason not in CONVERGED:
        return 1
    _count_table(params, jax.random.key(seed + 10_000))
    print(f"demo took {time.perf_counter() - start:.1f} s on {jax.default_backend()}")
    return 0


def _check_devices(devices: int | None, batch_size: int | None = None) -> None:
    """Refuses, naming the flags, a ``--devices`` beyond JAX's devices or a batch of
    ``batch_size`` sequences that they do not split evenly."""
    try:
        count = device_mesh(devices).size
    except ValueError as e:
        raise ValueError(f"--devices: {e}") from None
    if batch_size is not None and batch_size % count:
        raise ValueError(f"--batch-size {batch_size} does not split evenly over {count} devices; "
                         f"give a multiple of {count}, or a --devices that divides {batch_size}")


def _check_step_size(numbers: int, what: str) -> None:
    """Refuses a training step whose inputs hold more than ``tasks.MAX_STEP_NUMBERS`` numbers."""
    if numbers > tasks.MAX_STEP_NUMBERS:
        raise ValueError(f"{what} is {numbers:,} numbers a step, more than the {tasks.MAX_STEP_NUMBERS:,} "
                         "rnnjax trains on at once; give smaller values")


def train(args) -> int:
    if not args.out and (args.resume or args.overwrite or args.checkpoint_every):
        raise ValueError("--resume, --overwrite and --checkpoint-every need --out")
    settings = tasks.task_settings(args.task, recipe=args.recipe, batch_size=args.batch_size,
                                   length=args.max_length)
    _check_step_size(settings["batch_size"] * settings["length"],
                     f"--batch-size {settings['batch_size']:,} x --max-length {settings['length']:,}")
    if args.task == "count" and settings["length"] > tasks.COUNT_MAX_LENGTH:
        raise ValueError(f"--max-length {settings['length']}: a count sequence is at most "
                         f"{tasks.COUNT_MAX_LENGTH:,} long (float32 counts are exact up to there)")
    # A resumed run keeps its saved batch size, which fit checks against the devices itself.
    _check_devices(args.devices, None if args.resume else settings["batch_size"])
    given = {"recipe": args.recipe, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
             "length": args.max_length, "tol": args.tol, "skip_nonfinite": args.skip_nonfinite}
    created = False
    try:
        with _ctrl_c(polled=True) as interrupted:  # from here on, Ctrl-C is a flag that fit polls
            created = args.out and runs.prepare_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)
            run = runs.train_run(args.task, first_seed=args.seed, given=given, out=args.out,
                                 resume=args.resume, checkpoint_every=args.checkpoint_every,
                                 interrupt=interrupted, progress=True, devices=args.devices,
                                 on_dead=functools.partial(_print_dead, args.task))
            pressed = interrupted()
    finally:
        if created and Path(args.out).is_dir() and not any(Path(args.out).iterdir()):
            Path(args.out).rmdir()  # never leave an empty folder behind
    result = run.result
    if run.resumed_at and args.resume:
        print(f"resumed from step {run.resumed_at[-1]}")
    print(f"{args.task}: seed {run.seed}, recipe {run.settings['recipe']}, init "
          f"{_weights(args.task, run.settings, result.initial_params)}")
    loss = f"{result.history['loss'][-1]:.3g}" if result.steps else "n/a"
    print(f"trained {_describe(result)}: {_weights(args.task, run.settings, result.state.params)}, "
          f"final loss {loss}")
    if run.paths:
        print("wrote " + ", ".join(str(p) for p in run.paths))
    where = f"saved in {args.out}" if args.out else "nothing saved (no --out)"
    if pressed:  # even when the run ended meanwhile, Ctrl-C is never swallowed
        if result.stop_reason != "interrupted":
            print(f"rnnjax: interrupted after the run ended ({STOP_REASONS[result.stop_reason]}; {where})",
                  file=sys.stderr)
        else:
            resume = f"; continue with: rnnjax train {args.task} --out {args.out} --resume" if args.out else ""
            print(f"rnnjax: interrupted at step {result.steps} ({where}){resume}", file=sys.stderr)
        return 130
    failure = {
        "dead": _all_dead(run.first_seed, len(run.dead_seeds) + 1),
        "diverged": f"the run diverged at step {result.steps + 1} (a non-finite loss, gradient or weight); "
                    f"its last finite state, after step {result.steps}, is "
                    f"{where if args.out else 'not saved (no --out)'}; try a lower --lr "
                    f"or {'a larger ' if run.settings['skip_nonfinite'] else ''}--skip-nonfinite",
        "budget": f"not converged within {result.steps} steps ({where}); "
                  + (f"continue with: rnnjax train {args.task} --out {args.out} --resume --steps N"
                     if args.out else "raise --steps"),
    }.get(result.stop_reason)
    if failure:
        print(f"rnnjax: error: {failure}", file=sys.stderr)
        return 1
    return 0


def evaluate(args) -> int:
    if args.input and args.seed is not None:
        raise ValueError("--seed draws the random sequence of --length; --input reads its sequence "
                         "from the file: give one of them")
    loaded = runs.load_run(args.params, args.task)
    if args.input:
        try:
            sequence = inputs.read_sequence(args.input, bits=args.task == "count", max_values=EVAL_MAX_LENGTH)
        except ValueError as e:
            raise ValueError(f"--input {e}") from None
    else:
        rng = np.random.default_rng(args.seed or 0)
        sequence = rng.integers(0, 2, args.length) if args.task == "count" else rng.standard_normal(args.length)
    if args.task == "count" and sequence.size > tasks.COUNT_MAX_LENGTH:
        given = f"--length {args.length}" if args.input is None else f"--input {args.input}"
        raise ValueError(f"{given}: a count sequence is at most {tasks.COUNT_MAX_LENGTH:,} long (float32 "
                         f"counts are exact up to there); received {sequence.size:,} steps")
    untrusted = [] if loaded.converged else [f"--params {args.params}: not a converged run ({loaded.status})"]
    if args.task != "count":
        predicted, exact, error = tasks.l1_check(loaded.params, sequence, args.method, task=args.task)
        print(f"length {sequence.size}: predicted {predicted:.9g}, exact {exact:.9g} (float64), "
              f"relative error {error:.2e}")
        if not error <= tasks.L1_EVAL_TOL[args.task]:
            untrusted.append(f"relative error {error:.2e}, above the {tasks.L1_EVAL_TOL[args.task]:g} "
                             f"rnnjax holds {args.task} to" + _method_advice(args.method, loaded.converged))
    else:
        predicted, exact = tasks.count_check(loaded.params, sequence[None], args.method)
        errors = np.abs(predicted - exact)[0]
        print(f"length {sequence.size}: final count predicted {predicted[0, -1]:.6g}, exact "
              f"{exact[0, -1]:.6g}; largest error over all steps {errors.max():.2e}")
        if not errors.max() < 0.5:
            step = int(np.argmax(~(errors < 0.5)))
            untrusted.append(f"the count after step {step + 1} is off by {errors[step]:.3g}: it rounds to "
                             "a wrong count")
    if untrusted:
        print(f"rnnjax: error: do not trust these outputs: {'; '.join(untrusted)}", file=sys.stderr)
        return 1
    return 0


def _method_advice(method: str, converged: bool) -> str:
    return "; try --method auto (the default)" if method == "sequential" and converged else ""


def _add_recipe(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--recipe", choices=sorted(RECIPES), default=default,
                   help=f"how to train (default {tasks.DEFAULT_RECIPE}: W_ih = v*v, Adam b2 0.9999 with a "
                        "cosine decay, fresh batches; notebook: seed 000's recipe)")


def _add_devices(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--devices", type=_positive_int, metavar="N",
                   help=f"spread {what} over the first N of JAX's devices (default: all of them)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rnnjax", description="Bias-free ReLU RNNs in JAX: the seed tasks.")
    parser.add_argument("--version", action="version", version=f"rnnjax {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = commands.add_parser("demo", help="train both seed networks and check them (under a minute)")
    p.add_argument("--seed", type=_seed, default=0, help="first seed to try (default 0)")
    _add_recipe(p, tasks.DEFAULT_RECIPE)
    p.set_defaults(run=demo)

    p = commands.add_parser("train", help="train one network; save checkpoints, metrics and a plot")
    p.add_argument("task", choices=sorted(tasks.TASKS))
    _add_recipe(p)
    p.add_argument("--steps", type=_positive_int, help="step budget (default: the recipe's, 3000)")
    p.add_argument("--lr", type=_learning_rate, help="Adam's (peak) learning rate (default: the recipe's, 0.1)")
    p.add_argument("--batch-size", type=_positive_int, help="sequences in the batch (default 8)")
    p.add_argument("--max-length", type=_positive_int,
                   help="longest sequence (l1, default 10) or every sequence's length (count, default 5)")
    p.add_argument("--seed", type=_seed,
                   help="first seed to try (default 0); a dead init draws again from the next seed")
    p.add_argument("--tol", type=_tolerance,
                   help="stop once W_ih and W_hh are within TOL of 1 (default 1e-9: exactly 1.0 in "
                        "float32, which long sequences need; l1-learned: W_hh within TOL, its two "
                        f"slopes within max(TOL, {tasks.SLOPE_TOL:g}))")
    p.add_argument("--skip-nonfinite", type=_count, metavar="N",
                   help="skip up to N non-finite updates in a row (optax.apply_if_finite) instead of "
                        "stopping as diverged at the first (default 0)")
    p.add_argument("--out", type=_path, help="run folder: checkpoints/, metrics.json and training.png")
    p.add_argument("--checkpoint-every", type=_positive_int, metavar="N",
                   help=f"save a checkpoint every N steps (default {runs.CHECKPOINT_EVERY}); always at the end")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    again.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    _add_devices(p, "each batch")
    p.set_defaults(run=train)

    p = commands.add_parser("eval", help="run a trained network on a sequence")
    p.add_argument("task", choices=sorted(tasks.TASKS))
    p.add_argument("--params", type=_path, required=True,
                   help="a run folder written by 'rnnjax train --out', or one of its checkpoints/<step>")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--length", type=_length,
                        help=f"draw a random sequence this long (count: at most {tasks.COUNT_MAX_LENGTH:,})")
    source.add_argument("--input", type=_path, help="a .npy, .csv or .txt file of numbers (count: 0s and 1s)")
    p.add_argument("--seed", type=_seed, help="seed of the random sequence of --length (default 0)")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="default auto: the exact parallel scan from 256 steps on a CPU "
                        "(within 1e-6 of the float64 norm up to 1e8 steps), the loop below")
    p.set_defaults(run=evaluate)

    p = commands.add_parser("sweep", help="train many seeds at once: how often does training work?")
    p.add_argument("task", choices=sorted(tasks.TASKS))
    p.add_argument("--seeds", type=_positive_int, default=1000, help="how many seeds (default 1000)")
    p.add_argument("--first-seed", type=_seed, default=0, help="the first seed (default 0)")
    _add_recipe(p)
    p.add_argument("--steps", type=_positive_int, help="steps for every seed (default: the recipe's, 3000)")
    p.add_argument("--lr", type=_learning_rate, help="Adam's (peak) learning rate (default: the recipe's, 0.1)")
    p.add_argument("--tol", type=_tolerance, default=1e-3,
                   help="a seed converged once W_ih and W_hh (l1-learned: its slopes and W_hh) are "
                        "within TOL of 1 (default 1e-3)")
    p.add_argument("--data-seed", type=_seed,
                   help="every seed trains on this seed's batches (default: each on its own)")
    _add_devices(p, "the seeds")
    p.add_argument("--out", type=_path, help=f"folder for {sweep_runs.SUMMARY} and {sweep_runs.PICTURE}")
    p.add_argument("--overwrite", action="store_true", help="replace the sweep in --out")
    p.set_defaults(run=sweep)
    return parser


def sweep(args) -> int:
    if args.overwrite and not args.out:
        raise ValueError("--overwrite needs --out")
    if args.first_seed + args.seeds > SEED_LIMIT:
        raise ValueError(f"--first-seed {args.first_seed} --seeds {args.seeds}: the seeds must lie below 2**31; "
                         f"give at most --seeds {SEED_LIMIT - args.first_seed} or a lower --first-seed")
    settings = tasks.task_settings(args.task, recipe=args.recipe)
    _check_step_size(args.seeds * settings["batch_size"] * settings["length"],
                     f"--seeds {args.seeds:,} x {settings['batch_size']} sequences x {settings['length']} steps")
    _check_devices(args.devices)  # seeds are padded to a multiple of the devices
    created = args.out and sweep_runs.prepare_sweep_folder(args.out, overwrite=args.overwrite)
    try:
        settings, result = tasks.sweep_task(
            args.task, seeds=args.seeds, recipe=args.recipe, steps=args.steps, lr=args.lr, tol=args.tol,
            first_seed=args.first_seed, data_seed=args.data_seed, devices=args.devices, progress=True)
    except BaseException:
        if created:  # never leave an empty folder behind
            Path(args.out).rmdir()
        raise
    summary = sweep_summary(result)
    counts, fractions = summary["counts"], summary["fractions"]
    steps = summary["steps_to_converge"]
    print(f"{args.task}, recipe {settings['recipe']}: {args.seeds} seeds x {settings['steps']} steps on "
          f"{result.devices} {jax.default_backend()} device(s): {result.seconds:.1f} s "
          f"(+{result.compile_seconds:.1f} s compiling), {summary['seeds_per_second']:,.0f} seeds/s")
    print(f"  converged {counts['converged']} ({fractions['converged']:.1%}): every watched number within "
          f"{args.tol:g} of 1" + (f"; steps to converge: median {steps['median']:.0f}, p90 {steps['p90']:.0f}, "
                                  f"max {steps['max']:.0f}" if counts["converged"] else ""))
    print(f"  dead {counts['dead']} ({fractions['dead']:.1%}), diverged {counts['diverged']} "
          f"({fractions['diverged']:.1%}), stuck {counts['stuck']} ({fractions['stuck']:.1%}); "
          f"within {args.tol:g} after the last step: {summary['within_tol_at_end']:.1%}")
    if args.out:
        paths = sweep_runs.save_sweep(args.out, args.task, settings, result)
        print("wrote " + ", ".join(str(p) for p in paths))
    if not counts["converged"]:
        print(f"rnnjax: error: no seed of {args.seeds} converged ({counts['dead']} dead, {counts['diverged']} "
              f"diverged, {counts['stuck']} stuck)", file=sys.stderr)
        return 1
    return 0


def _quiet_libraries() -> None:
    """Keeps orbax's own reports off stderr, so that every refusal stays one line: its absl log
    records, asyncio's complaints about its tasks, and the exceptions its threads leave behind
    when a damaged checkpoint is read (what is wrong is in the one line instead)."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (see the module docstring)."""
    with _ctrl_c(polled=False) as interrupted:
        status = _run(argv)
    if interrupted() and status != 130:  # a Ctrl-C that some library swallowed
        print("rnnjax: interrupted", file=sys.stderr)
        return 130
    return status


def _run(argv: list[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
        return args.run(args)
    except KeyboardInterrupt:
        print("rnnjax: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as e:
        print(f"rnnjax: error: {_one_line(e)}", file=sys.stderr)
    except OSError as e:
        print(f"rnnjax: error: {_one_line(f'{e.filename}: {e.strerror}' if e.filename else e)}", file=sys.stderr)
    except MemoryError:
        print("rnnjax: error: out of memory; try a shorter sequence", file=sys.stderr)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print("rnnjax: error: out of memory; try a shorter sequence or a smaller batch", file=sys.stderr)
    return 2


def script() -> None:
    """The ``rnnjax`` program: ``main`` with the libraries quiet, then exit with its status."""
    _quiet_libraries()
    sys.exit(main())

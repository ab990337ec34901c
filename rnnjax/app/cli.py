"""The ``rnnjax`` command: ``demo``, ``train``, ``eval`` and ``sweep``. Each command is a short
function; the logic lives in ``rnnjax.app.tasks``, ``runs``, ``inputs`` and ``sweep_runs``, and
the options come from the settings table (``rnnjax.app.settings``).

Exit status: 0 done; 1 a result not to trust (a run that did not converge: dead, diverged or out
of budget, its files saved and saying so; an eval beyond its accuracy; a sweep in which no seed
converged), a machine that could not do it (out of memory, a full disk), or a bug (its
traceback, then one line saying so); 2 bad input (one line on stderr); 130 interrupted (Ctrl-C).

JAX loads only once a command runs, so that ``rnnjax --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from rnnjax import __version__
from rnnjax.app import settings as table
from rnnjax.core.checks import InputError

__all__ = ["main", "script"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2."""

    def error(self, message):
        self.exit(2, f"rnnjax: error: {_one_line(message)}\n")


def _one_line(message: str) -> str:
    """Escapes line breaks and other unprintable characters, so a message is one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


@contextlib.contextmanager
def _argument(name: str, setting: str):
    """Shows a refusal of the library's argument ``name`` as one of the option ``setting``."""
    try:
        yield
    except InputError as e:
        if e.name != name:
            raise
        raise InputError(f"{setting} {e}", setting) from None


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


def _weights(task: str, settings: dict, params) -> str:
    """The numbers the task watches, of the weights the network computes with: "W_ih = 1, W_hh = 1"."""
    from rnnjax.app import tasks

    numbers = tasks.watched(task, tasks.network_params(settings, params))
    ordered = sorted(numbers.items(), key=lambda item: item[0].endswith("W_hh"))  # W_hh last
    return ", ".join(f"{name.rsplit('/', 1)[-1]} = {value:.9g}" for name, value in ordered)


def _print_dead(task: str, seed: int, result, settings: dict) -> None:
    """One line on why the init of ``seed`` cannot be trained."""
    from rnnjax.app import tasks

    spec = tasks.TASKS[task]
    seen_at_init = result.steps == 0 or spec.dead_at_init is None
    reason = spec.dead_reason if seen_at_init else "a dead ReLU: every gradient is 0"
    print(f"  seed {seed}: init {_weights(task, settings, result.initial_params)}: {reason}; trying seed {seed + 1}")


def _describe(result) -> str:
    from rnnjax.training.stopping import STOP_REASONS

    return f"{result.steps} steps ({STOP_REASONS[result.stop_reason]})"


def _count_table(params, key) -> None:
    from rnnjax.app import tasks

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
    from rnnjax.app import tasks
    from rnnjax.training.stopping import CONVERGED

    settings = tasks.task_settings(task, recipe=recipe)
    seed, result = tasks.train_until_live(task, first_seed=first_seed, settings=settings,
                                          on_dead=lambda seed, result: _print_dead(task, seed, result, settings))
    print(f"  seed {seed}: init {_weights(task, settings, result.initial_params)}")
    print(f"  trained {_describe(result)}: {_weights(task, settings, result.state.params)}")
    if result.stop_reason not in CONVERGED:
        print(f"rnnjax: error: the {task} network did not converge from seed {seed}", file=sys.stderr)
    return seed, tasks.network_params(settings, result.state.params), result


def demo(args) -> int:
    import jax

    from rnnjax.app import tasks
    from rnnjax.training.stopping import CONVERGED

    start = time.perf_counter()
    print(f"Recipe {args.recipe}: {table.RECIPES[args.recipe]}")
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


def _given(args) -> dict:
    """The run settings given on the command line (None where not given)."""
    return {"recipe": args.recipe, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
            "length": args.length, "tol": args.tol, "skip_nonfinite": args.skip_nonfinite}


def _devices(devices: int | None) -> int:
    """The number of devices ``--devices`` asks for, checked against what JAX sees."""
    from rnnjax.training.devices import device_mesh

    return device_mesh(devices).size


def train(args) -> int:
    from rnnjax.app import folders, runs, tasks

    if not args.out and (args.resume or args.overwrite or args.checkpoint_every):
        raise InputError("`resume`, `overwrite` and `checkpoint_every` need `out`", "out")
    if args.resume and args.overwrite:
        raise InputError("`resume` continues the run in `out` and `overwrite` replaces it: give one of them",
                         "resume")
    devices = None if args.devices is None else _devices(args.devices)  # None: those that split the batch
    if not args.resume:  # a resumed run's settings are checked against its checkpoint
        table.check_run(tasks.task_settings(args.task, **_given(args)), task=args.task, devices=devices)
    created = False
    try:
        with _ctrl_c(polled=True) as interrupted, _argument("out", "out"):  # Ctrl-C: a flag fit polls
            created = args.out and folders.prepare_run_folder(args.out, resume=args.resume,
                                                              overwrite=args.overwrite)
            run = runs.train_run(args.task, seed=args.seed, given=_given(args), out=args.out, resume=args.resume,
                                 checkpoint_every=args.checkpoint_every, interrupt=interrupted, progress=True,
                                 devices=args.devices, on_dead=functools.partial(_print_dead, args.task))
            pressed = interrupted()
    finally:
        if created and Path(args.out).is_dir() and not any(Path(args.out).iterdir()):
            Path(args.out).rmdir()  # never leave an empty folder behind
    _print_run(args, run)
    return _train_status(args, run, pressed)


def _print_run(args, run) -> None:
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


def _train_status(args, run, pressed: bool) -> int:
    """Says, on stderr, why a run is not to be trusted, and returns the exit status."""
    from rnnjax.core.checks import SEED_LIMIT
    from rnnjax.training.stopping import STOP_REASONS

    result, where = run.result, (f"saved in {args.out}" if args.out else "nothing saved (no --out)")
    if pressed:  # even when the run ended meanwhile, Ctrl-C is never swallowed
        if result.stop_reason != "interrupted":
            print(f"rnnjax: interrupted after the run ended ({STOP_REASONS[result.stop_reason]}; {where})",
                  file=sys.stderr)
        else:
            resume = f"; continue with: rnnjax train {args.task} --out {args.out} --resume" if args.out else ""
            print(f"rnnjax: interrupted at step {result.steps} ({where}){resume}", file=sys.stderr)
        return 130
    tried = len(run.dead_seeds) + 1
    seeds = f"seed {run.first_seed}" if tried == 1 else f"{tried} seeds in a row from {run.first_seed}"
    failure = {
        "dead": f"{seeds} gave a dead init; " + ("try another --seed" if run.first_seed + tried < SEED_LIMIT
                                                 else "no seed is left below 2**31; try a lower --seed"),
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


def _eval_sequence(args) -> np.ndarray:
    """The sequence ``eval`` runs on: the ``--input`` file, or a random one of ``--length``."""
    from rnnjax.app import inputs

    if args.input and args.seed is not None:
        raise InputError("`seed` draws the random sequence of `sequence_length`; `input` reads its sequence "
                         "from the file: give one of them", "seed")
    if args.input:
        with _argument("path", "input"):
            sequence = inputs.read_sequence(args.input, bits=args.task == "count", max_values=table.EVAL_MAX_LENGTH)
    else:
        rng = np.random.default_rng(args.seed or 0)
        sequence = rng.integers(0, 2, args.sequence_length) if args.task == "count" else rng.standard_normal(
            args.sequence_length)
    if args.task == "count" and sequence.size > table.COUNT_MAX_LENGTH:
        given = f"`sequence_length` {args.sequence_length}" if args.input is None else f"`input` {args.input}"
        raise InputError(f"{given}: a count sequence is at most {table.COUNT_MAX_LENGTH:,} long (float32 counts "
                         f"are exact up to there); received {sequence.size:,} steps", "input")
    return sequence


COUNT_STEPS_SHOWN = (8, 3)  # eval count shows the first and last steps of a longer sequence


def _print_counts(bits: np.ndarray, exact: np.ndarray, predicted: np.ndarray) -> None:
    """The input bits and the exact and predicted running counts, one column per step, aligned;
    a sequence longer than ``COUNT_STEPS_SHOWN`` together has its middle steps as one "...".
    """
    first, last = COUNT_STEPS_SHOWN
    shown = np.arange(bits.size)
    if bits.size > first + last:
        shown = np.concatenate([shown[:first], [-1], shown[-last:]])  # -1: the steps left out
    rows = {"step": [str(i + 1) for i in shown], "input": [str(int(bits[i])) for i in shown],
            "exact": [str(int(exact[i])) for i in shown], "predicted": [f"{predicted[i]:.4f}" for i in shown]}
    for name in rows:
        rows[name] = ["..." if i < 0 else value for i, value in zip(shown, rows[name])]
    widths = [max(len(row[j]) for row in rows.values()) for j in range(shown.size)]
    for name, row in rows.items():
        print(f"  {name:<9} " + " ".join(value.rjust(width) for value, width in zip(row, widths)))


def evaluate(args) -> int:
    from rnnjax.app import runs, tasks

    sequence = _eval_sequence(args)  # the cheap checks first: the checkpoint is read after
    with _argument("path", "params"):
        loaded = runs.load_run(args.params, args.task)
    untrusted = [] if loaded.converged else [f"--params {args.params}: not a converged run ({loaded.status})"]
    if args.task != "count":
        with _argument("sequence", "input"):  # only a file's numbers can sum past float32's range
            predicted, exact, error = tasks.l1_check(loaded.params, sequence, args.method, task=args.task,
                                                     precision=args.precision)
        print(f"length {sequence.size}: predicted {predicted:.9g}, exact {exact:.9g} (float64), "
              f"relative error {error:.2e}")
        if not error <= tasks.L1_EVAL_TOL[args.task]:
            advice = ("; try --precision compensated (the default)"
                      if args.precision == "plain" and loaded.converged else "")
            untrusted.append(f"relative error {error:.2e}, above the {tasks.L1_EVAL_TOL[args.task]:g} "
                             f"rnnjax holds {args.task} to" + advice)
    else:
        predicted, exact = tasks.count_check(loaded.params, sequence[None], args.method, args.precision)
        errors = np.abs(predicted - exact)[0]
        print(f"length {sequence.size}: the running count after each step")
        _print_counts(sequence, exact[0], predicted[0])
        print(f"final count predicted {predicted[0, -1]:.6g}, exact {exact[0, -1]:.6g}; largest error over all "
              f"steps {errors.max():.2e}")
        if not errors.max() < 0.5:
            step = int(np.argmax(~(errors < 0.5)))
            untrusted.append(f"the count after step {step + 1} is off by {errors[step]:.3g}: it rounds to "
                             "a wrong count")
    if untrusted:
        print(f"rnnjax: error: do not trust these outputs: {'; '.join(untrusted)}", file=sys.stderr)
        return 1
    return 0


def sweep(args) -> int:
    from rnnjax.app import sweep_runs, tasks
    from rnnjax.core.checks import SEED_LIMIT
    from rnnjax.training.sweep import summarize

    if args.overwrite and not args.out:
        raise InputError("`overwrite` needs `out`", "overwrite")
    if args.first_seed + args.seeds > SEED_LIMIT:
        raise InputError(f"`first_seed` {args.first_seed} `seeds` {args.seeds}: the seeds must lie below 2**31; "
                         f"give at most `seeds` {SEED_LIMIT - args.first_seed} or a lower `first_seed`", "seeds")
    settings = tasks.task_settings(args.task, recipe=args.recipe, steps=args.steps, lr=args.lr, tol=args.tol)
    table.check_run(settings, task=args.task, seeds=args.seeds)
    _devices(args.devices)  # seeds are padded to a multiple of the devices
    with _argument("out", "out"):
        created = args.out and sweep_runs.prepare_sweep_folder(args.out, overwrite=args.overwrite)
    try:
        settings, result = tasks.sweep_task(args.task, seeds=args.seeds, settings=settings, first_seed=args.first_seed,
                                            data_seed=args.data_seed, devices=args.devices, progress=True)
    except BaseException:
        if created:  # never leave an empty folder behind
            Path(args.out).rmdir()
        raise
    summary = summarize(result)
    _print_sweep(args, settings, result, summary)
    if args.out:
        paths = sweep_runs.save_sweep(args.out, args.task, settings, result)
        print("wrote " + ", ".join(str(p) for p in paths))
    counts = summary["counts"]
    if not counts["converged"]:
        print(f"rnnjax: error: no seed of {args.seeds} converged ({counts['dead']} dead, {counts['diverged']} "
              f"diverged, {counts['stuck']} stuck)", file=sys.stderr)
        return 1
    return 0


def _print_sweep(args, settings: dict, result, summary: dict) -> None:
    import jax

    from rnnjax.training.sweep import LEFT, OUTCOMES, group_label, outcome_groups

    counts, fractions, steps = summary["counts"], summary["fractions"], summary["steps_to_converge"]
    print(f"{args.task}, recipe {settings['recipe']}: {args.seeds} seeds x {settings['steps']} steps on "
          f"{result.devices} {jax.default_backend()} device(s): {result.seconds:.1f} s "
          f"(+{result.compile_seconds:.1f} s compiling), {summary['seeds_per_second']:,.0f} seeds/s")
    print(f"  converged {counts['converged']} ({fractions['converged']:.1%}): every watched number within "
          f"{args.tol:g} of 1" + (f"; steps to converge: median {steps['median']:.0f}, p90 {steps['p90']:.0f}, "
                                  f"max {steps['max']:.0f}" if counts["converged"] else ""))
    groups = {name: group_label(name, seeds) for name, seeds in outcome_groups(result).items()}
    if LEFT in groups:  # the picture draws these apart: where each seed ended
        converged = [label for name, label in groups.items() if name not in OUTCOMES]
        print(f"    of these: {'; '.join(converged)}: outside {args.tol:g} again after the last step")
    print("  " + ", ".join(groups[name] for name in OUTCOMES[1:]))


_COMMANDS = {
    "demo": (demo, "train both seed networks and check them (under a minute)"),
    "train": (train, "train one network; save checkpoints, metrics and a plot"),
    "eval": (evaluate, "run a trained network on a sequence"),
    "sweep": (sweep, "train many seeds at once: how often does training work?"),
}
_ONE_OF = {"eval": [("sequence_length", "input")]}  # options of which exactly one is given


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rnnjax", description="Bias-free ReLU RNNs in JAX: the seed tasks.")
    parser.add_argument("--version", action="version", version=f"rnnjax {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (run, summary) in _COMMANDS.items():
        takes_task = "task" in table.SETTINGS and name in table.SETTINGS["task"].commands
        command = commands.add_parser(name, help=summary, description=summary,
                                      epilog=table.tasks_epilog() if takes_task else None,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        groups = {option: group for options in _ONE_OF.get(name, [])
                  for group in [command.add_mutually_exclusive_group(required=True)] for option in options}
        table.add_options(command, name, groups=groups)
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (see the module docstring)."""
    with _quiet_libraries(), _ctrl_c(polled=False) as interrupted:
        status = _run(argv)
    if interrupted() and status != 130:  # a Ctrl-C that some library swallowed
        print("rnnjax: interrupted", file=sys.stderr)
        return 130
    return status


def _run(argv: list[str] | None) -> int:
    """One command: bad input is one line and 2; a machine that cannot do it, one line and 1; a
    bug, its traceback, one line and 1."""
    args = _parser().parse_args(argv)
    try:
        _load_libraries()
        return args.run(args)
    except KeyboardInterrupt:
        print("rnnjax: interrupted", file=sys.stderr)
        return 130
    except InputError as e:
        print(f"rnnjax: error: {_one_line(table.command_line_message(e))}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 -- every other exception is reported, and it says which kind
        failure = _machine_failure(e)
        if failure is None:
            traceback.print_exc()
            failure = f"internal error, a bug in rnnjax: {type(e).__name__}: {_one_line(e)[:200]}"
        print(f"rnnjax: error: {failure}", file=sys.stderr)
        return 1


def _load_libraries() -> None:
    """Imports JAX and what the commands use, a second or two, with Ctrl-C counted rather than
    raised: a KeyboardInterrupt inside a C extension's import aborts the process or turns into
    an ImportError. A press meanwhile is raised once the imports are done."""
    presses: list[int] = []
    counting = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # not started with Ctrl-C ignored
    previous = signal.signal(signal.SIGINT, lambda signum, frame: presses.append(signum)) if counting else None
    try:
        from rnnjax.app import runs, sweep_runs, tasks  # noqa: F401  (they import JAX, Flax, optax)
    finally:
        if counting:
            signal.signal(signal.SIGINT, previous)
    if presses:
        raise KeyboardInterrupt


def _machine_failure(error: Exception) -> str | None:
    """What the machine could not do, for an out-of-memory or file-system error; else None."""
    if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error):
        return "out of memory; try a shorter sequence or a smaller batch"
    if isinstance(error, OSError):
        return _one_line(f"{error.filename}: {error.strerror}" if error.filename else error)
    return None


def _silence_libraries() -> tuple:
    """Keeps orbax's own reports off stderr, so that every refusal stays one line: its absl log
    records, asyncio's complaints about its tasks, and the exceptions its threads leave behind
    when a damaged checkpoint is read (what is wrong is in the one line). Returns what it
    replaced."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    replaced = (sys.unraisablehook, [(logger, logger.level) for logger in loggers])
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    return replaced


@contextlib.contextmanager
def _quiet_libraries():
    """``_silence_libraries`` while ``main`` runs, and everything as it was after."""
    hook, levels = _silence_libraries()
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for logger, level in levels:
            logger.setLevel(level)


def script() -> None:
    """The ``rnnjax`` program: ``main``, then exit with its status. The program stays quiet until
    the process ends: orbax's threads report at exit too."""
    _silence_libraries()
    sys.exit(main())

"""The run settings, each declared once: its type, range, command-line flag and help.

``SETTINGS`` is the one table. It builds the ``rnnjax`` command's options (``add_options``),
checks values given in Python (``check``) and the settings recorded in a run's checkpoint
(``check_record``), and it is the only code that knows flag names (``flag``,
``command_line_message``). Rules between settings live in ``check_run``.

It imports no JAX, so that ``rnnjax --help`` answers at once.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from rnnjax.app.inputs import parse_number
from rnnjax.core import checks
from rnnjax.core.checks import InputError

__all__ = ["Setting", "SETTINGS", "TASKS", "RECIPES", "METHODS", "PRECISIONS", "LR_RANGE", "MAX_STEP_NUMBERS",
           "COUNT_MAX_LENGTH", "EVAL_MAX_LENGTH", "check", "check_record", "check_run", "flag",
           "command_line_message", "add_options", "tasks_epilog"]

# The seed tasks and recipes by name, with one line each (rnnjax.app.tasks and
# rnnjax.training.recipes define them; a test keeps the names equal).
TASKS = {
    "l1": "seed 000: the L1 norm of variable-length N(0, 1) sequences, |x| made by negation",
    "count": "seed 003: the running count of ones in binary sequences, an output at every step",
    "l1-learned": "the L1 norm with |x| learned by a dense layer and a ReLU in front of the cell",
}
RECIPES = {
    "squared": "W_ih = v*v; Adam lr 0.1, b2 0.9999, cosine decay to 0.001 over 3000 steps; "
               "a fresh batch of 8 each step",
    "notebook": "seed 000's recipe: Adam lr 0.1, one fixed batch of 8, 3000 steps",
}
METHODS = ("sequential", "parallel", "auto")
PRECISIONS = ("compensated", "plain")
# A learning rate is used in float32: below its smallest normal number it is 0, and nothing moves.
LR_RANGE = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))
# The most numbers one training step's inputs may hold (train: batch size x length; sweep: seeds
# x batch size x length), refused before anything is compiled: beyond it the arrays do not fit a
# machine's memory, and compiling for them ran for minutes before failing.
MAX_STEP_NUMBERS = 10**8
COUNT_MAX_LENGTH = 2**24  # float32 counts are exact up to here
EVAL_MAX_LENGTH = 10**8  # 1e8 numbers: 0.8 GB in float64 for the reference, more in float32 copies
_INT_MAX = 2**31 - 1


class Setting(NamedTuple):
    """One setting.

    Attributes:
      name: its key in settings dicts and run records, and its Python keyword.
      flag: its command-line flag ("--max-length"), or the positional name ("task").
      check: ``(name, value) -> value``, raising ``InputError`` naming it.
      kind: ``int``, ``float``, ``str`` or ``bool`` (a switch): how the command line reads it,
        and the JSON type a run record holds.
      help: one line for ``--help``, or one per command.
      commands: the commands that take it.
      default: the command line's default, one for all or one per command (None: the recipe's
        or the task's, filled in by ``rnnjax.app.tasks.task_settings``).
      metavar: the placeholder ``--help`` shows.
      choices: the values a choice may take, listed by ``--help``.
      required: the command line must give it.
    """

    name: str
    flag: str
    check: Callable[[str, Any], Any]
    kind: type
    help: str | dict[str, str]
    commands: tuple[str, ...]
    default: Any = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    required: bool = False


def _integer(low: int, high: int = _INT_MAX) -> Callable[[str, Any], int]:
    return lambda name, value: checks.integer(name, value, low=low, high=high)


def _choice(options) -> Callable[[str, Any], str]:
    return lambda name, value: checks.choice(name, value, tuple(options))


def _choose(name: str, flag: str, options: dict | tuple, help_text, commands, default=None) -> Setting:
    return Setting(name, flag, _choice(options), str, help_text, commands, default, choices=tuple(options))


def _path(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"{name} must be a path; received {value!r}.", name)
    return value


def _switch(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False; received {value!r}.", name)
    return value


def _lr(name: str, value: Any) -> float:
    return checks.number(name, value, low=LR_RANGE[0], high=LR_RANGE[1])


def _tol(name: str, value: Any) -> float:  # a distance to the target weight 1: 0 is never within
    return checks.number(name, value, low=0, high=1, open_low=True, open_high=True)


def _b2(name: str, value: Any) -> float:
    return checks.number(name, value, low=0, high=1, open_high=True)


_TRAIN, _SWEEP = ("train",), ("sweep",)
SETTINGS = {row.name: row for row in [
    _choose("task", "task", TASKS, "the network: " + ", ".join(TASKS) + " (each below)", ("train", "eval", "sweep")),
    _choose("recipe", "--recipe", RECIPES,
            "how to train (default squared): " + "; ".join(f"{name}: {line}" for name, line in RECIPES.items()),
            ("demo", "train", "sweep"), {"demo": "squared"}),
    Setting("steps", "--steps", _integer(1), int,
            {"train": "step budget (default: the recipe's, 3000)",
             "sweep": "steps for every seed (default: the recipe's, 3000)"}, ("train", "sweep"), metavar="N"),
    Setting("lr", "--lr", _lr, float,
            f"Adam's (peak) learning rate (default: the recipe's, 0.1), from {LR_RANGE[0]:.4g} to "
            f"{LR_RANGE[1]:.4g} (float32's range)", ("train", "sweep"), metavar="X"),
    Setting("b2", "--b2", _b2, float, "Adam's second-moment decay: the recipe's", ()),
    Setting("batch_size", "--batch-size", _integer(1), int, "sequences in the batch (default 8)", _TRAIN,
            metavar="N"),
    Setting("length", "--max-length", _integer(1), int,
            "longest sequence (l1, default 10) or every sequence's length (count, default 5)", _TRAIN,
            metavar="N"),
    Setting("tol", "--tol", _tol, float,
            {"train": "stop once W_ih and W_hh are within TOL of 1 (default 1e-9: exactly 1.0 in float32, "
                      "which long sequences need; l1-learned: W_hh within TOL, its two slopes within "
                      "max(TOL, 1e-6))",
             "sweep": "a seed converged once W_ih and W_hh (l1-learned: its slopes and W_hh) are within "
                      "TOL of 1 (default 1e-3)"},
            ("train", "sweep"), {"train": 1e-9, "sweep": 1e-3}, "X"),
    Setting("skip_nonfinite", "--skip-nonfinite", _integer(0), int,
            "skip up to N non-finite updates in a row (optax.apply_if_finite) instead of stopping as "
            "diverged at the first (default 0)", _TRAIN, 0, "N"),
    Setting("dead_steps", "--dead-steps", _integer(1), int,
            "stop as dead after this many steps in a row with every gradient 0", (), 25),
    Setting("checkpoint_every", "--checkpoint-every", _integer(1), int,
            "save a checkpoint every N steps (default 1000); always at the end", _TRAIN, None, "N"),
    Setting("seed", "--seed", checks.seed, int,
            {"demo": "first seed to try (default 0)",
             "train": "first seed to try (default 0); a dead init draws again from the next seed",
             "eval": "seed of the random sequence of --length (default 0)"},
            ("demo", "train", "eval"), {"demo": 0}, "N"),
    Setting("first_seed", "--first-seed", checks.seed, int, "the first seed (default 0)", _SWEEP, 0, "N"),
    Setting("seeds", "--seeds", _integer(1), int, "how many seeds (default 1000)", _SWEEP, 1000, "N"),
    Setting("data_seed", "--data-seed", checks.seed, int,
            "every seed trains on this seed's batches (default: each on its own)", _SWEEP, None, "N"),
    Setting("devices", "--devices", _integer(1), int,
            {"train": "spread each batch over the first N of JAX's devices (default: all of them)",
             "sweep": "spread the seeds over the first N of JAX's devices (default: all of them)"},
            ("train", "sweep"), None, "N"),
    Setting("out", "--out", _path, str,
            {"train": "run folder: checkpoints/, metrics.json and training.png",
             "sweep": "folder for sweep.json and sweep.png"}, ("train", "sweep"), None, "DIR"),
    Setting("resume", "--resume", _switch, bool, "continue the run in --out from its last checkpoint",
            _TRAIN, False),
    Setting("overwrite", "--overwrite", _switch, bool,
            {"train": "replace the run in --out", "sweep": "replace the sweep in --out"}, ("train", "sweep"),
            False),
    Setting("params", "--params", _path, str,
            "a run folder written by 'rnnjax train --out', or one of its checkpoints/<step>", ("eval",), None,
            "DIR", required=True),
    Setting("sequence_length", "--length", _integer(1, EVAL_MAX_LENGTH), int,
            f"draw a random sequence this long (count: at most {COUNT_MAX_LENGTH:,})", ("eval",), None, "N"),
    Setting("input", "--input", _path, str, "a .npy, .csv or .txt file of numbers (count: 0s and 1s)",
            ("eval",), None, "FILE"),
    _choose("method", "--method", METHODS,
            "default auto: the parallel scan from 256 steps on a CPU, the loop below; with "
            "--precision compensated either is within 2 ulps (2.4e-7 relative) of the exact L1 "
            "norm at every length up to 1e8 and inputs of magnitude 1e-6 to 1e6",
            ("eval",), "auto"),
    _choose("precision", "--precision", PRECISIONS,
            "default compensated: each step as if in twice float32's precision (float64 on a CPU "
            "or GPU), then rounded once; plain rounds every operation in float32 (the loop "
            "drifts past 1e-6 by 1e5 steps, the scan's error depends on its block size)",
            ("eval",), "compensated"),
]}
# What a run record's "settings" hold (rnnjax.app.runs), each checked by its row.
RECORDED = ("recipe", "steps", "lr", "b2", "batch_size", "length", "tol", "skip_nonfinite", "dead_steps",
            "checkpoint_every")


def flag(name: str) -> str:
    """The command-line flag of setting ``name`` (the name itself if it has none)."""
    return SETTINGS[name].flag if name in SETTINGS else name


def check(name: str, value: Any) -> Any:
    """Returns ``value`` checked by setting ``name``'s row, or raises ``InputError`` naming it."""
    return SETTINGS[name].check(name, value)


def check_record(record: dict) -> list[str]:
    """Returns the names of the recorded settings that are missing, of the wrong JSON type, or
    out of range: a run record holds what ``check`` accepts, as its kind (a float as a float)."""
    bad = [name for name in RECORDED if name not in record]
    bad += [name for name in record if name not in RECORDED]
    for name in RECORDED:
        value = record.get(name)
        if name in bad or type(value) is not SETTINGS[name].kind:
            bad.append(name) if name not in bad else None
            continue
        try:
            check(name, value)
        except InputError:
            bad.append(name)
    return bad


def check_run(settings: dict, *, task: str, devices: int | None = None, seeds: int = 1,
              resumed: bool = False) -> None:
    """The rules between settings, for a run of ``task`` (``seeds`` at once, spread over
    ``devices``; ``resumed``: its batch size is the run's): a step's inputs at most
    ``MAX_STEP_NUMBERS`` numbers, a count sequence at most ``COUNT_MAX_LENGTH`` long, and the
    batch split evenly over the devices. Messages name the settings in backquotes, which the
    command line shows as its flags."""
    batch_size, length = settings["batch_size"], settings["length"]
    numbers = seeds * batch_size * length
    if numbers > MAX_STEP_NUMBERS:
        parts = (f"`seeds` {seeds:,} x {batch_size:,} sequences x {length:,} steps" if seeds > 1
                 else f"`batch_size` {batch_size:,} x `length` {length:,}")
        raise InputError(f"{parts} is {numbers:,} numbers a step, more than the {MAX_STEP_NUMBERS:,} rnnjax "
                         "trains on at once; give smaller values", "seeds" if seeds > 1 else "batch_size")
    if task == "count" and length > COUNT_MAX_LENGTH:
        raise InputError(f"`length` {length}: a count sequence is at most {COUNT_MAX_LENGTH:,} long "
                         "(float32 counts are exact up to there)", "length")
    if devices is not None and seeds == 1 and batch_size % devices:
        other = "" if resumed else f"a `batch_size` that is a multiple of {devices}, or "
        raise InputError(f"`batch_size` {batch_size} does not split evenly over {devices} devices; give "
                         f"{other}`devices` that divide {batch_size}", "devices" if resumed else "batch_size")


def command_line_message(error: InputError) -> str:
    """``error``'s message as the command line shows it: the setting it is about, where it
    begins the message, and every setting named in backquotes, written as their flags."""
    message = str(error)
    if error.name in SETTINGS and re.match(rf"{re.escape(error.name)}[ :]", message):
        message = SETTINGS[error.name].flag + message[len(error.name):]
    return re.sub(r"`(\w+)`", lambda m: flag(m.group(1)) if m.group(1) in SETTINGS else m.group(1), message)


def add_options(parser: argparse.ArgumentParser, command: str, *, groups: dict | None = None) -> None:
    """Adds the options of ``command`` to ``parser``: each row that names the command, with
    a type that parses the text and checks the value by the row; ``groups`` maps a setting's
    name to the argument group (e.g. a mutually exclusive one) it goes in."""
    for row in SETTINGS.values():
        if command not in row.commands:
            continue
        target = (groups or {}).get(row.name, parser)
        default = row.default.get(command) if isinstance(row.default, dict) else row.default
        help_text = row.help.get(command, "") if isinstance(row.help, dict) else row.help
        if row.kind is bool:
            target.add_argument(row.flag, action="store_true", help=help_text)
            continue
        options = {"choices": row.choices, "metavar": row.metavar, "required": row.required or None,
                   "dest": row.name if row.flag.startswith("--") else None}
        target.add_argument(row.flag, type=None if row.choices else _from_text(row), default=default,
                            help=help_text, **{k: v for k, v in options.items() if v is not None})


def tasks_epilog() -> str:
    """The tasks, one line each, for the end of a command's ``--help``."""
    width = max(map(len, TASKS))
    return "tasks:\n" + "\n".join(f"  {name:{width}}  {line}" for name, line in TASKS.items())


def _from_text(row: Setting) -> Callable[[str], Any]:
    """argparse's ``type`` for ``row``: the text read as its kind (None if it is not one), then
    checked by the row; a refusal says what the row expects."""
    def parse(text: str) -> Any:
        value: Any = text
        if row.kind is int:
            value = int(text) if re.fullmatch(r"[0-9]{1,30}", text) else None
        elif row.kind is float:
            try:
                value = parse_number(text)
            except ValueError:
                value = None
        try:
            return check(row.name, value)
        except InputError as e:
            expected = str(e).partition(" must be ")[2].partition("; received")[0]
            raise argparse.ArgumentTypeError(f"expected {expected}; received {_quote(text)}") from None

    parse.__name__ = row.name  # argparse names the type in some messages
    return parse


def _quote(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")

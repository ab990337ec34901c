"""rnnjax.RNN against the function beneath it (``rnnjax.rnn``) and flax's ``nn.RNN``.

The L1 network (|x| by negation, a one-unit cell, its final carry regressed on the L1 norm) at
T = 1e4, batches 1 and 8: forward pass and training step (forward, backward, Adam 0.1), each
way of running the cell timed in alternation, call by call (``timing.measure_alternating``),
compile time apart. Cells: ``ReLUCell(1)`` (the sequential method, which ``nn.RNN`` has too)
and ``nn.LSTMCell(1)``. rnnjax runs with ``precision="plain"``, the arithmetic ``nn.RNN`` does;
"RNN compensated" is ``rnnjax.RNN`` at its default, ``precision="compensated"`` (which changes
only a ReLU cell). It also compiles the ReLU network's training step through
``rnnjax.RNN`` and through ``rnn`` and says whether the two programs are the same (XLA's
optimised HLO, source metadata aside).

    python benchmarks/flax_module.py                         # T = 1e4, batches 1 and 8 (~1 min)
    python benchmarks/flax_module.py --lengths 1000 10000 --batches 1 8 64

Writes ``flax_module.json`` and ``flax_module.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
from timing import machine, measure_alternating  # noqa: E402

from rnnjax import RNN, ReLUCell, rnn  # noqa: E402
from rnnjax.app.folders import write_atomically  # noqa: E402
from rnnjax.training.data import Batch  # noqa: E402
from rnnjax.training.fit import init_state, make_train_step  # noqa: E402

CELLS = {"ReLUCell(1)": lambda **kw: ReLUCell(1, **kw), "nn.LSTMCell(1)": lambda **kw: nn.LSTMCell(1, **kw)}
WAYS = ("rnnjax.rnn", "rnnjax.RNN", "flax nn.RNN", "RNN compensated")
MODES = ("forward", "train")


class L1Network(nn.Module):
    """Sums ``|x|`` with a one-unit cell run one of ``WAYS``; returns the final carry's output."""

    cell: str
    way: str

    @nn.compact
    def __call__(self, xs, lengths=None):
        magnitudes = jnp.where(xs < 0, -xs, xs)[..., None]
        if self.way == "rnnjax.rnn":  # the weights passed in, as rnnjax's models did before RNN
            cell = CELLS[self.cell](parent=None)
            carry = cell.initialize_carry(jax.random.key(0), magnitudes[:, 0].shape)
            weights = self.param("cell", lambda key: cell.init(key, carry, magnitudes[:, 0])["params"])
            carry, _ = rnn(cell, {"params": weights}, magnitudes, lengths, method="sequential", precision="plain")
        elif self.way == "flax nn.RNN":
            layer = nn.RNN(CELLS[self.cell]())
        else:
            precision = "plain" if self.way == "rnnjax.RNN" else "compensated"
            layer = RNN(CELLS[self.cell](), method="sequential", precision=precision)
        if self.way != "rnnjax.rnn":
            carry, _ = layer(magnitudes, seq_lengths=lengths, return_carry=True)
        return (carry[1] if isinstance(carry, tuple) else carry)[:, 0]  # an LSTM's carry is (c, h)


def _batch(time: int, batch: int) -> Batch:
    xs, targets = baselines.problem(time, batch)
    return Batch(jnp.asarray(xs), jnp.full((batch,), time, jnp.int32), jnp.asarray(targets))


def same_program(time: int, batch: int) -> bool:
    """Whether the ReLU network's training step compiles to one program through ``rnnjax.RNN``
    and through ``rnnjax.rnn`` (the optimised HLO, without its source metadata)."""
    texts = []
    for way in ("rnnjax.rnn", "rnnjax.RNN"):
        model, optimizer, data = L1Network("ReLUCell(1)", way), optax.adam(0.1), _batch(time, batch)
        state = init_state(model, optimizer, jax.random.key(3), data)
        texts.append(_program(make_train_step(model, optimizer).lower(state, data).compile().as_text()))
    return texts[0] == texts[1]


def _program(hlo: str) -> str:
    """XLA's optimised HLO without what names the source: metadata, the tables of source files
    and frames, and the arguments' names (their pytree paths), numbered in order instead."""
    hlo = re.sub(r", metadata=\{[^}]*\}|^HloModule \S+", "", hlo, flags=re.M)
    hlo = "\n".join(line for line in hlo.splitlines()
                    if not re.match(r"\s*\d+ |(FileNames|FunctionNames|FileLocations|StackFrames)$", line))
    names = {}
    return re.sub(r"\bstate_[\w.]+", lambda m: names.setdefault(m.group(), f"argument_{len(names)}"), hlo)


def run(lengths, batches, budget_s: float) -> list[dict]:
    rows = []
    for cell, time, batch in itertools.product(CELLS, sorted(lengths), batches):
        xs, targets = baselines.problem(time, batch)
        closures = {way: baselines._jax_closures(L1Network(cell, way), xs, targets) for way in WAYS}
        for index, mode in enumerate(MODES):
            timed = measure_alternating({way: (fns[index], fns[2]) for way, fns in closures.items()},
                                        budget_s=budget_s)
            for way, result in timed.items():
                rows.append({"cell": cell, "way": way, "mode": mode, "time": time, "batch": batch, **result})
                print(f"{cell:15s} {way:12s} {mode:7s} T={time:<7d} B={batch:<4d} {result['median_ms']:9.4f} ms")
    return rows


def markdown(rows, info, same) -> str:
    out = [f"Machine: {info['device']} ({info['backend']}); CPU {info['cpu']}, {info['cpu_count']} cores; "
           f"jax {info['jax']}; {info['date']}.", "",
           "Median ms of one call without compile time (first call, ms, in brackets); the three ways of "
           "a row timed in alternation. RNN / rnn near 1 means the module costs nothing; nn.RNN / RNN "
           "above 1 means rnnjax.RNN is the faster.", "",
           "| cell | mode | T | batch | rnnjax.rnn | rnnjax.RNN | flax nn.RNN | RNN compensated | RNN / rnn "
           "| nn.RNN / RNN | compensated / RNN |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["cell"], r["mode"], r["time"], r["batch"])  # noqa: E731
    for group in sorted({key(r) for r in rows}, key=lambda k: (k[0], MODES.index(k[1]), k[2], k[3])):
        found = {r["way"]: r for r in rows if key(r) == group}
        cells = [f"{found[w]['median_ms']:.4g} ({found[w]['first_call_ms']:.0f})" for w in WAYS]
        module, function, flax, compensated = (found[w]["median_ms"] for w in WAYS[1::-1] + WAYS[2:])
        out.append(f"| {group[0]} | {group[1]} | {group[2]:.0e} | {group[3]} | " + " | ".join(cells)
                   + f" | {module / function:.2f} | {flax / module:.2f} | {compensated / module:.2f} |")
    out += ["", f"The ReLU network's training step through rnnjax.RNN and through rnnjax.rnn compiles to "
                f"{'the same' if same else 'a different'} program (optimised HLO without metadata)."]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[10_000])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--budget-s", type=float, default=3.0, help="seconds of repeats per row")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cpu")
    args = parser.parse_args(argv)
    info = machine()
    rows = run(args.lengths, args.batches, args.budget_s)
    same = same_program(min(args.lengths), max(args.batches))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": info, "command": " ".join(sys.argv), "same_program": same, "rows": rows}
    write_atomically(args.out / "flax_module.json", lambda f: f.write(json.dumps(report, indent=1)), mode="w")
    write_atomically(args.out / "flax_module.md", lambda f: f.write(markdown(rows, info, same)), mode="w")
    print(markdown(rows, info, same))


if __name__ == "__main__":
    main()

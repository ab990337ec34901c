"""Benchmark suite: rnnjax against flax nn.RNN, torch nn.RNN and the seed's PyTorch loop.

For each sequence length T and batch size, times the forward pass and the training step
(forward, backward, Adam update) of the L1-norm network, every implementation in the same run.
Compile time (the first call) is reported apart; times are medians of repeats after a warm-up,
each synchronised (``block_until_ready`` / ``torch.cuda.synchronize``); the two rnnjax
methods are timed in alternation, call by call, so that their ratio sees the same machine. A
configuration whose predicted time or memory is over budget is skipped, and the table says why.
The training step at T = 1e5, batch 1024 is also compiled (not run) for each method to read its
temporary memory.

    python benchmarks/suite.py                                   # the whole grid (~12 min, 2 cores)
    python benchmarks/suite.py --lengths 10000 --batches 1 8     # the 10,000-step sequence only

Writes ``results.json``, ``results.md`` and ``time_vs_length.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
from pathlib import Path

# JAX takes 75% of a GPU's memory when it starts; torch's baselines need room beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import baselines  # noqa: E402
from timing import machine, measure, measure_alternating  # noqa: E402

from rnnjax import ReLUCell  # noqa: E402
from rnnjax.core.recurrence import AUTO_PARALLEL_FROM, resolve_method  # noqa: E402
from rnnjax.app.folders import write_atomically  # noqa: E402

SEQUENTIAL, PARALLEL = "rnnjax sequential", "rnnjax blocked parallel"
IMPLEMENTATIONS = {
    SEQUENTIAL: baselines.rnnjax_model("sequential"),
    PARALLEL: baselines.rnnjax_model("parallel"),
    "flax nn.RNN": baselines.flax_rnn,
    "torch nn.RNN": baselines.torch_rnn,
    "seed loop": baselines.torch_seed_loop,
}
TORCH = {"torch nn.RNN", "seed loop"}
MODES = ("forward", "train")
# float32 arrays of (batch, time) that each implementation holds at once, roughly (inputs,
# mask, states, and in training the residuals and the blocked copies).
ARRAYS = {("forward", False): 4, ("forward", True): 6, ("train", False): 10, ("train", True): 12}
MEMORY_CHECK = (100_000, 1024)  # (T, batch) of the training step whose compiled memory is read
# The default grids: on a CPU the whole one; on a GPU that of benchmarks/results/gpu (about 4
# minutes on an H200), where the loop takes seconds a call from 1e5 steps on and the seed loop
# a Python step each, with half of the GPU's memory left to torch (below).
CPU_GRID = {"lengths": [100, 1000, 10_000, 100_000, 1_000_000], "batches": [1, 8, 1024],
            "budget_s": 0.5, "max_call_s": 2.0, "accuracy_lengths": [10**6, 10**7, 10**8],
            "memory_gb": 6.0, "seed_loop_max_length": 10_000}
GPU_GRID = {"lengths": [1000, 10_000, 100_000, 1_000_000], "batches": [1, 8, 65_536],
            "budget_s": 0.3, "max_call_s": 1.5, "accuracy_lengths": [10**6],
            "memory_gb": 60.0, "seed_loop_max_length": 1000}


def rnnjax_label(time: int) -> str:
    """The rnnjax method that "auto" picks for ``time`` steps here: the one ratios compare with."""
    method = resolve_method(ReLUCell(1), "auto", time=time)
    return SEQUENTIAL if method == "sequential" else PARALLEL


def skip_reason(name, mode, time, batch, previous, args) -> str | None:
    if name in TORCH and importlib.util.find_spec("torch") is None:
        return "torch not installed (pip install torch, the bench extra)"
    if name == "seed loop" and time > args.seed_loop_max_length:
        return f"seed loop only up to T = {args.seed_loop_max_length:.0e} (a Python step per element)"
    gigabytes = 4 * time * batch * ARRAYS[mode, name == PARALLEL] / 1e9
    if gigabytes > args.memory_gb:
        return f"needs ~{gigabytes:.0f} GB > {args.memory_gb:.0f} GB memory budget"
    if previous is not None:
        predicted = previous[1] * time / previous[0] / 1e3
        if predicted > args.max_call_s:
            return f"predicted {predicted:.0f} s a call > {args.max_call_s:.0f} s budget"
    return None


def run_grid(args, bar) -> list[dict]:
    """Times every implementation at one (batch, T) before the next, so that a ratio compares
    times taken seconds apart (this machine's speed drifts by up to 2x over minutes), and the
    two rnnjax methods in alternation, call by call (``measure_alternating``): their ratio is
    what issue 6's targets are stated in."""
    rows = []
    previous = {}  # (implementation, batch, mode): (time, median ms) of the last one measured
    for batch, time in itertools.product(args.batches, sorted(args.lengths)):
        problem = None
        for group in _alternated(args.implementations):
            closures = {}
            for mode_index, mode in enumerate(MODES):
                group_rows, runnable = {}, {}
                for name in group:
                    group_rows[name] = {"implementation": name, "mode": mode, "time": time,
                                        "batch": batch}
                    reason = skip_reason(name, mode, time, batch,
                                         previous.get((name, batch, mode)), args)
                    if reason is not None:
                        group_rows[name]["skipped"] = reason
                        continue
                    if name not in closures:
                        problem = problem or baselines.problem(time, batch)
                        closures[name] = IMPLEMENTATIONS[name](*problem)
                    runnable[name] = closures[name][mode_index], closures[name][2]
                results = measure_alternating(runnable, budget_s=args.budget_s * len(runnable))
                for name, row in group_rows.items():
                    result = results.get(name)
                    if isinstance(result, Exception):
                        message = str(result).splitlines()[0][:120] if str(result) else ""
                        row["skipped"] = f"failed: {type(result).__name__}: {message}"
                    elif result is not None:
                        row.update(result)
                        previous[name, batch, mode] = (time, row["median_ms"])
                    rows.append(row)
                    shown = (f"{row['median_ms']:10.3f} ms" if "median_ms" in row
                             else f"skipped ({row['skipped']})")
                    bar.write(f"{name:24s} {mode:7s} T={time:<8d} B={batch:<6d} {shown}")
                    bar.update()
            del closures
    return rows


def _alternated(names: list[str]) -> list[list[str]]:
    """``names`` in groups timed together: the rnnjax methods as one, each other alone."""
    pair = [name for name in names if name in (SEQUENTIAL, PARALLEL)]
    return [[name] if name not in pair else pair for name in names
            if name not in pair[1:]]


def compiled_memory_gb(time: int, batch: int) -> dict[str, float]:
    """Temporary memory of each rnnjax method's compiled training step, in GB (compiled, not run)."""
    return {name: baselines.train_step_memory(name.split()[-1], time, batch) / 1e9
            for name in (SEQUENTIAL, PARALLEL)}


def copy_bandwidth_gbs() -> float:
    """Device memory bandwidth from a large elementwise copy (bytes read plus bytes written)."""
    x = jnp.ones(2**28, jnp.float32)  # 1 GiB
    copy = jax.jit(lambda v: v + 1)
    stats = measure(lambda: copy(x), budget_s=1.0)
    return 2 * x.nbytes / (stats["median_ms"] / 1e3) / 1e9


def lookup(rows, name, mode, time, batch):
    for row in rows:
        if (row["implementation"], row["mode"], row["time"], row["batch"]) == (name, mode, time, batch):
            return row.get("median_ms")
    return None


def add_ratios(rows) -> None:
    """Adds ``ratio_to_rnnjax``: the time over rnnjax auto's (the method it picks at that T)."""
    for row in rows:
        base = lookup(rows, rnnjax_label(row["time"]), row["mode"], row["time"], row["batch"])
        if "median_ms" in row and base:
            row["ratio_to_rnnjax"] = row["median_ms"] / base


def check_targets(rows, info, memory=None) -> list[str]:
    """The issues' targets, each as a line saying met or missed, with the figure."""
    lines = []

    def verdict(ok):
        return "met" if ok else "MISSED"

    def faster_than(other, mode, time, batch, target):
        a, b = lookup(rows, other, mode, time, batch), lookup(rows, rnnjax_label(time), mode, time, batch)
        if a is None or b is None:
            lines.append(f"- {mode} T={time} B={batch}: {other} / rnnjax >= {target}x: not measured")
        else:
            lines.append(f"- {mode} T={time} B={batch}: {other} / rnnjax = {a / b:,.1f}x "
                         f"(target >= {target}x): {verdict(a / b >= target)}")

    if info["backend"] == "cpu":
        faster_than("seed loop", "train", 10_000, 8, 1000)
        faster_than("torch nn.RNN", "train", 10_000, 8, 100)
        for mode in MODES:
            for batch in (1, 8):
                for time in sorted({r["time"] for r in rows if r["time"] >= 10_000}):
                    a, b = (lookup(rows, n, mode, time, batch) for n in (PARALLEL, SEQUENTIAL))
                    limit = 2.0 if time < 100_000 else 1.5
                    if a is not None and b is not None:
                        lines.append(f"- {mode} T={time:.0e} B={batch}: parallel / sequential = "
                                     f"{a / b:.2f}x (target <= {limit}x): {verdict(a / b <= limit)}")
        first = next((r["first_call_ms"] for r in rows if r["implementation"] == PARALLEL
                      and r["mode"] == "forward" and r["time"] == 10**6 and "first_call_ms" in r), None)
        if first is not None:
            lines.append(f"- first call of the parallel forward at T=1e6: {first / 1e3:.1f} s "
                         f"(target < 5 s): {verdict(first < 5e3)}")
    else:
        faster_than("torch nn.RNN", "train", 10_000, 1, 20)
        t = lookup(rows, PARALLEL, "forward", 1_000_000, 1)
        lines.append("- forward T=1e6 B=1 under 1 ms: "
                     + ("not measured" if t is None else f"{t:.3f} ms: {verdict(t < 1)}"))
        t = lookup(rows, PARALLEL, "forward", 10_000, 65_536)
        if t is not None and "bandwidth_gbs" in info:
            floor = 4 * 10_000 * 65_536 / (info["bandwidth_gbs"] * 1e9) * 1e3
            lines.append(f"- forward T=1e4 B=65536 within 3x of the bandwidth floor {floor:.3f} ms: "
                         f"{t:.3f} ms = {t / floor:.2f}x: {verdict(t <= 3 * floor)}")
    if memory:
        lines.append(f"- training step T={MEMORY_CHECK[0]:.0e} B={MEMORY_CHECK[1]} compiles to "
                     f"{memory[PARALLEL]:.2f} GB of temporary memory (sequential "
                     f"{memory[SEQUENTIAL]:.2f} GB; target < 3 GB): {verdict(memory[PARALLEL] < 3)}")
    return lines


def accuracy_targets(errors) -> list[str]:
    """The accuracy target: auto's L1 norm within 1e-6 of the float64 sum at each length."""
    lines = []
    for row in errors:
        if row["method"] == "auto":
            ok = row["relative_error"] <= accuracy.TARGET
            lines.append(f"- L1 norm T={row['time']:.0e} B=1, auto ({row['picked']}): relative error "
                         f"{row['relative_error']:.1e} (target <= 1e-6): {'met' if ok else 'MISSED'}")
    return lines


def markdown(rows, info, targets, errors=()) -> str:
    names = [n for n in IMPLEMENTATIONS if any(r["implementation"] == n for r in rows)]
    baselines_shown = [n for n in names if n not in (SEQUENTIAL, PARALLEL)]
    out = [f"Machine: {info['device']} ({info['backend']}); CPU {info['cpu']}, {info['cpu_count']} cores; "
           f"jax {info['jax']}, torch {info['torch']}; {info['date']}.",
           "Medians in ms; compile time is not included (see below). Ratios are measured in the same "
           "run: the blocked parallel scan over the sequential loop, and each baseline over rnnjax "
           "auto (" + (f"sequential below {AUTO_PARALLEL_FROM} steps on a CPU, the parallel scan from "
                       "there)." if info["backend"] == "cpu" else "the parallel scan at every length "
                       "on an accelerator)."), ""]
    skipped = {}

    def cell(row):
        if "median_ms" in row:
            return f"{row['median_ms']:.4g}"
        mark = skipped.setdefault(row["skipped"], f"s{len(skipped) + 1}")
        return f"skip ({mark})"

    for mode in MODES:
        out += [f"### {mode}" + (" (forward, backward, Adam update)" if mode == "train" else ""), ""]
        out.append("| T | batch | " + " | ".join(f"{n} ms" for n in names) + " | parallel / sequential | "
                   + " | ".join(f"{n} / rnnjax" for n in baselines_shown) + " |")
        out.append("|" + "---|" * (3 + len(names) + len(baselines_shown)))
        for time, batch in sorted({(r["time"], r["batch"]) for r in rows}):
            found = {n: next(r for r in rows if (r["implementation"], r["mode"], r["time"], r["batch"])
                             == (n, mode, time, batch)) for n in names}
            par, seq = (found.get(n, {}).get("median_ms") for n in (PARALLEL, SEQUENTIAL))
            ratios = [f"{par / seq:.2f}x" if par and seq else "—"]
            ratios += [f"{found[n]['ratio_to_rnnjax']:,.1f}x" if "ratio_to_rnnjax" in found[n] else "—"
                       for n in baselines_shown]
            out.append(f"| {time:.0e} | {batch} | " + " | ".join(cell(found[n]) for n in names)
                       + " | " + " | ".join(ratios) + " |")
        out.append("")
    out += ["### first call (trace + compile + one run), ms", "",
            "| T | batch | mode | " + " | ".join(n for n in names if n not in TORCH) + " |",
            "|" + "---|" * (3 + len([n for n in names if n not in TORCH]))]
    for time, batch in sorted({(r["time"], r["batch"]) for r in rows}):
        for mode in MODES:
            cells = []
            for n in names:
                if n in TORCH:
                    continue
                row = next(r for r in rows if (r["implementation"], r["mode"], r["time"], r["batch"]) == (n, mode, time, batch))
                cells.append(f"{row['first_call_ms']:.0f}" if "first_call_ms" in row else "—")
            out.append(f"| {time:.0e} | {batch} | {mode} | " + " | ".join(cells) + " |")
    if errors:
        out += ["", "### accuracy (L1 norm, both weights 1, N(0, 1) inputs, batch 1)", ""]
        out += accuracy.table(errors)
    out += ["", "Skipped:"] + [f"- {mark}: {reason}" for reason, mark in skipped.items()]
    out += ["", "Targets:"] + targets
    return "\n".join(out) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(MODES), len(batches), figsize=(4.2 * len(batches), 7),
                             squeeze=False, layout="constrained")
    for i, mode in enumerate(MODES):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            for name in IMPLEMENTATIONS:
                points = sorted((r["time"], r["median_ms"]) for r in rows if r["implementation"] == name
                                and r["mode"] == mode and r["batch"] == batch and "median_ms" in r)
                if points:
                    ax.loglog(*zip(*points), marker="o", label=name)
            ax.set(title=f"{mode}, batch {batch}", xlabel="sequence length T", ylabel="median ms")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    write_atomically(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)


def main(argv=None) -> None:
    on_gpu = jax.default_backend() == "gpu"
    grid = GPU_GRID if on_gpu else CPU_GRID
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=grid["lengths"])
    parser.add_argument("--batches", type=int, nargs="+", default=grid["batches"])
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    parser.add_argument("--budget-s", type=float, default=grid["budget_s"], help="timing budget per configuration")
    parser.add_argument("--max-call-s", type=float, default=grid["max_call_s"], help="skip calls predicted slower than this")
    parser.add_argument("--accuracy-lengths", type=int, nargs="*", default=grid["accuracy_lengths"],
                        help="lengths at which the L1 norm's accuracy is checked (batch 1)")
    parser.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                        help="skip compiling the T=1e5, batch 1024 training step for its memory")
    parser.add_argument("--memory-gb", type=float, default=grid["memory_gb"], help="skip configurations needing more")
    parser.add_argument("--seed-loop-max-length", type=int, default=grid["seed_loop_max_length"])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / jax.default_backend())
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    info = machine()
    if on_gpu:
        info["bandwidth_gbs"] = copy_bandwidth_gbs()
    print(json.dumps(info))
    total = (len(args.implementations) * len(args.batches) * len(args.lengths) * len(MODES)
             + len(args.accuracy_lengths) * len(accuracy.METHODS) + args.memory_check)
    with tqdm(total=total, unit="step", desc="benchmarks") as bar:
        rows = run_grid(args, bar)
        errors = accuracy.measure(args.accuracy_lengths, [0], bar)
        memory = None
        if args.memory_check:
            memory = compiled_memory_gb(*MEMORY_CHECK)
            bar.update()
    add_ratios(rows)
    targets = check_targets(rows, info, memory) + accuracy_targets(errors)
    table = markdown(rows, info, targets, errors)
    report = json.dumps({"machine": info, "results": rows, "compiled_memory_gb": memory,
                         "accuracy": errors, "targets": targets}, indent=1)
    write_atomically(args.out / "results.json", lambda f: f.write(report), mode="w")
    write_atomically(args.out / "results.md", lambda f: f.write(table), mode="w")
    plot(rows, args.out / "time_vs_length.png")
    print(table)


if __name__ == "__main__":
    main()

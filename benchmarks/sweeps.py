"""Seed sweeps: how often each recipe trains each task, over 1,000 random inits, and how much
faster a sweep is than calling ``fit`` once per seed.

    python benchmarks/sweeps.py rates [--seeds 1000] [--tasks ...] [--recipes ...] [--tols ...]
    python benchmarks/sweeps.py speed [--seeds 1000] [--fit-seeds 20] [--task l1] [--recipe squared]

``rates`` writes rates.json, rates.md and one PNG per task and recipe; ``speed`` writes
speed.json and speed.md; both under ``--out`` (default benchmarks/results/sweeps).
benchmarks/SWEEPS.md explains the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import machine  # noqa: E402

from rnnjax.training.recipes import RECIPES, Recipe, sweep_recipe  # noqa: E402
from rnnjax.app.folders import write_atomically  # noqa: E402
from rnnjax.training.sweep import SweepResult, summarize  # noqa: E402
from rnnjax.app.sweep_plot import plot_sweep  # noqa: E402
from rnnjax.app.sweep_runs import landscape  # noqa: E402
from rnnjax.app.tasks import TASKS, parts, sweep_task, task_settings  # noqa: E402
from rnnjax.training.fit import StepOptions, fit  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "sweeps"


def _square_recurrent_too(params):
    """W_ih = v*v and W_hh = u*u: both weights non-negative."""
    return jax.tree_util.tree_map_with_path(
        lambda path, w: w * w if getattr(path[-2], "key", None) == "cell" else w, params)


class WithGradientNoise(NamedTuple):
    """A recipe with Gaussian noise added to every gradient (``optax.add_noise``: variance
    ``eta / (1 + step) ** gamma``), to shake runs out of flat traps; measured on l1-learned."""

    base: Recipe
    eta: float
    gamma: float

    def __getattr__(self, name):  # everything else as the base recipe has it
        return getattr(self.base, name)

    @property
    def name(self):
        return f"{self.base.name}-noise"

    @property
    def summary(self):
        return f"{self.base.summary}; gradient noise eta {self.eta:g}, gamma {self.gamma:g}"

    def optimizer(self, lr=None):
        return optax.chain(optax.add_noise(self.eta, self.gamma, 0), self.base.optimizer(lr))


# Recipes measured on the way to "squared" (benchmarks/SWEEPS.md); not offered by the library.
VARIANTS = {
    "fresh-b2": RECIPES["notebook"]._replace(  # main's train default before issue 8
        name="fresh-b2", summary="Adam lr 0.1, b2 0.9999, a fresh batch each step",
        b2=0.9999, fresh_batches=True),
    "squared-constant-lr": RECIPES["squared"]._replace(
        name="squared-constant-lr", summary="squared without the cosine decay", decay_steps=None),
    "squared-fixed-batch": RECIPES["squared"]._replace(
        name="squared-fixed-batch", summary="squared on one fixed batch per run", fresh_batches=False),
    "squared-both": RECIPES["squared"]._replace(
        name="squared-both", summary="squared, and W_hh = u*u too", transform=_square_recurrent_too),
    "squared-noise": WithGradientNoise(RECIPES["squared"], eta=0.1, gamma=0.55),
}
ALL_RECIPES = {**RECIPES, **VARIANTS}


def sweep_with(task: str, recipe: Recipe, *, seeds: int, steps: int | None, tol: float, data_seed: int | None,
               progress: bool) -> tuple[dict, SweepResult]:
    """Sweeps ``task`` trained by ``recipe``, one of RECIPES or a variant measured here."""
    spec = TASKS[task]
    result = sweep_recipe(recipe, spec.model(), lambda key, n: spec.batch(key, n, spec.length), seeds=seeds,
                          steps=steps, watch=spec.watch, tol=tol, data_seed=data_seed, progress=progress)
    return {"recipe": recipe.name, "steps": result.steps, "length": spec.length, "tol": tol}, result


def describe(task: str, result: SweepResult) -> dict:
    """The summary, and for l1-learned how the outcome splits by the init's dense layer."""
    summary = summarize(result)
    summary["exactly_1_at_end"] = float(np.mean(np.all(
        [w == result.target for w in result.final_weights.values()], axis=0)))
    if "cell/W_hh" in result.final_weights:  # where the runs that stop short end
        stuck = result.outcome == "stuck"
        summary["stuck_with_W_hh_below_0"] = int((stuck & (result.final_weights["cell/W_hh"] < 0)).sum())
    summary["converged_then_left"] = int(((result.outcome == "converged") & ~np.all(
        [np.abs(w - result.target) < result.tol for w in result.final_weights.values()], axis=0)).sum())
    if task == "l1-learned":
        initial = result.initial_weights
        both_ways = (initial["slope_pos"] > 0) & (initial["slope_neg"] > 0)
        converged = result.outcome == "converged"
        final = result.final_weights
        # under "squared" the cell's input weights are >= 0, so this means one dense unit faces
        # x > 0 and the other x < 0
        summary["both_slopes_positive_at_init"] = int(both_ways.sum())
        summary["converged_of_those"] = int((converged & both_ways).sum())
        summary["converged_of_the_others"] = int((converged & ~both_ways).sum())
        summary["failed_with_a_zero_slope"] = int(
            (~converged & ((final["slope_pos"] == 0) | (final["slope_neg"] == 0))).sum())
    return summary


def plot(task: str, recipe: str, settings: dict, result: SweepResult, out: Path) -> Path:
    grid, plane, drawn = landscape(task, settings, result)
    path = out / f"{task}-{recipe}.png"
    title = (f"{task}, recipe {recipe}: {len(result.seeds)} seeds, {result.steps} steps "
             f"(landscape: loss on 1,024 sequences)")
    write_atomically(path, lambda f: plot_sweep(drawn, f, landscape=grid, plane=plane, title=title))
    return path


def rates(args) -> None:
    rows = []
    for task in args.tasks:
        for name in args.recipes:
            for tol in args.tols:
                settings, result = sweep_with(task, ALL_RECIPES[name], seeds=args.seeds, steps=args.steps, tol=tol,
                                              data_seed=args.data_seed, progress=not args.quiet)
                row = {"task": task, "recipe": name, "summary_of_recipe": ALL_RECIPES[name].summary,
                       "tol": tol, **describe(task, result)}
                if tol == args.tols[0] and not args.no_plots:
                    row["plot"] = plot(task, name, settings, result, args.out).name
                rows.append(row)
                print(f"{task:10s} {name:20s} tol {tol:g}: converged {row['fractions']['converged']:.1%}, "
                      f"within tol at the end {row['within_tol_at_end']:.1%}, "
                      f"{row['seeds_per_second']:.0f} seeds/s", flush=True)
    info = machine()
    report = {"machine": info, "command": " ".join(sys.argv), "rows": rows}
    write_atomically(args.out / "rates.json", lambda f: json.dump(report, f, indent=1), mode="w")
    write_atomically(args.out / "rates.md", lambda f: f.write(rates_markdown(rows, info)), mode="w")


def rates_markdown(rows: list[dict], info: dict) -> str:
    lines = [f"Machine: {info['cpu']}, {info['cpu_count']} cores, jax {info['jax']}, {info['date']}.", "",
             "| task | recipe | tol | converged | dead | stuck | diverged | within tol at the end "
             "| steps to converge: median (p90, max) | seeds/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, s = r["fractions"], r["steps_to_converge"]
        steps = "—" if s["median"] is None else f"{s['median']:.0f} ({s['p90']:.0f}, {s['max']:.0f})"
        lines.append(
            f"| {r['task']} | {r['recipe']} | {r['tol']:g} | {r['counts']['converged']} / {r['seeds']} "
            f"({f['converged']:.1%}) | {f['dead']:.1%} | {f['stuck']:.1%} | {f['diverged']:.1%} "
            f"| {r['within_tol_at_end']:.1%} | {steps} | {r['seeds_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


def speed(args) -> None:
    # Each repeat is a whole sweep as a user runs one: it builds, compiles and trains anew.
    sweeps = []
    for _ in range(args.sweep_repeats):
        began = time.perf_counter()
        settings, result = sweep_task(args.task, seeds=args.seeds, data_seed=args.data_seed, progress=not args.quiet,
                                      settings=task_settings(args.task, recipe=args.recipe, steps=args.steps,
                                                             tol=1e-3))
        sweeps.append({"wall_seconds": time.perf_counter() - began, "train_seconds": result.seconds,
                       "compile_seconds": result.compile_seconds})
    sweep_wall = statistics.median(s["wall_seconds"] for s in sweeps)

    # fit trains every seed for the whole budget too (no target: no weights rule stops it), each
    # on the batches of its own seed: the sweep's work, one seed at a time
    chosen = parts(args.task, task_settings(args.task, recipe=args.recipe, steps=settings["steps"]))
    calls = []
    for seed in range(args.fit_seeds):
        began = time.perf_counter()
        result_of_fit = fit(chosen.network, chosen.optimizer, chosen.draw, seed=seed, max_steps=settings["steps"],
                            options=StepOptions(watch=chosen.watch, fresh_batches=chosen.fresh_batches))
        jax.block_until_ready(result_of_fit.state)
        calls.append({"seed": seed, "seconds": time.perf_counter() - began, "steps": result_of_fit.steps,
                      "stop_reason": result_of_fit.stop_reason})
    full = [c["seconds"] for c in calls if c["steps"] == settings["steps"]]
    report = {
        "machine": machine(), "command": " ".join(sys.argv), "task": args.task, "recipe": args.recipe,
        "steps": settings["steps"], "devices": result.devices, "data_seed": args.data_seed,
        "sweep": {"seeds": args.seeds, "repeats": sweeps, "wall_seconds": sweep_wall,
                  "train_seconds": statistics.median(s["train_seconds"] for s in sweeps),
                  "compile_seconds": statistics.median(s["compile_seconds"] for s in sweeps),
                  "seconds_per_seed": sweep_wall / args.seeds},
        "fit": {"calls": calls, "first_call_seconds": calls[0]["seconds"],
                "median_seconds": statistics.median(full[1:] or full),
                "mean_seconds": statistics.mean(full)},
    }
    per_seed = report["sweep"]["seconds_per_seed"]
    report["ratio_per_seed"] = {
        "fit_median_over_sweep": report["fit"]["median_seconds"] / per_seed,
        "fit_mean_over_sweep": report["fit"]["mean_seconds"] / per_seed,
    }
    name = "speed" if args.data_seed is None else "speed-shared-data"
    write_atomically(args.out / f"{name}.json", lambda f: json.dump(report, f, indent=1), mode="w")
    write_atomically(args.out / f"{name}.md", lambda f: f.write(speed_markdown(report)), mode="w")
    print(speed_markdown(report))


def speed_markdown(r: dict) -> str:
    s, f, m = r["sweep"], r["fit"], r["machine"]
    ratio = r["ratio_per_seed"]["fit_median_over_sweep"]
    return "\n".join([
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, jax {m['jax']}, {r['devices']} device(s), {m['date']}.",
        f"Task {r['task']}, recipe {r['recipe']}, {r['steps']} steps per seed (both sides train every step); "
        + ("each seed draws its own batches." if r["data_seed"] is None
           else f"the sweep's seeds share the batches of seed {r['data_seed']}."),
        "",
        "| | seeds | wall s | s per seed |",
        "|---|---|---|---|",
        f"| sweep (median of {len(s['repeats'])} runs; compile {s['compile_seconds']:.2f} s included) "
        f"| {s['seeds']} | {s['wall_seconds']:.2f} | {s['seconds_per_seed'] * 1e3:.2f} ms |",
        f"| fit, once per seed (median of calls 2-{len(f['calls'])}; first call {f['first_call_seconds']:.2f} s) "
        f"| {len(f['calls'])} | {sum(c['seconds'] for c in f['calls']):.2f} | {f['median_seconds'] * 1e3:.1f} ms |",
        "",
        f"Per seed, the sweep is {ratio:,.0f}x faster than fit (target >= 100x: "
        f"{'met' if ratio >= 100 else 'MISSED'}).",
        "",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("rates", help="convergence rates of each recipe on each task")
    p.add_argument("--seeds", type=int, default=1000)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--recipes", nargs="+", choices=list(ALL_RECIPES), default=list(RECIPES))
    p.add_argument("--tols", nargs="+", type=float, default=[1e-3, 1e-9],
                   help="convergence tolerances; 1e-9 asks for exactly 1.0 in float32")
    p.add_argument("--steps", type=int, help="steps per seed (default: each recipe's)")
    p.add_argument("--data-seed", type=int, help="every seed trains on this seed's batches")
    p.add_argument("--no-plots", action="store_true", help="write no PNGs")
    p.set_defaults(run=rates)
    p = commands.add_parser("speed", help="a sweep against fit once per seed")
    p.add_argument("--seeds", type=int, default=1000)
    p.add_argument("--fit-seeds", type=int, default=20)
    p.add_argument("--sweep-repeats", type=int, default=3, help="whole sweeps timed; the median counts")
    p.add_argument("--task", choices=list(TASKS), default="l1")
    p.add_argument("--recipe", choices=list(RECIPES), default="squared")
    p.add_argument("--steps", type=int, help="steps per seed (default: the recipe's)")
    p.add_argument("--data-seed", type=int, help="the sweep's seeds share this seed's batches")
    p.set_defaults(run=speed)
    for p in commands.choices.values():
        p.add_argument("--out", type=Path, default=OUT)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.run(args)


if __name__ == "__main__":
    main()

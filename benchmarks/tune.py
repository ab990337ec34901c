"""Block size and unroll of the blocked parallel scan on this backend: checks each setting
against a float64 NumPy loop, then times the L1 network's forward pass and training step with
it, next to the sequential loop and cuDNN (torch ``nn.RNN``, on a GPU).

The settings tried are the accelerator defaults' alternatives (``rnnjax.core.parallel``'s
``_ACCELERATOR_BLOCK_SIZE`` and ``_ACCELERATOR_UNROLL``, set here one after another); on a CPU
they replace the CPU's. Compile time (the first call) is reported apart; a setting whose first
call takes longer than ``--max-compile-s`` is not timed at larger shapes, and the sweep stops at
``--deadline-s`` with what it has.

    python benchmarks/tune.py                                  # on the GPU being tuned

It is meant for an accelerator: on a 2-core CPU the batch-65536 shape and XLA's compiles of
unrolled loops take many minutes. The runs in ``benchmarks/results/gpu`` (an H200) were
``tune.py --deadline-s 230 --max-compile-s 30`` (``tune-rolled.json``), then ``tune.py --settings
32:8 16:16 32:32 64:8 --no-baselines --known .../tune-rolled.json --deadline-s 140
--max-compile-s 12 --suite`` with the suite's GPU grid (``tune-unrolled.json``, ``pick.json``,
``results.*``).

Writes ``tune.json`` (and with ``--suite``, ``pick.json``) under ``--out``, printing each
setting's figures as they come.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
from timing import machine, measure  # noqa: E402

from rnnjax.core import parallel  # noqa: E402
from rnnjax.app.folders import write_atomically  # noqa: E402

# (T, batch, modes): the shapes of issue 6's GPU targets.
SHAPES = [(10_000, 1, ("forward", "train")), (1_000_000, 1, ("forward", "train")),
          (10_000, 65_536, ("forward",))]


def reference(w: np.ndarray, inputs: np.ndarray, lengths: np.ndarray):
    """The float64 loop for ``(batch, time, features)`` inputs: final states and the derivative
    of their sum over the batch with respect to each feature's ``w``."""
    h = np.zeros((inputs.shape[0], inputs.shape[2]))
    dh = np.zeros_like(h)
    for t in range(inputs.shape[1]):  # reference code: one step per iteration
        active = (t < lengths)[:, None]
        z = w * h + inputs[:, t]
        fired = (z > 0) & active
        dh = np.where(active, np.where(fired, h + w * dh, 0.0), dh)
        h = np.where(active, np.maximum(z, 0.0), h)
    return h, dh.sum(axis=0)


# Weights of both signs, 0, near 1 and (second set) some above 1, each with its inputs' scale.
CHECKS = [([1.0, -0.9, 0.99999, 0.0, 0.5, -0.3], [1.0, 10.0, 1.0, 100.0, 1e5, 1.0]),
          ([1.01, -1.005, 0.7, 1.0, 0.0, -0.5], [1.0, 1.0, 1e3, 1.0, 10.0, 1e-3])]


def check(seed: int, time_: int = 2000, batch: int = 4) -> float:
    """Largest error of ``relu_scan``'s final states and ``d/dw`` against the float64 loop over
    ``CHECKS``, in units of ``eps`` times the largest magnitude along the way (inf if not finite)."""
    rng = np.random.default_rng(seed)

    def finals(w, inputs, lengths):
        return parallel.relu_scan(w, inputs, lengths, jnp.zeros((batch, w.shape[0])))[0]

    forward = jax.jit(finals)
    gradient = jax.jit(jax.grad(lambda *args: finals(*args).sum()))
    worst = 0.0
    for ws, scales in CHECKS:
        w = np.array(ws)
        inputs = (rng.standard_normal((batch, time_, w.size)) * scales).astype(np.float32)
        lengths = rng.integers(0, time_ + 1, batch)
        lengths[0] = time_
        inputs[np.arange(time_)[None] >= lengths[:, None]] = 0  # as rnn() pads
        exact, dexact = reference(w, inputs.astype(np.float64), lengths)
        args = jnp.asarray(w, jnp.float32), jnp.asarray(inputs), jnp.asarray(lengths, jnp.int32)
        got, grad = (np.asarray(f(*args), np.float64) for f in (forward, gradient))
        if not (np.isfinite(got).all() and np.isfinite(grad).all()):
            return np.inf
        magnitude = np.abs(inputs).sum(axis=(0, 1)) * np.maximum(1.0, np.abs(w)) ** time_
        eps = np.finfo(np.float32).eps
        worst = max(worst, (np.abs(got - exact) / (eps * magnitude)).max(),
                    (np.abs(grad - dexact) / (eps * (np.abs(dexact) + magnitude))).max())
    return float(worst)


@functools.lru_cache(maxsize=None)
def problem(time_: int, batch: int):
    return baselines.problem(time_, batch)


def time_closures(builder, time_, batch, modes, budget_s):
    xs, targets = problem(time_, batch)
    forward, train, sync = builder(xs, targets)
    out = {}
    for mode in modes:
        stats = measure(forward if mode == "forward" else train, budget_s=budget_s, sync=sync)
        out[mode] = {k: stats[k] for k in ("first_call_ms", "median_ms")}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["32:1", "64:1", "128:1", "256:1", "32:8",
                                                           "64:8", "128:8", "16:full", "32:full"],
                        help="block size:unroll of a block's loops (an integer, or 'full')")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="time only the blocked scan's settings")
    parser.add_argument("--known", type=Path, help="an earlier tune.json whose settings compete")
    parser.add_argument("--suite", nargs=argparse.REMAINDER, metavar="SUITE_ARGS",
                        help="then run benchmarks/suite.py with these arguments and the fastest "
                             "setting (pick), recorded in pick.json beside tune.json")
    parser.add_argument("--budget-s", type=float, default=0.3)
    parser.add_argument("--max-compile-s", type=float, default=40.0)
    parser.add_argument("--deadline-s", type=float, default=240.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / jax.default_backend())
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    info = machine()
    print(json.dumps(info), flush=True)
    report = {"machine": info, "baselines": {}, "settings": []}

    def save():
        write_atomically(args.out / "tune.json", lambda f: f.write(json.dumps(report, indent=1)), mode="w")

    for name, builder in [("sequential", baselines.rnnjax_model("sequential")),
                          ("torch nn.RNN", baselines.torch_rnn)] * args.baselines:
        for time_, batch, modes in SHAPES:
            try:
                report["baselines"][f"{name} T={time_} B={batch}"] = time_closures(
                    builder, time_, batch, modes, args.budget_s)
            except Exception as e:  # noqa: BLE001 (torch absent, or out of memory: reported)
                report["baselines"][f"{name} T={time_} B={batch}"] = f"{type(e).__name__}: {e}"[:200]
            print(name, time_, batch, report["baselines"][f"{name} T={time_} B={batch}"], flush=True)
    save()

    for size, unroll in (text.split(":") for text in args.settings):
        size = int(size)
        if time.perf_counter() - began > args.deadline_s:
            break
        setting = {"block_size": size, "unroll": unroll}
        apply(size, unroll)
        try:
            setting["error_in_eps_units"] = check(size)
        except Exception as e:  # noqa: BLE001 (reported; the setting is still timed)
            setting["error_in_eps_units"] = f"{type(e).__name__}: {e}"[:300]
        print(f"block {size}, unroll {unroll}: error {setting['error_in_eps_units']}", flush=True)
        for time_, batch, modes in SHAPES:
            if time.perf_counter() - began > args.deadline_s:
                break
            key = f"T={time_} B={batch}"
            try:
                setting[key] = time_closures(baselines.rnnjax_model("parallel"), time_, batch,
                                             modes, args.budget_s)
            except Exception as e:  # noqa: BLE001
                setting[key] = f"{type(e).__name__}: {e}"[:200]
            print(f"block {size}, unroll {unroll}, {key}: {setting[key]}", flush=True)
            compiled = [m["first_call_ms"] for m in setting[key].values()] if isinstance(setting[key], dict) else []
            if any(ms > args.max_compile_s * 1e3 for ms in compiled):
                setting["stopped"] = f"a first call took over {args.max_compile_s} s"
                break
        report["settings"].append(setting)
        save()
    report["wall_s"] = time.perf_counter() - began
    save()
    print(f"wall {report['wall_s']:.0f} s")
    if args.suite is not None:
        known = json.loads(args.known.read_text())["settings"] if args.known else []
        best = pick(report["settings"] + known, args.max_compile_s)
        write_atomically(args.out / "pick.json", lambda f: f.write(json.dumps(best)), mode="w")
        print(f"suite with block size {best['block_size']}, unroll {best['unroll']}", flush=True)
        apply(best["block_size"], best["unroll"])
        import suite

        suite.main(args.suite)


def pick(settings: list[dict], max_compile_s: float) -> dict:
    """The setting whose times have the smallest geometric mean, among those that passed the
    check, timed every shape and compiled each within ``max_compile_s``."""
    keys = [f"T={t} B={b}" for t, b, _ in SHAPES]

    def score(setting):
        if not isinstance(setting.get("error_in_eps_units"), float) or not np.isfinite(
                setting["error_in_eps_units"]) or not all(isinstance(setting.get(k), dict) for k in keys):
            return np.inf
        entries = [m for k in keys for m in setting[k].values()]
        if max(m["first_call_ms"] for m in entries) > max_compile_s * 1e3:
            return np.inf
        return float(np.mean([np.log(m["median_ms"]) for m in entries]))

    scored = [(score(s), i) for i, s in enumerate(settings)]
    best, index = min(scored)
    if not np.isfinite(best):
        raise SystemExit("no setting passed the check and timed every shape")
    return {k: settings[index][k] for k in ("block_size", "unroll")} | {"log_mean_ms": best}


def apply(size: int, unroll: str) -> None:
    """Makes ``size`` and ``unroll`` the blocked scan's settings on this backend."""
    parallel._ACCELERATOR_UNROLL = True if unroll == "full" else int(unroll)
    parallel._ACCELERATOR_BLOCK_SIZE = (size, size)
    parallel._BLOCK_SIZE.pop(jax.default_backend(), None)  # on a CPU too, for a dry run
    parallel._UNROLL.pop(jax.default_backend(), None)
    jax.clear_caches()


if __name__ == "__main__":
    main()

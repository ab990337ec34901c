"""Seed sweeps: many independently initialised models trained at once, in one jitted program.

Every seed's run is ``fit``'s run for that seed (same init key, same batches), vmapped over the
seeds and scanned over the steps; the seeds are spread over every visible device by a
``jax.sharding.Mesh``, so one device and eight run the same code, and so do several hosts after
``jax.distributed.initialize()``. The host sees the seeds only between chunks of steps, to
advance a progress bar.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from rnnjax.core import checks
from rnnjax.training.data import Batch
from rnnjax.training.devices import device_mesh
from rnnjax.training.fit import TrainState, check_data, init_state, make_train_step, squared_error, weight_elements
from rnnjax.training.stopping import StopRules, reason, stop_code, within

__all__ = ["OUTCOMES", "STAYED", "LEFT", "SweepResult", "sweep", "outcome_groups", "group_label", "summarize",
           "loss_landscape"]

OUTCOMES = ("converged", "dead", "diverged", "stuck")
# "converged", split when some seed converged and was outside tol again after the last step
STAYED, LEFT = "converged and stayed", "converged, then left"


class SweepResult(NamedTuple):
    """What ``sweep`` returns; arrays have one row per seed.

    Attributes:
      seeds: ``(seeds,)`` the integer seeds, as ``fit(seed=...)`` takes them.
      initial_weights: name -> ``(seeds,)``: each watched weight at init.
      final_weights: name -> ``(seeds,)``: each watched weight after the last step.
      final_params: the trained parameters after the last step, every leaf stacked along a
        leading ``(seeds,)`` axis (``jax.tree.map(lambda a: a[i], final_params)`` is seed i's).
      final_loss: ``(seeds,)`` the loss at the last step (before its update).
      outcome: ``(seeds,)`` strings, one of ``OUTCOMES``: "converged" (every watched weight
        within ``tol`` of ``target`` after some step: where ``fit`` with the same
        ``target_weight`` and ``weight_tol`` stops), "diverged" (a NaN or infinite loss or
        weight at the end), "dead" (every gradient exactly 0 at the last step while the loss
        is not: a dead ReLU, which no optimizer leaves), or "stuck" (none of those).
      converged_at: ``(seeds,)`` the first step after which every watched weight was within
        ``tol`` (``fit``'s ``steps``); -1 where that never happened.
      trajectories: name -> ``(tracked, steps + 1)``: each watched weight of the first
        ``tracked`` seeds at init and after every step; "loss" -> ``(tracked, steps)``.
      steps: steps each seed took.
      target, tol: the convergence rule, as passed to ``sweep``.
      data_seed: the seed whose batches every seed trained on; None when each drew its own.
      devices: number of devices the seeds were spread over.
      seconds: wall time of the training, compilation excluded.
      compile_seconds: time to compile the program.
    """

    seeds: np.ndarray
    initial_weights: dict[str, np.ndarray]
    final_weights: dict[str, np.ndarray]
    final_params: Any
    final_loss: np.ndarray
    outcome: np.ndarray
    converged_at: np.ndarray
    trajectories: dict[str, np.ndarray]
    steps: int
    target: float
    tol: float
    data_seed: int | None
    devices: int
    seconds: float
    compile_seconds: float


class _Carry(NamedTuple):
    """One seed's state between steps."""

    state: TrainState
    data_key: jax.Array
    fixed_batch: Batch | None  # the seed's batch for every step, when it has its own and keeps it
    converged_at: jax.Array  # first step count at which every watched weight was within tol
    loss: jax.Array
    grad_norm: jax.Array


def sweep(
    model: Any,
    optimizer: optax.GradientTransformation,
    data: Batch | Callable[[jax.Array], Batch],
    *,
    seeds: int,
    steps: int,
    first_seed: int = 0,
    fresh_batches: bool = True,
    data_seed: int | None = None,
    watch: Callable[[Any], dict[str, jax.Array]] = weight_elements,
    target: float = 1.0,
    tol: float = 1e-3,
    devices: int | None = None,
    chunk: int = 100,
    tracked: int = 8,
    progress: bool = False,
) -> SweepResult:
    """Trains one model per seed, all at once, for ``steps`` steps each.

    Seed ``s`` draws its init and its batches as ``fit(seed=s)`` does, bit for bit, so each row
    of the result is that ``fit`` run (to float32 rounding: XLA may order a sum over the batch
    differently in the vmapped step), trained on to the end rather than stopped. The seeds are split evenly over
    ``devices`` devices (padded with extra seeds whose results are dropped).

    Args:
      model: anything with flax's ``init(key, xs, lengths)`` and ``apply(params, xs, lengths)``.
      optimizer: an optax gradient transformation.
      data: a ``Batch`` that every seed trains on at every step, or a function ``key -> Batch``.
      seeds: number of seeds.
      steps: steps each seed takes.
      first_seed: the seeds are ``first_seed, ..., first_seed + seeds - 1``.
      fresh_batches: with a function as ``data``, draw a new batch every step (True) or one
        batch per seed, kept for every step (False).
      data_seed: None: each seed draws its own batches, as ``fit(seed=s)`` does. An integer:
        every seed trains on the batches ``fit(seed=data_seed)`` draws, one stream shared by
        all; only the inits differ, and a batch is drawn once per step rather than once per
        seed and step (on a CPU, drawing 80 normal numbers per seed and step costs several
        times the training step itself).
      watch: ``params -> {name: scalar}``, the weights that must reach ``target``; for a
        reparametrised model, the weights the network computes with.
      target: the value every watched weight should reach.
      tol: a seed converged once every watched weight is within ``tol`` of ``target``.
      devices: how many of ``jax.devices()`` to use; None for all.
      chunk: steps per jitted call; the progress bar advances between calls.
      tracked: how many seeds (the first ones) have their whole trajectory recorded.
      progress: show a tqdm progress bar.

    Returns:
      A ``SweepResult``.

    Example:
      >>> import jax, optax
      >>> from rnnjax.training.data import count_batch
      >>> from rnnjax.training.models import RunningCount
      >>> result = sweep(RunningCount(), optax.adam(0.1), lambda k: count_batch(k, 8, 5),
      ...                seeds=16, steps=300)
      >>> sorted(set(result.outcome)) <= ["converged", "dead", "stuck"], result.outcome.shape
      (True, (16,))
    """
    seeds, steps, chunk = (checks.integer(name, value) for name, value in
                           (("seeds", seeds), ("steps", steps), ("chunk", chunk)))
    first_seed = checks.seed("first_seed", first_seed)
    checks.seed("the last seed, first_seed + seeds - 1", first_seed + seeds - 1)
    data_seed = None if data_seed is None else checks.seed("data_seed", data_seed)
    tracked = checks.integer("tracked", tracked, low=0)
    checks.interface("model", model, ("init", "apply"), "a flax module or a Reparametrized model")
    checks.interface("optimizer", optimizer, ("init", "update"), "an optax transformation, e.g. optax.adam(0.1)")
    check_data(data)
    target = checks.number("target", target, low=-np.inf, high=np.inf)
    tol = checks.number("tol", tol, low=0, high=np.inf, open_low=True)
    rules = StopRules.checked(max_steps=steps, target_weight=target, weight_tol=tol, dead_steps=1)
    mesh = device_mesh(devices, axis="seeds")
    per_seed, replicated = NamedSharding(mesh, P("seeds")), NamedSharding(mesh, P())
    padded = math.ceil(seeds / mesh.size) * mesh.size
    tracked = min(tracked, seeds)
    chunk = min(chunk, steps)
    start, run_chunk, finish = _program(model, optimizer, data, fresh_batches, data_seed, watch,
                                        rules, tracked, chunk)
    # Everything but the carries comes back replicated: every host then holds all of it.
    start_all = jax.jit(lambda first: start(first + jnp.arange(padded, dtype=jnp.int32)),
                        out_shardings=(per_seed, replicated))
    carries, initial = start_all(jnp.asarray(first_seed, jnp.int32))
    initial = jax.device_get(initial)

    began = time.perf_counter()  # one program for every chunk: the last may run only part of it
    run_chunk = jax.jit(run_chunk, donate_argnums=0, out_shardings=(per_seed, replicated)).lower(
        carries, jnp.int32(0), jnp.int32(chunk)).compile()
    compile_seconds = time.perf_counter() - began

    seen, last, seconds = _train(run_chunk, finish, carries, steps, chunk, replicated,
                                 progress and f"{seeds} seeds")
    final, converged_at, loss, code, params = jax.tree.map(lambda a: a[:seeds], last)
    initial = {k: v[:seeds] for k, v in initial.items()}
    outcome = np.where(converged_at >= 0, "converged",
                       np.array([reason(c) or "stuck" for c in code.tolist()], dtype=object)).astype(str)
    return SweepResult(
        seeds=np.arange(first_seed, first_seed + seeds), initial_weights=initial, final_weights=final,
        final_params=params, final_loss=loss, outcome=outcome, converged_at=converged_at,
        trajectories=_trajectories(initial, seen, tracked), steps=steps, target=target, tol=tol,
        data_seed=data_seed, devices=mesh.size, seconds=seconds, compile_seconds=compile_seconds)


def _train(run_chunk, finish, carries, steps: int, chunk: int, replicated, progress: str | bool):
    """Runs every chunk of steps; returns what the tracked seeds went through, what ``finish``
    makes of the last carries (on the host), and the seconds it took."""
    began = time.perf_counter()
    seen = []
    with tqdm(total=steps, disable=not progress, unit="step", desc=progress or None) as bar:
        for done in range(0, steps, chunk):
            active = min(chunk, steps - done)
            carries, chunk_seen = run_chunk(carries, jnp.int32(done), jnp.int32(active))
            seen.append(jax.tree.map(lambda a, n=active: a[:n], jax.block_until_ready(chunk_seen)))
            bar.update(active)
    last = jax.device_get(jax.jit(finish, out_shardings=replicated)(carries))
    return jax.device_get(seen), last, time.perf_counter() - began


def _trajectories(initial: dict, seen: list, tracked: int) -> dict[str, np.ndarray]:
    """Each watched weight of the tracked seeds at init and after every step; their loss."""
    trajectories = {name: np.concatenate([initial[name][:tracked, None]] +
                                         [weights_seen[name].T for weights_seen, _ in seen], axis=1)
                    for name in initial}
    trajectories["loss"] = np.concatenate([loss_seen.T for _, loss_seen in seen], axis=1)
    return trajectories


def _program(model, optimizer, data, fresh_batches, data_seed, watch, rules: StopRules, tracked, chunk):
    """Returns the three pieces of a sweep, each over every seed at once:
    ``start(seeds) -> (carries, initial_weights)``; ``run_chunk(carries, done, active)``, which
    advances every seed ``active <= chunk`` steps from step ``done`` and returns the tracked
    seeds' weights and losses after each of ``chunk`` steps (those past ``active`` repeat the
    last); and ``finish(carries)``, everything the result needs from the final carries."""
    train_step = make_train_step(model, optimizer)
    fixed = isinstance(data, Batch)
    batch_at = (lambda _: data) if fixed else data
    fresh = fresh_batches and not fixed

    def data_key_of(seed):
        return jax.random.split(jax.random.key(seed))[1]  # as fit splits it

    def start_one(seed, example: Batch):
        init_key = jax.random.split(jax.random.key(seed))[0]
        data_key = data_key_of(seed if data_seed is None else data_seed)
        # The init depends on the key alone; a batch only gives it shapes.
        state = init_state(model, optimizer, init_key, example)
        zero = jnp.zeros((), jnp.float32)
        return _Carry(state, data_key, None, jnp.full((), -1, jnp.int32), zero, zero)

    def advance(carry: _Carry, batch: Batch) -> _Carry:
        state, metrics = train_step(carry.state, batch)
        first = (carry.converged_at < 0) & within(watch(state.params), rules.target_weight, rules.weight_tol)
        return carry._replace(state=state, converged_at=jnp.where(first, state.step, carry.converged_at),
                              loss=metrics["loss"], grad_norm=metrics["grad_norm"])

    def advance_all(carries: _Carry, step: jax.Array) -> _Carry:
        if not fresh and data_seed is None:
            return jax.vmap(lambda c: advance(c, c.fixed_batch))(carries)
        if not fresh:
            shared = batch_at(jax.random.fold_in(data_key_of(data_seed), 0))
            return jax.vmap(advance, in_axes=(0, None))(carries, shared)
        if data_seed is None:
            return jax.vmap(lambda c: advance(c, batch_at(jax.random.fold_in(c.data_key, step))))(carries)
        shared = batch_at(jax.random.fold_in(data_key_of(data_seed), step))  # once for all seeds
        return jax.vmap(advance, in_axes=(0, None))(carries, shared)

    def start(seeds):
        example = batch_at(jax.random.fold_in(data_key_of(0 if data_seed is None else data_seed), 0))
        carries = jax.vmap(start_one, in_axes=(0, None))(seeds, example)
        if not fresh and data_seed is None:  # each seed's own batch, kept for every step
            # lax.map, not vmap: XLA compiles a vmapped threefry several times slower
            batches = jax.lax.map(lambda key: batch_at(jax.random.fold_in(key, 0)), carries.data_key)
            carries = carries._replace(fixed_batch=batches)
        return carries, jax.vmap(watch)(carries.state.params)

    def run_chunk(carries: _Carry, done: jax.Array, active: jax.Array):
        def body(carries, i):
            carries = jax.lax.cond(i < active, advance_all, lambda c, _: c, carries, done + i)
            seen = jax.vmap(watch)(jax.tree.map(lambda a: a[:tracked], carries.state.params))
            return carries, (seen, carries.loss[:tracked])

        return jax.lax.scan(body, carries, jnp.arange(chunk))

    def outcome_code(carry: _Carry):  # the rules after the last step; dead_steps is 1 here
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(w)) for w in jax.tree.leaves(carry.state.params)]))
        dead = (carry.grad_norm == 0) & (carry.loss > 0)
        return stop_code(rules, diverged=~(finite & jnp.isfinite(carry.loss)), watched=watch(carry.state.params),
                         loss=carry.loss, dead_run=dead.astype(jnp.int32))

    def finish(carries: _Carry):
        params = carries.state.params
        return (jax.vmap(watch)(params), carries.converged_at, carries.loss, jax.vmap(outcome_code)(carries),
                params)

    return start, run_chunk, finish


def _ended_within(result: SweepResult) -> np.ndarray:
    """``(seeds,)`` True where every watched weight is within ``tol`` after the last step."""
    return np.array([bool(within({k: v[i] for k, v in result.final_weights.items()}, result.target, result.tol))
                     for i in range(len(result.seeds))], dtype=bool)


def outcome_groups(result: SweepResult) -> dict[str, np.ndarray]:
    """Returns the seeds of each outcome, ``(seeds,)`` booleans, keyed by the words the command
    and the picture use: ``OUTCOMES``, in order, with "converged" split into ``STAYED`` and
    ``LEFT`` (within ``tol`` after some step, outside it after the last) when some seed left.

    Example:
      >>> result = SweepResult(np.arange(3), {}, {"w": np.array([1.0, 0.5, 0.0])}, {}, np.zeros(3),
      ...                      np.array(["converged", "converged", "dead"]), np.array([12, 30, -1]), {},
      ...                      steps=50, target=1.0, tol=1e-3, data_seed=None, devices=1, seconds=0.5,
      ...                      compile_seconds=1.0)
      >>> [group_label(name, seeds) for name, seeds in outcome_groups(result).items()]
      ['converged and stayed 1 (33.3%)', 'converged, then left 1 (33.3%)', 'dead 1 (33.3%)', 'diverged 0 (0.0%)', \
'stuck 0 (0.0%)']
    """
    groups = {name: result.outcome == name for name in OUTCOMES}
    left = groups["converged"] & ~_ended_within(result)
    if not left.any():
        return groups
    converged = groups.pop("converged")
    return {STAYED: converged & ~left, LEFT: left, **groups}


def group_label(name: str, seeds: np.ndarray) -> str:
    """``name``, how many seeds ``seeds`` (booleans) holds and their fraction: "dead 102 (51.0%)"."""
    return f"{name} {int(seeds.sum())} ({seeds.mean():.1%})"


def summarize(result: SweepResult) -> dict[str, Any]:
    """Returns a JSON-able summary: the fraction of each outcome, the distribution of steps to
    converge, the fraction whose weights are still within ``tol`` at the end, how many converged
    and then left it (``LEFT``), and the speed.

    Example:
      >>> import json, numpy as np
      >>> result = SweepResult(np.arange(2), {}, {"w": np.array([1.0, 0.0])}, {}, np.zeros(2),
      ...                      np.array(["converged", "dead"]), np.array([120, -1]), {},
      ...                      steps=500, target=1.0, tol=1e-3, data_seed=None, devices=1, seconds=0.5,
      ...                      compile_seconds=1.0)
      >>> summary = summarize(result)
      >>> summary["fractions"]["converged"], summary["steps_to_converge"]["median"]
      (0.5, 120.0)
    """
    n = len(result.seeds)
    counts = {name: int(np.sum(result.outcome == name)) for name in OUTCOMES}
    converged_at = result.converged_at[result.outcome == "converged"]
    ended_within = _ended_within(result)
    quantiles = ("min", 0), ("p10", 10), ("median", 50), ("p90", 90), ("p99", 99), ("max", 100)
    return {
        "seeds": n,
        "first_seed": int(result.seeds[0]),
        "steps": result.steps,
        "target": result.target,
        "tol": result.tol,
        "data_seed": result.data_seed,
        "devices": result.devices,
        "counts": counts,
        "fractions": {name: count / n for name, count in counts.items()},
        "within_tol_at_end": float(np.mean(ended_within)),
        "converged_then_left": int(np.sum((result.outcome == "converged") & ~ended_within)),
        "steps_to_converge": {name: float(np.percentile(converged_at, q)) if converged_at.size
                              else None for name, q in quantiles},
        "seconds": result.seconds,
        "compile_seconds": result.compile_seconds,
        "seeds_per_second": n / result.seconds,
    }


def loss_landscape(model: Any, batch: Batch, w_ih: np.ndarray, w_hh: np.ndarray) -> np.ndarray:
    """Returns the loss on ``batch`` of a network whose weights are one scalar cell's
    (``cell/W_ih`` and ``cell/W_hh``, as in ``L1Norm`` and ``RunningCount``) at every point of
    a grid, ``(len(w_hh), len(w_ih))``.

    Example:
      >>> import numpy as np, jax
      >>> from rnnjax.training.data import count_batch
      >>> from rnnjax.training.models import RunningCount
      >>> grid = np.linspace(0, 2, 5)
      >>> loss = loss_landscape(RunningCount(), count_batch(jax.random.key(0), 8, 5), grid, grid)
      >>> loss.shape, float(loss[2, 2])  # W_ih = W_hh = 1 counts exactly
      ((5, 5), 0.0)
    """

    def loss(a, b):
        cell = {"W_ih": jnp.reshape(a, (1, 1)), "W_hh": jnp.reshape(b, (1, 1))}
        predictions = model.apply({"params": {"cell": cell}}, batch.xs, batch.lengths)
        return squared_error(predictions, batch.targets, batch.lengths)

    grid = jax.vmap(jax.vmap(loss, (0, None)), (None, 0))
    return np.asarray(jax.jit(grid)(jnp.asarray(w_ih, jnp.float32), jnp.asarray(w_hh, jnp.float32)))

"""Training: a jitted optax step, and a loop that runs it until a stop rule holds."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from rnnjax.data import Batch
from rnnjax.devices import device_mesh, replicate, shard_leading_axis
from rnnjax.masking import length_mask

__all__ = ["TrainState", "FitResult", "STOP_REASONS", "CONVERGED", "init_state", "squared_error", "make_train_step",
           "SEED_LIMIT", "seed_keys", "fit_start", "fit", "weights_by_path", "weight_elements"]

STOP_REASONS = {  # why fit stopped (FitResult.stop_reason), in words
    "weights": "every watched weight within tolerance of the target",
    "loss": "loss under tolerance",
    "dead": "dead ReLU: every gradient is 0",
    "diverged": "diverged: a non-finite loss, gradient or weight",
    "budget": "step budget spent, NOT converged",
    "interrupted": "interrupted",
    "running": "still running",
}
CONVERGED = ("weights", "loss")  # the stop reasons of a fit that reached its goal


class TrainState(NamedTuple):
    """Everything a training step changes.

    Attributes:
      step: number of steps taken, an int32 scalar.
      params: the model's variables (``model.init``'s result).
      opt_state: the optimizer's state.
    """

    step: jax.Array
    params: Any
    opt_state: optax.OptState


class FitResult(NamedTuple):
    """What ``fit`` returns.

    Attributes:
      state: the final ``TrainState``; its loss and weights are the last row of ``history``.
      initial_params: the variables drawn at init, before any step.
      steps: number of steps taken (``state.step``).
      stop_reason: "weights" (every watched weight within ``weight_tol`` of ``target_weight``),
        "loss" (the state's loss at most ``loss_tol``), "dead" (``dead_steps`` steps in a row
        with every gradient exactly zero while the loss is not: a dead ReLU, which no optimizer
        can leave), "diverged" (step ``steps + 1`` gave a non-finite loss, gradient or weight;
        ``state`` is the last finite one), "budget" (``max_steps`` taken), "interrupted"
        (``interrupt()`` returned True), or "running" (a run in progress: ``fit_start`` and the
        snapshots given to ``on_checkpoint``).
      history: per-step host arrays, one row per step taken: "step"; "loss", the loss of the
        state after the step on that step's batch; "grad_norm", of the gradient the step
        applied; "skipped", True where a non-finite update was skipped (``skip_nonfinite``);
        "weight_error", the largest distance of a weight from ``target_weight`` (NaN without
        one); and one entry per weight named by its path (e.g. "cell/W_ih"): its first element.
    """

    state: TrainState
    initial_params: Any
    steps: int
    stop_reason: str
    history: dict[str, np.ndarray]


def init_state(
    model: nn.Module, optimizer: optax.GradientTransformation, key: jax.Array, batch: Batch
) -> TrainState:
    """Draws the model's weights from ``key`` (shapes from ``batch``) and starts the optimizer."""
    params = model.init(key, batch.xs, batch.lengths)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def squared_error(predictions: jax.Array, targets: jax.Array, lengths: jax.Array) -> jax.Array:
    """Mean squared error; for ``(batch, time)`` predictions, over the steps before each length."""
    if predictions.ndim == 1:
        return jnp.mean((predictions - targets) ** 2)
    mask = length_mask(lengths, predictions.shape[1])
    errors = jnp.where(mask, predictions - targets, 0)
    return jnp.sum(errors**2) / jnp.maximum(jnp.sum(mask), 1)


def _loss(model: nn.Module, params, batch: Batch) -> jax.Array:
    return squared_error(model.apply(params, batch.xs, batch.lengths), batch.targets, batch.lengths)


def make_train_step(
    model: nn.Module, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns a jitted ``step(state, batch) -> (state, metrics)``: forward, backward, update.

    The step traces once per batch shape and dtype; later calls reuse the compiled code.

    Args:
      model: a module whose ``apply(params, xs, lengths)`` gives predictions shaped like
        ``batch.targets``.
      optimizer: an optax gradient transformation.

    Returns:
      The step. ``metrics`` holds "loss" (``squared_error`` before the update) and "grad_norm".

    Example:
      >>> import jax, optax
      >>> from rnnjax.data import l1_batch
      >>> from rnnjax.models import L1Norm
      >>> model, optimizer = L1Norm(), optax.adam(0.1)
      >>> batch = l1_batch(jax.random.key(0), 8, 10)
      >>> state = init_state(model, optimizer, jax.random.key(1), batch)
      >>> state, metrics = make_train_step(model, optimizer)(state, batch)
      >>> int(state.step), sorted(metrics)
      (1, ['grad_norm', 'loss'])
    """

    @jax.jit
    def step(state: TrainState, batch: Batch):
        loss, grads = jax.value_and_grad(functools.partial(_loss, model))(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


# Seeds are integers in [0, SEED_LIMIT), as `rnnjax --seed` takes them and runs record them.
SEED_LIMIT = 2**31


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """Returns ``(init_key, data_key)``: the keys ``fit`` draws the init and the batches from.

    Batch ``i`` (counting from 0) comes from ``jax.random.fold_in(data_key, i)``.
    """
    init_key, data_key = jax.random.split(jax.random.key(seed))
    return init_key, data_key


class _Program(NamedTuple):
    """The compiled pieces of a fit, shared by every fit of the same model, optimizer and data."""

    optimizer: optax.GradientTransformation  # wrapped in apply_if_finite when skipping
    source: Callable  # (data, seed) -> the data key, or the batch of every step (on the devices)
    batch_at: Callable  # (source, i) -> Batch
    step: Callable  # (state, batch) -> (state, row): the update and what fit watches, one dispatch
    place: Callable  # state -> the state on the devices (replicated), or as it is on one


@functools.lru_cache(maxsize=16)
def _program(model, optimizer, draw, target_weight, skip_nonfinite, watch, fresh_batches, devices) -> _Program:
    """Builds the jitted step once per setting, so fits from other seeds reuse its compilation.

    ``draw`` is the function that draws batches, or None for one ``Batch`` given by the caller."""
    if skip_nonfinite:
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=skip_nonfinite)
    train_step = make_train_step(model, optimizer)
    target = jnp.nan if target_weight is None else target_weight
    mesh = device_mesh(devices)
    if mesh.size == 1:  # one device: nothing is placed, exactly as without a mesh
        place = shard = lambda tree: tree  # noqa: E731
    else:  # the batch split over the devices, the parameters and optimizer state on each
        place = functools.partial(replicate, mesh=mesh)
        shard = functools.partial(shard_leading_axis, mesh=mesh)

    if draw is None:
        source = lambda data, seed: shard(data)  # noqa: E731  the caller's batch, every step
        batch_at = lambda source, i: source  # noqa: E731
    elif not fresh_batches:  # the seed's first batch, kept for every step
        first = jax.jit(lambda key: draw(jax.random.fold_in(key, 0)))
        source = lambda data, seed: shard(first(seed_keys(seed)[1]))  # noqa: E731
        batch_at = lambda source, i: source  # noqa: E731
    else:
        drawn = jax.jit(lambda key, i: draw(jax.random.fold_in(key, i)))
        source = lambda data, seed: seed_keys(seed)[1]  # noqa: E731
        batch_at = lambda source, i: shard(drawn(source, i))  # noqa: E731

    @jax.jit  # the batch is drawn by a program of its own, so no fusion into the step can move it
    def step(state, batch):
        new, metrics = train_step(state, batch)
        loss = _loss(model, new.params, batch)
        if skip_nonfinite:  # apply_if_finite rejected it, and has not given up yet
            opt = new.opt_state
            skipped = ~opt.last_finite & (opt.notfinite_count <= skip_nonfinite)
        else:
            skipped = jnp.zeros((), bool)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(loss)
        params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(w)) for w in jax.tree.leaves(new.params)]))
        row = {"loss": loss, "grad_norm": metrics["grad_norm"], "skipped": skipped,
               "diverged": ~params_finite | (~skipped & ~finite), **_observe(watch(new.params), target)}
        return new, row

    return _Program(optimizer, source, batch_at, step, place)


def _draw(data):
    return None if isinstance(data, Batch) else data


def fit_start(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    data: Batch | Callable[[jax.Array], Batch],
    *,
    seed: int,
    skip_nonfinite: int = 0,
    watch: Callable[[Any], dict[str, jax.Array]] | None = None,
    fresh_batches: bool = True,
    devices: int | None = None,
) -> FitResult:
    """Returns where ``fit`` starts from ``seed``: step 0, the drawn init, an empty history.

    The keywords are ``fit``'s: the same values give the same start.

    It has the structure of every later state of the same fit, so it is the template a
    checkpoint is restored into (``rnnjax.checkpoints``); ``fit(..., start=...)`` continues one.

    Example:
      >>> import jax, optax
      >>> from rnnjax.data import count_batch
      >>> from rnnjax.models import RunningCount
      >>> start = fit_start(RunningCount(), optax.adam(0.1), count_batch(jax.random.key(0), 8, 5), seed=3)
      >>> start.steps, start.stop_reason, start.history["loss"].shape
      (0, 'running', (0,))
    """
    program = _program(model, optimizer, _draw(data), None, skip_nonfinite, watch or weight_elements,
                       fresh_batches, devices)
    batch = program.batch_at(program.source(data, seed), 0)
    state = init_state(model, program.optimizer, seed_keys(seed)[0], batch)
    rows = jax.eval_shape(program.step, state, batch)[1]
    history = {"step": np.zeros(0, np.int64)}
    history.update({k: np.zeros(0, v.dtype) for k, v in rows.items() if k != "diverged"})
    return FitResult(state, state.params, 0, "running", history)


def fit(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    data: Batch | Callable[[jax.Array], Batch],
    *,
    seed: int,
    max_steps: int,
    target_weight: float | None = None,
    weight_tol: float | Mapping[str, float] = 1e-5,
    loss_tol: float | None = None,
    skip_nonfinite: int = 0,
    dead_steps: int = 25,
    sync_every: int = 25,
    progress: bool = True,
    start: FitResult | None = None,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable[[FitResult], None] | None = None,
    interrupt: Callable[[], bool] | None = None,
    watch: Callable[[Any], dict[str, jax.Array]] | None = None,
    fresh_batches: bool = True,
    devices: int | None = None,
) -> FitResult:
    """Trains from a random init until a stop rule holds; reproducible from ``seed``.

    Steps are dispatched without waiting; metrics come to the host every ``sync_every`` steps.
    There the rules are checked for each step since the last check, in order, and the state
    returned is the one from the first step at which a rule held. Each rule looks at that
    state itself: its weights, and its loss on the batch of the step that made it.

    A step whose loss, gradient or new weights are not finite stops the fit as "diverged" and
    the state before it is returned, unless ``skip_nonfinite`` is set: then the optimizer is
    wrapped in ``optax.apply_if_finite``, which skips up to that many non-finite gradients in
    a row (``history["skipped"]`` marks them) before it applies one, and the fit diverges.

    Args:
      model: the network (see ``make_train_step``).
      optimizer: an optax gradient transformation.
      data: a ``Batch`` to train on at every step, or a function ``key -> Batch`` that draws a
        fresh one each step (jitted here; batch ``i`` from ``fold_in(seed_keys(seed)[1], i)``).
        ``sweep`` draws the same batches for the same seed.
      seed: an integer; it fixes the init and every drawn batch.
      max_steps: the step budget.
      target_weight: if set, stop once every watched weight is within ``weight_tol`` of it.
      weight_tol: see ``target_weight``; a mapping gives each watched weight, by name, its own.
      loss_tol: if set, stop once the loss is at most this.
      skip_nonfinite: how many non-finite gradients in a row to skip; 0 stops at the first.
      dead_steps: stop as "dead" after this many steps in a row with every gradient zero and
        a positive loss.
      sync_every: steps between host syncs.
      progress: show a tqdm progress bar.
      start: a ``FitResult`` to continue, e.g. one restored from a checkpoint; the fit then
        goes on exactly as the fit it came from would have (same model, optimizer, data, seed
        and settings). None starts from ``fit_start``.
      checkpoint_every: call ``on_checkpoint`` after every step whose number is a multiple of
        this, unless a rule stopped the fit at that step.
      on_checkpoint: receives a ``FitResult`` with stop_reason "running" (e.g. to save it).
      interrupt: polled before each step; once it returns True the fit stops as "interrupted"
        with the state of the last step taken.
      watch: ``params -> {name: scalar}``, the weights ``target_weight`` applies to and the
        history records; None: every element of every weight (``weight_elements``). For a
        reparametrised model, the weights the network computes with.
      fresh_batches: with a function as ``data``, draw a new batch every step (True), or the
        seed's batch 0 once and train on it throughout (False).
      devices: spread each batch over this many of ``jax.devices()`` (its first axis split
        evenly; parameters and optimizer state copied to each), None for all of them. On one
        device nothing is placed; on several the results equal one device's to float32 rounding.

    Returns:
      A ``FitResult``.

    Example:
      >>> import jax, optax
      >>> from rnnjax.data import count_batch
      >>> from rnnjax.models import RunningCount
      >>> batch = count_batch(jax.random.key(0), batch_size=8, length=5)
      >>> result = fit(RunningCount(), optax.adam(0.1), batch, seed=3, max_steps=3000,
      ...              target_weight=1.0, weight_tol=1e-6, progress=False)
      >>> result.stop_reason, result.steps < 3000
      ('weights', True)
      >>> fit(RunningCount(), optax.adam(0.1), batch, seed=0, max_steps=3000,
      ...     progress=False).stop_reason  # seed 0 draws W_ih <= 0
      'dead'
      >>> fit(RunningCount(), optax.adam(1e30), batch, seed=3, max_steps=3000,
      ...     progress=False)[2:4]  # the first step overflows: the init is returned
      (0, 'diverged')
    """
    for name, value, low in [("max_steps", max_steps, 1), ("sync_every", sync_every, 1), ("dead_steps", dead_steps, 1),
                             ("checkpoint_every", 1 if checkpoint_every is None else checkpoint_every, 1),
                             ("skip_nonfinite", skip_nonfinite, 0)]:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; received {value!r}.")
    watch = watch or weight_elements
    if start is None:
        start = fit_start(model, optimizer, data, seed=seed, skip_nonfinite=skip_nonfinite, watch=watch,
                          fresh_batches=fresh_batches, devices=devices)
    if start.steps > max_steps:
        raise ValueError(f"start has taken {start.steps} steps, more than max_steps={max_steps}.")
    program = _program(model, optimizer, _draw(data), target_weight, skip_nonfinite, watch, fresh_batches,
                       devices)
    source = program.source(data, seed)
    loss_tol = -np.inf if loss_tol is None else float(loss_tol)
    near = _near_rule(weight_tol, start.history, target_weight)
    dtypes = {k: v.dtype for k, v in start.history.items()}
    columns = {k: list(v) for k, v in start.history.items() if k != "step"}

    def result(state, stop_reason):
        history = {k: np.asarray(v, dtypes[k]) for k, v in columns.items()}
        return FitResult(state, start.initial_params, int(state.step), stop_reason,
                         {"step": np.arange(1, len(history["loss"]) + 1, dtype=dtypes["step"]), **history})

    def stop_rule(row, dead_run):
        if near(row):
            return "weights"
        if row["loss"] <= loss_tol:
            return "loss"
        return "dead" if dead_run >= dead_steps else None

    state = head = program.place(start.state)  # the last state taken, and the last one dispatched
    steps, pending = start.steps, []
    dead_run = _trailing_dead_steps(start.history)
    # A start whose last step already met a stop rule (a run killed after its final checkpoint)
    # stops there, as the uninterrupted fit did.
    stop_reason = stop_rule({k: v[-1] for k, v in start.history.items()}, dead_run) if steps else None
    with tqdm(total=max_steps, initial=steps, disable=not progress, unit="step") as bar:
        while stop_reason is None:
            dispatched = steps + len(pending)
            stopping = dispatched >= max_steps or (interrupt is not None and interrupt())
            if not stopping:
                head, row = program.step(head, program.batch_at(source, dispatched))
                pending.append((head, row))
                if len(pending) < sync_every:
                    continue
            rows = jax.device_get([row for _, row in pending])
            for (new_state, _), row in zip(pending, rows):
                if row.pop("diverged"):
                    stop_reason = "diverged"
                    break
                state, steps = new_state, steps + 1
                for k, v in row.items():
                    columns[k].append(v)
                dead_run = dead_run + 1 if row["grad_norm"] == 0 and row["loss"] > 0 else 0
                stop_reason = stop_rule(row, dead_run)
                if stop_reason:
                    break
                if on_checkpoint is not None and checkpoint_every and steps % checkpoint_every == 0:
                    on_checkpoint(result(state, "running"))
            bar.update(steps - bar.n)
            if columns["loss"]:
                bar.set_postfix(loss=f"{columns['loss'][-1]:.3g}")
            pending = []
            if stop_reason is None and stopping:
                stop_reason = "budget" if steps >= max_steps else "interrupted"
    return result(state, stop_reason)


def weights_by_path(params) -> dict[str, jax.Array]:
    """Returns the model's weights keyed by their path, e.g. ``{"cell/W_ih": ..., "cell/W_hh": ...}``."""
    flat = jax.tree_util.tree_flatten_with_path(params["params"])[0]
    return {"/".join(k.key for k in path): leaf for path, leaf in flat}


def weight_elements(params) -> dict[str, jax.Array]:
    """Returns every weight's element as a scalar, keyed by path (``"cell/W_ih"``), with an index
    for weights of more than one element (``"dense/kernel[1]"``).

    Example:
      >>> import jax.numpy as jnp
      >>> sorted(weight_elements({"params": {"dense": {"kernel": jnp.ones((1, 2))}}}))
      ['dense/kernel[0]', 'dense/kernel[1]']
    """
    named = {}
    for name, w in weights_by_path(params).items():
        flat = jnp.ravel(w)
        named.update({name: flat[0]} if flat.size == 1 else
                     {f"{name}[{i}]": flat[i] for i in range(flat.size)})
    return named


def _observe(watched: dict[str, jax.Array], target) -> dict[str, jax.Array]:
    """Returns the watched weights and "weight_error", the largest ``|w - target|`` among them
    (NaN when the target is NaN)."""
    errors = [jnp.abs(w - target) for w in watched.values()]
    return {**watched, "weight_error": jnp.max(jnp.stack(errors))}


def _near_rule(weight_tol, history: dict[str, np.ndarray], target_weight) -> Callable[[dict], bool]:
    """Returns ``row -> bool``: every watched weight of the row within its tolerance of the target."""
    if not isinstance(weight_tol, Mapping):
        weight_tol = float(weight_tol)
        return lambda row: float(row["weight_error"]) < weight_tol  # in float64: a tol below float32's is not 0
    names = set(history) - {"step", "loss", "grad_norm", "skipped", "weight_error"}
    if set(weight_tol) != names:
        raise ValueError(f"weight_tol must name every watched weight, {sorted(names)}; received "
                         f"{sorted(weight_tol)}.")
    if target_weight is None:
        return lambda row: False
    return lambda row: all(abs(float(row[name]) - target_weight) < tol for name, tol in weight_tol.items())


def _trailing_dead_steps(history: dict[str, np.ndarray]) -> int:
    """Returns how many of the last steps in ``history`` had a zero gradient and a positive loss."""
    dead = (history["grad_norm"] == 0) & (history["loss"] > 0)
    return len(dead) - int(np.flatnonzero(~dead)[-1]) - 1 if (~dead).any() else len(dead)

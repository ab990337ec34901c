"""Training: a jitted optax step, and a loop that runs it until a stop rule holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from rnnjax.data import Batch
from rnnjax.masking import length_mask

__all__ = ["TrainState", "FitResult", "init_state", "squared_error", "make_train_step", "fit",
           "weights_by_path"]


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
      state: the final ``TrainState``.
      initial_params: the variables drawn at init, before any step.
      steps: number of steps taken.
      stop_reason: "weights" (every weight within ``weight_tol`` of ``target_weight``),
        "loss" (loss at most ``loss_tol``), "budget" (``max_steps`` taken) or "dead" (every
        gradient exactly zero while the loss is not: a dead ReLU, which no optimizer can leave).
      history: per-step host arrays: "step", "loss", "grad_norm", "weight_error" (largest
        distance of a weight from ``target_weight``; NaN without one), and one entry per weight
        named by its path (e.g. "cell/W_ih"): the weight's first element after the step.
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

    def loss_fn(params, batch: Batch):
        predictions = model.apply(params, batch.xs, batch.lengths)
        return squared_error(predictions, batch.targets, batch.lengths)

    @jax.jit
    def step(state: TrainState, batch: Batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def fit(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    data: Batch | Callable[[jax.Array], Batch],
    *,
    seed: int,
    max_steps: int,
    target_weight: float | None = None,
    weight_tol: float = 1e-5,
    loss_tol: float | None = None,
    sync_every: int = 25,
    progress: bool = True,
) -> FitResult:
    """Trains from a random init until a stop rule holds; reproducible from ``seed``.

    Steps are dispatched without waiting; metrics come to the host every ``sync_every`` steps.
    There the rules are checked for each step since the last check, and the state returned is
    the one from the first step at which a rule held.

    Args:
      model: the network (see ``make_train_step``).
      optimizer: an optax gradient transformation.
      data: a ``Batch`` to train on at every step, or a function ``key -> Batch`` that draws a
        fresh one each step (jitted here).
      seed: an integer; it fixes the init and every drawn batch.
      max_steps: the step budget.
      target_weight: if set, stop once every weight is within ``weight_tol`` of it.
      weight_tol: see ``target_weight``.
      loss_tol: if set, stop once the loss is at most this.
      sync_every: steps between host syncs.
      progress: show a tqdm progress bar.

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
    """
    if max_steps < 1 or sync_every < 1:
        raise ValueError(
            f"max_steps and sync_every must be positive; received {max_steps} and {sync_every}."
        )
    init_key, data_key = jax.random.split(jax.random.key(seed))
    if isinstance(data, Batch):
        batch_at = lambda _: data  # noqa: E731
    else:
        batch_at = jax.jit(lambda i: data(jax.random.fold_in(data_key, i)))
    step = make_train_step(model, optimizer)
    state = init_state(model, optimizer, init_key, batch_at(0))
    initial_params = state.params
    target = jnp.nan if target_weight is None else target_weight

    @jax.jit
    def observed_step(state, batch):  # one dispatch per step: the step and what fit watches
        state, metrics = step(state, batch)
        return state, {**metrics, **_observe(state.params, target)}

    chunks, states, stop_reason = [], [], "budget"
    with tqdm(total=max_steps, disable=not progress, unit="step") as bar:
        for i in range(max_steps):
            state, row = observed_step(state, batch_at(i))
            states.append((state, row))
            if len(states) < sync_every and i + 1 < max_steps:
                continue
            rows = jax.device_get([row for _, row in states])
            chunk = {k: np.asarray([row[k] for row in rows]) for k in rows[0]}
            hits = _stop_reasons(chunk, weight_tol, loss_tol)
            first = next((n for n, reason in enumerate(hits) if reason), len(hits) - 1)
            chunks.append({k: v[: first + 1] for k, v in chunk.items()})
            state = states[first][0]
            bar.update(first + 1)
            bar.set_postfix(loss=f"{chunk['loss'][first]:.3g}")
            states = []
            if hits[first]:
                stop_reason = hits[first]
                break
            if ((chunk["grad_norm"] == 0) & (chunk["loss"] > 0)).all():
                stop_reason = "dead"
                break
    history = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    steps = len(history["loss"])
    history["step"] = np.arange(1, steps + 1)
    return FitResult(state, initial_params, steps, stop_reason, history)


def weights_by_path(params) -> dict[str, jax.Array]:
    """Returns the model's weights keyed by their path, e.g. ``{"cell/W_ih": ..., "cell/W_hh": ...}``."""
    flat = jax.tree_util.tree_flatten_with_path(params["params"])[0]
    return {"/".join(k.key for k in path): leaf for path, leaf in flat}


def _observe(params, target) -> dict[str, jax.Array]:
    """Returns each weight's first element by path and "weight_error", the largest
    ``|w - target|`` over every weight (NaN when the target is NaN)."""
    weights = weights_by_path(params)
    errors = [jnp.max(jnp.abs(w - target)) for w in weights.values()]
    return {**{k: w.reshape(-1)[0] for k, w in weights.items()},
            "weight_error": jnp.max(jnp.stack(errors))}


def _stop_reasons(chunk, weight_tol, loss_tol) -> list[str | None]:
    """Returns, for each step of the chunk, the rule that held there ("weights", "loss") or None."""
    near = chunk["weight_error"] < weight_tol
    low = chunk["loss"] <= (-np.inf if loss_tol is None else loss_tol)
    return ["weights" if w else "loss" if loss else None for w, loss in zip(near, low)]

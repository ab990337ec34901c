"""Training: a jitted optax step, and ``fit``, a loop that runs it until a stop rule holds."""

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

from rnnjax.core import checks
from rnnjax.core.masking import length_mask
from rnnjax.training.data import Batch
from rnnjax.training.devices import device_mesh, replicate, shard_leading_axis
from rnnjax.training.stopping import DIVERGED, StopRules, reason, stop_code

__all__ = ["TrainState", "FitResult", "StepOptions", "LoopOptions", "init_state", "squared_error",
           "make_train_step", "seed_keys", "fit_start", "fit", "weights_by_path", "weight_elements"]

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
        (``loop.interrupt()`` returned True), or "running" (a run in progress: ``fit_start`` and
        the snapshots given to ``loop.on_checkpoint``); ``stopping.STOP_REASONS`` says each in words.
      history: per-step host arrays, one row per step taken: "step"; "loss", the loss of the
        state after the step on that step's batch; "grad_norm", of the gradient the step
        applied; "skipped", True where a non-finite update was skipped (``skip_nonfinite``);
        "weight_error", the largest distance of a watched weight from ``target_weight`` (NaN
        without one); and, with ``StepOptions.watch``, one entry per watched name.
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
    """Mean squared error; for ``(batch, time)`` predictions, over the steps before each length.

    Example:
      >>> import jax.numpy as jnp
      >>> float(squared_error(jnp.array([[1.0, 5.0]]), jnp.array([[2.0, 0.0]]), jnp.array([1])))
      1.0
    """
    predictions = checks.floating_array("predictions", predictions, shapes=("(batch,)", "(batch, time)"))
    targets = checks.floating_array("targets", targets)
    if targets.shape != predictions.shape:
        raise checks.InputError(f"targets must have the predictions' shape {predictions.shape}; received "
                                f"{targets.shape}.", "targets")
    if predictions.ndim == 1:
        return jnp.mean((predictions - targets) ** 2)
    lengths = checks.lengths(lengths, *predictions.shape, sequences="predictions")
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
      >>> from rnnjax.training.data import l1_batch
      >>> from rnnjax.training.models import L1Norm
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


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """Returns ``(init_key, data_key)``: the keys ``fit`` draws the init and the batches from.

    Batch ``i`` (counting from 0) comes from ``jax.random.fold_in(data_key, i)``.
    """
    init_key, data_key = jax.random.split(jax.random.key(seed))
    return init_key, data_key


class StepOptions(NamedTuple):
    """How ``fit`` makes each step: part of the compiled program.

    Attributes:
      watch: ``params -> {name: scalar}``, the numbers ``target_weight`` applies to, recorded in
        the history at every step; for a reparametrised model, the weights the network computes
        with. None: every weight, by path, and only the largest distance recorded
        ("weight_error"), so that memory does not grow with steps x parameters.
      fresh_batches: with a function as ``data``, draw a new batch every step (True), or the
        seed's batch 0 once and train on it throughout (False).
      skip_nonfinite: how many non-finite updates in a row ``optax.apply_if_finite`` skips
        before the fit diverges; 0 stops at the first.
      devices: spread each batch over this many of ``jax.devices()`` (its first axis split
        evenly; parameters and optimizer state copied to each), None for the most of them that
        split the batch evenly. On one
        device nothing is placed; on several the results equal one device's to float32 rounding.
    """

    watch: Callable[[Any], dict[str, jax.Array]] | None = None
    fresh_batches: bool = True
    skip_nonfinite: int = 0
    devices: int | None = None


class LoopOptions(NamedTuple):
    """How ``fit``'s host loop runs: none of it changes a result.

    Attributes:
      sync_every: steps dispatched between two reads of their metrics by the host.
      progress: show a tqdm progress bar.
      interrupt: polled before each step; once it returns True the fit stops as "interrupted"
        with the state of the last step taken.
      checkpoint_every: call ``on_checkpoint`` after every step whose number is a multiple of
        this, unless a rule stopped the fit at that step.
      on_checkpoint: receives a ``FitResult`` with stop_reason "running" (e.g. to save it).
    """

    sync_every: int = 25
    progress: bool = False
    interrupt: Callable[[], bool] | None = None
    checkpoint_every: int | None = None
    on_checkpoint: Callable[[FitResult], None] | None = None


class _Carry(NamedTuple):
    """What the compiled step carries: the state, and the stop rules' own."""

    state: TrainState
    dead_run: jax.Array  # steps in a row with every gradient 0 and a positive loss
    code: jax.Array  # stopping.stop_code of the last step; once non-zero, steps change nothing


class _Spec(NamedTuple):
    """What a fit's compiled program depends on, hashable: flax modules and NamedTuples of
    module-level functions compare by value, so equal settings share one compilation."""

    model: Any
    optimizer: optax.GradientTransformation
    draw: Callable[[jax.Array], Batch] | None  # None: one Batch given by the caller
    rules: StopRules
    options: StepOptions


class _Program(NamedTuple):
    """The compiled pieces of a fit."""

    optimizer: optax.GradientTransformation  # wrapped in apply_if_finite when skipping
    source: Callable  # (data, seed) -> the data key, or the batch of every step (on the devices)
    batch_at: Callable  # (source, i) -> Batch
    step: Callable  # (carry, batch) -> (carry, row): the update and the stop rules, one dispatch
    place: Callable  # tree -> the tree on the devices (replicated), or as it is on one


def _weights(spec: _Spec, params) -> dict[str, jax.Array]:
    return weights_by_path(params) if spec.options.watch is None else spec.options.watch(params)


@functools.lru_cache(maxsize=16)
def _program(spec: _Spec) -> _Program:
    """Builds the jitted pieces once per ``_Spec``, so fits from other seeds reuse them."""
    options, rules = spec.options, spec.rules
    optimizer = spec.optimizer
    if options.skip_nonfinite:
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=options.skip_nonfinite)
    train_step = make_train_step(spec.model, optimizer)
    source, batch_at, place = _placement(spec.draw, options)

    @jax.jit  # the batch is drawn by a program of its own, so no fusion into the step can move it
    def step(carry: _Carry, batch: Batch):
        new, metrics = train_step(carry.state, batch)
        loss = _loss(spec.model, new.params, batch)
        if options.skip_nonfinite:  # apply_if_finite rejected it, and has not given up yet
            skipped = ~new.opt_state.last_finite & (new.opt_state.notfinite_count <= options.skip_nonfinite)
        else:
            skipped = jnp.zeros((), bool)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(loss)
        params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(w)) for w in jax.tree.leaves(new.params)]))
        dead = (metrics["grad_norm"] == 0) & (loss > 0)
        dead_run = jnp.where(dead, carry.dead_run + 1, 0)
        watched = _weights(spec, new.params)
        code = stop_code(rules, diverged=~params_finite | (~skipped & ~finite), watched=watched, loss=loss,
                         dead_run=dead_run)
        target = jnp.nan if rules.target_weight is None else rules.target_weight
        errors = [jnp.max(jnp.abs(w - target)) for w in watched.values()]
        row = {"loss": loss, "grad_norm": metrics["grad_norm"], "skipped": skipped,
               "weight_error": jnp.max(jnp.stack(errors)), "code": code,
               **({} if options.watch is None else watched)}
        # A diverged step keeps the last finite state; after a stop, nothing changes.
        keep = (carry.code != 0) | (code == DIVERGED)
        new_carry = jax.tree.map(lambda old, n: jnp.where(keep, old, n), carry,
                                 _Carry(new, dead_run, code))
        return new_carry._replace(code=jnp.where(carry.code != 0, carry.code, code)), row

    return _Program(optimizer, source, batch_at, step, place)


def _placement(draw, options: StepOptions):
    """``(source, batch_at, place)``: where each step's batch comes from, and how trees are put
    on the devices."""
    mesh = device_mesh(options.devices)
    if mesh.size == 1:  # one device: nothing is placed, exactly as without a mesh
        place = shard = lambda tree: tree  # noqa: E731
    else:  # the batch split over the devices, the parameters and optimizer state on each
        place = functools.partial(replicate, mesh=mesh)
        shard = functools.partial(shard_leading_axis, mesh=mesh)
    if draw is None:
        return (lambda data, seed: shard(data)), (lambda source, i: source), place
    if not options.fresh_batches:  # the seed's first batch, kept for every step
        first = jax.jit(lambda key: draw(jax.random.fold_in(key, 0)))
        return (lambda data, seed: shard(first(seed_keys(seed)[1]))), (lambda source, i: source), place
    drawn = jax.jit(lambda key, i: draw(jax.random.fold_in(key, i)))
    return (lambda data, seed: seed_keys(seed)[1]), (lambda source, i: shard(drawn(source, i))), place


def _spec(model, optimizer, data, rules: StopRules, options: StepOptions) -> _Spec:
    """The checked description of a fit (``options.devices`` None: the most devices that split
    the batch evenly)."""
    checks.interface("model", model, ("init", "apply"), "a flax module or a Reparametrized model")
    checks.interface("optimizer", optimizer, ("init", "update"), "an optax transformation, e.g. optax.adam(0.1)")
    if not isinstance(options, StepOptions):
        raise checks.InputError(f"options must be a StepOptions; received {type(options).__name__}.", "options")
    batch = check_data(data)
    options = options._replace(skip_nonfinite=checks.integer("skip_nonfinite", options.skip_nonfinite, low=0))
    if options.devices is None:
        available = len(jax.devices())
        options = options._replace(devices=max(d for d in range(1, available + 1) if batch % d == 0))
    draw = None if isinstance(data, Batch) else data
    return _Spec(model, optimizer, draw, rules._replace(max_steps=1), options)


def check_data(data: Any) -> int:
    """Refuses ``data`` that is neither a ``Batch`` nor a function ``key -> Batch``; returns its
    batch size."""
    if not isinstance(data, Batch) and not callable(data):
        raise checks.InputError(f"data must be a Batch or a function key -> Batch; received {type(data).__name__}.",
                                "data")
    batch = data if isinstance(data, Batch) else jax.eval_shape(lambda key: data(key), jax.random.key(0))
    if not isinstance(batch, Batch):
        raise checks.InputError(f"data must give a Batch(xs, lengths, targets); it gave {type(batch).__name__}.",
                                "data")
    return batch.xs.shape[0]


def fit_start(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    data: Batch | Callable[[jax.Array], Batch],
    *,
    seed: int,
    options: StepOptions = StepOptions(),
    abstract: bool = False,
) -> FitResult:
    """Returns where ``fit`` starts from ``seed``: step 0, the drawn init, an empty history.

    It has the structure of every later state of the same fit (same ``options``), so it is the
    template a checkpoint is restored into (``rnnjax.training.checkpoints``);
    ``fit(..., start=...)`` continues one. With ``abstract`` its arrays are
    ``jax.ShapeDtypeStruct``: nothing is computed or compiled, which is all a restore needs.

    Example:
      >>> import jax, optax
      >>> from rnnjax.training.data import count_batch
      >>> from rnnjax.training.models import RunningCount
      >>> start = fit_start(RunningCount(), optax.adam(0.1), count_batch(jax.random.key(0), 8, 5), seed=0)
      >>> start.steps, start.stop_reason, start.history["loss"].shape
      (0, 'running', (0,))
    """
    return _start(_spec(model, optimizer, data, StopRules(1), options), data, checks.seed("seed", seed),
                  abstract=abstract)


def _start(spec: _Spec, data, seed: int, *, abstract: bool = False) -> FitResult:
    program = _program(spec)

    def initial():
        batch = program.batch_at(program.source(data, seed), 0)
        return init_state(spec.model, program.optimizer, seed_keys(seed)[0], batch), batch

    state, batch = jax.eval_shape(initial) if abstract else initial()
    zero = jax.ShapeDtypeStruct((), jnp.int32)
    rows = jax.eval_shape(program.step, _Carry(state, zero, zero), batch)[1]
    history = {"step": np.zeros(0, np.int64)}
    history.update({k: np.zeros(0, v.dtype) for k, v in rows.items() if k != "code"})
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
    dead_steps: int = 25,
    options: StepOptions = StepOptions(),
    loop: LoopOptions = LoopOptions(),
    start: FitResult | None = None,
) -> FitResult:
    """Trains from a random init until a stop rule holds; reproducible from ``seed``.

    Steps are dispatched without waiting; the stop rules (``rnnjax.training.stopping``) are
    decided inside each compiled step, and the host reads them every ``loop.sync_every`` steps.
    The state returned is the one from the first step at which a rule held (a step after it
    changes nothing). Each rule looks at that state itself: its weights, and its loss on the
    batch of the step that made it. A step whose loss, gradient or new weights are not finite
    stops the fit as "diverged" with the state before it, unless ``options.skip_nonfinite``
    lets ``optax.apply_if_finite`` skip it (``history["skipped"]`` marks those).

    Args:
      model: a module whose ``apply(params, xs, lengths)`` gives predictions shaped like the
        batch's targets.
      optimizer: an optax gradient transformation.
      data: a ``Batch`` to train on at every step, or a function ``key -> Batch`` (batch ``i``
        from ``fold_in(seed_keys(seed)[1], i)``; ``sweep`` draws the same ones).
      seed: an integer in ``[0, 2**31)``; it fixes the init and every drawn batch.
      max_steps, target_weight, weight_tol, loss_tol, dead_steps: the stop rules
        (``StopRules``): the budget; stop once every watched weight is within ``weight_tol``
        (one number, or one per watched name) of ``target_weight``; once the loss is at most
        ``loss_tol``; or as "dead" after ``dead_steps`` steps in a row with every gradient 0
        and a positive loss.
      options: how each step is made (``StepOptions``: ``watch``, ``fresh_batches``,
        ``skip_nonfinite``, ``devices``).
      loop: how the host loop runs (``LoopOptions``: ``sync_every``, ``progress``,
        ``interrupt``, ``checkpoint_every``, ``on_checkpoint``).
      start: a ``FitResult`` to continue, e.g. restored from a checkpoint; the fit goes on
        exactly as the one it came from would have (same model, optimizer, data, seed and
        options). None starts from ``fit_start``.

    Returns:
      A ``FitResult``.

    Example:
      >>> import jax, optax
      >>> from rnnjax.training.data import count_batch
      >>> from rnnjax.training.models import RunningCount
      >>> batch = count_batch(jax.random.key(0), batch_size=8, length=5)
      >>> result = fit(RunningCount(), optax.adam(0.1), batch, seed=0, max_steps=3000,
      ...              target_weight=1.0, weight_tol=1e-6)
      >>> result.stop_reason, result.steps < 3000
      ('weights', True)
      >>> fit(RunningCount(), optax.adam(0.1), batch, seed=3, max_steps=3000).stop_reason  # W_ih <= 0
      'dead'
      >>> fit(RunningCount(), optax.adam(1e30), batch, seed=0, max_steps=3000)[2:4]  # overflows at once
      (0, 'diverged')
    """
    rules = StopRules.checked(max_steps=max_steps, target_weight=target_weight, weight_tol=weight_tol,
                              loss_tol=loss_tol, dead_steps=dead_steps)
    spec = _spec(model, optimizer, data, rules, options)
    seed, loop = checks.seed("seed", seed), _checked_loop(loop)
    _check_tolerances(spec, data, seed)
    start = _start(spec, data, seed) if start is None else _checked_start(start, rules)
    return _run(spec, data, seed, rules, loop, start)


def _checked_loop(loop: LoopOptions) -> LoopOptions:
    if not isinstance(loop, LoopOptions):
        raise checks.InputError(f"loop must be a LoopOptions; received {type(loop).__name__}.", "loop")
    every = loop.checkpoint_every
    return loop._replace(sync_every=checks.integer("sync_every", loop.sync_every),
                         checkpoint_every=None if every is None else checks.integer("checkpoint_every", every))


def _checked_start(start: FitResult, rules: StopRules) -> FitResult:
    if not isinstance(start, FitResult):
        raise checks.InputError(f"start must be a FitResult; received {type(start).__name__}.", "start")
    if start.steps > rules.max_steps:
        raise checks.InputError(f"start has taken {start.steps} steps, more than max_steps={rules.max_steps}.",
                                "start")
    return start


def _check_tolerances(spec: _Spec, data, seed: int) -> None:
    """Refuses a ``weight_tol`` mapping that does not name every watched weight (traced only)."""
    if not isinstance(spec.rules.weight_tol, tuple):
        return
    params = _start(spec._replace(rules=StopRules(1)), data, seed, abstract=True).state.params
    names = sorted(jax.eval_shape(functools.partial(_weights, spec), params))
    given = [name for name, _ in spec.rules.weight_tol]
    if given != names:
        raise checks.InputError(f"weight_tol must name every watched weight, {names}; received {given}.",
                                "weight_tol")


def _run(spec: _Spec, data, seed: int, rules: StopRules, loop: LoopOptions, start: FitResult) -> FitResult:
    """``fit``'s loop: dispatch a chunk of steps, read their rows, stop at the first rule."""
    program, history = _program(spec), _History(start.history)
    source = program.source(data, seed)
    dead_run = _trailing_dead_steps(start.history)
    carry = program.place(_Carry(start.state, jnp.int32(dead_run), jnp.int32(0)))
    steps, code, interrupted = start.steps, _code_at(spec, rules, start, dead_run), False
    with tqdm(total=rules.max_steps, initial=steps, disable=not loop.progress, unit="step") as bar:
        while not code and not interrupted and steps < rules.max_steps:
            rows = []
            for i in range(_chunk(steps, rules.max_steps, loop)):
                interrupted = loop.interrupt is not None and loop.interrupt()
                if interrupted:
                    break
                carry, row = program.step(carry, program.batch_at(source, steps + i))
                rows.append(row)
            taken, code = history.extend(jax.device_get(rows))
            steps += taken
            bar.update(taken)
            bar.set_postfix(loss=history.last_loss())
            if not code and loop.on_checkpoint and loop.checkpoint_every and steps % loop.checkpoint_every == 0:
                loop.on_checkpoint(history.result(start, carry.state, "running"))
    stop_reason = reason(code) or ("budget" if steps >= rules.max_steps else "interrupted")
    return history.result(start, carry.state, stop_reason)


def _chunk(steps: int, max_steps: int, loop: LoopOptions) -> int:
    """Steps to dispatch before the host reads them: at most ``sync_every``, and ending at the
    budget and at the next checkpoint, whose state must be the one saved."""
    chunk = min(loop.sync_every, max_steps - steps)
    if loop.on_checkpoint and loop.checkpoint_every:
        chunk = min(chunk, loop.checkpoint_every - steps % loop.checkpoint_every)
    return chunk


def _code_at(spec: _Spec, rules: StopRules, start: FitResult, dead_run: int) -> int:
    """The stop code of ``start``'s last step (0 for step 0): a run killed after its final
    checkpoint stops there, as the uninterrupted one did."""
    if not start.steps:
        return 0
    code = stop_code(rules, diverged=jnp.zeros((), bool), watched=_weights(spec, start.state.params),
                     loss=start.history["loss"][-1], dead_run=jnp.int32(dead_run))
    return int(code)


class _History:
    """The host's copy of the per-step rows: one list a column."""

    def __init__(self, history: dict[str, np.ndarray]):
        self.dtypes = {k: v.dtype for k, v in history.items()}
        self.columns = {k: list(v) for k, v in history.items() if k != "step"}

    def extend(self, rows: list[dict]) -> tuple[int, int]:
        """Appends the rows up to the first whose code is not 0 (that one too, unless it
        diverged); returns how many were appended and that code."""
        for taken, row in enumerate(rows):
            code = int(row.pop("code"))
            if code == DIVERGED:
                return taken, code
            for k, v in row.items():
                self.columns[k].append(v)
            if code:
                return taken + 1, code
        return len(rows), 0

    def last_loss(self) -> str:
        return f"{self.columns['loss'][-1]:.3g}" if self.columns["loss"] else "n/a"

    def result(self, start: FitResult, state: TrainState, stop_reason: str) -> FitResult:
        history = {k: np.asarray(v, self.dtypes[k]) for k, v in self.columns.items()}
        steps = len(history["loss"])
        history = {"step": np.arange(1, steps + 1, dtype=self.dtypes["step"]), **history}
        return FitResult(state, start.initial_params, steps, stop_reason, history)


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
        flat = w.reshape(-1)  # NumPy arrays stay NumPy: a restored run is checked without compiling
        named.update({name: flat[0]} if flat.size == 1 else
                     {f"{name}[{i}]": flat[i] for i in range(flat.size)})
    return named




def _trailing_dead_steps(history: dict[str, np.ndarray]) -> int:
    """Returns how many of the last steps in ``history`` had a zero gradient and a positive loss."""
    dead = (history["grad_norm"] == 0) & (history["loss"] > 0)
    return len(dead) - int(np.flatnonzero(~dead)[-1]) - 1 if (~dead).any() else len(dead)

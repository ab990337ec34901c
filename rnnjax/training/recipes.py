"""Training recipes: how the weights are parametrised, the optimizer and its schedule, the data.

A recipe never sets or initialises a weight by hand: every trained parameter is drawn at random
as the model draws it (PyTorch's U(-1, 1) for a scalar cell), and a recipe only chooses what
the network computes with (the parameters themselves, or products of them), the optimizer and
the batches. ``benchmarks/SWEEPS.md`` holds the measured rates.

- "notebook": seed 000 as it was run: Adam lr 0.1, one fixed batch of 8 sequences, 3,000 steps.
  Half of all inits draw ``W_ih <= 0``: for inputs that are never negative every state and every
  gradient is then exactly 0 (a dead ReLU), so about half the runs never move.
- "squared": ``W_ih = v * v`` for a trained ``v`` drawn like ``W_ih`` was (a product of
  weights, so ``W_ih >= 0`` and the dead region is gone: ``v`` reaches 0 only by landing on it
  exactly); Adam lr 0.1 with ``b2 = 0.9999``, cosine-decayed to 0.001 over 3,000 steps and held
  there; a fresh batch every step. ``b2 = 0.9999`` and fresh batches let Adam land on 1.0
  exactly; the decay keeps the weights there once they arrive. The schedule does not depend on
  the step budget, so a run continued with a larger budget goes on as a longer one would have.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from rnnjax.training.data import Batch
from rnnjax.training.sweep import SweepResult, sweep
from rnnjax.training.fit import weight_elements

__all__ = ["Reparametrized", "square_input_weights", "Recipe", "RECIPES", "network_watch", "sweep_recipe"]


class Reparametrized(NamedTuple):
    """A model whose weights are a function of the trained parameters.

    ``init`` draws the trained parameters exactly as ``model.init`` draws its weights;
    ``apply`` runs ``model`` on ``transform(params)``. Both follow flax's signatures, so
    ``fit`` and ``sweep`` take a ``Reparametrized`` wherever they take a model.

    Attributes:
      model: a flax module.
      transform: ``params -> weights``, pure and jittable.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from rnnjax.training.models import L1Norm
      >>> net = Reparametrized(L1Norm(), square_input_weights)
      >>> params = net.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> float(net.transform(params)["params"]["cell"]["W_ih"][0, 0]) >= 0
      True
    """

    model: Any
    transform: Callable[[Any], Any]

    def init(self, key: jax.Array, *args, **kwargs) -> Any:
        return self.model.init(key, *args, **kwargs)

    def apply(self, params: Any, *args, **kwargs) -> Any:
        return self.model.apply(self.transform(params), *args, **kwargs)


def square_input_weights(params: Any) -> Any:
    """Returns ``params`` with every ``cell/W_ih`` replaced by its elementwise square."""

    def square(path, leaf):
        keys = [getattr(k, "key", None) for k in path]
        return leaf * leaf if keys[-2:] == ["cell", "W_ih"] else leaf

    return jax.tree_util.tree_map_with_path(square, params)


def _identity(params: Any) -> Any:
    return params


class _Watch(NamedTuple):
    """``watch(transform(params))``, hashable by value (a fit's compiled program is cached on it)."""

    watch: Callable[[Any], dict[str, jax.Array]]
    transform: Callable[[Any], Any]

    def __call__(self, params: Any) -> dict[str, jax.Array]:
        return self.watch(self.transform(params))


class Recipe(NamedTuple):
    """How to train a seed network.

    Attributes:
      name: the name ``RECIPES`` and ``--recipe`` know it by.
      summary: one line for help texts and reports.
      transform: ``params -> weights`` (see ``Reparametrized``).
      lr: Adam's learning rate (its peak, with ``decay_steps``).
      b2: Adam's second-moment decay.
      decay_steps: cosine-decay the learning rate over this many steps to ``final_lr`` times
        ``lr``, then hold it there; None keeps it constant.
      final_lr: see ``decay_steps``.
      fresh_batches: draw a new batch every step; else one batch per run, kept throughout.
      batch_size: sequences per batch.
      steps: the step budget.
    """

    name: str
    summary: str
    transform: Callable[[Any], Any]
    lr: float
    b2: float
    decay_steps: int | None
    final_lr: float
    fresh_batches: bool
    batch_size: int = 8
    steps: int = 3000

    def network(self, model: Any) -> Reparametrized:
        """Returns ``model`` with this recipe's parametrisation."""
        return Reparametrized(model, self.transform)

    @functools.lru_cache(maxsize=32)  # one object per (recipe, lr): fits share its compilation
    def optimizer(self, lr: float | None = None) -> optax.GradientTransformation:
        """Returns Adam as this recipe runs it, with a peak learning rate ``lr`` (None: ``self.lr``)."""
        lr = self.lr if lr is None else lr
        if self.decay_steps is not None:
            lr = optax.cosine_decay_schedule(lr, self.decay_steps, alpha=self.final_lr)
        return optax.adam(lr, b2=self.b2)


RECIPES: dict[str, Recipe] = {
    "notebook": Recipe(
        "notebook", "seed 000's recipe: Adam lr 0.1, one fixed batch of 8, 3000 steps",
        _identity, lr=0.1, b2=0.999, decay_steps=None, final_lr=1.0, fresh_batches=False),
    "squared": Recipe(
        "squared", "W_ih = v*v; Adam lr 0.1, b2 0.9999, cosine decay to 0.001 over 3000 steps; "
        "a fresh batch of 8 each step",
        square_input_weights, lr=0.1, b2=0.9999, decay_steps=3000, final_lr=0.01, fresh_batches=True),
}


def network_watch(watch: Callable[[Any], dict[str, jax.Array]], transform: Callable[[Any], Any]) -> _Watch:
    """``params -> watch(transform(params))``: the numbers ``watch`` picks of the weights a
    reparametrised network computes with; equal arguments give equal (hashable) functions."""
    return _Watch(watch, transform)


def sweep_recipe(
    recipe: Recipe,
    model: Any,
    batch: Callable[[jax.Array, int], Batch],
    *,
    seeds: int,
    steps: int | None = None,
    lr: float | None = None,
    watch: Callable[[Any], dict[str, jax.Array]] = weight_elements,
    **kwargs,
) -> SweepResult:
    """Runs ``sweep`` on ``model`` trained by ``recipe``; convergence is judged on the weights
    the network computes with (``watch`` of the transformed parameters).

    Args:
      recipe: a ``Recipe``.
      model: a flax module.
      batch: ``(key, batch_size) -> Batch``.
      seeds: number of seeds.
      steps: the step budget (None: the recipe's).
      lr: the peak learning rate (None: the recipe's).
      watch: ``weights -> {name: scalar}``, the numbers that must reach the target.
      **kwargs: passed on to ``sweep`` (``first_seed``, ``tol``, ``devices``, ``progress``...).

    Example:
      >>> from rnnjax.training.data import count_batch
      >>> from rnnjax.training.models import RunningCount
      >>> result = sweep_recipe(RECIPES["squared"], RunningCount(),
      ...                       lambda key, n: count_batch(key, n, 5), seeds=8)
      >>> list(result.outcome) == ["converged"] * 8
      True
    """
    steps = recipe.steps if steps is None else steps
    network = recipe.network(model)
    return sweep(
        network,
        recipe.optimizer(lr),
        lambda key: batch(key, recipe.batch_size),
        seeds=seeds,
        steps=steps,
        fresh_batches=recipe.fresh_batches,
        watch=network_watch(watch, network.transform),
        **kwargs,
    )


"""The named checks that every public function runs on its arguments, once, at the boundary.

Each check takes the argument's name and value, returns the value in the form the code inside
uses (a Python ``int``, an ``int32`` array, ...), and otherwise raises ``InputError`` with a
message that names the argument, what was expected and what was received. Code behind a public
function trusts its arguments and checks nothing again.

This module imports JAX only inside the checks of arrays, so that the ``rnnjax`` command can
check its options without loading it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["InputError", "integer", "seed", "SEED_LIMIT", "number", "interface", "choice", "floating_array",
           "lengths", "cell", "variables", "key"]

SEED_LIMIT = 2**31  # seeds are integers in [0, SEED_LIMIT): what a run records and --seed takes


class InputError(ValueError, TypeError):
    """Bad input to a public rnnjax function or to the ``rnnjax`` command.

    It is both a ``ValueError`` and a ``TypeError``, so callers may catch either, and the
    command catches exactly this type (anything else is a bug). ``name`` is the argument the
    message is about (``"batch_size"``, ``"xs"``), or None.
    """

    def __init__(self, message: str, name: str | None = None):
        super().__init__(message)
        self.name = name


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def integer(name: str, value: Any, *, low: int = 1, high: int | None = None) -> int:
    """Returns ``value`` as a Python int in ``[low, high]`` (Python or NumPy integers; not bools).

    Example:
      >>> integer("batch_size", np.int64(8))
      8
    """
    try:
        number_ = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
    except TypeError:
        number_ = None
    if number_ is None or number_ < low or (high is not None and number_ > high):
        raise InputError(f"{name} must be {_integers(low, high)}; received {_show(value)}.", name)
    return number_


def _integers(low: int, high: int | None) -> str:
    """The integers of ``[low, high]`` in words: "a positive integer", "an integer >= 0 below 2**31"."""
    words = {0: "an integer >= 0", 1: "a positive integer"}.get(low, f"an integer >= {low}")
    if high is None:
        return words
    return f"{words} below 2**31" if high == 2**31 - 1 else f"an integer from {low} to {high:,}"


def seed(name: str, value: Any) -> int:
    """Returns ``value`` as a seed, an integer in ``[0, 2**31)``."""
    try:
        return integer(name, value, low=0, high=SEED_LIMIT - 1)
    except InputError:
        raise InputError(f"{name} must be a seed, an integer in [0, 2**31); received {_show(value)}.",
                         name) from None


def number(name: str, value: Any, *, low: float, high: float, open_low: bool = False,
           open_high: bool = False) -> float:
    """Returns ``value`` as a finite Python float in the interval from ``low`` to ``high``
    (open at either end if asked).

    Example:
      >>> number("tol", 1e-9, low=0, high=1, open_low=True, open_high=True)
      1e-09
    """
    try:
        as_float = None if isinstance(value, (bool, np.bool_, str, bytes)) else float(value)
    except (TypeError, ValueError, OverflowError):
        as_float = None
    inside = as_float is not None and math.isfinite(as_float) and (
        (low < as_float if open_low else low <= as_float)
        and (as_float < high if open_high else as_float <= high))
    if not inside:
        interval = (f"{'(' if open_low or math.isinf(low) else '['}{low:.4g}, "
                    f"{high:.4g}{')' if open_high or math.isinf(high) else ']'}")
        bounded = math.isfinite(low) and math.isfinite(high)
        kind = f"a number in {interval}" if bounded else "a finite number" + (
            "" if math.isinf(low) and math.isinf(high) else f" in {interval}")
        raise InputError(f"{name} must be {kind}; received {_show(value)}.", name)
    return as_float


def interface(name: str, value: Any, methods: Sequence[str], what: str) -> Any:
    """Returns ``value`` if it has every one of ``methods`` (an instance, not a class), such as a
    flax module's ``init`` and ``apply`` or an optax transformation's ``init`` and ``update``."""
    if isinstance(value, type) or not all(callable(getattr(value, m, None)) for m in methods):
        received = f"the class {value.__name__}" if isinstance(value, type) else type(value).__name__
        raise InputError(f"{name} must be {what} (with {', '.join(methods)}); received {received}.", name)
    return value


def choice(name: str, value: Any, options: Sequence[str]) -> str:
    """Returns ``value`` if it is one of ``options``."""
    if not isinstance(value, str) or value not in options:
        raise InputError(f"{name} must be one of {tuple(options)}; received {_show(value)}.", name)
    return value


def floating_array(name: str, value: Any, *, shapes: Sequence[str] = (), complex_ok: bool = False) -> Any:
    """Returns ``value`` as a JAX array after checking that it is floating point (or complex,
    given ``complex_ok``), has no empty axis and, given ``shapes`` (e.g.
    ``("(batch, time, features)",)``), one of those ranks; an axis written ``*batch`` stands for
    any number of axes, none included.

    Example:
      >>> floating_array("xs", [[1.0, 2.0]], shapes=("(batch, time)",)).shape
      (1, 2)
      >>> floating_array("xs", [[1.0, 2.0]], shapes=("(*batch, time, features)",)).shape
      (1, 2)
    """
    import jax
    import jax.numpy as jnp

    if not isinstance(value, (jax.Array, np.ndarray)):
        received = type(value).__name__
        try:
            value = np.asarray(value)  # NumPy first: JAX refuses what is no array in its own words
        except ValueError:  # a ragged list
            raise InputError(f"{name} must be a floating-point array; received a ragged {received}.",
                             name) from None
        if value.dtype.kind in "OSUV":
            raise InputError(f"{name} must be a floating-point array; received {received} of dtype "
                             f"{value.dtype}.", name)
    if not jnp.issubdtype(value.dtype, jnp.inexact if complex_ok else jnp.floating):
        kind = "floating-point or complex" if complex_ok else "floating-point"
        raise InputError(f"{name} must be a {kind} array; received dtype {value.dtype}. "
                         f"Convert it with {name}.astype(jnp.float32).", name)
    if shapes and not any(_fits(value.ndim, shape) for shape in shapes):
        fix = " Add a features axis with xs[..., None], or a batch axis with xs[None]."
        raise InputError(f"{name} must have shape {' or '.join(shapes)}; received shape "
                         f"{tuple(value.shape)}." + (fix if name == "xs" else ""), name)
    if 0 in value.shape:
        raise InputError(f"{name} must hold at least one sequence and one time step; received "
                         f"shape {tuple(value.shape)}.", name)
    return jnp.asarray(value)


def _fits(rank: int, shape: str) -> bool:
    """Whether an array of ``rank`` axes can have ``shape``, e.g. ``"(*batch, time, features)"``."""
    axes = [axis.strip() for axis in shape.strip("()").split(",") if axis.strip()]
    fixed = [axis for axis in axes if not axis.startswith("*")]
    return rank >= len(fixed) if len(fixed) < len(axes) else rank == len(fixed)


def lengths(value: Any, batch: int | tuple[int, ...], time: int, *, sequences: str = "xs",
            name: str = "lengths") -> Any:
    """Returns the ``lengths`` of sequences of ``time`` steps as int32 in ``[0, time]``, shaped
    ``(batch,)`` (or ``batch`` when it is a shape, several batch axes or none); None means every
    sequence is full.

    Concrete lengths outside ``[0, time]`` are refused; traced ones (under ``jit``, where the
    values are unknown) are clipped in their own type: above ``time`` acts as ``time``, below 0
    as 0, and no uint32 or 64-bit value wraps around int32.

    Example:
      >>> import jax.numpy as jnp
      >>> lengths(jnp.array([3, 0], jnp.uint8), 2, 5)
      Array([3, 0], dtype=int32)
    """
    import jax
    import jax.numpy as jnp

    shape = tuple(batch) if isinstance(batch, tuple) else (batch,)
    if value is None:
        return jnp.full(shape, time, jnp.int32)
    if not isinstance(value, jax.core.Tracer):  # under jit the values are unknown
        value = np.asarray(value)  # keeps int64 and uint types, so the range check sees them
        if value.dtype == object and all(type(n) is int for n in value.flat):  # beyond 64 bits
            as_float = np.asarray(value, np.float64)
            raise InputError(f"{name} must lie in [0, {time}] (the time axis of {sequences}); received "
                             f"values from {as_float.min():.4g} to {as_float.max():.4g}.", name)
    if value.shape != shape:
        axes = "(batch,)" if isinstance(batch, int) else "(*batch,)"
        raise InputError(f"{name} must have shape {axes} = {shape} to match {sequences}; "
                         f"received shape {value.shape}.", name)
    if not jnp.issubdtype(value.dtype, jnp.integer):
        raise InputError(f"{name} must be integers; received dtype {value.dtype}. Convert them "
                         f"with {name}.astype(jnp.int32).", name)
    if isinstance(value, np.ndarray):
        if value.min() < 0 or value.max() > time:
            raise InputError(f"{name} must lie in [0, {time}] (the time axis of {sequences}); "
                             f"received values from {value.min()} to {value.max()}.", name)
        return jnp.asarray(value.astype(np.int32))
    if jnp.iinfo(value.dtype).bits > 32 or jnp.iinfo(value.dtype).max > jnp.iinfo(jnp.int32).max:
        # Traced: clip in the lengths' own type first, so that uint32 and 64-bit values cannot
        # wrap around int32 (2**32 + 3 to 3, -2**32 + 3 to 3).
        value = jnp.clip(value, 0, time)
    return jnp.clip(value.astype(jnp.int32), 0, time)


def cell(name: str, value: Any) -> Any:
    """Returns ``value`` if it is a flax recurrent cell: a module with ``initialize_carry``."""
    import flax.linen as nn

    if not isinstance(value, nn.Module) or not callable(getattr(value, "initialize_carry", None)):
        raise InputError(f"{name} must be a flax recurrent cell (a module with initialize_carry), such "
                         f"as ReLUCell(features=1) or nn.LSTMCell; received {type(value).__name__}.", name)
    return value


def variables(name: str, value: Any, expected: Any, *, what: str = "", fix: str = "") -> Any:
    """Returns ``value`` if it is a flax variables dict ``{'params': weights}`` whose weights have
    the paths and shapes of ``expected`` (e.g. ``jax.eval_shape`` of ``init``) and floating dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> variables("params", {"params": {"W": jnp.ones(2)}}, {"params": {"W": jnp.zeros(2)}})["params"]["W"].shape
      (2,)
    """
    import jax.numpy as jnp

    if not isinstance(value, Mapping) or not isinstance(value.get("params"), Mapping):
        received = (f"a dict with keys {sorted(map(str, value))}" if isinstance(value, Mapping)
                    else type(value).__name__)
        raise InputError(f"{name} must be the variables init returns, {{'params': {{...}}}}; received "
                         f"{received}. Weights alone go in as {{'params': weights}}.", name)
    shapes = {path: tuple(leaf.shape) for path, leaf in _weights(expected["params"]).items()}
    weights = _weights(value["params"])
    received = {path: tuple(jnp.shape(leaf)) for path, leaf in weights.items()}
    if received != shapes:
        raise InputError(f"{name} do not fit{' ' + what if what else ''}: expected weights {shapes}; "
                         f"received {received}.{fix}", name)
    for path, weight in weights.items():
        if not jnp.issubdtype(jnp.result_type(weight), jnp.floating):
            raise InputError(f"{name} must be floating point; received {jnp.result_type(weight)} for {path}. "
                             "Cast them with jax.tree.map(lambda w: w.astype(jnp.float32), variables).", name)
    return value


def _weights(tree: Any) -> dict[str, Any]:
    """The leaves of ``tree`` by path, ``"cell/W_ih"``, sorted."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return dict(sorted((jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in flat))


def key(name: str, value: Any) -> Any:
    """Returns ``value`` if it is one JAX random key (``jax.random.key(seed)``)."""
    import jax

    typed = isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)
    raw = isinstance(value, jax.Array) and value.dtype == np.uint32 and value.shape == (2,)  # PRNGKey(seed)
    if not ((typed and value.shape == ()) or raw):
        received = f"shape {value.shape}" if isinstance(value, jax.Array) else type(value).__name__
        raise InputError(f"{name} must be one JAX random key, jax.random.key(seed); received {received}.", name)
    return value

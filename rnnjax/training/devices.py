"""Spreading work over devices: a one-axis ``Mesh``, arrays split along it, or replicated on it.

On one device all of this is a no-op in effect, so the same code runs everywhere. On several
hosts, call ``jax.distributed.initialize()`` first: ``jax.devices()`` then lists every host's
devices, and each host must pass the same global values (draw them from the same key).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rnnjax.core import checks

__all__ = ["device_mesh", "shard_leading_axis", "replicate"]


def device_mesh(devices: int | None = None, *, axis: str = "batch") -> Mesh:
    """Returns a one-axis mesh over the first ``devices`` of ``jax.devices()`` (None: all).

    Example:
      >>> mesh = device_mesh(1, axis="seeds")
      >>> mesh.axis_names, mesh.size
      (('seeds',), 1)
    """
    available = jax.devices()
    try:
        devices = len(available) if devices is None else checks.integer("devices", devices, high=len(available))
    except checks.InputError as e:
        raise checks.InputError(f"{e} JAX sees {len(available)} {jax.default_backend()} device(s); on a CPU, "
                                "set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts "
                                "to get N.", "devices") from None
    return Mesh(np.array(available[:devices]), (axis,))


def shard_leading_axis(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` on ``mesh``, split along its first axis (e.g. a ``Batch``:
    each device holds ``batch / devices`` sequences).

    Args:
      tree: a pytree of arrays whose first axes all divide evenly by ``mesh.size``.
      mesh: a one-axis mesh, as ``device_mesh`` returns.

    Returns:
      The same pytree, sharded; jitted functions of it run on every device of the mesh.

    Example:
      >>> import jax.numpy as jnp
      >>> sharded = shard_leading_axis({"xs": jnp.ones((8, 3))}, device_mesh(1))
      >>> sharded["xs"].sharding.spec
      P('batch',)
    """
    for leaf in jax.tree.leaves(tree):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % mesh.size:
            raise checks.InputError(
                f"every array must have a first axis divisible by the {mesh.size} devices; "
                f"received shape {np.shape(leaf)}. Use a batch size that is a multiple of "
                f"{mesh.size}, or fewer devices.", "devices")
    return jax.device_put(tree, NamedSharding(mesh, P(mesh.axis_names[0])))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a whole copy of every array of ``tree`` (e.g. parameters) on each device of ``mesh``.

    Example:
      >>> import jax.numpy as jnp
      >>> replicate({"w": jnp.ones(2)}, device_mesh(1))["w"].sharding.is_fully_replicated
      True
    """
    return jax.device_put(tree, NamedSharding(mesh, P()))

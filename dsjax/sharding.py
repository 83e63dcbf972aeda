"""Logical axis names -> mesh axes.

Model code names the axes of its parameters (`dsjax.model.params`) and of the activations it constrains
(`constrain(x, ("batch", "seq", "act_embed"))`). A list of rules `(logical_name, mesh_axis or tuple or None)` maps
those names onto a device mesh. Inside `use_rules(mesh, rules)` the constraints are applied; outside they are
no-ops, so a model runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
import threading

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_STATE = threading.local()


def logical_to_spec(axes, rules) -> PartitionSpec:
    """PartitionSpec for logical `axes`; a mesh axis is used at most once (later dimensions lose it)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in axes:
        target = table.get(name)
        if target is None:
            spec.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else (targets or None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules):
    """Activates activation-sharding constraints for code traced inside this block."""
    previous = getattr(_STATE, "active", None)
    _STATE.active = (mesh, tuple(rules))
    try:
        yield
    finally:
        _STATE.active = previous


def constrain(x: jax.Array, axes) -> jax.Array:
    """Hints XLA to lay `x` out by its logical `axes`; a no-op outside `use_rules`."""
    active = getattr(_STATE, "active", None)
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))

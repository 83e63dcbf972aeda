"""Device mesh, logical axis rules, and the shardings of parameters, optimizer state and batches.

Model code names the axes of its parameters (`dsjax.model.params`) and of the activations it constrains
(`constrain(x, ("batch", "seq", "act_embed"))`). Rules `(logical name, mesh axis | tuple of axes | None)` from the
config map those names onto a mesh with axes (data, fsdp, tensor):

- data: pure data parallelism; parameters are replicated over it. With ZeRO-1 (`mesh.zero1`) the optimizer state is
  additionally split over `data`, as in the paper's HAI-LLM.
- fsdp: data parallelism whose parameters, gradients and optimizer state are split (ZeRO-3 / FSDP): the batch is split
  over it and the `embed` dimension of every weight is too.
- tensor: Megatron-style tensor parallelism over heads, the FFN width and the vocabulary, and sequence parallelism
  (`act_seq`): between those blocks the activations are split along the sequence, not repeated on every device.

Inside `use_rules(mesh, rules)` activation constraints apply; outside they are no-ops, so a model runs unchanged on
one device. A rule whose mesh axes do not divide a dimension is dropped for that tensor (it stays replicated there).
"""

from __future__ import annotations

import contextlib
import math
import threading

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    # activations
    ("batch", ("data", "fsdp")),
    ("seq", None),
    # The residual stream between the attention and MLP blocks (norms, adds), split along the sequence over the
    # tensor axis: Megatron-style sequence parallelism. Attention and the MLP gather it; None turns it off.
    ("act_seq", "tensor"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed_vocab", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
)

_STATE = threading.local()


def make_mesh(shape, axes=MESH_AXES, devices=None, dcn_shape=None) -> Mesh:
    """A mesh of `shape` over `axes`; one -1 entry takes the devices left over. Errors name `mesh.shape`.

    dcn_shape: how many slices (TPU) or hosts each axis spans, the rest of the axis being inside one (ICI, NVLink);
    None: one slice, or, when the devices span several, all of them over the first axis they divide (see
    `device_grid`).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(axes):
        raise ConfigError(f"mesh.shape={tuple(shape)} needs one entry per mesh axis {tuple(axes)}.")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh.shape={tuple(shape)} must hold positive sizes and at most one -1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ConfigError(f"mesh.shape={tuple(shape)}: {len(devices)} devices are not divisible by {known}.")
        shape[shape.index(-1)] = len(devices) // known
    if -1 not in shape and math.prod(shape) < len(devices) and jax.process_count() == 1:
        devices = devices[: math.prod(shape)]  # a smaller explicit mesh on one host: use the first devices
    if math.prod(shape) != len(devices):
        raise ConfigError(f"mesh.shape={tuple(shape)} needs {math.prod(shape)} devices, but {len(devices)} are present.")
    return Mesh(device_grid(shape, dcn_shape, devices), tuple(axes))


def granules(devices) -> tuple[list[list], str]:
    """The devices grouped by what the slow network (DCN) connects, and what the groups are: "slice" (TPU) where
    the devices span several slices, else "process" (hosts)."""
    kind = "slice" if len({getattr(d, "slice_index", 0) for d in devices}) > 1 else "process"
    groups: dict[int, list] = {}
    for device in devices:
        groups.setdefault(getattr(device, f"{kind}_index"), []).append(device)
    return [groups[key] for key in sorted(groups)], kind


def device_grid(shape, dcn_shape, devices) -> np.ndarray:
    """The devices as an array of `shape`, laid out as `jax.experimental.mesh_utils.create_hybrid_device_mesh`
    does: each slice (or host) holds an ICI block of shape // dcn_shape, and the blocks tile the mesh by
    `dcn_shape`, so only the axes that dcn_shape splits talk over DCN. Inside a block the order is
    topology-aware on TPU (mesh_utils.create_device_mesh), by device id on GPU, as listed on CPU. dcn_shape None:
    one block (over several hosts of one slice, ICI spans them), except across TPU slices, which go over the first
    axis they divide."""
    from jax.experimental import mesh_utils

    shape, (groups, kind) = tuple(shape), granules(devices)
    if dcn_shape is None:
        if kind == "process" or len(groups) == 1:
            return _ici_grid(shape, devices)
        first = next((i for i, s in enumerate(shape) if s % len(groups) == 0), None)
        if first is None:
            raise ConfigError(f"mesh.shape={shape}: the devices span {len(groups)} slices, which divide no axis; "
                              "set mesh.dcn_shape to how many slices each axis spans.")
        dcn_shape = tuple(len(groups) if i == first else 1 for i in range(len(shape)))
    dcn = check_dcn_shape(dcn_shape, len(shape))
    if math.prod(dcn) != len(groups):
        plural = {"slice": "slices", "process": "processes"}[kind]
        raise ConfigError(f"mesh.dcn_shape={dcn} spans {math.prod(dcn)} {plural}, but the devices are on "
                          f"{len(groups)}.")
    bad = next((i for i, (s, d) in enumerate(zip(shape, dcn)) if s % d), None)
    if bad is not None:
        raise ConfigError(f"mesh.dcn_shape={dcn} does not divide mesh.shape={shape} (axis {bad}: {dcn[bad]} into "
                          f"{shape[bad]}).")
    ici = tuple(s // d for s, d in zip(shape, dcn))
    if any(len(g) != math.prod(ici) for g in groups):
        raise ConfigError(f"mesh.shape={shape} over mesh.dcn_shape={dcn} needs {math.prod(ici)} devices per "
                          f"{kind}, but they hold {sorted({len(g) for g in groups})}.")
    try:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=kind == "process",
                                                    allow_split_physical_axes=True)
    except NotImplementedError:  # no topology-aware layout for this block shape: each block in device order
        blocks = np.empty(dcn, dtype=object)
        for index, group in zip(np.ndindex(*dcn), groups):
            blocks[index] = np.asarray(group, dtype=object).reshape(ici)
        return np.block(blocks.tolist())


def _ici_grid(shape, devices) -> np.ndarray:
    from jax.experimental import mesh_utils

    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except NotImplementedError:
        return np.asarray(devices, dtype=object).reshape(shape)


def check_dcn_shape(dcn_shape, n_axes: int) -> tuple[int, ...]:
    """mesh.dcn_shape as a tuple of positive ints, one per mesh axis, or ConfigError naming it."""
    dcn = tuple(dcn_shape)
    if len(dcn) != n_axes or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dcn):
        raise ConfigError(f"mesh.dcn_shape={dcn} needs one positive size per mesh axis ({n_axes}).")
    return dcn


def logical_to_spec(axes, rules, shape=None, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes`. A mesh axis is used at most once; with `shape` and `mesh`, axes that do not
    divide the dimension are dropped."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(axes):
        target = table.get(name)
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        targets = tuple(t for t in targets if t not in used)
        if shape is not None and mesh is not None:
            kept = []
            for t in targets:
                if shape[dim] % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[t]) == 0:
                    kept.append(t)
            targets = tuple(kept)
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def zero1_spec(spec: PartitionSpec, shape, mesh: Mesh, axis: str = "data") -> PartitionSpec:
    """Adds `axis` to the largest dimension it divides (ZeRO-1: optimizer state split over data-parallel ranks)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    flat = [a for e in entries if e is not None for a in ((e,) if isinstance(e, str) else e)]
    if axis in flat or mesh.shape[axis] == 1:
        return PartitionSpec(*entries)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        current = () if entries[dim] is None else ((entries[dim],) if isinstance(entries[dim], str) else entries[dim])
        if shape[dim] % (math.prod(mesh.shape[a] for a in current) * mesh.shape[axis]) == 0:
            entries[dim] = current + (axis,) if current else axis
            return PartitionSpec(*entries)
    return PartitionSpec(*entries)


def tree_shardings(abstract_tree, axes_tree, mesh: Mesh, rules, zero1: bool = False):
    """NamedShardings for a pytree of arrays, given a matching pytree of logical axes (None: replicated)."""

    def one(leaf, axes):
        if axes is None or not hasattr(leaf, "shape"):
            return NamedSharding(mesh, PartitionSpec())
        spec = logical_to_spec(axes, rules, leaf.shape, mesh)
        if zero1:
            spec = zero1_spec(spec, leaf.shape, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_tree, axes_tree, is_leaf=lambda x: x is None)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), rules))


def data_parallel_size(mesh: Mesh, rules) -> int:
    """How many ways the batch dimension is split."""
    spec = logical_to_spec(("batch",), rules)[0]
    names = () if spec is None else ((spec,) if isinstance(spec, str) else spec)
    return math.prod(mesh.shape[n] for n in names)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules):
    """Activates activation-sharding constraints for code traced inside this block."""
    previous = getattr(_STATE, "active", None)
    _STATE.active = (mesh, tuple(rules))
    try:
        yield
    finally:
        _STATE.active = previous


def active_rules():
    """(mesh, rules) inside `use_rules`, else None."""
    return getattr(_STATE, "active", None)


def constrain(x: jax.Array, axes) -> jax.Array:
    """Hints XLA to lay `x` out by its logical `axes`; a no-op outside `use_rules`."""
    active = getattr(_STATE, "active", None)
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, x.shape, mesh)))

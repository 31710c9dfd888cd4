"""The device mesh and the one table that maps logical axis names onto it."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mpt_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes. FSDP shards the embed axis of every matrix; tensor parallelism
# splits heads, MLP and vocabulary when mesh.tensor > 1. Batch rows go over data and fsdp.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("qkv_heads", "tensor"),
    ("kv", None),
    ("layers", None),
)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with a -1 filled in; a product that misses n_devices is an error."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n_devices % known:
            raise ConfigError(
                f"mesh: {n_devices} devices cannot be split as data={cfg.data} fsdp={cfg.fsdp} "
                f"tensor={cfg.tensor}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} ({sizes[0]}x{sizes[1]}x{sizes[2]}) "
            f"but there are {n_devices} devices"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all (or the given) devices, GSPMD-style axes.

    Hybrid when the devices span several TPU slices or mesh.dcn_* asks for it: each axis is
    split into a part inside a slice (or process) and a part across them.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    dcn = dcn_shape(cfg, devices)
    if dcn is None:
        grid = np.array(devices).reshape(shape)
    else:
        ici = tuple(total // across for total, across in zip(shape, dcn, strict=True))
        slices = _slice_count(devices)
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=slices is None
        )
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_tensor_within_processes(grid: np.ndarray) -> None:
    """Refuse a (data, fsdp, tensor) device grid whose tensor groups span processes.

    The devices of one tensor group hold the same batch rows, and each process loads rows of its
    own (data.BatchLoader), so a group must sit within one process.
    """
    groups = grid.reshape(-1, grid.shape[-1])
    for group in groups:
        processes = sorted({d.process_index for d in group})
        if len(processes) > 1:
            raise ConfigError(
                f"mesh.tensor: {grid.shape[-1]} spans processes {processes} (one tensor group "
                "must sit within one process, which loads its batch rows); make mesh.tensor at "
                "most the devices per process"
            )


def _slice_count(devices: Sequence[Any]) -> int | None:
    """TPU slices among the devices (multislice), or None where devices have no slice index."""
    if any(d.platform != "tpu" for d in devices):
        return None  # CPU and GPU devices report slice_index 0 whatever the process
    indices = {getattr(d, "slice_index", None) for d in devices}
    return None if None in indices else len(indices)


def dcn_shape(cfg: MeshConfig, devices: Sequence[Any]) -> tuple[int, int, int] | None:
    """The across-slice (or across-process) factor of each axis, or None for a flat mesh."""
    slices = _slice_count(devices)
    granules = slices if slices is not None else len({d.process_index for d in devices})
    dcn_data = cfg.dcn_data
    if dcn_data is None:
        dcn_data = granules if slices is not None and slices > 1 else 1
    dcn = (dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor)
    if dcn == (1, 1, 1):
        return None
    if math.prod(dcn) != granules:
        kind = "slices" if slices is not None else "processes"
        raise ConfigError(
            f"mesh: dcn_data*dcn_fsdp*dcn_tensor = {math.prod(dcn)} but the devices span "
            f"{granules} {kind}"
        )
    for name, total, across in zip(MESH_AXES, mesh_shape(cfg, len(devices)), dcn, strict=True):
        if total % across:
            raise ConfigError(f"mesh.dcn_{name}: {across} does not divide mesh.{name} ({total})")
    return dcn


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES
) -> PartitionSpec:
    """PartitionSpec for an array with these logical axis names.

    A dimension that the mapped mesh axes do not divide evenly, or a mesh axis already used by
    an earlier dimension, stays unsharded (e.g. a 258-token vocabulary over tensor=4).
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        axes = tuple(a for a in _mesh_axes(name, mesh, rules) if a not in used)
        if not axes or size % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(_spec_entry(axes))
    return PartitionSpec(*spec)


def _mesh_axes(logical: str | None, mesh: Any, rules=LOGICAL_RULES) -> tuple[str, ...]:
    """The mesh axes (of size > 1) a logical axis name maps to; () for None or an unmapped name."""
    axes = dict(rules).get(logical) or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def _spec_entry(axes: tuple[str, ...]) -> str | tuple[str, ...]:
    """A PartitionSpec entry for a dimension split over these mesh axes."""
    return axes[0] if len(axes) == 1 else axes


def device_share(abstract_params: Any) -> float:
    """The fraction of the parameters (by count) that each device holds, from arrays that carry
    their sharding (jax.ShapeDtypeStruct or jax.Array): 1/(fsdp x tensor) where the mesh axes
    divide every dimension they split, 1 where none does."""
    leaves = jax.tree.leaves(abstract_params)
    total = sum(math.prod(x.shape) for x in leaves)
    held = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in leaves)
    return held / max(total, 1)


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for an (abstract) NNX state from each variable's logical axis names."""

    def one(var):
        value = var.get_value()
        names = var.get_metadata().get("out_sharding") or (None,) * value.ndim
        return NamedSharding(mesh, logical_to_spec(names, value.shape, mesh))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(batch, seq) arrays: rows over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def traced_on(mesh: Mesh, fn: Callable) -> Callable:
    """fn, traced with `mesh` as the abstract mesh in context (unless one already is), so that
    the model's Pallas kernels run on each device's own batch rows and heads (`device_local`)."""

    @functools.wraps(fn)
    def on_mesh(*args, **kwargs):
        if not jax.sharding.get_abstract_mesh().empty:
            return fn(*args, **kwargs)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return on_mesh


def split_count(logical: str) -> int:
    """How many ways the mesh in context splits a logical axis (LOGICAL_RULES), divisibility
    aside; 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else math.prod(mesh.shape[a] for a in _mesh_axes(logical, mesh))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """x laid out by the mesh in context as its logical axis `names` say (LOGICAL_RULES), an
    axis the mesh axes do not divide left whole; x itself without a mesh.

    XLA propagates shardings from the parameters as readily as from the batch: after the
    embedding gather from a table split over `embed`, it kept every row of the batch on each
    device through the blocks (3.3x the step's temporaries at fsdp 8 in the test).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def device_local(
    fn: Callable,
    args: Sequence[Any],
    names: Sequence[tuple[str | None, ...] | None],
    out_names: Any,
) -> Any:
    """fn(*args), run by each device on its own block of the arrays where the mesh in context
    splits them (a shard_map); else as it is.

    XLA cannot partition a Pallas kernel (a custom call): given sharded operands it gathers
    them whole onto every device and runs the kernel there, on all of it. names: per arg, its
    logical axis names (`batch` over data and fsdp, `heads` over tensor), or None for an arg
    every device takes whole; out_names: the output's, or a tuple of them for a tuple output.
    A logical axis is split only where its mesh axes divide it in every arg that names it (the
    output's named axes must have the same sizes). None args pass through.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*args)
    named = [(x, ns) for x, ns in zip(args, names, strict=True) if x is not None and ns]
    split: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for logical in dict.fromkeys(n for _, ns in named for n in ns if n is not None):
        axes = tuple(a for a in _mesh_axes(logical, mesh) if a not in used)
        ways = math.prod(mesh.shape[a] for a in axes)
        sizes = [x.shape[i] for x, ns in named for i, n in enumerate(ns) if n == logical]
        if axes and all(size % ways == 0 for size in sizes):
            split[logical] = axes
            used.update(axes)
    if not split:
        return fn(*args)

    def spec(ns):
        if ns is None:
            return PartitionSpec()
        return PartitionSpec(*(_spec_entry(split[n]) if n in split else None for n in ns))

    def is_names(t):
        return t is None or all(n is None or isinstance(n, str) for n in t)

    in_specs = tuple(spec(ns) for ns in names)
    out_specs = jax.tree.map(spec, out_names, is_leaf=is_names)
    local = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return local(*args)

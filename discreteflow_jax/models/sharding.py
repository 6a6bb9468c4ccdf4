"""Device mesh, logical-axis rules and placement of parameters and batches.

Parameters get *logical* axis names from their path (one table, ``PARAM_LOGICAL_AXES``); a second
table (``LOGICAL_RULES``) maps logical names onto the mesh axes ``data``, ``fsdp`` and ``tensor``.
One device is the trivial mesh, so the same code runs on a laptop CPU and a pod slice.

The same rules serve activations (``constrain``): a mesh axis shards at most one dimension of an
array, and when two logical axes of one array map to the same mesh axis the earlier dimension
keeps it. An activation ``(batch, length, embed)`` is therefore sharded over data×fsdp on the
batch and replicated on ``embed`` (whose rule, fsdp, the batch already uses): the Megatron
layout, with the residual stream whole on every tensor-parallel device between blocks.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("discreteflow_jax")

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "kv": None,
    "cond": None,
}

# (regex on the "/"-joined parameter path, logical axes of the array). First match wins, so
# specific patterns come before general ones; an unmatched parameter is replicated. Covers
# TokenFlow, LLaMA and GPT-2 (``unmatched_params`` lists any matrix no rule matches; a test keeps
# that list empty). 1-D norm scales and output biases are left replicated on purpose: sharding
# a few hundred floats costs more in collectives than it saves.
PARAM_LOGICAL_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"(^|/)wpe/embedding$", (None, "embed")),  # GPT-2 positions: max_len rows, not vocab
    (r"(^|/)embedding$", ("vocab", "embed")),
    (r"(q_proj|k_proj|v_proj)/kernel$", ("embed", "heads")),
    (r"(q_proj|k_proj|v_proj)/bias$", ("heads",)),
    (r"o_proj/kernel$", ("heads", "embed")),
    (r"(gate_proj|up_proj|c_fc)/kernel$", ("embed", "mlp")),
    (r"(gate_proj|up_proj|c_fc)/bias$", ("mlp",)),
    (r"(down_proj|c_proj)/kernel$", ("mlp", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"modulation/kernel$", ("embed", None)),
    (r"time_embed/fc1/kernel$", (None, "embed")),
    (r"time_embed/fc2/kernel$", ("embed", None)),
]


class ShardingError(ValueError):
    """The mesh or a shape does not fit the devices; the message gives the numbers."""


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Fills the single -1 axis so that the product equals ``num_devices``."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ShardingError(
                f"mesh fsdp×tensor×data (known part {known}) does not divide the {num_devices} available devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ShardingError(
            f"mesh data={sizes[0]} × fsdp={sizes[1]} × tensor={sizes[2]} = {math.prod(sizes)} "
            f"but {num_devices} devices are available; make the product equal the device count"
        )
    return tuple(sizes)  # type: ignore[return-value]


# The devices a mesh is made of when none are named: jax.devices(), unless ``mesh_devices`` says
# otherwise. Ahead-of-time compilation for an accelerator this host does not have (the devices of a
# TPU topology description) builds every mesh of an experiment, the task's included, from those.
_MESH_DEVICES: contextvars.ContextVar[tuple[Any, ...] | None] = contextvars.ContextVar("mesh_devices", default=None)


@contextlib.contextmanager
def mesh_devices(devices: Sequence[Any]) -> Iterator[None]:
    """Within this block, ``make_mesh`` without ``devices`` uses these devices."""
    token = _MESH_DEVICES.set(tuple(devices))
    try:
        yield
    finally:
        _MESH_DEVICES.reset(token)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over ``devices`` (default: those of ``mesh_devices``, else
    all), in the device order ``jax.make_mesh`` picks for the hardware topology. Axes are Auto
    (XLA propagates the shardings), which jax.make_mesh does not default to."""
    if devices is None:
        devices = _MESH_DEVICES.get() or jax.devices()
    devices = list(devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:  # several TPU slices joined by the data-center network: the data axis spans them
        if shape[0] % slices:
            raise ShardingError(f"mesh data={shape[0]} is not a multiple of the {slices} slices; the data axis "
                                "is the one that crosses slices")
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices, 1, 1), devices)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def _as_tuple(mesh_axes: Any) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(logical: Sequence[str | None]) -> P:
    """PartitionSpec of logical axes; a mesh axis already used by an earlier dimension is dropped
    (a PartitionSpec may name each mesh axis once)."""
    used: set[str] = set()
    spec = []
    for name in logical:
        axes = tuple(a for a in _as_tuple(LOGICAL_RULES.get(name) if name else None) if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _path_str(path: Sequence[Any]) -> str:
    """A tree path as "a/b/0"; nnx.State leaves sit below a Variable's ``value``, which is dropped."""
    parts = tuple(path)
    if parts and jax.tree_util.keystr(parts[-1:], simple=True) == "value":
        parts = parts[:-1]
    return jax.tree_util.keystr(parts, simple=True, separator="/")


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    for pattern, axes in PARAM_LOGICAL_AXES:
        if re.search(pattern, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def _axis_size(mesh: Mesh, mesh_axes: Any) -> int:
    if mesh_axes is None:
        return 1
    if isinstance(mesh_axes, str):
        return mesh.shape[mesh_axes]
    return math.prod(mesh.shape[a] for a in mesh_axes)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh, *, strict: bool = True) -> P:
    """PartitionSpec of one parameter.

    A dimension that the size of its mesh axes does not divide raises ShardingError
    (``strict``), or is replicated with a warning (``strict=False``, for frozen inputs such as a
    teacher whose vocabulary, e.g. GPT-2's 50257 = 29·1733, divides no tensor-parallel size).
    """
    spec = list(logical_to_spec(param_logical_axes(path, len(shape))))
    for i, (dim, axes) in enumerate(zip(shape, spec)):
        size = _axis_size(mesh, axes)
        if dim % size == 0:
            continue
        if strict:
            hint = ""
            if "tensor" in _as_tuple(axes):
                hint = f" (or use --config.mesh.tensor=1; {dim} is divisible by {_divisors(dim, 16)} only, up to 16)"
            raise ShardingError(
                f"parameter {path} has a dimension of size {dim} that does not divide the mesh axis "
                f"{axes} of size {size}; change the model size or the mesh (config.mesh){hint}"
            )
        log.warning("replicating dimension %d (size %d) of %s: it does not divide mesh axis %s of size %d",
                    i, dim, path, axes, size)
        spec[i] = None
    return P(*spec)


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, limit + 1) if n % d == 0]


def param_shardings(tree: Any, mesh: Mesh, *, strict: bool = True) -> Any:
    """NamedShardings for any parameter pytree: a pure dict, an ``nnx.State``, arrays or
    ShapeDtypeStructs, of TokenFlow, LLaMA or GPT-2 (or anything shaped like them: optimizer state).

    Optimizer moments have the same paths as the parameters below their own prefix, so the
    path regexes match them too; scalars (counts) are replicated. Use ``strict=False`` for frozen
    auxiliary inputs (teacher parameters), see ``param_spec``.
    """

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        if not shape:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, param_spec(_path_str(path), shape, mesh, strict=strict))

    return jax.tree_util.tree_map_with_path(one, tree)


def shard_params(tree: Any, mesh: Mesh, *, strict: bool = False) -> tuple[Any, Any]:
    """Places a parameter pytree (host or device arrays, the same values on every process) on the
    mesh by the rules above. Returns (sharded tree, its shardings): pass them as ``Task.aux`` and
    ``Task.aux_shardings`` for a frozen teacher. Each device receives only its own slice, so this
    works across processes (``make_array_from_callback`` reads the host copy per shard). A tree of
    ShapeDtypeStructs (a teacher known by its shapes only, for ahead-of-time compilation) comes back
    as ShapeDtypeStructs carrying those shardings: nothing is allocated."""
    shardings = param_shardings(tree, mesh, strict=strict)

    def place(leaf, sharding):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree, shardings), shardings


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """Strict ``param_shardings`` (the trainable state: every dimension must divide)."""
    return param_shardings(tree, mesh, strict=True)


def unmatched_params(tree: Any) -> list[str]:
    """Paths of parameters with two or more dimensions that no rule in PARAM_LOGICAL_AXES matches
    (they would be replicated on every device)."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = tuple(getattr(leaf, "shape", ()))
        name = _path_str(path)
        if len(shape) >= 2 and all(a is None for a in param_logical_axes(name, len(shape))):
            out.append(name)
    return out


def check_model_parallel(model_cfg: Any, mesh: Mesh) -> None:
    """Tensor parallelism splits attention at head boundaries: the (KV) head counts must divide."""
    tensor = _axis_size(mesh, LOGICAL_RULES["heads"])
    for field in ("num_heads", "num_kv_heads"):
        heads = getattr(model_cfg, field, None)
        if heads and heads % tensor:
            raise ShardingError(
                f"config.model.{field}={heads} is not divisible by the tensor-parallel size "
                f"config.mesh.tensor={tensor}; use a tensor size from {_divisors(heads, heads)}"
            )


# -- activations ---------------------------------------------------------------------------------
# The mesh that ``constrain`` uses. Set only while a step function is traced for a mesh (see
# ``with_activation_mesh``), so models called outside a sharded step (tests, samplers, one
# device) trace exactly as before: no constraint ops at all.
_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None) -> Iterator[None]:
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def with_activation_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """Wraps a function to be jitted so that ``constrain`` inside it uses ``mesh`` while tracing."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axes; the identity outside a multi-device mesh."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical)))


def axis_shards(logical: str) -> int:
    """How many ways ``constrain`` splits an activation dimension with this logical axis name
    (as the first dimension of its array; 1 outside a multi-device mesh)."""
    mesh = _ACTIVATION_MESH.get()
    return 1 if mesh is None else _axis_size(mesh, LOGICAL_RULES.get(logical))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(global_batch: int, grad_accum: int, mesh: Mesh) -> None:
    shards = _axis_size(mesh, LOGICAL_RULES["batch"])
    micro = global_batch // grad_accum
    if micro % shards:
        raise ShardingError(
            f"the micro-batch train.batch_size/grad_accum = {global_batch}/{grad_accum} = {micro} sequences "
            f"does not divide the {shards} data-parallel shards (mesh data×fsdp); use a batch that is a multiple "
            f"of {shards * grad_accum}"
        )


def global_batch_from_local(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assembles the global batch from this process's rows (each process passes its own)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)

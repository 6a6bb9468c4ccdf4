"""Device mesh, logical-axis rules and placement of parameters and batches.

Parameters get *logical* axis names from their path (one table, ``PARAM_LOGICAL_AXES``); a second
table (``LOGICAL_RULES``) maps logical names onto the mesh axes ``data``, ``fsdp`` and ``tensor``.
One device is the trivial mesh, so the same code runs on a laptop CPU and a pod slice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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

# (regex on the "/"-joined parameter path, logical axes of the array). First match wins;
# an unmatched parameter is replicated.
PARAM_LOGICAL_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"(^|/)embedding$", ("vocab", "embed")),
    (r"(^|/)(wte|embed_tokens)/embedding$", ("vocab", "embed")),
    (r"(^|/)wpe/embedding$", (None, "embed")),
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


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(logical: Sequence[str | None]) -> P:
    return P(*[LOGICAL_RULES.get(name) if name else None for name in logical])


def _path_str(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


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


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec of one parameter; raises ShardingError when a dimension does not divide."""
    spec = logical_to_spec(param_logical_axes(path, len(shape)))
    for dim, axes in zip(shape, spec):
        size = _axis_size(mesh, axes)
        if dim % size:
            raise ShardingError(
                f"parameter {path} has a dimension of size {dim} that does not divide the mesh axis "
                f"{axes} of size {size}; change the model size or the mesh (config.mesh)"
            )
    return spec


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of parameters (or anything shaped like them: optimizer state).

    Optimizer moments have the same paths as the parameters below their own prefix, so the
    path regexes match them too; scalars (counts) are replicated.
    """

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        if not shape:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, param_spec(_path_str(path), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


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

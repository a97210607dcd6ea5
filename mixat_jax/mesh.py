"""Device mesh (data, fsdp, tensor) and logical-axis sharding rules (DESIGN.md rule 5).

Every parameter carries logical axis names in its NNX metadata (`axes=("embed", "mlp")`); a rule
table maps logical names to mesh axes. A dimension that the mesh axis does not divide stays
replicated (so tiny test models run on any mesh), and a mesh axis is never used twice in one spec.
Batches shard their leading axis over ("data", "fsdp"). The same code runs on 1 CPU, 8 simulated
CPU devices, a GPU node or a TPU pod.

Device order (issue #16 "Batch placement"): :func:`device_grid` lays devices out in their
physical order (``mesh_utils.create_device_mesh``, what ``jax.make_mesh`` uses: a torus-aware
order on TPU, id order on GPU). On a multi-slice job (devices carry ``slice_index``, S > 1
slices) the ``mesh`` block describes ONE slice (its ``-1`` resolves over the devices of a slice)
and the mesh is hybrid (``mesh_utils.create_hybrid_device_mesh``): only the data axis crosses
slices (DCN), fsdp and tensor stay inside a slice (ICI), so ``mesh.shape["data"] = S ×
mesh.data``. :func:`batch_shards` is the number of batch shards (data × fsdp).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; one axis may be -1 (= all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: tuple[tuple[str, str | None], ...] = DEFAULT_RULES

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        dims = [self.data, self.fsdp, self.tensor]
        if dims.count(-1) > 1:
            raise ValueError("at most one of mesh.data/fsdp/tensor may be -1")
        known = int(np.prod([d for d in dims if d != -1]))
        if -1 in dims:
            if n_devices % known:
                raise ValueError(
                    f"mesh {dims} does not divide {n_devices} devices; choose axis sizes whose "
                    "product divides the device count"
                )
            dims[dims.index(-1)] = n_devices // known
        if int(np.prod(dims)) != n_devices:
            raise ValueError(
                f"mesh data={dims[0]} fsdp={dims[1]} tensor={dims[2]} needs "
                f"{int(np.prod(dims))} devices but {n_devices} are available; fix --config.mesh.*"
            )
        return tuple(dims)


def num_slices(devices: Sequence[jax.Device]) -> int:
    """Number of slices the devices span (``slice_index``; 1 where devices have none)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(cfg: MeshConfig, devices: Sequence[jax.Device]) -> np.ndarray:
    """``[data, fsdp, tensor]`` array of ``devices`` in physical order (hybrid across slices)."""
    devices = list(devices)
    slices = num_slices(devices)
    if slices == 1:
        return mesh_utils.create_device_mesh(cfg.shape(len(devices)), devices)
    per_slice = {}
    for d in devices:
        per_slice[d.slice_index] = per_slice.get(d.slice_index, 0) + 1
    if len(set(per_slice.values())) != 1:
        raise ValueError(
            f"slices hold different device counts {sorted(per_slice.items())}; run on whole "
            "slices of one topology"
        )
    try:
        ici = cfg.shape(len(devices) // slices)  # the mesh block describes one slice
    except ValueError as e:
        raise ValueError(
            f"{e} (multi-slice: the mesh block describes ONE of the {slices} "
            "slices; the data axis is split over the slices as well)"
        ) from None
    return mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over ``devices`` (default: all), see the module doc."""
    cfg = cfg or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    types = (AxisType.Auto,) * len(AXES)
    if num_slices(devices) == 1:
        return jax.make_mesh(cfg.shape(len(devices)), AXES, axis_types=types, devices=devices)
    return Mesh(device_grid(cfg, devices), AXES, axis_types=types)


def batch_shards(mesh: Mesh) -> int:
    """Shards of a batch's leading (slot) axis: data × fsdp."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def spec_for(
    axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES,
) -> PartitionSpec:
    """Logical axes -> PartitionSpec, replicating dims the mesh axis does not divide."""
    if not axes:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(axes, shape, strict=True):
        m = table.get(name) if name else None
        if m is None or m in used or size % mesh.shape[m] or mesh.shape[m] == 1:
            out.append(None)
        else:
            out.append(m)
            used.add(m)
    return PartitionSpec(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding for every Variable of an NNX state, from its `axes` metadata."""

    def one(v):
        axes = v.get_metadata().get("axes") if isinstance(v, nnx.Variable) else None
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        return NamedSharding(mesh, spec_for(axes, value.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over data×fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Places a host batch with its leading axis sharded (replicated if not divisible)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % n:
            return jax.device_put(x, replicated(mesh))
        return jax.device_put(x, batch_sharding(mesh, x.ndim))

    return jax.tree.map(put, batch)

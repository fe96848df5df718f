"""Meshes, logical-axis rules and shardings: one table maps parameter axis names onto the mesh.

Every parameter of `critic_jax.models` names its axes with the logical names below
(`nnx.with_partitioning(init, ("embed", "mlp"))`). `LOGICAL_AXIS_RULES` maps each logical name to
a mesh axis of the 3-axis mesh `("data", "fsdp", "tensor")`; changing the parallelism of a run is
changing the mesh shape in the config, never the model code.

- `data`: pure data parallelism (parameters replicated, batch split).
- `fsdp`: batch split *and* parameters split along their `embed` axis (ZeRO-3 style; XLA inserts
  the all-gathers and reduce-scatters).
- `tensor`: Megatron-style split of heads, MLP width and vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or None: replicated). The one table of the project.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Shape of the device mesh. -1 on one axis means "all remaining devices".

    Attributes:
      data: data-parallel degree (parameters replicated).
      fsdp: fully-sharded data-parallel degree (parameters split over `embed`).
      tensor: tensor-parallel degree (heads / MLP / vocab split).
      num_devices: use only the first this many devices (-1: all of them).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    num_devices: int = -1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"At most one mesh axis may be -1. Received: {self.shape_dict()}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(
                f"Mesh axis sizes must be positive or -1. Received: {self.shape_dict()}"
            )
        if self.num_devices == 0 or self.num_devices < -1:
            raise ValueError(
                f"mesh.num_devices must be positive or -1. Received: {self.num_devices}"
            )

    def shape_dict(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Returns the concrete (data, fsdp, tensor) sizes for `num_devices` devices.

        Raises:
          ValueError: if the sizes do not multiply to `num_devices`.
        """
        sizes = [self.data, self.fsdp, self.tensor]
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"Mesh {self.shape_dict()} cannot fill {num_devices} devices: "
                    f"{num_devices} is not divisible by {known}. Received: {self.shape_dict()}"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(
                f"Mesh data*fsdp*tensor = {int(np.prod(sizes))} but {num_devices} devices are "
                f"available; the product must equal the device count. Received: {self.shape_dict()}"
            )
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the `("data", "fsdp", "tensor")` mesh with Auto axes over `devices` (default: all).

    Raises:
      ValueError: if the mesh shape does not match the number of devices.
    """
    config = config or MeshConfig()
    if devices is None:
        devices = jax.devices()
        if config.num_devices > 0:
            if config.num_devices > len(devices):
                raise ValueError(
                    f"mesh.num_devices={config.num_devices} but only {len(devices)} devices exist. "
                    f"Received: {config.num_devices}"
                )
            devices = devices[: config.num_devices]
    devices = list(devices)
    shape = config.resolve(len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for an `nnx.State` (or module) by the logical names on its variables."""
    with nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(
        lambda p: NamedSharding(mesh, p),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def logical_spec(names: Sequence[str | None]) -> PartitionSpec:
    """The `PartitionSpec` that `LOGICAL_AXIS_RULES` gives an array with these axis names."""
    rules = dict(LOGICAL_AXIS_RULES)
    return PartitionSpec(*(None if name is None else rules[name] for name in names))


def with_logical_constraint(x: jax.Array, names: Sequence[str | None], mesh: Mesh) -> jax.Array:
    """Constrains an activation inside a jitted function by its logical axis names (trailing
    axes not named are replicated), through the same rule table as the parameters."""
    names = tuple(names) + (None,) * (x.ndim - len(names))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(names)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[B, ...]` batch array: rows over `("data", "fsdp")`, the rest replicated."""
    return NamedSharding(mesh, logical_spec(("batch",) + (None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# XLA:CPU compiler options for the update (passed per jit, never process-wide). YNNPACK is
# kept for elementwise fusions only: its dot and reduction fusions ran the train step ~10% slower
# than XLA's own dots and loops (`experiments/bench_train_step.py`: 900 -> 800 ms a step), the
# reductions of RMSNorm's scale gradient at ~1 ms for 131k elements.
CPU_COMPILER_OPTIONS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE"
}


@functools.cache
def _cpu_options_accepted() -> bool:
    """Whether this jaxlib's CPU compiler takes `CPU_COMPILER_OPTIONS` (the names are
    experimental and may go): one compile of a scalar add, once per process."""
    x = jax.device_put(np.float32(0), jax.devices("cpu")[0])
    try:
        jax.jit(lambda v: v + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(x).compile()
    except Exception:  # noqa: BLE001 - an unknown option or value: compile without them
        return False
    return True


def compiler_options(mesh: Mesh) -> dict[str, str]:
    """The compiler options for a jit over `mesh`: `CPU_COMPILER_OPTIONS` on CPU devices where
    the compiler accepts them, none otherwise (GPU and TPU compile with XLA's defaults).

    >>> jax.jit(fn, compiler_options=compiler_options(mesh))  # doctest: +SKIP
    """
    if mesh.devices.flat[0].platform != "cpu" or not _cpu_options_accepted():
        return {}
    return dict(CPU_COMPILER_OPTIONS)


def batch_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch axis is split (data * fsdp)."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def initialize_distributed(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Starts multi-host JAX when asked to, and is a no-op for single-process runs.

    Arguments fall back to the standard environment variables `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`; on TPU pods and SLURM/Open MPI clusters, setting
    `CRITIC_JAX_DISTRIBUTED=auto` lets JAX discover everything itself.

    Returns:
      True if `jax.distributed.initialize` was called.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if os.environ.get("CRITIC_JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return True
    if coordinator_address is None or num_processes is None or num_processes <= 1:
        return False
    # Only affects CPU devices; must be set before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True


def make_global_batch(local: Any, mesh: Mesh) -> Any:
    """Assembles each process's slice of a batch (numpy, leading axis = local rows) into global
    `jax.Array`s sharded over `("data", "fsdp")`. Single-process: a plain sharded `device_put`."""

    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, local)

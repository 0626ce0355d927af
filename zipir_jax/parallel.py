"""Scale-out: the device mesh ('data', 'fsdp', 'tensor'), logical-axis rules and shardings.

Models name their parameter and activation axes ('embed', 'mlp', 'heads', 'conv_out', 'batch', …);
:data:`LOGICAL_AXIS_RULES` maps those names onto the mesh in one place (maxtext style):

* ``batch`` is split over ``data`` and ``fsdp`` (every device sees its own examples);
* parameters and optimizer state are split over ``fsdp`` on their model dimension (``embed`` for the
  DiT, ``conv_out`` for convolutions, ``vocab`` / ``embed`` for T5) — ZeRO-3 style FSDP;
* ``mlp`` and ``heads`` go over ``tensor`` (Megatron-style tensor parallelism).

A dimension whose size is not a multiple of its mesh axes stays replicated (tiny models, the 9-channel
E_c output, …) instead of failing, so every config runs on every mesh.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from zipir_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES = (
  # activations
  ("batch", BATCH_AXES),
  ("length", None),
  ("text_length", None),
  ("height", None),
  ("width", None),
  ("channels", None),
  ("activation_embed", None),
  ("activation_mlp", "tensor"),
  # DiT / T5 parameters
  ("embed", "fsdp"),
  ("text_embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv", None),
  ("layers", None),
  ("vocab", "tensor"),
  ("relpos_buckets", None),
  # convolutions (VAE, pixel decoder, discriminator)
  ("conv_out", "fsdp"),
  ("conv_in", None),
  ("kernel_h", None),
  ("kernel_w", None),
  ("norm", None),
)


def create_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one entry of ``shape`` may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != 3:
    raise errors.ConfigError(
      f"config.train.mesh must have 3 entries (data, fsdp, tensor); got {shape}"
    )
  if shape.count(-1) > 1:
    raise errors.ConfigError(f"config.train.mesh={tuple(shape)}: at most one entry may be -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % known:
      raise errors.ConfigError(
        f"config.train.mesh={tuple(shape)}: {len(devices)} devices are not a multiple of {known}"
      )
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise errors.ConfigError(
      f"config.train.mesh={tuple(shape)} needs {int(np.prod(shape))} "
      f"devices; this run has {len(devices)}"
    )
  try:  # physical topology aware where jax knows it (TPU, GPU); plain reshape otherwise.
    grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _axis_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops the mesh axes of every dimension they do not divide (that dimension is replicated)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  return P(
    *[
      a if a is not None and dim % _axis_size(mesh, a) == 0 else None
      for a, dim in zip(entries, shape)
    ]
  )


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings of a tree of (possibly ``nn.Partitioned``-boxed) abstract arrays."""
  logical = nn.get_partition_spec(boxed_tree)
  unboxed = nn.meta.unbox(boxed_tree)
  mesh_specs = nn.logical_to_mesh_sharding(logical, mesh, rules)

  def fit(sharding, leaf):
    return NamedSharding(mesh, fit_spec(sharding.spec, leaf.shape, mesh))

  return jax.tree.map(fit, mesh_specs, unboxed, is_leaf=lambda x: isinstance(x, NamedSharding))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process arrays (numpy, or jax.Arrays on a local device: nothing waits for them) -> global
  jax.Arrays split over the batch axes (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def initialize_distributed(
  coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> None:
  """``jax.distributed.initialize``: auto-detected on TPU pods and SLURM, explicit otherwise."""
  if coordinator_address:
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  else:
    jax.distributed.initialize()

"""Scale-out: the device mesh ('data', 'fsdp', 'tensor'), logical-axis rules and shardings.

The mesh has one shape within a slice or node (ICI/NVLink: ``config.train.mesh``) and one across
slices or nodes (DCN/InfiniBand: ``config.train.dcn_mesh``); each mesh axis is their product, so
e.g. FSDP stays inside a node while data parallelism spans nodes. The logical-axis rules
(``config.train.logical_axis_rules``, default :data:`zipir_jax.axis_rules.LOGICAL_AXIS_RULES`)
map the models' axis names onto it.

A dimension whose size is not a multiple of its mesh axes stays replicated (tiny models, the 9-channel
E_c output, …) instead of failing, so every config runs on every mesh.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from zipir_jax import errors
from zipir_jax.axis_rules import BATCH_AXES, MESH_AXES

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def _check_shape(shape: Sequence[int], key: str) -> list[int]:
  shape = list(shape)
  if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) for s in shape):
    raise errors.ConfigError(f"{key} must be 3 integers (data, fsdp, tensor); got {shape}")
  if shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
    raise errors.ConfigError(f"{key}={tuple(shape)}: entries must be >= 1, at most one -1")
  return [int(s) for s in shape]


def _resolve(shape: list[int], count: int, key: str, what: str) -> list[int]:
  """``shape`` with its -1 replaced so that its product is ``count`` (of ``what``)."""
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if count % known:
      raise errors.ConfigError(
        f"{key}={tuple(shape)}: {count} {what} are not a multiple of {known}"
      )
    shape = [count // known if s == -1 else s for s in shape]
  if math.prod(shape) != count:
    raise errors.ConfigError(
      f"{key}={tuple(shape)} needs {math.prod(shape)} {what}; this run has {count}"
    )
  return shape


def _granule_attr(devices: Sequence[Any]) -> str | None:
  """'slice_index' on several TPU slices, else 'process_index' with several processes, else None."""
  for attr in ("slice_index", "process_index"):
    if len({getattr(d, attr, 0) for d in devices}) > 1:
      return attr
  return None


def device_granules(devices: Sequence[Any], count: int) -> list[list[Any]]:
  """The devices in ``count`` groups joined by the slow network (DCN), each in device order.

  Groups are TPU slices (``slice_index``), else processes (one per GPU node), else — one process
  on one slice, as on a workstation or with fake CPU devices — the devices split in order, which
  lays out a multi-slice mesh there for tests and rehearsals.
  """
  attr = _granule_attr(devices)
  if attr is not None:
    keys = sorted({getattr(d, attr) for d in devices})
    if len(keys) != count:
      raise errors.ConfigError(
        f"config.train.dcn_mesh asks for {count} slices/nodes; the {len(devices)} devices "
        f"are on {len(keys)} (by {attr})"
      )
    return [[d for d in devices if getattr(d, attr) == k] for k in keys]
  if len(devices) % count:
    raise errors.ConfigError(
      f"config.train.dcn_mesh asks for {count} slices/nodes; {len(devices)} devices do not "
      "split evenly"
    )
  size = len(devices) // count
  return [list(devices[i * size : (i + 1) * size]) for i in range(count)]


def hybrid_device_grid(
  ici_shape: Sequence[int], dcn_shape: Sequence[int], granules: Sequence[Sequence[Any]]
) -> np.ndarray:
  """``mesh_utils.create_hybrid_device_mesh``'s layout for given granules (which jax finds only
  by slice or process): each granule a topology-aware ``ici_shape`` block (physical axes may be
  split to fit), blocks tiled in ``dcn_shape`` order, so mesh axis i has size
  ici_shape[i] * dcn_shape[i] and its outer factor crosses granules."""
  try:
    blocks = [
      mesh_utils.create_device_mesh(ici_shape, g, allow_split_physical_axes=True) for g in granules
    ]
  except (ValueError, NotImplementedError) as e:  # jax cannot map the shape onto the topology
    raise errors.ConfigError(f"config.train.mesh={tuple(ici_shape)}: {e}") from e
  n = len(ici_shape)
  grid = np.stack(blocks).reshape(*dcn_shape, *ici_shape)
  interleaved = [axis for i in range(n) for axis in (i, n + i)]  # (dcn_0, ici_0, dcn_1, ici_1, …)
  return grid.transpose(interleaved).reshape([d * i for d, i in zip(dcn_shape, ici_shape)])


def create_mesh(
  shape: Sequence[int],
  devices: Sequence[jax.Device] | None = None,
  *,
  dcn_shape: Sequence[int] = (1, 1, 1),
) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh of ``shape`` per slice/node times ``dcn_shape`` of them.

  ``shape`` is ``config.train.mesh``; one entry may be -1 (the remaining devices of each
  slice/node). ``dcn_shape`` is ``config.train.dcn_mesh``, the same axes across slices (TPU
  multislice) or nodes (GPU clusters); its product is their number, and one entry may be -1. With
  one slice/node this is ``jax.make_mesh``. Axes are ``AxisType.Auto``: the logical-axis rules,
  not the types, place the arrays. Shapes the devices cannot form raise ``ConfigError``.
  """
  devices = list(jax.devices() if devices is None else devices)
  ici = _check_shape(shape, "config.train.mesh")
  dcn = _check_shape(dcn_shape, "config.train.dcn_mesh")
  if -1 in dcn:
    attr = _granule_attr(devices)
    groups = len({getattr(d, attr) for d in devices}) if attr else 1
    dcn = _resolve(dcn, groups, "config.train.dcn_mesh", "slices/nodes")
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn) == 1:
    ici = _resolve(ici, len(devices), "config.train.mesh", "devices")
    try:
      return jax.make_mesh(ici, MESH_AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError) as e:  # e.g. several TPU slices: needs dcn_mesh
      raise errors.ConfigError(
        f"config.train.mesh={tuple(ici)} with config.train.dcn_mesh=(1, 1, 1): {e}"
      ) from e
  granules = device_granules(devices, math.prod(dcn))
  ici = _resolve(ici, len(granules[0]), "config.train.mesh", "devices per slice/node")
  return Mesh(hybrid_device_grid(ici, dcn, granules), MESH_AXES, axis_types=auto)


def axis_rules(rules: Sequence[Sequence[Any]]) -> Rules:
  """``config.train.logical_axis_rules`` checked and as tuples (a config read back from JSON has
  lists): every entry a (logical name, None | mesh axis | tuple of mesh axes) pair."""
  key = "config.train.logical_axis_rules"
  out = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise errors.ConfigError(f"{key}: {rule!r} is not a (logical name, mesh axes) pair")
    name, axes = rule
    if isinstance(axes, (tuple, list)):
      axes = tuple(axes)
    unknown = [a for a in (axes if isinstance(axes, tuple) else (axes,)) if a not in MESH_AXES]
    if axes is not None and unknown:
      raise errors.ConfigError(
        f"{key}: rule {name!r} maps to {unknown}; mesh axes are {', '.join(MESH_AXES)} (or None)"
      )
    out.append((name, axes))
  return tuple(out)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[Sequence[Any]]) -> Iterator[None]:
  """``mesh`` as the current mesh (``jax.set_mesh``) and ``rules`` as the logical-axis rules.

  Flax's ``with_logical_constraint`` constrains activations only while a mesh is set this way (the
  deprecated ``with mesh:`` leaves them unconstrained).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules(rules)):
    yield


class _FlatInitPartitioned(nn.LogicallyPartitioned):
  """A logically partitioned value constrained only once it has the rank its names describe."""

  def unbox(self, apply_constraint: bool = True) -> Any:
    return super().unbox(apply_constraint and np.ndim(self.value) == len(self.names))


def with_dense_general_partitioning(
  init: nn.initializers.Initializer, names: tuple[str, ...]
) -> nn.initializers.Initializer:
  """``nn.with_logical_partitioning`` for ``nn.DenseGeneral`` kernels and biases of several axes.

  DenseGeneral initialises them flat, e.g. (in, heads * kv), then reshapes to ``names``' rank; with a
  mesh set (:func:`use_mesh`) the plain wrapper would constrain the flat value with those names and
  fail — also in ``apply``, where flax traces the initialiser to check the parameter's shape.
  """

  def wrapper(*args, **kwargs):
    return _FlatInitPartitioned(init(*args, **kwargs), names)

  return wrapper


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


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[Sequence[Any]]) -> Any:
  """NamedShardings of a tree of (possibly ``nn.Partitioned``-boxed) abstract arrays."""
  logical = nn.get_partition_spec(boxed_tree)
  unboxed = nn.meta.unbox(boxed_tree)
  mesh_specs = nn.logical_to_mesh_sharding(logical, mesh, axis_rules(rules))

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

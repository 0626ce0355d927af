"""Does the train step fit the device? Known before step 1, from XLA's analysis of the compiled step.

The loop compiles the step for every batch shape of a data phase before the phase's first step
(``steps.jit_train_step``'s ``compile``), logs what one device holds — weights, optimizer state,
batch, and XLA's temporaries (activations, gradients, remat buffers) — and refuses a step that
cannot fit, naming the remedies, instead of an out-of-memory error from the allocator minutes into
the run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from zipir_jax.errors import ConfigError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Bytes one device needs for one train step."""

  weights: int  # trained, EMA and frozen parameters (and the discriminator's)
  optimizer: int  # optimizer state (both optimizers of a GAN stage)
  batch: int
  activations: int  # XLA's temporaries of the step
  peak: int  # arguments + temporaries + outputs that do not reuse a donated argument

  def describe(self) -> str:
    return (
      f"weights {_gib(self.weights)}, optimizer {_gib(self.optimizer)}, batch "
      f"{_gib(self.batch)}, activations {_gib(self.activations)}; peak {_gib(self.peak)}"
    )


def _gib(n: float) -> str:
  return f"{n / GIB:.3g} GiB" if n >= GIB else f"{n / 2**20:.3g} MiB"


def per_device_bytes(tree: Any) -> int:
  """Bytes of ``tree``'s arrays (or ``ShapeDtypeStruct``s with a sharding) on the most loaded
  device: each leaf's shard shape under its sharding."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += math.prod(shape) * x.dtype.itemsize
  return total


def step_memory(compiled: Any, state: Any, batch: Any) -> StepMemory:
  """What the compiled step (``jax.stages.Compiled``) needs per device, by part of the state."""
  analysis = compiled.memory_analysis()
  peak = (
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
    + analysis.temp_size_in_bytes
  )
  return StepMemory(
    weights=per_device_bytes((state.params, state.ema_params, state.frozen, state.disc)),
    optimizer=per_device_bytes((state.opt_state, state.disc_opt_state)),
    batch=per_device_bytes(batch),
    activations=analysis.temp_size_in_bytes,
    peak=peak,
  )


def device_budget(train_config, state: Any) -> tuple[int | None, int, str]:
  """(bytes a device may use or None if unknown, bytes other arrays already hold there, source).

  ``config.train.device_memory_gib`` when set, else the allocator's limit of the first local
  device (GPU/TPU; the CPU reports none). Other arrays: what is in use beyond the state (the text
  encoder, the preview's decoder), where the device reports it.
  """
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  other = max(stats.get("bytes_in_use", 0) - per_device_bytes(state), 0)
  if float(train_config.device_memory_gib) > 0:
    limit = int(float(train_config.device_memory_gib) * GIB)
    return limit, other, f"config.train.device_memory_gib={train_config.device_memory_gib}"
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"]), other, f"{device.device_kind} {device.id}'s allocator limit"
  return None, other, f"{device.platform} reports no memory limit"


def check_fit(
  memory: StepMemory, limit: int | None, other: int, source: str, where: str, remat: str | None
) -> None:
  """Raises a ConfigError naming the remedies when ``memory`` and ``other`` exceed ``limit``;
  ``remat``: the stage's remat policy (the DiT's ``config.dit.remat_policy``), None without one."""
  if limit is None or memory.peak + other <= limit:
    return
  held = f" + {_gib(other)} held by other arrays" if other else ""
  remedies = [
    "shard the weights and optimizer state over more devices (a larger fsdp axis, e.g. "
    "--config.train.mesh='(-1,8,1)')",
    "train smaller batches (config.data.buckets, or config.optim.grad_accum to split each batch "
    "into micro-batches)",
  ]
  if remat not in (None, "nothing_saveable"):
    remedies.insert(
      1,
      f"recompute more in the backward pass (config.dit.remat_policy={remat!r} -> "
      "--config.dit.remat_policy=nothing_saveable)",
    )
  raise ConfigError(
    f"{where}: the train step needs {_gib(memory.peak)} per device ({memory.describe()}){held}, "
    f"more than the {_gib(limit)} available ({source}). Remedies: {'; '.join(remedies)}"
  )

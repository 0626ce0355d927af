"""What a finished stage hands on, and the statistics stages measure on their data.

A stage's export (``WORKDIR/<stage>/export``) holds what its :class:`~zipir_jax.training.stages.Stage`
lists in ``exports``: the EMA weights of the networks it trained, the frozen ones it carried, and the
constants measured on its data — z_macro's RGB statistics (measured before ``vae_coarse`` trains)
and the latent's per-channel statistics (measured after the last stage that trains an encoder).
The dit stage's export is the restoration bundle ``sample.py`` loads.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from zipir_jax import bundle as bundle_lib
from zipir_jax import latents, parallel, param_io
from zipir_jax.errors import MissingPrerequisiteError
from zipir_jax.training import checkpointing, stages


def to_host(tree: Any) -> Any:
  """Global (possibly sharded across hosts) arrays -> numpy, identical on every process: for small
  values (statistics, preview images); exports write sharded arrays as they are."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return x
  return np.sum(multihost_utils.process_allgather(x), axis=0)


def _moments_to_stats(total: np.ndarray) -> dict[str, np.ndarray]:
  """[sum, sum of squares, count] per channel (float64) -> {'mean', 'std'} (float32)."""
  mean = total[0] / total[2]
  std = np.sqrt(np.maximum(total[1] / total[2] - mean**2, 1e-12))
  return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}


def measure_macro_stats(batches: Iterator[dict], num_batches: int) -> dict[str, np.ndarray]:
  """Per-channel RGB mean/std of the HQ crops (in [-1, 1]) of ``num_batches`` host batches, over
  all processes: z_macro's μ and σ (§3.1, "calculated from the entire training dataset")."""
  total = np.zeros((3, 3), np.float64)
  for _ in range(max(num_batches, 1)):
    hq = np.asarray(next(batches)["hq"], np.float64).reshape(-1, 3)
    total += np.stack([hq.sum(0), np.square(hq).sum(0), np.full(3, hq.shape[0], np.float64)])
  return _moments_to_stats(_sum_over_processes(total))


def measure_latent_stats(
  models: Any, encoders: dict, batches: Iterator[dict], mesh: Any, num_batches: int
) -> dict[str, np.ndarray]:
  """Per-channel mean/std of the VAE latent (posterior mode) over ``num_batches`` global batches:
  the normalisation the DiT's latent uses (``latents.py``)."""
  identity = {"mean": jnp.zeros(models.vae.latent_channels), "std": 1.0}
  encode = jax.jit(lambda p, x: latents.encode(models.vae, p, x, identity))
  total = np.zeros((3, models.vae.latent_channels), np.float64)
  for _ in range(max(num_batches, 1)):
    batch = parallel.global_batch({"hq": next(batches)["hq"]}, mesh)
    with parallel.use_mesh(mesh, models.config.train.logical_axis_rules):
      z = encode(encoders, batch["hq"]).astype(jnp.float32)
    s = jnp.stack(
      [
        jnp.sum(z, axis=(0, 1, 2)),
        jnp.sum(z * z, axis=(0, 1, 2)),
        jnp.full(z.shape[-1:], z.shape[0] * z.shape[1] * z.shape[2], jnp.float32),
      ]
    )
    total += np.asarray(to_host(s), np.float64)
  return _moments_to_stats(total)


def restoration_decoder(config, prereqs: dict) -> dict:
  """The ``pixel_decoder`` params the dit stage restores with (preview, bundle): D_f* from the
  pixel_decoder export; with no fusion levels the autoencoder's plain decoder (a D_f* without
  fusion levels is exactly that): the SD-VAE ablation's, or D_f for Table 4's LP-VAE rows before
  "+ Pixel-aware Decoder" (then the prerequisite is the vae_fine export, which holds D_f)."""
  if tuple(config.pixel_decoder.fusion_levels):
    return prereqs["pixel_decoder"]
  experiment = stages.experiment(config.vae.kind)
  key, stage = experiment.plain_decoder, experiment.plain_decoder_stage
  if key not in prereqs:
    prerequisite = stages.current(config).prerequisite
    raise MissingPrerequisiteError(
      f"with config.pixel_decoder.fusion_levels=() the dit stage restores with the plain "
      f"decoder {key}, which its prerequisite export does not hold ({', '.join(sorted(prereqs))})"
      f"; point --config.train.init_from.{prerequisite} at the {stage} "
      f"export (WORKDIR/{stage}/export)"
    )
  return {"decoder": prereqs[key]}


def export(config, workdir: str, state, prereqs: dict, measured: dict, text=None) -> str:
  """Writes the stage's export (dit: the restoration bundle); returns its folder.

  Every process calls it: the state's sharded arrays are written where they lie, with no gather to
  any host (``param_io``). ``measured``: constants measured on the stage's data
  ({'latent_stats': ...} after vae_fine); ``text``: the dit stage's (T5 config, params, tokenizer),
  stored in the bundle.
  """
  stage = stages.current(config)
  ema, frozen = state.ema_params, state.frozen
  if stage.exports == ("bundle",):
    experiment = stages.experiment(config.vae.kind)
    params = {
      "vae": stages.select(frozen, experiment.encoders),
      "pixel_decoder": restoration_decoder(config, prereqs),
      "dit": ema["dit"],
      "latent_stats": frozen["latent_stats"],
    }
    path = os.path.join(checkpointing.stage_dir(workdir, stage.name), "bundle")
    if jax.process_index() == 0 and os.path.exists(path):
      shutil.rmtree(path)
    param_io.sync_processes(f"replace {path}")
    bundle_lib.save_bundle(path, bundle_lib.Bundle(config, params, *text))
    return path
  available = {**prereqs, **frozen, **ema, **measured}
  missing = [k for k in stage.exports if k not in available]
  if missing:  # the stage table promises what it cannot deliver: a bug, not a user error
    raise RuntimeError(f"stage {stage.name}: nothing to export for {missing}")
  path = checkpointing.export_dir(workdir, stage.name)
  checkpointing.save_export(path, config, stages.select(available, stage.exports))
  return path


def random_prerequisite(config, workdir: str, rng: jax.Array) -> str:
  """Writes the dit stage's prerequisite export with random weights where the stage reads it
  (``bundle.random_bundle``'s encoders, restoration decoder and latent statistics); returns its
  folder. For benchmarks and tests of the dit stage that need no trained autoencoder."""
  stage = stages.current(config)
  if stage.exports != ("bundle",):
    raise ValueError(f"random_prerequisite makes the dit stage's prerequisite, not {stage.name}'s")
  params = bundle_lib.random_bundle(config, rng).params
  experiment = stages.experiment(config.vae.kind)
  available = {
    **params["vae"],
    "pixel_decoder": params["pixel_decoder"],
    experiment.plain_decoder: params["pixel_decoder"]["decoder"],
    "latent_stats": params["latent_stats"],
  }
  earlier = experiment.stage(stage.prerequisite)
  earlier_config = copy.deepcopy(config)
  earlier_config.stage = earlier.name
  path = checkpointing.export_dir(workdir, earlier.name)
  checkpointing.save_export(path, earlier_config, stages.select(available, earlier.exports))
  return path

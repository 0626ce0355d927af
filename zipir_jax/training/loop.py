"""``train_and_evaluate(config, workdir)``: one stage of progressive ZipIR training, start to export.

Reads the earlier stage's export (refusing clearly when it is missing), builds the sharded train
state, resumes from the latest checkpoint in ``WORKDIR/<stage>/checkpoints`` (train state, RNG and
grain iterator state), runs the jitted step, reports, checkpoints every N steps / at the end / on
SIGTERM, and finally exports the EMA weights (the dit stage writes the restoration bundle).

Preemption: a SIGTERM once the loop is set up (logged as "training <stage>: steps a..b") lets the
step in flight finish, writes a checkpoint of that step even off the ``checkpoint_every`` schedule,
waits until it is on disk, logs "SIGTERM: checkpoint of step N written; exiting" and returns without
exporting; train.py then exits 0. Running the same command again resumes from step N. With several
processes the stop is agreed on after every step (one process's SIGTERM stops all at the same step).
A SIGTERM before that (loading, initialising, restoring) has the default effect: the process dies
(status 143, -15 to Python's subprocess) and no step is lost.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from zipir_jax import bundle as bundle_lib
from zipir_jax import config_lib, parallel
from zipir_jax import text as text_lib
from zipir_jax.data import pipeline
from zipir_jax.errors import NonFiniteError
from zipir_jax.models import autoencoder, t5
from zipir_jax.training import checkpointing, reporting, steps, text_cache
from zipir_jax.training import state as state_lib


def to_host(tree: Any) -> Any:
  """Global (possibly sharded across hosts) arrays -> numpy, identical on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return multihost_utils.process_allgather(tree, tiled=True)


def text_encoder(config, rng: jax.Array):
  """(T5Encoder, params, tokenizer): config.text.encoder_path, else the tiny random ByT5-style one."""
  if config.text.encoder_path:
    text_config, params, tokenizer = t5.load_t5_encoder(
      config.text.encoder_path, dtype=config.text.dtype
    )
  else:
    import transformers  # pylint: disable=g-import-not-at-top

    text_config = t5.tiny_byt5_config(d_model=config.dit.text_dim, dtype=config.text.dtype)
    params, tokenizer = t5.init_t5_encoder(text_config, rng), transformers.ByT5Tokenizer()
  return text_config, params, tokenizer


def run_rngs(config) -> tuple[jax.Array, jax.Array]:
  """(train-state rng, text-encoder rng) of a run, from config.seed."""
  return tuple(jax.random.split(jax.random.PRNGKey(config.seed)))


def dit_text_encoder(config):
  """The dit stage's (config, params, tokenizer); the caption cache is built with the same."""
  return text_encoder(config, run_rngs(config)[1])


def caption_encoder(config, text_config, text_params, tokenizer):
  """captions -> (embeddings, masks): config.text.embedding_cache's lookup, else T5 itself."""
  if config.text.embedding_cache:
    return text_cache.load(
      config.text.embedding_cache, config, text_config, text_params, tokenizer
    ).lookup
  return functools.partial(
    text_lib.encode_prompts,
    tokenizer=tokenizer,
    model=t5.T5Encoder(text_config),
    params=text_params,
    max_length=int(config.text.max_length),
  )


def _prerequisite_subset(config, prereqs: dict) -> dict:
  stage = config.stage
  wanted = set(state_lib.TRAINABLE[stage]) | set(state_lib.frozen_parts(config))
  if stage == "pixel_decoder":
    wanted |= {"fine_encoder", "fine_decoder"}
  return {k: v for k, v in prereqs.items() if k in wanted}


def restoration_decoder(config, prereqs: dict) -> dict:
  """The ``pixel_decoder`` params the dit stage restores with (preview, bundle): D_f* from the
  pixel_decoder export; with no fusion levels the autoencoder's plain decoder (a D_f* without
  fusion levels is exactly that): the SD-VAE ablation's, or D_f for Table 4's LP-VAE rows before
  "+ Pixel-aware Decoder" (then the prerequisite is the vae_fine export, which holds D_f)."""
  if tuple(config.pixel_decoder.fusion_levels):
    return prereqs["pixel_decoder"]
  key, stage = bundle_lib.PLAIN_DECODER[config.vae.kind]
  if key not in prereqs:
    raise checkpointing.MissingPrerequisiteError(
      f"with config.pixel_decoder.fusion_levels=() the dit stage restores with the plain "
      f"decoder {key}, which its prerequisite export does not hold ({', '.join(sorted(prereqs))})"
      f"; point --config.train.init_from.{config_lib.prerequisite_stage(config)} at the {stage} "
      f"export (WORKDIR/{stage}/export)"
    )
  return {"decoder": prereqs[key]}


def measure_latent_stats(models, params: dict, data_iter, mesh, num_batches: int) -> dict:
  """Per-channel mean/std of the VAE latent (posterior mode) over ``num_batches`` batches."""
  encode = jax.jit(lambda p, x: models.vae.apply({"params": p}, x, method="encode")[0])
  total = None
  for _ in range(max(num_batches, 1)):
    batch = parallel.global_batch({"hq": next(data_iter)["hq"]}, mesh)
    with parallel.use_mesh(mesh, models.config.train.logical_axis_rules):
      z = encode(params, batch["hq"]).astype(jnp.float32)
    s = jnp.stack(
      [
        jnp.sum(z, axis=(0, 1, 2)),
        jnp.sum(z * z, axis=(0, 1, 2)),
        jnp.full(z.shape[-1:], z.shape[0] * z.shape[1] * z.shape[2], jnp.float32),
      ]
    )
    s = np.asarray(jax.device_get(s), np.float64)
    total = s if total is None else total + s
  mean = total[0] / total[2]
  std = np.sqrt(np.maximum(total[1] / total[2] - mean**2, 1e-12))
  return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}


def _host_batch(example: dict, stage: str, step: int, nan_steps, text) -> dict[str, np.ndarray]:
  """``text``: the dit stage's :func:`caption_encoder` (None for the other stages)."""
  batch = {
    k: np.asarray(example[k], np.float32) for k in ("hq", "lq_up") if k in steps.batch_keys(stage)
  }
  if step in nan_steps:  # fault-handling tests: a planted non-finite batch.
    batch["hq"] = np.full_like(batch["hq"], np.nan)
  if stage == "dit":
    emb, mask = text([str(c) for c in example["caption"]])
    batch["text_emb"] = np.asarray(emb, np.float32)
    batch["text_mask"] = np.asarray(mask, np.int32)
  return batch


def export(
  config, workdir: str, stage_state, prereqs: dict, models, data_iter, mesh, text=None
) -> str:
  """Writes the stage's EMA export (dit: the restoration bundle); returns its folder."""
  stage = config.stage
  ema = to_host(stage_state.ema_params)
  frozen = to_host(stage_state.frozen)
  encoders = autoencoder.encoder_keys(config)
  if stage == "dit":
    model_config, text_params, tokenizer = text
    params = {
      "vae": {k: frozen[k] for k in encoders},
      "pixel_decoder": restoration_decoder(config, prereqs),
      "dit": ema["dit"],
      "latent_stats": frozen["latent_stats"],
    }
    path = os.path.join(checkpointing.stage_dir(workdir, stage), "bundle")
    if jax.process_index() == 0:
      if os.path.exists(path):
        shutil.rmtree(path)
      bundle_lib.save_bundle(
        path, bundle_lib.Bundle(config, params, model_config, text_params, tokenizer)
      )
    return path
  params = {**frozen, **ema}  # frozen encoders are carried forward to the later stages
  if stage == bundle_lib.PLAIN_DECODER[config.vae.kind][1]:  # the last stage training an encoder
    params["latent_stats"] = measure_latent_stats(
      models,
      {k: params[k] for k in encoders},
      data_iter,
      mesh,
      int(config.train.latent_stats_batches),
    )
  if stage == "pixel_decoder":
    params["latent_stats"] = prereqs["latent_stats"]
  path = checkpointing.export_dir(workdir, stage)
  checkpointing.save_export(path, config, params)
  return path


def train_and_evaluate(config, workdir: str, config_file: str = "configs/<model>.py") -> Any:
  """Trains ``config.stage`` to ``config.optim.num_steps``; returns the final train state."""
  stage = state_lib.check_stage(config)
  sdir = checkpointing.stage_dir(workdir, stage)
  mesh = parallel.create_mesh(config.train.mesh, dcn_shape=config.train.dcn_mesh)
  logging.info("stage %s, mesh %s, %d processes", stage, dict(mesh.shape), jax.process_count())
  prereqs = checkpointing.load_prerequisites(config, workdir, config_file)
  models = state_lib.build_models(config)
  rng_state = run_rngs(config)[0]

  text = None
  init_inputs = _prerequisite_subset(config, prereqs)
  if stage == "dit":
    restoration_decoder(config, prereqs)  # a missing decoder fails now, not at the export
    text_config, text_params, tokenizer = dit_text_encoder(config)
    text = caption_encoder(config, text_config, text_params, tokenizer)
    null_emb, null_mask = text([""])  # the CFG null condition, from the cache when there is one
    init_inputs["null_text"] = {
      "emb": np.asarray(null_emb, np.float32),
      "mask": np.asarray(null_mask, np.int32),
    }

  data_iter = pipeline.create_train_iterator(
    config.data,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  manager = checkpointing.create_manager(os.path.join(sdir, "checkpoints"), config.train)
  abstract, shardings = state_lib.abstract_state(models, mesh, rng_state, init_inputs)
  # Resume by default: the checkpoint is read straight onto this run's mesh (which may differ from
  # the one that wrote it); only a fresh run initialises.
  restored = checkpointing.restore(
    manager, state_lib.abstract_with_shardings(abstract, shardings), data_iter
  )
  if restored is not None:
    state, start = restored
    logging.info("resumed %s from step %d (%s)", stage, start, manager.directory)
  else:
    state, _ = state_lib.create_train_state(models, mesh, rng_state, init_inputs, shardings)
  logging.info(
    "trainable parameters: %d; frozen: %d",
    state_lib.count_params(state.params),
    state_lib.count_params(state.frozen),
  )
  start = int(jax.device_get(state.step))

  train_step = steps.jit_train_step(models, mesh, shardings)
  preview = jax.jit(lambda s, b, pd: steps.preview(models, s, b, pd))
  # The dit state holds no decoder: its preview decodes with the earlier export's (D_f*).
  preview_decoder = (
    jax.device_put(restoration_decoder(config, prereqs), parallel.replicated(mesh))
    if (stage == "dit" and config.train.image_every)
    else None
  )
  writer = reporting.create_writer(sdir, start_step=start)
  total = int(config.optim.num_steps)
  nan_steps = {int(s) for s in config.train.nan_steps}
  preempted = []
  previous_handler = (
    signal.signal(signal.SIGTERM, lambda *_: preempted.append(True)) if _main_thread() else None
  )
  logging.info(
    "training %s: steps %d..%d (SIGTERM from here on: checkpoint and stop)", stage, start + 1, total
  )
  throughput = None
  try:
    for step in range(start, total):
      example = next(data_iter)
      host = _host_batch(example, stage, step, nan_steps, text)
      batch = parallel.global_batch(host, mesh)
      if throughput is None:
        peak = reporting.peak_flops_per_device(config.train)  # None on CPU: no MFU there
        throughput = reporting.Throughput(
          total, step, train_step.flops(state, batch) if peak else None, peak
        )
      state, metrics = train_step(state, batch)
      throughput.update(int(batch["hq"].shape[0]))
      done = step + 1
      nonfinite = int(jax.device_get(state.nonfinite))
      if nonfinite >= int(config.train.max_nonfinite):
        manager.wait_until_finished()
        last = manager.latest_step()
        raise NonFiniteError(
          f"stage {stage}: {nonfinite} non-finite updates in a row (steps {done - nonfinite}.."
          f"{step}) — stopping. Last good checkpoint: "
          f"{os.path.join(sdir, 'checkpoints', str(last)) if last is not None else 'none'}"
        )
      if done % int(config.train.log_every) == 0 or done == total:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        scalars.update(throughput.report(done))
        writer.write_scalars(done, scalars)
      if config.train.image_every and done % int(config.train.image_every) == 0:
        with parallel.use_mesh(mesh, config.train.logical_axis_rules):
          out = preview(state, batch, preview_decoder)
        local = host["hq"].shape[0]  # process 0's examples lead the global batch
        grid = reporting.image_grid(host["hq"], example["lq_up"], to_host(out)[:local])
        writer.write_images(done, {"hq_lq_output": grid})
      stop = _any_process(bool(preempted))  # read once: a later SIGTERM waits for the next step
      checkpointing.save(manager, done, state, data_iter, force=stop)
      if done == int(config.train.kill_after_step):  # crash simulation for the resume tests
        manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
      if stop:
        manager.wait_until_finished()
        logging.warning("SIGTERM: checkpoint of step %d written; exiting", done)
        return state
    last = int(jax.device_get(state.step))
    if manager.latest_step() != last:
      checkpointing.save(manager, last, state, data_iter, force=True)
    manager.wait_until_finished()
    path = export(
      config,
      workdir,
      state,
      prereqs,
      models,
      data_iter,
      mesh,
      text and (text_config, text_params, tokenizer),
    )
    logging.info("stage %s done at step %d; export: %s", stage, last, path)
    return state
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)


def _any_process(flag: bool) -> bool:
  """``flag`` of any process, so that every process takes the same save-and-stop decision."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _main_thread() -> bool:
  import threading  # pylint: disable=g-import-not-at-top

  return threading.current_thread() is threading.main_thread()

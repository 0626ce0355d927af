"""``train_and_evaluate(config, workdir)``: one stage of progressive ZipIR training, start to export.

Reads the earlier stage's export (refusing clearly when it is missing), builds the sharded train
state, resumes from the latest checkpoint in ``WORKDIR/<stage>/checkpoints`` (train state, RNG and
grain iterator state), runs the jitted step over the stage's data phases, reports, checkpoints every
N steps / at the end / on SIGTERM, and finally exports (``export.py``). What the stage trains and
with which numbers is ``stages.py``'s; the stage prints its resolved recipe when it starts.

Preemption: a SIGTERM once the loop is set up (logged as "training <stage>: steps a..b") lets the
step in flight finish, writes a checkpoint of that step even off the ``checkpoint_every`` schedule,
waits until it is on disk, logs "SIGTERM: checkpoint of step N written; exiting" and returns without
exporting; train.py then exits 0. Running the same command again resumes from step N. With several
processes the stop is agreed on after every step (one process's SIGTERM stops all at the same step).
A SIGTERM before that (loading, initialising, restoring) has the default effect: the process dies
(status 143, -15 to Python's subprocess) and no step is lost.
"""

from __future__ import annotations

import copy
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from zipir_jax import parallel
from zipir_jax.data import pipeline
from zipir_jax.errors import NonFiniteError
from zipir_jax.models import count_params
from zipir_jax.training import checkpointing, export, reporting, stages, steps, text_cache
from zipir_jax.training import state as state_lib


def data_iterator(config, phase: int):
  """The training iterator of the stage's data ``phase`` (``stages.data_phases``) on this process.

  Each phase draws its own deterministic stream (phase 0 keeps the run's seed), of HQ crops only
  for stages without LQ↑, with §3.2's negative examples for the dit stage.
  """
  stage = stages.current(config)
  data = copy.deepcopy(config.data)
  data.buckets = stages.data_phases(config)[phase][1]
  data.phases = ()
  seed = config.seed if phase == 0 else pipeline.derive_seed(config.seed, 0xDA7A, phase)
  negative = "text_emb" in stage.batch_keys
  return pipeline.create_train_iterator(
    data,
    seed=seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    degrade=stage.needs_lq,
    negative_rate=float(config.dit.negative_rate) if negative else 0.0,
    negative_prompts=tuple(config.dit.negative_prompts),
  )


def _host_batch(example: dict, stage: stages.Stage, nan: bool, text) -> dict[str, np.ndarray]:
  """The stage's batch keys as host arrays; ``text`` encodes captions (dit), ``nan`` plants NaNs."""
  batch = {k: np.asarray(example[k], np.float32) for k in ("hq", "lq_up") if k in stage.batch_keys}
  if nan:  # fault-handling tests (config.debug.nan_steps)
    batch["hq"] = np.full_like(batch["hq"], np.nan)
  if "text_emb" in stage.batch_keys:
    emb, mask = text([str(c) for c in example["caption"]])
    batch["text_emb"] = np.asarray(emb, np.float32)
    batch["text_mask"] = np.asarray(mask, np.int32)
  return batch


def _initial_inputs(config, stage: stages.Stage, prereqs: dict, text) -> dict[str, Any]:
  """What replaces random initialisation: the prerequisite export's parts, the null text (dit) and
  a placeholder for z_macro's statistics (measured before a fresh vae_coarse run)."""
  wanted = (*stage.trains, *stage.freezes, *stage.init_from)
  inputs = {k: v for k, v in prereqs.items() if k in wanted}
  if "null_text" in stage.freezes:
    null_emb, null_mask = text([""])  # the CFG null condition, from the cache when there is one
    inputs["null_text"] = {
      "emb": np.asarray(null_emb, np.float32),
      "mask": np.asarray(null_mask, np.int32),
    }
  if "macro" in stage.measures:
    inputs["macro"] = {"mean": np.zeros(3, np.float32), "std": np.ones(3, np.float32)}
  return inputs


def train_and_evaluate(config, workdir: str, config_file: str = "configs/<model>.py") -> Any:
  """Trains ``config.stage`` to ``config.optim.num_steps``; returns the final train state."""
  stage = state_lib.check_config(config)
  sdir = checkpointing.stage_dir(workdir, stage.name)
  mesh = parallel.create_mesh(tuple(config.train.mesh))
  logging.info("stage %s, mesh %s, %d processes", stage.name, dict(mesh.shape), jax.process_count())
  logging.info("recipe:\n%s", stages.format_table(stages.describe(config)))
  prereqs = checkpointing.load_prerequisites(config, workdir, config_file)
  models = state_lib.build_models(config)
  rng_state = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # [1]: the text encoder

  text = text_bundle = None
  if "text_emb" in stage.batch_keys:
    export.restoration_decoder(config, prereqs)  # a missing decoder fails now, not at the export
    text_bundle = text_cache.dit_text_encoder(config)
    text = text_cache.caption_encoder(config, *text_bundle)
  init_inputs = _initial_inputs(config, stage, prereqs, text)

  manager = checkpointing.create_manager(os.path.join(sdir, "checkpoints"), config.train)
  abstract, shardings = state_lib.abstract_state(models, mesh, rng_state, init_inputs)
  # Resume by default: the checkpoint is read straight onto this run's mesh (which may differ from
  # the one that wrote it); only a fresh run initialises. The saved iterator is of the phase that
  # trained the checkpoint's last step; the next step may start a new phase.
  latest = manager.latest_step()
  phase = stages.phase_at(config, max((latest or 0) - 1, 0))
  data_iter = data_iterator(config, phase)
  restored = checkpointing.restore(
    manager, state_lib.abstract_with_shardings(abstract, shardings), data_iter
  )
  if restored is not None:
    state, start = restored
    logging.info("resumed %s from step %d (%s)", stage.name, start, manager.directory)
  else:
    if "macro" in stage.measures:  # z_macro's μ/σ from this stage's own data (§3.1)
      init_inputs["macro"] = export.measure_macro_stats(
        data_iterator(config, 0), int(config.train.macro_stats_batches)
      )
      logging.info("z_macro statistics of the training data: %s", init_inputs["macro"])
    state, _ = state_lib.create_train_state(models, mesh, rng_state, init_inputs, shardings)
  logging.info(
    "trained parameters: %d; frozen: %d",
    count_params(state.params),
    count_params(state.frozen),
  )
  start = int(jax.device_get(state.step))

  train_step = steps.jit_train_step(models, mesh, shardings)
  preview = jax.jit(lambda s, b, pd: steps.preview(models, s, b, pd))
  # The dit state holds no decoder: its preview decodes with the earlier export's (D_f*).
  preview_decoder = (
    jax.device_put(export.restoration_decoder(config, prereqs), parallel.replicated(mesh))
    if (text is not None and config.train.image_every)
    else None
  )
  writer = reporting.create_writer(sdir, start_step=start)
  total = int(config.optim.num_steps)
  nan_steps = {int(s) for s in config.debug.nan_steps}
  preempted = []
  previous_handler = (
    signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    if threading.current_thread() is threading.main_thread()
    else None
  )
  logging.info(
    "training %s: steps %d..%d (SIGTERM from here on: checkpoint and stop)",
    stage.name,
    start + 1,
    total,
  )
  throughput = None
  try:
    for step in range(start, total):
      if stages.phase_at(config, step) != phase:
        phase = stages.phase_at(config, step)
        logging.info(
          "step %d: data phase %d (%s)", step + 1, phase + 1, stages.data_phases(config)[phase][1]
        )
        data_iter = data_iterator(config, phase)
      example = next(data_iter)
      host = _host_batch(example, stage, step in nan_steps, text)
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
          f"stage {stage.name}: {nonfinite} non-finite updates in a row (steps "
          f"{done - nonfinite}..{step}) — stopping. Last good checkpoint: "
          f"{os.path.join(sdir, 'checkpoints', str(last)) if last is not None else 'none'}"
        )
      if done % int(config.train.log_every) == 0 or done == total:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        scalars.update(throughput.report(done))
        writer.write_scalars(done, scalars)
      if config.train.image_every and done % int(config.train.image_every) == 0:
        with mesh:
          out = preview(state, batch, preview_decoder)
        local = host["hq"].shape[0]  # process 0's examples lead the global batch
        lq = [example["lq_up"]] if "lq_up" in example else []  # HQ | LQ↑ | output
        grid = reporting.image_grid(host["hq"], *lq, export.to_host(out)[:local])
        writer.write_images(done, {"hq_lq_output": grid})
      stop = _any_process(bool(preempted))  # read once: a later SIGTERM waits for the next step
      checkpointing.save(manager, done, state, data_iter, force=stop)
      if done == int(config.debug.kill_after_step):  # crash simulation for the resume tests
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
    measured = {}
    if "latent_stats" in stage.measures:
      encoders = stages.select(
        state.ema_params | state.frozen, stages.experiment(config.vae.kind).encoders
      )
      measured["latent_stats"] = export.measure_latent_stats(
        models, encoders, data_iter, mesh, int(config.train.latent_stats_batches)
      )
    path = export.export(config, workdir, state, prereqs, measured, text_bundle)
    logging.info("stage %s done at step %d; export: %s", stage.name, last, path)
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
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))

"""``train_and_evaluate(config, workdir)``: one stage of progressive ZipIR training, start to export.

Reads the earlier stage's export (refusing clearly when it is missing), builds the sharded train
state, resumes from the latest checkpoint in ``WORKDIR/<stage>/checkpoints`` (train state, RNG and
grain iterator state), compiles the step for every batch shape still ahead and refuses one that
cannot fit the device (``memory.py``), runs it over the stage's data phases, reports, checkpoints
every N steps / at the end / at a preemption notice, and finally exports (``export.py``: every
process writes its own shards). What the stage trains and with which numbers is ``stages.py``'s;
the stage prints its resolved recipe when it starts.

No step waits for its own result. The step's metrics and the longest run of skipped (non-finite)
updates accumulate on the device (``reporting.IntervalMetrics``); the host reads them every
``config.train.log_every`` steps, where the logged values are means over the interval, and before
every checkpoint. A run of ``config.train.max_nonfinite`` skipped updates stops the run there
(``NonFiniteError``: train.py exits 2) before anything more is written. The host runs at most
``MAX_STEPS_AHEAD`` steps ahead of the device, which bounds the batches queued in device memory.

Preemption: the step in flight finishes, a checkpoint of it is written and waited for, the log says
"preempted: checkpoint of step N written", and :class:`Preempted` is raised without exporting;
train.py then exits with status 75 (``EX_TEMPFAIL``, "resumable"), and the same command resumes from
step N.

* One process: a SIGTERM once the loop is set up (logged as "training <stage>: steps a..b"). A
  SIGTERM before that (loading, initialising, restoring) has the default effect: the process dies
  (status 143) and no step is lost.
* Several processes: jax.distributed's preemption service catches a SIGTERM on any process from
  ``jax.distributed.initialize`` on and the processes agree, through the coordination service, on
  the step to stop after (``CheckpointManager.reached_preemption``: the step after the one the
  fastest process had reached), so every process checkpoints the same step; no collective runs for
  it per step. A notice received while the run sets up stops it after its first step.
"""

from __future__ import annotations

import collections
import copy
import os
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from zipir_jax import parallel, param_io
from zipir_jax.data import pipeline
from zipir_jax.errors import ConfigError, NonFiniteError
from zipir_jax.models import count_params
from zipir_jax.training import checkpointing, export, memory, reporting, stages, steps, text_cache
from zipir_jax.training import state as state_lib

# Steps the host may dispatch before the device has finished the earliest of them: enough to keep
# the device fed while the host prepares the next batch, few enough to bound queued batches.
MAX_STEPS_AHEAD = 2


class Preempted(Exception):
  """The stage stopped at a preemption notice once a checkpoint of ``step`` was on disk; the same
  command resumes from it (train.py exits with status 75)."""

  def __init__(self, step: int):
    super().__init__(f"preempted: checkpoint of step {step} written; the same command resumes")
    self.step = step


class PreemptionNotice:
  """Whether a preemption notice asks the run to checkpoint and stop after a step (see the module
  docstring): a SIGTERM handler on one process, jax.distributed's preemption service on several.

  ``step``: the latest checkpoint's step, registered with the service at once so that a notice
  received while the run is still setting up stops it after its first step.
  """

  def __init__(self, manager: Any, step: int):
    self._manager = manager
    self._signalled = False
    self._previous_handler = None
    if jax.process_count() > 1:
      if not jax.config.jax_enable_preemption_service:
        logging.warning(
          "jax_enable_preemption_service is off: a SIGTERM ends this run without a checkpoint"
        )
      manager.reached_preemption(step)

  def listen(self) -> None:
    """From now on a SIGTERM of a single-process run is a notice, not the end of the process."""
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, *_) -> None:
    self._signalled = True

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and stop after ``step``: on several processes, the same step on all."""
    if jax.process_count() == 1:
      return self._signalled
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)


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


def _local_batch(example: dict, stage: stages.Stage, nan: bool, text) -> dict[str, Any]:
  """This process's share of the batch: the stage's batch keys, float32 images and embeddings;
  ``text`` encodes captions (dit; T5's output stays on the device), ``nan`` plants NaNs."""
  batch = {k: np.asarray(example[k], np.float32) for k in ("hq", "lq_up") if k in stage.batch_keys}
  if nan:  # fault-handling tests (config.debug.nan_steps)
    batch["hq"] = np.full_like(batch["hq"], np.nan)
  if "text_emb" in stage.batch_keys:
    emb, mask = text([str(c) for c in example["caption"]])
    batch["text_emb"] = emb.astype(np.float32)
    batch["text_mask"] = mask.astype(np.int32)
  return batch


def abstract_batch(config, stage: stages.Stage, bucket, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch of ``bucket`` (height, width, global batch size) as the step receives it."""
  height, width, size = bucket
  split = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
  if size % split:
    raise ConfigError(
      f"config.data.buckets: the global batch of {size} ({height}x{width}) does not split over the "
      f"{split} devices of the mesh's batch axes (data x fsdp of {dict(mesh.shape)}); make each "
      f"batch size a multiple of {split}"
    )
  sharding = parallel.batch_sharding(mesh)
  image = jax.ShapeDtypeStruct((size, height, width, 3), jnp.float32, sharding=sharding)
  batch = {k: image for k in ("hq", "lq_up") if k in stage.batch_keys}
  if "text_emb" in stage.batch_keys:
    length = int(config.text.max_length)
    batch["text_emb"] = jax.ShapeDtypeStruct(
      (size, length, int(config.dit.text_dim)), jnp.float32, sharding=sharding
    )
    batch["text_mask"] = jax.ShapeDtypeStruct((size, length), jnp.int32, sharding=sharding)
  return batch


def compile_and_check_fit(config, stage, train_step, state, mesh, first_phase: int) -> None:
  """Compiles the step for every bucket of the data phases from ``first_phase`` on that the run
  reaches, logs what a device holds for each, and refuses (``ConfigError``) one that cannot fit;
  then waits for every process, so that all start the first step together."""
  limit, other, source = memory.device_budget(config.train, state)
  remat = config.dit.remat_policy if "dit" in stage.trains else None
  for start, buckets in stages.data_phases(config)[first_phase:]:
    if start >= int(config.optim.num_steps):  # a phase the run never reaches
      continue
    for bucket in buckets:
      batch = abstract_batch(config, stage, bucket, mesh)
      need = memory.step_memory(train_step.compile(state, batch), state, batch)
      where = f"stage {stage.name}, batch {bucket[0]}x{bucket[1]} x {bucket[2]}"
      logging.info(
        "%s: train step per device: %s (%s)",
        where,
        need.describe(),
        f"{limit / memory.GIB:.3g} GiB available, {source}" if limit else source,
      )
      memory.check_fit(need, limit, other, source, where, remat)
  param_io.sync_processes("train step compiled")


def profile_window(config) -> tuple[int, int] | None:
  """(first, last) step of ``config.train.profile_steps`` (first step, number of steps), or None."""
  spec = tuple(config.train.profile_steps)
  if not spec:
    return None
  if len(spec) != 2 or any(not isinstance(v, int) or v < 1 for v in spec):
    raise ConfigError(
      f"config.train.profile_steps={spec}: expected (first step, number of steps), both at least "
      "1, or () for no trace"
    )
  return spec[0], spec[0] + spec[1] - 1


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


def _check_finite(interval, config, stage, done: int, manager, sdir: str) -> None:
  """Raises NonFiniteError when ``max_nonfinite`` updates in a row were skipped by step ``done``."""
  streak = interval.longest_nonfinite_streak()
  if streak < int(config.train.max_nonfinite):
    return
  manager.wait_until_finished()
  last = manager.latest_step()
  raise NonFiniteError(
    f"stage {stage.name}: {streak} non-finite updates in a row (seen at step {done}) — stopping. "
    "Last good checkpoint: "
    f"{os.path.join(sdir, 'checkpoints', str(last)) if last is not None else 'none'}"
  )


def train_and_evaluate(config, workdir: str, config_file: str = "configs/<model>.py") -> Any:
  """Trains ``config.stage`` to ``config.optim.num_steps``; returns the final train state.

  Raises :class:`Preempted` after checkpointing at a preemption notice, ``NonFiniteError`` after
  ``config.train.max_nonfinite`` skipped updates in a row, and ``ConfigError`` (before step 1) when
  the step cannot fit the device.
  """
  stage = state_lib.check_config(config)
  profile = profile_window(config)
  sdir = checkpointing.stage_dir(workdir, stage.name)
  mesh = parallel.create_mesh(config.train.mesh, dcn_shape=config.train.dcn_mesh)
  logging.info("stage %s, mesh %s, %d processes", stage.name, dict(mesh.shape), jax.process_count())
  logging.info("recipe:\n%s", stages.format_table(stages.describe(config)))
  manager = checkpointing.create_manager(os.path.join(sdir, "checkpoints"), config.train)
  latest = manager.latest_step()
  preemption = PreemptionNotice(manager, latest or 0)
  writer, tracing = None, False
  try:
    prereqs = checkpointing.load_prerequisites(config, workdir, config_file)
    models = state_lib.build_models(config)
    rng_state = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # [1]: the text encoder

    text = text_bundle = None
    if "text_emb" in stage.batch_keys:
      export.restoration_decoder(config, prereqs)  # a missing decoder fails now, not at the export
      text_bundle = text_cache.dit_text_encoder(config)
      text = text_cache.caption_encoder(config, *text_bundle)
    init_inputs = _initial_inputs(config, stage, prereqs, text)

    abstract, shardings = state_lib.abstract_state(models, mesh, rng_state, init_inputs)
    # Resume by default: the checkpoint is read straight onto this run's mesh (which may differ from
    # the one that wrote it); only a fresh run initialises. The saved iterator is of the phase that
    # trained the checkpoint's last step; the next step may start a new phase.
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
    total = int(config.optim.num_steps)

    train_step = steps.jit_train_step(models, mesh, shardings)
    if start < total:
      compile_and_check_fit(config, stage, train_step, state, mesh, stages.phase_at(config, start))
    preview = jax.jit(lambda s, b, pd: steps.preview(models, s, b, pd))
    # The dit state holds no decoder: its preview decodes with the earlier export's (D_f*).
    preview_decoder = (
      jax.device_put(export.restoration_decoder(config, prereqs), parallel.replicated(mesh))
      if (text is not None and config.train.image_every)
      else None
    )
    writer = reporting.create_writer(sdir, start_step=start)
    nan_steps = {int(s) for s in config.debug.nan_steps}
    log_every = int(config.train.log_every)
    profile_dir = os.path.join(sdir, "profile")
    if jax.process_count() > 1:  # one trace per process (hosts may share a name)
      profile_dir = os.path.join(profile_dir, f"process_{jax.process_index()}")
    interval = throughput = None
    in_flight = collections.deque()
    preemption.listen()
    if start < total:
      logging.info(
        "training %s: steps %d..%d (SIGTERM from here on: checkpoint and stop)",
        stage.name,
        start + 1,
        total,
      )
    for step in range(start, total):
      if stages.phase_at(config, step) != phase:
        phase = stages.phase_at(config, step)
        logging.info(
          "step %d: data phase %d (%s)", step + 1, phase + 1, stages.data_phases(config)[phase][1]
        )
        data_iter = data_iterator(config, phase)
      example = next(data_iter)
      local = _local_batch(example, stage, step in nan_steps, text)
      batch = parallel.global_batch(local, mesh)
      if throughput is None:
        peak = reporting.peak_flops_per_device(config.train)  # None on CPU: no MFU there
        throughput = reporting.Throughput(
          total, step, train_step.flops(state, batch) if peak else None, peak
        )
      if profile and step + 1 == max(profile[0], start + 1) <= profile[1]:
        jax.profiler.start_trace(profile_dir)
        tracing = True
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):  # steps in a trace
        state, metrics = train_step(state, batch)
      done = step + 1
      if interval is None:
        interval = reporting.IntervalMetrics(metrics, parallel.replicated(mesh))
      interval.add(metrics, state.nonfinite)
      throughput.update(int(batch["hq"].shape[0]))
      in_flight.append(metrics)
      if len(in_flight) > MAX_STEPS_AHEAD:
        jax.block_until_ready(in_flight.popleft())
      if tracing and done == profile[1]:
        jax.block_until_ready((state, metrics))
        jax.profiler.stop_trace()
        tracing = False
        logging.info("profile of steps %d..%d: %s", profile[0], done, profile_dir)

      stop = preemption.reached(done)
      log_now = done % log_every == 0 or done == total
      save_now = stop or manager.should_save(done)
      if log_now or save_now:
        _check_finite(interval, config, stage, done, manager, sdir)
      if log_now:
        scalars = interval.report()
        scalars.update(throughput.report(done))
        writer.write_scalars(done, scalars)
      if config.train.image_every and done % int(config.train.image_every) == 0:
        with parallel.use_mesh(mesh, config.train.logical_axis_rules):
          out = preview(state, batch, preview_decoder)
        rows = local["hq"].shape[0]  # process 0's examples lead the global batch
        lq = [example["lq_up"]] if "lq_up" in example else []  # HQ | LQ↑ | output
        grid = reporting.image_grid(local["hq"], *lq, export.to_host(out)[:rows])
        writer.write_images(done, {"hq_lq_output": grid})
      if save_now:
        checkpointing.save(manager, done, state, data_iter, force=True)
      if done == int(config.debug.kill_after_step):  # crash simulation for the resume tests
        manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
      if stop:
        manager.wait_until_finished()
        logging.warning("preempted: checkpoint of step %d written; exiting", done)
        raise Preempted(done)
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
    if tracing:
      jax.profiler.stop_trace()
    preemption.close()
    manager.wait_until_finished()
    manager.close()
    if writer is not None:
      writer.close()

"""Orbax checkpoints (train state + grain iterator), stage exports and stage prerequisites.

Workdir layout (``--workdir=runs/tiny``; one folder per stage, so stages chain without flags):

  runs/tiny/<stage>/checkpoints/<step>/{state,data}   resumable (async, keep-N, latest restored)
  runs/tiny/<stage>/export/{config.json,params}       EMA weights of everything later stages need
  runs/tiny/dit/bundle/                               the restoration bundle sample.py loads
  runs/tiny/<stage>/metrics.jsonl, images/            reporting

Stage S reads the export of its prerequisite stage (``stages.Stage.prerequisite``) from
``WORKDIR/<that stage>/export`` unless ``config.train.init_from.<that stage>`` names another folder.
Each export carries forward what later stages need (``stages.Stage.exports``: frozen encoders, D_f,
z_macro and latent statistics).
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from zipir_jax import param_io
from zipir_jax.errors import MissingPrerequisiteError
from zipir_jax.training import stages


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(os.path.abspath(workdir), stage)


def export_dir(workdir: str, stage: str) -> str:
  return os.path.join(stage_dir(workdir, stage), "export")


def prerequisite_path(config, workdir: str) -> str | None:
  earlier = stages.current(config).prerequisite
  if earlier is None:
    return None
  return os.path.abspath(config.train.init_from[earlier] or export_dir(workdir, earlier))


def load_prerequisites(config, workdir: str, config_file: str = "configs/<model>.py") -> dict:
  """Parameters exported by the earlier stage; refuses with the command that produces them, or
  naming what the export lacks of what the stage reads (the dit stage's decoder is checked where it
  is chosen, ``export.restoration_decoder``)."""
  path = prerequisite_path(config, workdir)
  if path is None:
    return {}
  stage = stages.current(config)
  earlier = stage.prerequisite
  if not os.path.isdir(os.path.join(path, "params")):
    raise MissingPrerequisiteError(
      f"stage {config.stage!r} needs the {earlier!r} export at {path} (its params/ folder is "
      f"missing). Produce it with:\n  python train.py --config={config_file}:{earlier} "
      f"--workdir={os.path.abspath(workdir)}\nor point --config.train.init_from.{earlier}=DIR at "
      f"an existing export."
    )
  prereqs = restore_export(path)
  decoders = {"pixel_decoder", stages.experiment(config.vae.kind).plain_decoder}
  needed = [
    k
    for k in stage.reads
    if k not in prereqs and not (stage.exports == ("bundle",) and k in decoders)
  ]
  if needed:
    raise MissingPrerequisiteError(
      f"stage {stage.name!r} reads {', '.join(needed)} from the {earlier!r} export at {path}, "
      f"which holds only {', '.join(sorted(prereqs))}: it was written by another stage or version"
    )
  return prereqs


def save_export(path: str, config, params: dict) -> None:
  """EMA weights (+ carried-forward frozen parts) of a finished stage, readable without the code.

  Every process calls it: sharded arrays are written where they lie (``param_io.save``), the
  config by process 0; it returns when the export is complete for all of them.
  """
  path = os.path.abspath(path)
  param_io.save(os.path.join(path, "params"), params)
  if jax.process_index() == 0:
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json(indent=2))
  param_io.sync_processes(f"export {path}")


def restore_export(path: str) -> dict:
  """An export's parameters as numpy arrays (``param_io.restore``: any mesh may have written it)."""
  return param_io.restore(os.path.join(os.path.abspath(path), "params"))


def create_manager(directory: str, train_config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=int(train_config.keep_checkpoints),
    save_interval_steps=int(train_config.checkpoint_every),
    enable_async_checkpointing=bool(train_config.async_checkpointing),
    create=True,
  )
  return ocp.CheckpointManager(
    os.path.abspath(directory), options=options, item_names=("state", "data")
  )


def save(
  manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, force: bool = False
) -> bool:
  return manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)
    ),
    force=force,
  )


def _layout(state: Any) -> Any:
  """The keys and list lengths of a JSON iterator state, its values left out."""
  if isinstance(state, dict):
    return {k: _layout(v) for k, v in state.items()}
  if isinstance(state, list):
    return [_layout(v) for v in state]
  return None


def check_data_state(folder: str, data_iter: Any) -> None:
  """Raises a ValueError in plain words unless ``folder`` holds a grain iterator state that fits
  ``data_iter``: written by as many processes, with the same streams (buckets, weights, phase).

  grain itself fails deep inside ``set_state`` with a bare KeyError or a missing file.
  """
  index, count = jax.process_index(), jax.process_count()
  path = os.path.join(folder, f"process_{index}-of-{count}.json")
  if not os.path.exists(path):
    found = (
      sorted(n for n in os.listdir(folder) if n.startswith("process_"))
      if os.path.isdir(folder)
      else []
    )
    raise ValueError(
      f"checkpoint {os.path.dirname(folder)} cannot resume this run: it holds the data "
      f"iterator state of {', '.join(found) or 'no process'}, and this run is process {index} of "
      f"{count}. Resume with the process count that wrote it, or start a fresh --workdir."
    )
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  current = data_iter.get_state()
  if isinstance(current, bytes):  # grain's DataLoader iterators serialise their state themselves
    current = json.loads(current.decode())
  if _layout(saved) != _layout(current):
    raise ValueError(
      f"checkpoint {os.path.dirname(folder)} cannot resume this run: its data iterator state "
      f"({path}) does not fit this run's data pipeline, so config.data.buckets, bucket_weights or "
      "phases differ from the run that wrote it. Resume with the same data settings, or start a "
      "fresh --workdir."
    )


def restore(
  manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any, step: int | None = None
) -> tuple[Any, int] | None:
  """Latest (or ``step``) checkpoint onto ``abstract_state``'s shardings (any mesh); None if none."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  check_data_state(os.path.join(str(manager.directory), str(step), "data"), data_iter)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iter),
    ),
  )
  return restored["state"], step

"""Metrics writers, interval means of the step's metrics, throughput / MFU and progress with ETA.

The step's metrics are accumulated on the device (:class:`IntervalMetrics`, ``clu.metrics``) and read
by the host once per ``config.train.log_every`` steps: no step waits for its own result. Every run
writes scalars to ``metrics.jsonl`` and the log and image grids to
``images/<step>_<name>.png`` (:class:`PlainWriter`), plus TensorBoard event files in the same
folder: through ``clu.metric_writers`` when it imports (it needs TensorFlow), else through
:class:`TensorBoardWriter`, which needs only the ``tensorboard`` package. Only process 0 writes.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import socket
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metrics as clu_metrics

# Dense bf16 peak per device (TFLOP/s) for the MFU estimate when config.train.peak_tflops is 0.
PEAK_TFLOPS = {
  "H100": 989.0,
  "H200": 989.0,
  "A100": 312.0,
  "TPU v4": 275.0,
  "TPU v5p": 459.0,
  "TPU v5 lite": 197.0,
  "TPU v6 lite": 918.0,
}


class PlainWriter:
  """JSONL scalars + PNG image grids; only process 0 writes."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self.active = jax.process_index() == 0
    if self.active:
      os.makedirs(logdir, exist_ok=True)
      self._file = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.active:
      return
    values = {k: float(v) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), **values}) + "\n")
    self._file.flush()
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(values.items())))

  def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
    if not self.active:
      return
    from PIL import Image  # pylint: disable=g-import-not-at-top

    folder = os.path.join(self.logdir, "images")
    os.makedirs(folder, exist_ok=True)
    for name, grid in images.items():
      array = np.asarray(grid)
      array = array[0] if array.ndim == 4 else array
      Image.fromarray(array).save(os.path.join(folder, f"{int(step):08d}_{name}.png"))

  def flush(self) -> None:
    if self.active:
      self._file.flush()

  def close(self) -> None:
    if self.active:
      self._file.close()


_FILE_COUNTER = itertools.count()


class TensorBoardWriter:
  """TensorBoard event file of scalars and PNG images from the ``tensorboard`` package alone.

  Records go through tensorboard's ``RecordWriter`` and protos directly, not its
  ``EventFileWriter``, whose file I/O resolves ``tensorboard.compat.tf`` and so imports TensorFlow
  whenever it is installed. Writes are synchronous (no thread to lose on SIGTERM); CRC-32C is pure
  Python there (~0.5 s per MB of PNG), negligible at image_every's pace. Each file opens with
  SessionLog START at ``start_step + 1``, the first step this process logs: on resume TensorBoard
  then drops what an earlier process logged past the checkpoint (after a SIGKILL, say).
  """

  def __init__(self, logdir: str, start_step: int = 0):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer import record_writer

    # pylint: enable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self.active = jax.process_index() == 0
    self.path = None
    if not self.active:
      return
    os.makedirs(logdir, exist_ok=True)
    # The name TensorFlow's writers use; TensorBoard reads every events.out.tfevents.* of a folder.
    self.path = os.path.join(
      logdir,
      f"events.out.tfevents.{int(time.time()):010d}."
      f"{socket.gethostname()}.{os.getpid()}.{next(_FILE_COUNTER)}",
    )
    file = open(self.path, "wb")  # pylint: disable=consider-using-with  # closed by close()
    self._records = record_writer.RecordWriter(file)
    self._write(event_pb2.Event(file_version="brain.Event:2"))  # version 2: SessionLog purges
    self._write(
      event_pb2.Event(
        step=int(start_step) + 1,
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
      )
    )
    self.flush()

  def _write(self, event) -> None:
    event.wall_time = time.time()
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.active:
      return
    value = self._summary_pb2.Summary.Value
    summary = self._summary_pb2.Summary(
      value=[value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    )
    self._write(self._event_pb2.Event(step=int(step), summary=summary))
    self.flush()

  def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """uint8 (H, W, C) or (N, H, W, C) images, C in {1, 3, 4}; N > 1 are tagged ``name/i``."""
    if not self.active:
      return
    from PIL import Image  # pylint: disable=g-import-not-at-top

    values = []
    for name, array in images.items():
      array = np.asarray(array)
      batch = array[None] if array.ndim == 3 else array
      for i, image in enumerate(batch):
        png = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, format="PNG")
        values.append(
          self._summary_pb2.Summary.Value(
            tag=name if len(batch) == 1 else f"{name}/{i}",
            image=self._summary_pb2.Summary.Image(
              height=image.shape[0],
              width=image.shape[1],
              colorspace=image.shape[-1],
              encoded_image_string=png.getvalue(),
            ),
          )
        )
    self._write(
      self._event_pb2.Event(step=int(step), summary=self._summary_pb2.Summary(value=values))
    )
    self.flush()

  def flush(self) -> None:
    if self.active:
      self._records.flush()

  def close(self) -> None:
    if self.active and not self._records.closed:
      self._records.close()


class MultiWriter:
  """Sends every call to several writers (TensorBoard and the plain JSONL/PNG one)."""

  def __init__(self, *writers):
    self.writers = writers

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def create_writer(logdir: str, start_step: int = 0) -> MultiWriter:
  """metrics.jsonl + PNG grids, and TensorBoard events: clu's writer if it imports, else ours."""
  plain = PlainWriter(logdir)
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  # imports TensorFlow
  except ImportError as e:
    try:
      board = TensorBoardWriter(logdir, start_step)
    except ImportError as e2:
      logging.warning(
        "no TensorBoard events: clu.metric_writers (%s) and the tensorboard package "
        "(%s) are unavailable; writing metrics.jsonl and PNG grids only",
        e,
        e2,
      )
      return MultiWriter(plain)
    logging.info(
      "clu.metric_writers unavailable (%s); TensorBoard events via the tensorboard package: %s",
      e,
      board.path,
    )
    return MultiWriter(board, plain)
  return MultiWriter(
    metric_writers.create_default_writer(
      logdir, just_logging=jax.process_index() > 0, asynchronous=True
    ),
    plain,
  )


def image_grid(*rows: np.ndarray) -> np.ndarray:
  """Images in [-1, 1] (B, H, W, 3) side by side per example (HQ | LQ↑ | output) -> uint8 (1, H', W', 3)."""
  panels = [
    np.clip((np.asarray(r, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8) for r in rows
  ]
  per_example = np.concatenate(panels, axis=2)  # (B, H, k*W, 3)
  return np.concatenate(list(per_example), axis=0)[None]


def peak_flops_per_device(train_config) -> float | None:
  if train_config.peak_tflops:
    return float(train_config.peak_tflops) * 1e12
  kind = jax.devices()[0].device_kind
  for name, tflops in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops * 1e12
  return None


class Throughput:
  """steps/s, examples/s, MFU and ETA over the interval since the last report."""

  def __init__(
    self, total_steps: int, start_step: int, flops_per_step: float | None, peak_flops: float | None
  ):
    self.total, self.flops, self.peak = total_steps, flops_per_step, peak_flops
    self.t0, self.step0, self.examples = time.time(), start_step, 0

  def update(self, examples: int) -> None:
    self.examples += examples

  def report(self, step: int) -> dict[str, float]:
    now = time.time()
    dt = max(now - self.t0, 1e-9)
    steps = step - self.step0
    out = {"steps_per_sec": steps / dt, "examples_per_sec": self.examples / dt}
    if steps > 0:
      out["eta_hours"] = (self.total - step) * dt / steps / 3600.0
    if self.flops and self.peak and steps > 0:
      out["mfu"] = self.flops * steps / dt / (self.peak * jax.device_count())
    self.t0, self.step0, self.examples = now, step, 0
    return out


# Step metrics reported as their last value in an interval (the others as interval means).
LAST_VALUE_METRICS = ("lr", "skipped")


@flax.struct.dataclass
class Maximum(clu_metrics.Metric):
  """The largest value seen (an int32 count): the longest run of skipped updates."""

  value: jnp.ndarray

  @classmethod
  def empty(cls) -> Maximum:
    return cls(value=jnp.array(0, jnp.int32))

  @classmethod
  def from_model_output(cls, values: jnp.ndarray, **_) -> Maximum:
    return cls(value=jnp.max(values).astype(jnp.int32))

  def merge(self, other: Maximum) -> Maximum:
    return type(self)(value=jnp.maximum(self.value, other.value))

  def compute(self) -> jnp.ndarray:
    return self.value


def _from_step(metric: type[clu_metrics.Metric], name: str, applied_only: bool):
  """``metric`` of the step output ``name``; ``applied_only``: over the steps whose update was
  applied (finite), so that a skipped step's NaN does not hide the interval's mean."""

  @flax.struct.dataclass
  class FromStep(metric):
    @classmethod
    def from_model_output(cls, **outputs):
      mask = (outputs["finite"] > 0)[None] if applied_only else None
      return super().from_model_output(jnp.asarray(outputs[name]), mask=mask)

  return FromStep


class IntervalMetrics:
  """The step's metrics over the steps since the last report, accumulated on the device.

  :meth:`add` merges a step's metrics into a ``clu.metrics.Collection`` with one small jitted call
  that the host dispatches without waiting for the step; :meth:`report` reads the interval (the
  one host sync, at log cadence) and starts the next. Means are over the steps whose update was
  applied; ``finite`` is the fraction of applied steps, ``lr`` and ``skipped`` (the running count)
  the last step's values, and ``nonfinite_streak`` the longest run of skipped updates in the
  interval, which :meth:`longest_nonfinite_streak` reads without ending it.
  """

  def __init__(self, step_metrics: dict[str, Any], sharding: jax.sharding.Sharding):
    fields = {
      k: _from_step(
        clu_metrics.LastValue if k in LAST_VALUE_METRICS else clu_metrics.Average,
        k,
        applied_only=k not in (*LAST_VALUE_METRICS, "finite"),
      )
      for k in step_metrics
    }
    fields["nonfinite_streak"] = _from_step(Maximum, "nonfinite_streak", applied_only=False)
    collection = clu_metrics.Collection.create(**fields)
    # Replicated on the mesh like the step's metrics: every process runs the same small programs.
    self._empty = jax.jit(collection.empty, out_shardings=sharding)
    self._merge = jax.jit(
      lambda total, step, streak: total.merge(
        collection.single_from_model_output(**step, nonfinite_streak=streak)
      ),
      out_shardings=sharding,
    )
    self._compute = jax.jit(lambda total: total.compute(), out_shardings=sharding)
    self._total = self._empty()

  def add(self, step_metrics: dict[str, jax.Array], nonfinite: jax.Array) -> None:
    """Adds one step: its metrics and the state's count of consecutive skipped updates."""
    self._total = self._merge(self._total, step_metrics, nonfinite)

  def longest_nonfinite_streak(self) -> int:
    return int(jax.device_get(self._total.nonfinite_streak.value))

  def report(self) -> dict[str, float]:
    """The interval's values as floats; the next interval starts empty."""
    values = jax.device_get(self._compute(self._total))
    self._total = self._empty()
    return {k: float(v) for k, v in values.items()}

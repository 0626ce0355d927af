"""Metrics writers, throughput / MFU and progress with ETA.

``clu.metric_writers`` (TensorBoard) needs TensorFlow; when it cannot be imported a plain writer takes
over: scalars to ``metrics.jsonl`` and the log, image grids to ``images/<step>_<name>.png``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

# Dense bf16 peak per device (TFLOP/s) for the MFU estimate when config.train.peak_tflops is 0.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5p": 459.0,
               "TPU v5 lite": 197.0, "TPU v6 lite": 918.0}


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


class _Both:
  """TensorBoard via clu plus the plain JSONL file (kept so runs are comparable with or without TF)."""

  def __init__(self, clu_writer, plain: PlainWriter):
    self.clu, self.plain = clu_writer, plain

  def write_scalars(self, step, scalars):
    self.clu.write_scalars(step, scalars)
    self.plain.write_scalars(step, scalars)

  def write_images(self, step, images):
    self.clu.write_images(step, images)
    self.plain.write_images(step, images)

  def flush(self):
    self.clu.flush()
    self.plain.flush()

  def close(self):
    self.clu.close()
    self.plain.close()


def create_writer(logdir: str):
  plain = PlainWriter(logdir)
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  # imports TensorFlow
  except ImportError as e:
    logging.info("clu.metric_writers unavailable (%s); writing metrics.jsonl and PNG grids only", e)
    return plain
  return _Both(metric_writers.create_default_writer(
      logdir, just_logging=jax.process_index() > 0, asynchronous=True), plain)


def image_grid(*rows: np.ndarray) -> np.ndarray:
  """Images in [-1, 1] (B, H, W, 3) side by side per example (HQ | LQ↑ | output) -> uint8 (1, H', W', 3)."""
  panels = [np.clip((np.asarray(r, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8) for r in rows]
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

  def __init__(self, total_steps: int, start_step: int, flops_per_step: float | None,
               peak_flops: float | None):
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

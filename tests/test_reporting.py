"""Metrics writers: TensorBoard event files without TensorFlow, metrics.jsonl, PNG grids."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import read_events
from PIL import Image

from zipir_jax.training import reporting


def test_tensorboard_writer_round_trips_scalars_and_images(tmp_path):
  rng = np.random.default_rng(0)
  grid = rng.integers(0, 256, (1, 24, 40, 3), dtype=np.uint8)  # image_grid's (1, H, W, 3)
  pair = rng.integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
  writer = reporting.TensorBoardWriter(str(tmp_path))
  writer.write_scalars(10, {"loss": 0.5, "lr": np.float32(1e-4)})
  writer.write_scalars(20, {"loss": 0.25, "lr": 2e-4})
  writer.write_images(20, {"hq_lq_output": grid, "pair": pair})
  writer.close()

  events = read_events(tmp_path)
  assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 0.5), (20, 0.25)]
  assert [e.value for e in events.Scalars("lr")] == pytest.approx([1e-4, 2e-4], rel=1e-6)
  assert sorted(events.Tags()["images"]) == ["hq_lq_output", "pair/0", "pair/1"]
  (image,) = events.Images("hq_lq_output")
  assert (image.step, image.width, image.height) == (20, 40, 24)
  np.testing.assert_array_equal(
    np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), grid[0]
  )  # PNG: lossless
  decoded = np.asarray(Image.open(io.BytesIO(events.Images("pair/1")[0].encoded_image_string)))
  np.testing.assert_array_equal(decoded, pair[1])


def test_resumed_writer_supersedes_steps_past_the_checkpoint(tmp_path):
  first = reporting.TensorBoardWriter(str(tmp_path))
  for step in (1, 2, 3, 4):  # a run killed after logging step 4, last checkpoint at step 2
    first.write_scalars(step, {"loss": float(step)})
  first.close()
  resumed = reporting.TensorBoardWriter(str(tmp_path), start_step=2)
  for step in (3, 4):
    resumed.write_scalars(step, {"loss": 10.0 * step})
  resumed.close()
  assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
  loss = read_events(tmp_path).Scalars("loss")
  assert [(e.step, e.value) for e in loss] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_create_writer_keeps_jsonl_and_png_next_to_tensorboard(tmp_path):
  writer = reporting.create_writer(str(tmp_path))
  grid = reporting.image_grid(*(np.full((2, 4, 5, 3), v, np.float32) for v in (-1.0, 0.0, 1.0)))
  assert grid.shape == (1, 8, 15, 3) and grid.dtype == np.uint8  # HQ | LQ↑ | output per row
  writer.write_scalars(3, {"loss": 1.5})
  writer.write_images(3, {"hq_lq_output": grid})
  writer.close()
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == [{"step": 3, "loss": 1.5}]
  png = np.asarray(Image.open(tmp_path / "images" / "00000003_hq_lq_output.png"))
  np.testing.assert_array_equal(png, grid[0])
  try:
    from clu import metric_writers  # noqa: F401 (is clu with TensorFlow importable?)
  except ImportError:  # no TensorFlow: our own event writer
    assert any(isinstance(w, reporting.TensorBoardWriter) for w in writer.writers)
  events = read_events(tmp_path)
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [(3, 1.5)]
  assert [(e.width, e.height) for e in events.Images("hq_lq_output")] == [(15, 8)]


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(reporting.jax, "process_index", lambda: 1)
  writer = reporting.MultiWriter(
    reporting.TensorBoardWriter(str(tmp_path)), reporting.PlainWriter(str(tmp_path))
  )
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_images(1, {"grid": np.zeros((1, 4, 4, 3), np.uint8)})
  writer.close()
  assert not list(tmp_path.iterdir())


# Records every attempt to import TensorFlow (an absent package leaves no sys.modules entry).
_NO_TENSORFLOW = """
import sys
attempts = []
class Recorder:
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] == "tensorflow":
      attempts.append(name)
    return None
sys.meta_path.insert(0, Recorder())
import numpy as np
from zipir_jax.training import reporting
writer = reporting.TensorBoardWriter(sys.argv[1])
writer.write_scalars(1, {"loss": 1.0})
writer.write_images(1, {"grid": np.zeros((1, 4, 4, 3), np.uint8)})
writer.close()
assert not attempts and "tensorflow" not in sys.modules, attempts
print("ok")
"""


def test_tensorboard_events_need_no_tensorflow(tmp_path):
  result = subprocess.run(
    [sys.executable, "-c", _NO_TENSORFLOW, str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
  assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1


def test_interval_metrics_are_means_over_applied_steps_and_keep_the_longest_skip_run():
  import jax

  from zipir_jax import parallel

  def step(loss, finite, skipped, lr):
    return {
      k: jax.numpy.float32(v)
      for k, v in dict(loss=loss, finite=finite, skipped=skipped, lr=lr).items()
    }

  nan = float("nan")
  steps = [  # (step metrics, consecutive skipped updates after the step)
    (step(1.0, 1, 0, 0.1), 0),
    (step(nan, 0, 1, 0.2), 1),
    (step(nan, 0, 2, 0.3), 2),
    (step(3.0, 1, 2, 0.4), 0),  # the run of two skipped updates is over
  ]
  interval = reporting.IntervalMetrics(
    steps[0][0], parallel.replicated(parallel.create_mesh((1, 1, 1)))
  )
  for metrics, streak in steps:
    interval.add(metrics, jax.numpy.int32(streak))
  assert interval.longest_nonfinite_streak() == 2  # still seen after it ended
  assert interval.report() == {
    "loss": 2.0,  # the mean of the two applied steps: the skipped steps' NaN is left out
    "finite": 0.5,
    "skipped": 2.0,  # running count: the last value
    "lr": pytest.approx(0.4),
    "nonfinite_streak": 2.0,
  }
  interval.add(step(5.0, 1, 2, 0.5), jax.numpy.int32(0))  # the next interval starts empty
  assert interval.longest_nonfinite_streak() == 0
  assert interval.report()["loss"] == 5.0

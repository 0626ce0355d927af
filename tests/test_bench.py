"""The GPU benchmark scripts run end to end on the tiny config (CPU), as bench/device_suite.sh calls
them: device time is lent for minutes per session, and a script broken by a refactor would spend it.
"""

import json
import math
import subprocess
import sys

from conftest import ROOT, subprocess_env


def _run(*args):
  result = subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=subprocess_env(),
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def test_suite_script_parses():
  assert subprocess.run(["bash", "-n", "bench/device_suite.sh"], cwd=ROOT).returncode == 0


def test_restore_and_train_step_benchmarks_report_every_part():
  # Not the full restore: that is restore.Restorer.restore, which test_restore.py covers.
  out = _run(
    "bench/restore.py",
    "--config=configs/tiny.py",
    "--sizes=128",
    "--dtype=float32",
    "--repeats=1",
    "--parts=encode,decode,step,plain",
  ).stdout
  header, _, row = [line for line in out.splitlines() if line.startswith("|")]
  values = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
  assert values["config"] == "tiny" and values["size"] == "128²", values
  for column in ("encode ms", "DiT step ms (CFG 2B)", "plain stack ms", "decode ms"):
    assert math.isfinite(float(values[column])) and float(values[column]) > 0, (column, values)
  assert values["total s (steps)"].startswith("nan")  # not run
  assert "failed" not in out  # every phase ran

  out = _run(
    "bench/train_step.py",
    "--config=configs/tiny.py:dit",
    "--resolution=64",
    "--batch=2",
    "--steps=1",
  ).stdout
  early = json.loads(out.splitlines()[0])  # printed before the encoders are timed alone
  result = json.loads(out[out.index("\n{") + 1 :])
  assert early["step_ms"] == result["step_ms"] > 0
  assert result["dit"] == "2 x 64, 4 heads of 16" and result["model_tflops_per_step"] > 0
  assert set(result["frozen_encoders_ms"]) == {"float32"} and result["loss"] > 0


def test_rng_compile_probe_compares_both_lowerings_and_declines_off_gpu():
  """The suite enables JAX's threefry GPU kernel only on the probe's exit status 0."""
  result = subprocess.run(
    [sys.executable, "bench/rng_compile.py", "--draws=2"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=subprocess_env(),
    timeout=300,
  )
  assert result.returncode == 3, result.stderr[-3000:]  # CPU: the option changes nothing
  report = json.loads(result.stdout.splitlines()[-1])
  assert report["platform"] == "cpu" and report["draws"] == 2 and report["bit_identical"] is True
  assert report["default_compile_s"] > 0 and report["kernel_compile_s"] > 0

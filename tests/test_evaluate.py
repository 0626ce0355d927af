"""`python -m zipir_jax.evaluate` on real photos: several methods, one Table-1-style table."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_golden_module, subprocess_env
from PIL import Image
from skimage import data as skdata

from zipir_jax import evaluate

# Shares the session fixture it needs with the other files of this group on one xdist worker.
pytestmark = pytest.mark.xdist_group("tiny_bundle")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  folder = tmp_path_factory.mktemp("photos")
  for name in ("astronaut", "coffee"):
    Image.fromarray(getattr(skdata, name)()[..., :3]).save(folder / f"{name}.png")
  (folder / "coffee.txt").write_text("a cup of coffee on a saucer")
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
  Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(folder / "small.png")
  return folder


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
  """Seeded random FID-Inception weights (the real file is the user's): exercises FID/KID/pFID."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  module = load_golden_module("inception_reference_weights")
  path = tmp_path_factory.mktemp("inception") / "pt_inception.safetensors"
  safetensors.numpy.save_file(module.state_dict(), str(path))
  return path


def test_bicubic_and_realesrgan_on_sr8(tmp_path, photos, inception_weights):
  out = tmp_path / "eval"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "zipir_jax.evaluate",
      "--method=bicubic,realesrgan",
      f"--data={photos}",
      "--preset=sr8",
      "--size=320",
      f"--output={out}",
      f"--inception={inception_weights}",
      "--num_crops=2",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
    env=subprocess_env(),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  table = (out / "table.md").read_text()
  assert table in result.stdout
  assert "| Method | PSNR ↑ | SSIM ↑ | LPIPS ↓ | FID ↓ | pFID ↓ | KID ↓ |" in table
  rows = {
    line.split("|")[1].strip(): line
    for line in table.splitlines()
    if line.startswith("| ") and "Method" not in line
  }
  assert set(rows) == {"bicubic", "realesrgan"}
  assert "LPIPS: omitted: no VGG16 weights" in table  # absent weights are noted, never faked
  assert (
    "skipped" in result.stderr and "broken.jpg" in result.stderr and "small.png" in result.stderr
  )

  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["images"] == ["astronaut", "coffee"]
  for method in ("bicubic", "realesrgan"):
    mean = metrics["methods"][method]["mean"]
    per_image = metrics["methods"][method]["per_image"]
    assert set(per_image) == set(metrics["images"])
    assert mean["PSNR"] == pytest.approx(np.mean([s["PSNR"] for s in per_image.values()]))
    assert {"FID", "pFID", "KID"} <= set(mean) and "LPIPS" not in mean
    for name in metrics["images"]:
      with Image.open(out / method / f"{name}.png") as image:
        assert image.size == (320, 320)
  with Image.open(out / "lq" / "astronaut.png") as image:
    assert image.size == (40, 40)  # sr8
  # The bicubic row is reproducible from the written LQ and the HQ centre crop alone.
  hq = np.asarray(Image.open(photos / "astronaut.png"))[96:416, 96:416].astype(np.float32) / 255
  lq = np.asarray(Image.open(out / "lq" / "astronaut.png"))
  import cv2  # pylint: disable=g-import-not-at-top

  bicubic = np.clip(
    cv2.resize(lq.astype(np.float32) / 255, (320, 320), interpolation=cv2.INTER_CUBIC), 0, 1
  )
  expected = 10 * np.log10(1 / np.mean((bicubic - hq) ** 2))
  assert metrics["methods"]["bicubic"]["per_image"]["astronaut"]["PSNR"] == pytest.approx(
    expected, abs=1e-3
  )  # scored in float, before the PNG is rounded


def test_zipir_method_restores_with_a_bundle(tmp_path, photos, tiny_bundle_dir):
  """--method=zipir goes through restore.Restorer with the bundle (random weights here)."""
  results = evaluate.evaluate(
    ["zipir"],
    str(photos),
    "sr16",
    128,
    str(tmp_path / "z"),
    checkpoint=str(tiny_bundle_dir),
    limit=1,
    steps=1,
    log=lambda m: None,
  )
  assert results["images"] == ["astronaut"]
  assert set(results["methods"]["zipir"]["mean"]) == {"PSNR", "SSIM"}
  with Image.open(tmp_path / "z" / "zipir" / "astronaut.png") as image:
    assert image.size == (128, 128)
  assert "FID: omitted" in results["table"] and "LPIPS: omitted" in results["table"]


def test_table_layout_and_errors(tmp_path, photos):
  table = evaluate.markdown_table(
    "mix",
    2048,
    3,
    {"a": {"PSNR": 25.123, "SSIM": 0.71234}},
    {"FID": "omitted: no Inception weights (--inception)"},
  )
  assert "| a | 25.12 | 0.7123 | — | — | — | — |" in table
  assert "- FID: omitted" in table
  with pytest.raises(ValueError, match="unknown method"):
    evaluate.evaluate(["esrgan"], str(photos), "sr8", 320, str(tmp_path))
  with pytest.raises(ValueError, match="unknown preset"):
    evaluate.evaluate(["bicubic"], str(photos), "sr3", 320, str(tmp_path))
  with pytest.raises(ValueError, match="needs --checkpoint"):
    evaluate.evaluate(["zipir"], str(photos), "sr8", 320, str(tmp_path), log=lambda m: None)
  with pytest.raises(ValueError, match="no usable image"):
    evaluate.evaluate(["bicubic"], str(photos), "sr8", 4096, str(tmp_path), log=lambda m: None)


def test_restored_folders_are_scored_like_methods(tmp_path, photos):
  """--restored scores another program's outputs (e.g. sample.py) for the same fixed LQ images."""
  first = evaluate.evaluate(
    ["bicubic"], str(photos), "fig4", 128, str(tmp_path / "a"), log=lambda m: None
  )
  second = evaluate.evaluate(
    [],
    str(photos),
    "fig4",
    128,
    str(tmp_path / "b"),
    log=lambda m: None,
    restored={"copy": str(tmp_path / "a" / "bicubic")},
  )
  assert second["methods"]["copy"] == first["methods"]["bicubic"]
  for name in first["images"]:  # the same deterministic LQ images in both runs
    with (
      Image.open(tmp_path / "a" / "lq" / f"{name}.png") as a,
      Image.open(tmp_path / "b" / "lq" / f"{name}.png") as b,
    ):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  os.remove(tmp_path / "a" / "bicubic" / "coffee.png")
  with pytest.raises(FileNotFoundError, match=r"coffee.png is missing"):
    evaluate.evaluate(
      [],
      str(photos),
      "fig4",
      128,
      str(tmp_path / "c"),
      log=lambda m: None,
      restored={"copy": str(tmp_path / "a" / "bicubic")},
    )
  with pytest.raises(ValueError, match="is 128x128, expected 96x96"):
    evaluate.evaluate(
      [],
      str(photos),
      "fig4",
      96,
      str(tmp_path / "d"),
      log=lambda m: None,
      restored={"copy": str(tmp_path / "a" / "bicubic")},
    )
  with pytest.raises(ValueError, match="both as --method and --restored"):
    evaluate.evaluate(
      ["bicubic"],
      str(photos),
      "fig4",
      128,
      str(tmp_path / "e"),
      restored={"bicubic": str(tmp_path)},
    )

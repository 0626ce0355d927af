"""`python -m zipir_jax.evaluate` on real photos: several methods, one Table-1-style table."""

import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import scipy.linalg
from conftest import ROOT, load_golden_module, subprocess_env
from PIL import Image
from skimage import data as skdata
from skimage import metrics as skmetrics

from zipir_jax import evaluate
from zipir_jax.models import inception, lpips

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


@pytest.fixture(scope="module")
def vgg16_weights(tmp_path_factory):
  """Seeded random torchvision VGG16 weights for LPIPS (the heads are the lpips package's)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  module = load_golden_module("lpips_reference_weights")
  path = tmp_path_factory.mktemp("vgg16") / "vgg16.safetensors"
  safetensors.numpy.save_file(module.vgg16_state_dict(), str(path))
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
  )  # the harness scores the 8-bit PNG, this float bicubic is within 1e-3 dB of it


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


# ------------------------------------------------------------------------------------------------
# Every metric of the table, recomputed from the written files by separate code.
# ------------------------------------------------------------------------------------------------

SIZE, SEED, NUM_CROPS = 304, 3, 2  # 304 >= the 299 pFID crop; seed 3 so crops depend on it


def _rgb(path) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


def _crops(image: np.ndarray, index: int) -> np.ndarray:
  """pFID's crops as documented: NUM_CROPS uniform 299x299 corners from default_rng([seed, index])."""
  rng = np.random.default_rng([SEED, index])
  tops = rng.integers(0, image.shape[0] - 299 + 1, NUM_CROPS)
  lefts = rng.integers(0, image.shape[1] - 299 + 1, NUM_CROPS)
  return np.stack([image[t : t + 299, x : x + 299] for t, x in zip(tops, lefts)])


def _fid(f1: np.ndarray, f2: np.ndarray) -> float:
  """pytorch-fid's formula, ``tr sqrtm(S1 S2)`` by scipy, in an orthonormal basis of the span of
  both centred feature sets: exact (both covariances live in it) and small for sqrtm."""
  mu1, mu2 = f1.mean(0), f2.mean(0)
  basis, _ = np.linalg.qr(np.concatenate([f1 - mu1, f2 - mu2]).T)
  s1, s2 = np.cov(f1 @ basis, rowvar=False), np.cov(f2 @ basis, rowvar=False)
  with warnings.catch_warnings():  # S1 S2 is singular (2 samples); sqrtm still gets its trace
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
  assert np.abs(np.imag(covmean)).max() < 1e-9
  return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _kid(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD² with k(a, b) = (a·b / d + 1)³. With fewer than 1000 images every KID subset is
  the whole set (reordered), so the harness's subset mean is this one value."""
  kernel = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3
  kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
  m, n = len(x), len(y)
  within = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
  return float(within - 2 * kxy.mean())


@pytest.fixture(scope="module")
def scored(tmp_path_factory, photos, inception_weights, vgg16_weights):
  """The harness with LPIPS and Inception weights: bicubic on sr8, two photos (and the broken and
  small files it must skip)."""
  out = tmp_path_factory.mktemp("scored")
  results = evaluate.evaluate(
    ["bicubic"],
    str(photos),
    "sr8",
    SIZE,
    str(out),
    seed=SEED,
    lpips_path=str(vgg16_weights),
    inception_path=str(inception_weights),
    num_crops=NUM_CROPS,
    log=lambda m: None,
  )
  return out, results


def test_every_metric_agrees_with_an_independent_computation(
  scored, photos, inception_weights, vgg16_weights
):
  """PSNR/SSIM (scikit-image), LPIPS, FID/pFID (scipy sqrtm), KID (polynomial MMD²) recomputed
  from the PNGs the harness wrote and the HQ centre crops: checks which images, crops and pairs
  were scored, the means, metrics.json and the table. The networks are shared (each has its own
  reference test); their inputs and everything after are not."""
  out, results = scored
  names = ["astronaut", "coffee"]  # sorted; broken.jpg and small.png are skipped
  assert results["images"] == names and set(results["methods"]) == {"bicubic"}
  hq = []
  for name in names:
    image = _rgb(photos / f"{name}.png")
    top, left = (image.shape[0] - SIZE) // 2, (image.shape[1] - SIZE) // 2
    hq.append(image[top : top + SIZE, left : left + SIZE].astype(np.float32) / 255)
  restored = [_rgb(out / "bicubic" / f"{name}.png").astype(np.float32) / 255 for name in names]
  assert all(x.shape == (SIZE, SIZE, 3) for x in restored)

  lpips_variables, lpips_model = lpips.load(vgg16_weights), lpips.LPIPS()
  lpips_fn = jax.jit(lambda v, a, b: lpips_model.apply(v, a, b))
  per_image = {}
  for name, x, ref in zip(names, restored, hq):
    x64, ref64 = x.astype(np.float64), ref.astype(np.float64)
    per_image[name] = {
      "PSNR": skmetrics.peak_signal_noise_ratio(ref64, x64, data_range=1),
      "SSIM": skmetrics.structural_similarity(
        ref64,
        x64,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1,
        channel_axis=-1,
      ),
      "LPIPS": float(lpips_fn(lpips_variables, x[None] * 2 - 1, ref[None] * 2 - 1)[0]),
    }
  features = inception.make_feature_fn(inception.load(inception_weights), batch_size=NUM_CROPS)

  def whole_and_crops(images):
    whole = np.concatenate([features(x[None]) for x in images])
    crops = np.concatenate([features(_crops(x, i)) for i, x in enumerate(images)])
    return whole.astype(np.float64), crops.astype(np.float64)

  (real, real_crops), (fake, fake_crops) = whole_and_crops(hq), whole_and_crops(restored)
  mean = {k: float(np.mean([s[k] for s in per_image.values()])) for k in ("PSNR", "SSIM", "LPIPS")}
  mean.update(FID=_fid(real, fake), pFID=_fid(real_crops, fake_crops), KID=_kid(real, fake))

  # Measured max |harness - this| (2 and 3 photos, bicubic and lanczos): PSNR 2.0e-6 dB and SSIM
  # 1.6e-6 (float32 vs float64), LPIPS 0 (one network, same inputs), FID/pFID 4.5e-12 (values
  # 14-27), KID 1.6e-15 (values 0.1-0.2). Bounds ~10x that.
  tolerance = {"PSNR": 2e-5, "SSIM": 2e-5, "LPIPS": 1e-7, "FID": 5e-11, "pFID": 5e-11, "KID": 1e-14}
  got = results["methods"]["bicubic"]
  assert set(got["per_image"]) == set(names) and set(got["mean"]) == set(tolerance)
  for name in names:
    for key, want in per_image[name].items():
      assert got["per_image"][name][key] == pytest.approx(want, rel=0, abs=tolerance[key]), (
        name,
        key,
      )
  for key, want in mean.items():
    assert got["mean"][key] == pytest.approx(want, rel=0, abs=tolerance[key]), key
  # The metrics are far from trivial values, so the agreement above means something.
  assert mean["FID"] > 1 and mean["pFID"] > 1 and mean["LPIPS"] > 1e-3 and mean["KID"] != 0
  assert abs(mean["FID"] - mean["pFID"]) > 1  # whole images and crops are different sets

  assert json.loads((out / "metrics.json").read_text())["methods"] == results["methods"]
  # The row shows the means checked above (formatted from them: float32 SSIM can round the 4th
  # digit the other way than float64 does).
  row = "| bicubic | {PSNR:.2f} | {SSIM:.4f} | {LPIPS:.4f} | {FID:.2f} | {pFID:.2f} | {KID:.4f} |"
  row = row.format(**got["mean"])
  table = (out / "table.md").read_text()
  assert row in table.splitlines() and table == results["table"]
  assert "omitted" not in table

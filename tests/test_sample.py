"""sample.py end to end: a folder of good and bad images, overwrite protection, checkpoint errors."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, subprocess_env
from PIL import Image

from zipir_jax.data import testing

BAD = ("corrupt.jpg", "truncated.jpg", "zero_bytes.png", "garbage_after_header.png")

# Shares the session fixture it needs with the other files of this group on one xdist worker.
pytestmark = pytest.mark.xdist_group("tiny_bundle")


def _run(*args):
  return subprocess.run(
    [sys.executable, "sample.py", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=subprocess_env(),
    timeout=600,
  )


def test_folder_with_good_and_bad_images(tmp_path, tiny_bundle_dir):
  """One output per good input (photo.webp/.bmp/.tiff share a stem), written into a folder inside
  the input folder, which a second run does not read back; library INFO logs only on request."""
  inputs = tmp_path / "in"
  outputs = inputs / "restored"
  expected = testing.write_bad_files(str(inputs), size=(24, 32))
  (inputs / "photo.txt").write_text("a photo")  # sidecar caption of photo.{webp,bmp,tiff}
  result = _run(
    f"--checkpoint={tiny_bundle_dir}",
    f"--input={inputs}",
    f"--output={outputs}",
    "--scale=4",
    "--steps=2",
  )
  assert result.returncode == 1, result.stderr[-2000:]
  good = [p for p, outcome in expected.items() if os.path.basename(p) not in BAD]
  stems = [os.path.splitext(os.path.basename(p))[0] for p in good]
  names = {  # the documented rule: stems used once name the output; shared ones keep the suffix
    os.path.basename(p): (stem if stems.count(stem) == 1 else os.path.basename(p)) + ".png"
    for p, stem in zip(good, stems)
  }
  assert {"photo.webp.png", "photo.bmp.png", "photo.tiff.png"} <= set(names.values())
  assert sorted(p.name for p in outputs.iterdir()) == sorted(names.values())
  for path in good:
    with Image.open(outputs / names[os.path.basename(path)]) as image:
      h, w = (16, 16) if "too_small" in path else (24, 32)
      assert image.size == (4 * w, 4 * h) and image.mode == "RGB"
  for name in BAD:
    assert f"FAILED {inputs / name}:" in result.stderr
  assert " at 0x" not in result.stderr  # plain words, no Python object reprs
  assert f"restored {len(good)} of {len(expected)} images" in result.stdout
  assert not re.search(r"^[IW]\d{4} ", result.stderr, re.M), result.stderr[-2000:]  # no absl logs
  assert "PyTorch was not found" not in result.stderr  # nor transformers' import notice

  # A second run never replaces what the first wrote, unless told to, and does not take the
  # outputs inside the input folder for inputs. --verbosity=1 shows the libraries' INFO lines.
  before = {p: p.stat().st_mtime_ns for p in outputs.glob("*.png")}
  again = _run(
    f"--checkpoint={tiny_bundle_dir}",
    f"--input={inputs}",
    f"--output={outputs}",
    "--scale=4",
    "--steps=2",
    "--verbosity=1",
  )
  assert again.returncode == 1 and "exists (use --overwrite" in again.stderr
  assert f"restored 0 of {len(expected)} images" in again.stdout
  assert {p: p.stat().st_mtime_ns for p in outputs.glob("*.png")} == before
  assert "orbax" in again.stderr.lower()


def test_size_flag_single_file_overwrite_and_plain_decoder(
  tmp_path, tiny_bundle, tiny_bundle_dir, tiny_vae_fine_export
):
  from zipir_jax import bundle as bundle_lib
  from zipir_jax import restore

  lq = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
  path = tmp_path / "lq.png"
  Image.fromarray(lq).save(path)
  out = tmp_path / "out"
  first = _run(
    f"--checkpoint={tiny_bundle_dir}",
    f"--input={path}",
    f"--output={out}",
    "--size=50x70",
    "--steps=2",
    "--color_fix=wavelet",
    "--prompt=a cat",
  )
  assert first.returncode == 0, first.stderr[-2000:]
  with Image.open(out / "lq.png") as image:
    assert image.size == (70, 50)
  # Replaced with --overwrite, by what --plain_decoder restores: the Restorer with
  # ``with_plain_decoder`` (whose refusals test_restore checks; sample.py reports them as it
  # reports a bad checkpoint).
  second = _run(
    f"--checkpoint={tiny_bundle_dir}",
    f"--input={path}",
    f"--output={out}",
    "--size=50x70",
    "--steps=2",
    "--overwrite",
    f"--plain_decoder={tiny_vae_fine_export}",
  )
  assert second.returncode == 0, second.stderr[-2000:]
  want = restore.Restorer(bundle_lib.with_plain_decoder(tiny_bundle, str(tiny_vae_fine_export)))
  want = want.restore([lq], (50, 70), options=restore.RestoreOptions(steps=2))[0]
  with Image.open(out / "lq.png") as image:
    got = np.asarray(image, np.float32) / 255.0
  np.testing.assert_allclose(got, want, atol=1.01 / 255)


def test_missing_checkpoint_and_usage_errors(tmp_path):
  path = tmp_path / "lq.png"
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
  missing = _run(
    f"--checkpoint={tmp_path / 'nope'}",
    f"--input={path}",
    f"--output={tmp_path / 'o'}",
    "--scale=4",
  )
  assert missing.returncode == 2 and "checkpoint bundle folder not found" in missing.stderr
  both = _run(
    f"--checkpoint={tmp_path}",
    f"--input={path}",
    f"--output={tmp_path / 'o'}",
    "--scale=4",
    "--size=64x64",
  )
  assert both.returncode != 0 and "exactly one of --scale or --size" in both.stderr
  none = _run(
    f"--checkpoint={tmp_path}",
    f"--input={tmp_path / 'empty*'}",
    f"--output={tmp_path / 'o'}",
    "--scale=4",
  )
  assert none.returncode == 2 and "no images" in none.stderr
  # An output that would be an input file is refused, --overwrite or not (nothing loads).
  onto_input = _run(
    f"--checkpoint={tmp_path / 'nope'}",
    f"--input={path}",
    f"--output={tmp_path}",
    "--scale=4",
    "--overwrite",
  )
  assert onto_input.returncode == 1 and f"FAILED {path}: its output" in onto_input.stderr
  assert "restored 0 of 1 images" in onto_input.stdout
  assert np.asarray(Image.open(path)).max() == 0  # untouched

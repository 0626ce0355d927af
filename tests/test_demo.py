"""`make demo` (the README's first command) keeps working: a 2-step run end to end."""

import os

from PIL import Image

from zipir_jax import demo


def test_demo_runs_and_says_what_it_is(tmp_path, capsys):
  demo.main(["--output", str(tmp_path), "--steps", "2", "--crop", "64", "--batch", "2"])
  out = capsys.readouterr().out
  assert "PARTIAL" in out and "not the paper's model" in out
  assert "z (1, 9, 14, 64)" in out  # the held-out 288x448 photo's latent
  png = tmp_path / "lpvae_reconstruction.png"
  assert png.exists()
  with Image.open(png) as image:
    assert image.size == (4 * 448, 288)

"""Experiment configs: every file loads for each of its stages; mistakes fail with the valid names."""

import subprocess
import sys

import pytest
from conftest import CONFIG_FILES, ROOT, subprocess_env

from zipir_jax import config_lib
from zipir_jax.models import autoencoder, count_params, summary
from zipir_jax.training import stages

# Shares the session fixture it needs with the other files of this group on one xdist worker.
pytestmark = pytest.mark.xdist_group("tiny_lpvae")


def test_the_configs_exist():
  assert {
    "configs/zipir_3b.py",
    "configs/zipir_2p5b.py",
    "configs/zipir_0p7b.py",
    "configs/sdvae_f32c64.py",
    "configs/tiny.py",
    "configs/tiny_sdvae.py",
  } <= set(CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_stage_loads_and_builds(path):
  default = config_lib.load_config(path)
  for stage in stages.experiment(default.vae.kind).names:
    config = config_lib.load_config(f"{path}:{stage}")
    assert config.stage == stage and config.is_locked
    autoencoder.build_autoencoder(config)
    autoencoder.build_pixel_decoder(config)


def test_paper_numbers():
  config = config_lib.load_config("configs/zipir_3b.py:dit")
  assert (config.vae.ch, config.vae.num_res_blocks) == (128, 2)
  assert tuple(config.vae.coarse_ch_mult) == (1, 2, 4, 4)
  assert tuple(config.vae.fine_ch_mult) == (1, 2, 4, 4, 4, 4)
  assert 3 + config.vae.coarse_channels + config.vae.fine_channels == 64
  assert (config.dit.depth, config.dit.hidden_size, config.dit.num_heads) == (24, 2048, 16)
  assert (config.optim.lr, config.optim.end_lr, config.optim.weight_decay) == (5e-5, 5e-6, 0.05)
  assert (config.diffusion.beta_start, config.diffusion.beta_end) == (0.00085, 0.012)


@pytest.mark.parametrize(
  "path,stage",
  [
    ("configs/zipir_3b.py", "vae"),
    ("configs/sdvae_f32c64.py", "vae_fine"),
    ("configs/tiny.py", "dti"),
  ],
)
def test_wrong_stage_lists_the_valid_ones(path, stage):
  valid = stages.experiment(config_lib.load_config(path).vae.kind).names
  with pytest.raises(ValueError, match=f"unknown stage '{stage}'") as info:
    config_lib.load_config(f"{path}:{stage}")
  for name in valid:
    assert name in str(info.value)


def test_unknown_keys_fail_and_name_the_valid_ones():
  config = config_lib.load_config("configs/tiny.py")
  with pytest.raises(AttributeError, match=r"num_group.*Other fields present.*num_groups"):
    config.vae.num_group = 4  # locked: a typo cannot add a field
  with pytest.raises(KeyError, match=r"'vae.chh' does not exist.*\bch\b.*num_res_blocks"):
    config_lib.apply_overrides(config, {"vae.chh": 64})
  with pytest.raises(KeyError, match=r"'vea' does not exist.*\bvae\b"):
    config_lib.apply_overrides(config, {"vea.ch": 64})
  config_lib.apply_overrides(config, {"vae.ch": 8})
  assert config.vae.ch == 8
  config_lib.apply_overrides(config, {"vae.kind": "vqgan"})  # a string field takes any string
  with pytest.raises(ValueError, match="valid kinds: lpvae, sdvae"):
    autoencoder.build_autoencoder(config)


def test_missing_config_file():
  with pytest.raises(FileNotFoundError, match=r"configs/nope.py"):
    config_lib.load_config("configs/nope.py:dit")


def test_summary_counts_match_real_initialisation(tiny_config, tiny_lpvae):
  _, params = tiny_lpvae
  result = summary.summarize(tiny_config, 96, 160)
  counts = result["counts"]
  for name, key in [
    ("E_c  coarse encoder", "coarse_encoder"),
    ("E_f  fine encoder", "fine_encoder"),
    ("D_c  coarse decoder (training only)", "coarse_decoder"),
    ("D_f  fine decoder", "fine_decoder"),
  ]:
    assert counts[name] == count_params(params[key])
  # D_f* = extractor (a subset of E_f) + D_f + the new fusion layers.
  assert counts["  of which extractor"] < counts["E_f  fine encoder"]
  assert (
    counts["D_f* pixel-aware decoder"]
    == counts["  of which extractor"]
    + counts["D_f  fine decoder"]
    + counts["  of which new fusion layers"]
  )
  assert tuple(result["shapes"]["z"]) == (1, 3, 5, 64)


def test_summary_cli_prints_every_component_for_every_config():
  out = subprocess.run(
    [sys.executable, "-m", "zipir_jax.models.summary", "--size=2048x1376"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
    env=subprocess_env(),
  ).stdout
  blocks = out.strip().split("\n\n")
  assert len(blocks) == len(CONFIG_FILES)
  for block, path in zip(blocks, CONFIG_FILES):
    assert block.startswith(f"== {path}")
    names = (
      ["E_c", "D_c", "E_f", "D_f ", "D_f*"] if "sdvae" not in path else ["encoder", "decoder"]
    ) + ["discriminator", "DiT"]
    for name in names:
      assert any(line.startswith(name) for line in block.splitlines()), (path, name)
    # The SD-VAE ablation restores with its own decoder: no pixel-aware decoder to count.
    assert ("D_f*" in block) == ("sdvae" not in path), path
    assert "(1, 64, 43, 64)" in block


def test_summary_single_config_and_bad_size():
  run = lambda *a: subprocess.run(
    [sys.executable, "-m", "zipir_jax.models.summary", *a],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=subprocess_env(),
  )
  out = run("--config=configs/zipir_3b.py")
  assert out.returncode == 0 and out.stdout.count("==") == 1 and "(1, 64, 64, 64)" in out.stdout
  bad = run("--config=configs/zipir_3b.py", "--size=2048x")
  assert bad.returncode != 0 and "expected N or HxW" in bad.stderr


def test_command_line_config_mistakes_are_one_line_errors(tmp_path):
  """A misspelt --config.KEY override or an impossible value is named in one line, no traceback."""

  def train(*overrides):
    return subprocess.run(
      [
        sys.executable,
        "train.py",
        "--config=configs/tiny.py:vae_coarse",
        f"--workdir={tmp_path}",
        *overrides,
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=subprocess_env(),
    )

  for override, words in (
    ("--config.optim.lrr=1", ("'optim.lrr' does not exist", "b1, b2")),
    ("--config.optimm.lr=1", ("'optimm' does not exist", "optim, pixel_decoder")),
    ("--config.optim.lr.x=1", ("'optim.lr' is a value",)),
  ):
    result = train(override)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"train.py: {override.partition('=')[0]}: "), result.stderr
    assert all(w in result.stderr for w in words), result.stderr
  mesh = train("--config.train.mesh=(3,1,1)", f"--config.data.path={tmp_path}")
  assert mesh.returncode == 2 and "Traceback" not in mesh.stderr, mesh.stderr
  assert "train.py: config.train.mesh=(3, 1, 1) needs 3 devices; this run has 1" in mesh.stderr
  assert not (tmp_path / "vae_coarse").exists()  # refused before anything was written

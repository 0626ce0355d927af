"""The training recipe (training/stages.py) against the paper: per-stage data and steps, the VAE
objective's balance at any crop size, LPIPS and GAN never silently off, negative prompts, the
timesteps the sampler visits, the DiT's size and z_macro's measured statistics."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, subprocess_env

from zipir_jax import config_lib, diffusion, errors, losses
from zipir_jax.data import pipeline, testing
from zipir_jax.models import dit as dit_lib
from zipir_jax.models.vae_blocks import DiagonalGaussian
from zipir_jax.training import export, stages
from zipir_jax.training import state as state_lib


def _config(stage: str, path: str = "configs/zipir_3b.py"):
  return config_lib.load_config(f"{path}:{stage}")


def test_paper_config_resolves_to_the_papers_data_and_steps():
  """§4: coarse batch 512 for 50K; fine 512² x 160 for 100K then 1024² x 32 for 50K; DiT mixed
  resolutions and aspects 512²..4096² x 128 for 250K."""
  want = {
    "vae_coarse": (50_000, [(0, ((512, 512, 512),))]),
    "vae_fine": (150_000, [(0, ((512, 512, 160),)), (100_000, ((1024, 1024, 32),))]),
    "pixel_decoder": (50_000, [(0, ((1024, 1024, 32),))]),
  }
  for stage, (steps, phases) in want.items():
    config = _config(stage)
    assert int(config.optim.num_steps) == steps, stage
    assert list(stages.data_phases(config)) == phases, stage
  dit = _config("dit")
  assert int(dit.optim.num_steps) == 250_000
  ((start, buckets),) = stages.data_phases(dit)
  assert start == 0 and {b for _, _, b in buckets if _ * _ <= 1024 * 1024} == {128}
  sides = [s for h, w, _ in buckets for s in (h, w)]
  assert (min(sides), max(sides)) == (512, 4096) and any(h != w for h, w, _ in buckets)
  # The SD-VAE of Table 4 trains "with the same settings as f32c64-LP-VAE" (the fine stage).
  sd = _config("vae", "configs/sdvae_f32c64.py")
  assert stages.data_phases(sd) == stages.data_phases(_config("vae_fine"))
  assert not hasattr(config_lib.load_config("configs/zipir_3b.py").optim, "batch_size")


def test_stage_table_prints_from_the_summary_cli():
  out = subprocess.run(
    [sys.executable, "-m", "zipir_jax.models.summary", "--config=configs/zipir_3b.py", "--stages"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
    env=subprocess_env(),
  ).stdout
  for stage in ("vae_coarse", "vae_fine", "pixel_decoder", "dit"):
    assert f"== configs/zipir_3b.py:{stage}" in out
  assert "steps 100000..150000: 1024x1024 x 32" in out
  assert "0.5 x adaptive weight from step 25000 of 50000" in out  # vae_coarse's GAN


def test_vae_objective_is_the_same_at_every_crop_size():
  """Same per-pixel error and same per-element posterior at 64² and 256²: the same loss (with the
  KL weighed as LDM does: its per-example sum against the reconstruction's)."""

  def loss(size):
    target = jnp.zeros((2, size, size, 3))
    recon = target + 0.25
    h = size // 32
    post = {"fine": DiagonalGaussian(jnp.full((2, h, h, 52), 0.3), jnp.full((2, h, h, 52), -1.0))}
    nll = losses.reconstruction_loss(target, recon, None, 1.0, 0.0)
    kl = losses.kl_loss(post)
    return float(nll + 1e-6 * losses.per_target_element(kl, target)), float(kl)

  (small, kl_small), (large, kl_large) = loss(64), loss(256)
  assert kl_large == pytest.approx(16 * kl_small, rel=1e-6)  # the KL sum grows with H·W ...
  assert large == pytest.approx(small, rel=1e-6)  # ... the objective does not.
  # LDM's balance: KL sum x 1e-6 against the sum of |x - x̂| over the target's elements.
  n = 64 * 64 * 3
  assert small == pytest.approx((0.25 * n + 1e-6 * kl_small) / n, rel=1e-6)


def test_lpips_is_never_silently_off(tmp_path):
  """A stage with lpips_weight > 0 and no VGG16 file refuses, naming the key and the remedy."""
  config = _config("vae_coarse", "configs/tiny.py")
  assert config.loss.lpips_weight == 0  # the tiny config says so explicitly
  config_lib.apply_overrides(config, {"loss.lpips_weight": 1.0})
  for path, words in (("", "is not set"), (str(tmp_path / "vgg16.pth"), "does not exist")):
    config_lib.apply_overrides(config, {"loss.lpips_vgg16": path})
    with pytest.raises(errors.ConfigError, match=r"config\.loss\.lpips_vgg16") as info:
      state_lib.build_models(config)
    assert words in str(info.value) and "torchvision.models.vgg16" in str(info.value)
  for stage in ("vae_coarse", "vae_fine", "pixel_decoder"):  # the paper's config has LPIPS on
    assert _config(stage).loss.lpips_weight > 0
    assert "off" not in stages.loss_terms(_config(stage))["LPIPS"]


def test_gan_starts_inside_every_autoencoder_stage():
  """The discriminator trains in both VAE phases and the pixel decoder (none of them 'never')."""
  for stage in ("vae_coarse", "vae_fine", "pixel_decoder"):
    config = _config(stage)
    start = stages.disc_start(config)
    assert start is not None and 0 <= start < int(config.optim.num_steps) // 2 + 1, stage
  # A shortened run keeps the GAN: the start is a fraction of the stage, not an absolute step.
  short = _config("vae_fine")
  config_lib.apply_overrides(short, {"optim.num_steps": 10})
  assert stages.disc_start(short) == 5
  assert stages.disc_start(_config("dit")) is None
  off = _config("vae_fine")
  config_lib.apply_overrides(off, {"loss.disc_weight": 0.0})
  assert stages.disc_start(off) is None and "off" in stages.loss_terms(off)["GAN"]


def test_negative_prompt_rate_is_honoured_over_a_stream(tmp_path):
  """§3.2's negative prompts: that share of dit examples is (its own LQ↑ as target, a negative)."""
  testing.write_image_folder(str(tmp_path), [(64, 64)] * 6)
  data = _config("dit", "configs/tiny.py").data
  config_lib.apply_overrides(data, {"path": str(tmp_path), "buckets": ((64, 64, 8),)})
  prompts = ("blurry", "noisy")
  it = pipeline.create_train_iterator(data, seed=3, negative_rate=0.25, negative_prompts=prompts)
  negative = total = 0
  for _ in range(40):
    batch = next(it)
    for hq, lq_up, caption in zip(batch["hq"], batch["lq_up"], batch["caption"]):
      total += 1
      if caption in prompts:
        negative += 1
        np.testing.assert_array_equal(hq, lq_up)  # the target is the example's own LQ↑
      else:
        assert not np.array_equal(hq, lq_up)
  # 320 examples at p = 0.25: 80 expected, binomial sd 7.7; 4 sd either side.
  assert 49 <= negative <= 111, (negative, total)
  with pytest.raises(errors.ConfigError, match="negative prompts"):
    pipeline.create_train_iterator(data, seed=3, negative_rate=0.1, negative_prompts=())
  assert stages.current(_config("dit")).recipe.negative_rate > 0
  assert _config("dit").diffusion.negative_prompt == _config("dit").dit.negative_prompts[0]


def test_every_ddim_interval_is_trained():
  """Each of the 25 trailing DDIM intervals receives >= 1 % of the training timesteps."""
  config = _config("dit")
  d = config.diffusion
  t = diffusion.sample_timesteps(
    jax.random.key(0),
    400_000,
    d.num_train_steps,
    d.timestep_sampling,
    d.logit_mean,
    d.logit_std,
    d.uniform_fraction,
  )
  ts, _ = diffusion.ddim_timesteps(d.num_train_steps, d.sample_steps)
  edges = np.concatenate([[-1], np.asarray(ts)[::-1]])  # (-1, 39], (39, 79], ..., (959, 999]
  counts = np.histogram(np.asarray(t), bins=edges + 0.5)[0]
  share = counts / t.shape[0]
  assert share.shape == (25,) and share.min() >= 0.01, share
  # The logit-normal bulk stays where the paper puts it: the middle intervals get the most.
  assert share.argmax() in range(8, 17), share


def test_paper_dit_has_3p1b_parameters():
  """Table 3's 3.1 B within ±3 %, with the paper's depth, width and heads; the 2.54 B layout kept."""
  total = dit_lib.param_breakdown(_config("dit"))["total"]
  assert abs(total - 3.1e9) / 3.1e9 <= 0.03, total
  variant = config_lib.load_config("configs/zipir_2p5b.py")
  assert dit_lib.param_breakdown(variant)["total"] == 2_543_775_808


def test_macro_statistics_are_measured_from_the_data():
  """vae_coarse measures z_macro's μ/σ over its HQ batches (all pixels, per channel)."""
  rng = np.random.default_rng(0)
  batches = [{"hq": rng.uniform(-1, 0.5, (2, 8, 8, 3)).astype(np.float32)} for _ in range(3)]
  stats = export.measure_macro_stats(iter(batches), 3)
  pixels = np.concatenate([b["hq"].reshape(-1, 3) for b in batches]).astype(np.float64)
  np.testing.assert_allclose(stats["mean"], pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats["std"], pixels.std(0), rtol=1e-5)
  assert "macro" in stages.current(_config("vae_coarse")).measures
  assert "macro" in stages.current(_config("dit")).freezes  # carried to the bundle

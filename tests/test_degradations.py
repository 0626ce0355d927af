"""Each Real-ESRGAN degradation operation measures as it claims; eval presets are deterministic."""

import itertools
import math

import numpy as np
import pytest

from zipir_jax.data import defaults, eval_presets, testing
from zipir_jax.data import degradations as deg


def _params(**overrides) -> deg.DegradationParams:
  config = defaults.get_degradation_config()
  config.update(overrides)
  return deg.DegradationParams.from_config(config)


def _second_moments(kernel: np.ndarray) -> np.ndarray:
  grid = deg.mesh_grid(kernel.shape[0])
  k = kernel.astype(np.float64)[..., None, None]
  outer = grid[..., :, None] * grid[..., None, :]
  return np.sum(k * outer, axis=(0, 1))


# ---------------------------------------------------------------------------- blur kernels


@pytest.mark.parametrize(
  "sigma_x,sigma_y,theta",
  [(1.0, 1.0, 0.0), (2.5, 2.5, 0.0), (2.0, 1.0, 0.0), (2.4, 1.2, math.pi / 5), (1.5, 2.5, -2.0)],
)
def test_gaussian_kernel_sums_to_one_with_requested_covariance(sigma_x, sigma_y, theta):
  kernel = deg.bivariate_gaussian_kernel(21, sigma_x, sigma_y, theta)
  assert kernel.shape == (21, 21)
  np.testing.assert_allclose(kernel.sum(), 1.0, atol=1e-6)
  grid = deg.mesh_grid(21)
  mean = np.sum(kernel[..., None] * grid, axis=(0, 1))
  np.testing.assert_allclose(mean, 0.0, atol=1e-6)
  expected = deg.sigma_matrix(sigma_x, sigma_y, theta)
  measured = _second_moments(kernel)
  assert np.linalg.norm(measured - expected) / np.linalg.norm(expected) < 0.02, (measured, expected)


def test_generalized_and_plateau_kernels():
  """β=1 generalized Gaussian is the Gaussian; all kernels sum to 1 and are centred."""
  gauss = deg.bivariate_gaussian_kernel(15, 2.0, 1.0, 0.3)
  np.testing.assert_allclose(
    deg.bivariate_generalized_gaussian_kernel(15, 2.0, 1.0, 0.3, 1.0), gauss, atol=1e-7
  )
  for kernel in (
    deg.bivariate_generalized_gaussian_kernel(15, 2.0, 1.0, 0.3, 0.5),
    deg.bivariate_generalized_gaussian_kernel(15, 2.0, 1.0, 0.3, 4.0),
    deg.bivariate_plateau_kernel(15, 2.0, 1.0, 0.3, 1.5),
  ):
    np.testing.assert_allclose(kernel.sum(), 1.0, atol=1e-6)
    assert np.unravel_index(np.argmax(kernel), kernel.shape) == (7, 7)
  # Heavier tails for β<1: more mass outside 2σ than the Gaussian.
  heavy = deg.bivariate_generalized_gaussian_kernel(21, 1.5, 1.5, 0.0, 0.5)
  r = np.linalg.norm(deg.mesh_grid(21), axis=-1)
  assert heavy[r > 3].sum() > deg.bivariate_gaussian_kernel(21, 1.5, 1.5, 0.0)[r > 3].sum()


@pytest.mark.parametrize("size", [13, 21])
@pytest.mark.parametrize("omega_fraction", [1 / 3, 0.5, 2 / 3, 0.9])
def test_sinc_kernel_has_requested_cutoff(size, omega_fraction):
  omega_c = omega_fraction * math.pi
  kernel = deg.circular_lowpass_kernel(omega_c, size)
  np.testing.assert_allclose(kernel.sum(), 1.0, atol=1e-6)
  spectrum = np.abs(np.fft.fft2(kernel, s=(512, 512)))
  freqs = np.arange(257) * 2 * math.pi / 512
  along_x = spectrum[0, :257]
  diagonal = np.array([spectrum[i, i] for i in range(182)])
  diagonal_freqs = np.arange(182) * 2 * math.pi / 512 * math.sqrt(2)
  # The half-amplitude point is the cut-off, in every direction (circular low-pass).
  for profile, w in ((along_x, freqs), (diagonal, diagonal_freqs)):
    crossing = w[np.argmax(profile < 0.5)]
    assert abs(crossing - omega_c) < 0.05 * math.pi, (crossing / math.pi, omega_fraction)
  assert along_x[freqs < 0.6 * omega_c].min() > 0.8  # pass band
  stop = freqs > omega_c + 2 * math.pi / size
  if stop.any():
    assert along_x[stop].max() < 0.25  # stop band (ringing ripple only)


def test_random_kernels_every_type_and_size_range():
  rng = np.random.default_rng(0)
  for kind in deg.KERNEL_TYPES:
    params = _params(kernel_list=(kind,), kernel_prob=(1.0,), sinc_prob=0.0)
    for _ in range(5):
      kernel = deg.random_blur_kernel(rng, params.stage1, params)
      assert kernel.shape[0] == kernel.shape[1] and kernel.shape[0] % 2 == 1
      assert 7 <= kernel.shape[0] <= 21
      np.testing.assert_allclose(kernel.sum(), 1.0, atol=1e-5)
  params = _params(sinc_prob=1.0)
  sizes = {deg.random_blur_kernel(rng, params.stage1, params).shape[0] for _ in range(200)}
  assert sizes == set(range(7, 22, 2))
  final = [deg.random_final_sinc_kernel(rng, params) for _ in range(400)]
  assert 0.72 < np.mean([k is not None for k in final]) < 0.88  # final_sinc_prob = 0.8


def test_separable_filter_matches_full_2d_filter():
  import cv2  # pylint: disable=g-import-not-at-top

  img = testing.natural_image(40, 56).astype(np.float32) / 255
  kernel = deg.bivariate_gaussian_kernel(13, 1.7, 1.7, 0.0)
  expected = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
  np.testing.assert_allclose(deg.filter2d(img, kernel), expected, atol=2e-6)
  aniso = deg.bivariate_gaussian_kernel(13, 2.5, 0.8, 0.7)
  np.testing.assert_allclose(
    deg.filter2d(img, aniso),
    cv2.filter2D(img, -1, aniso, borderType=cv2.BORDER_REFLECT_101),
    atol=2e-6,
  )


# ---------------------------------------------------------------------------- noise, JPEG, resize


@pytest.mark.parametrize("gray", [False, True])
@pytest.mark.parametrize("sigma", [5.0, 20.0])
def test_gaussian_noise_has_requested_sigma_on_flat_image(sigma, gray):
  flat = np.full((256, 256, 3), 0.5, np.float32)
  noisy = deg.add_gaussian_noise(flat, np.random.default_rng(1), sigma, gray)
  measured = np.std(noisy - flat) * 255
  assert abs(measured - sigma) < 0.05 * sigma
  channel_spread = np.abs(noisy[..., 0] - noisy[..., 1]).max()
  assert (channel_spread == 0) == gray


@pytest.mark.parametrize("gray", [False, True])
def test_poisson_noise_has_requested_sigma(gray):
  """σ = scale·sqrt(x/v) with v = 2^ceil(log2(#levels)) (basicsr generate_poisson_noise)."""
  rng = np.random.default_rng(2)
  flat = np.full((256, 256, 3), 128 / 255, np.float32)  # one level -> v = 1
  scale = 0.1
  noise = deg.poisson_noise(flat, rng, scale, gray)
  expected = scale * math.sqrt(128 / 255)
  assert abs(np.std(noise) - expected) < 0.05 * expected
  assert abs(np.mean(noise)) < 0.05 * expected
  # 256 levels -> v = 256: a ramp, each level's σ = scale·sqrt(x/256).
  ramp = np.tile(np.arange(256, dtype=np.float32)[None, :, None] / 255, (512, 1, 3))
  noise = deg.poisson_noise(ramp, rng, 2.0, gray)
  x = ramp[..., :1] if gray else ramp
  bright = x[..., 0] > 0.2
  normalised = noise[..., 0][bright] / (2.0 * np.sqrt(x[..., 0][bright] / 256))
  assert abs(np.std(normalised) - 1.0) < 0.05
  noisy = deg.add_poisson_noise(ramp, rng, 2.0, gray)
  assert (np.abs(noisy[..., 0] - noisy[..., 2]).max() == 0) == gray


@pytest.mark.parametrize("vals,level", [(1, 200), (64, 3), (64, 255), (256, 1), (256, 128)])
def test_poisson_sampler_matches_the_poisson_distribution(vals, level):
  """Table inversion draws Poisson(level/255·v) exactly: χ² against the pmf."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  lam = level / 255 * vals
  draws = deg.sample_poisson_of_levels(
    np.full(100_000, level, np.uint8), vals, np.random.default_rng(level)
  )
  counts = np.bincount(draws.astype(np.int64))
  ks = np.arange(len(counts))
  expected = stats.poisson.pmf(ks, lam) * draws.size
  keep = expected > 10
  chi2 = np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])
  assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-3
  assert abs(draws.mean() - lam) < 5 * math.sqrt(lam / draws.size) + 1e-9


def test_jpeg_quality_changes_error_monotonically():
  img = testing.natural_image(128, 128).astype(np.float32) / 255
  errors = [np.mean((deg.jpeg_compress(img, q) - img) ** 2) for q in (10, 30, 50, 70, 90)]
  assert all(a > b for a, b in itertools.pairwise(errors)), errors


@pytest.mark.parametrize("mode", ["area", "bilinear", "bicubic"])
def test_resize_sizes_are_exact(mode):
  img = np.random.default_rng(0).random((50, 70, 3), dtype=np.float32)
  for size in ((25, 35), (7, 9), (100, 140), (51, 3)):
    assert deg.resize(img, size, mode).shape == (*size, 3)
  assert deg.lq_size((2048, 2048), 16) == (128, 128)
  assert deg.lq_size((1344, 768), 8) == (168, 96)
  assert deg.lq_size((100, 60), 12.5) == (8, 5)


@pytest.mark.parametrize("scale", [8.0, 16.0, 10.5])
def test_degrade_lq_is_exactly_hq_over_scale(scale):
  hq = testing.natural_image(128, 96)
  pair = deg.degrade(hq, np.random.default_rng(3), _params(scale_range=(scale, scale)))
  assert pair.scale == scale
  assert pair.lq.shape == (round(128 / scale), round(96 / scale), 3)
  assert pair.lq_up.shape == hq.shape
  assert pair.lq.dtype == pair.lq_up.dtype == pair.hq.dtype == np.uint8
  np.testing.assert_array_equal(pair.hq, hq)


def test_degrade_is_a_function_of_the_rng_and_samples_the_scale_range():
  hq = testing.natural_image(64, 64)
  params = _params()
  a = deg.degrade(hq, np.random.default_rng(5), params)
  b = deg.degrade(hq, np.random.default_rng(5), params)
  np.testing.assert_array_equal(a.lq_up, b.lq_up)
  scales = [deg.degrade(hq, np.random.default_rng(s), params).scale for s in range(20)]
  assert all(8.0 <= s <= 16.0 for s in scales) and np.std(scales) > 1.0
  # Severely degraded: far from HQ, yet correlated with it.
  err = np.abs(a.lq_up.astype(np.float32) - hq).mean()
  assert 3 < err < 100


def test_usm_sharpened_target():
  hq = testing.natural_image(64, 64)
  pair = deg.degrade(hq, np.random.default_rng(0), _params(usm_sharpen=True))
  assert pair.hq.shape == hq.shape and not np.array_equal(pair.hq, hq)

  # Sharpening raises local contrast.
  def gradient(x):
    return np.abs(np.diff(x.astype(np.float32), axis=1)).mean()

  assert gradient(pair.hq) > gradient(hq)


def test_invalid_config_names_the_field():
  with pytest.raises(ValueError, match="kernel_list"):
    _params(kernel_list=("iso", "bogus"), kernel_prob=(0.5, 0.5))
  with pytest.raises(ValueError, match="scale_range"):
    _params(scale_range=(16.0, 8.0))


# ---------------------------------------------------------------------------- evaluation presets


@pytest.mark.parametrize("preset,scale", [("sr16", 16), ("sr8", 8), ("mix", 8), ("fig4", 8)])
def test_presets_shapes_and_bit_identical_with_same_seed(preset, scale):
  hq = testing.natural_image(128, 192)
  lq, lq_up = eval_presets.make_eval_pair(hq, preset, seed=7)
  assert lq.shape == (128 // scale, 192 // scale, 3) and lq.dtype == np.uint8
  assert lq_up.shape == hq.shape and lq_up.dtype == np.uint8
  lq2, lq_up2 = eval_presets.make_eval_pair(hq, preset, seed=7)
  np.testing.assert_array_equal(lq, lq2)
  np.testing.assert_array_equal(lq_up, lq_up2)
  other, _ = eval_presets.make_eval_pair(hq, preset, seed=8)
  # Only presets with noise depend on the seed.
  assert np.array_equal(lq, other) == (preset in ("sr16", "sr8"))


def test_preset_noise_level_and_errors():
  flat = np.full((512, 512, 3), 128, np.uint8)
  lq, _ = eval_presets.make_eval_pair(flat, {"scale": 8, "noise_sigma": 15.0}, seed=0)
  assert abs(np.std(lq.astype(np.float32)) - 15.0) < 0.05 * 15.0
  with pytest.raises(ValueError, match="unknown preset"):
    eval_presets.make_eval_pair(flat, "sr4", seed=0)
  with pytest.raises(ValueError, match="not divisible"):
    eval_presets.make_eval_pair(flat[:100], "sr8", seed=0)
  # The mixture is much harsher than plain 8x SR.
  hq = testing.natural_image(256, 256)
  sr_err = np.abs(eval_presets.make_eval_pair(hq, "sr8", 0)[1].astype(float) - hq).mean()
  mix_err = np.abs(eval_presets.make_eval_pair(hq, "mix", 0)[1].astype(float) - hq).mean()
  assert mix_err > sr_err

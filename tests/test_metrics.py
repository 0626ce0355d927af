"""PSNR/SSIM against scikit-image on real photos; FID, KID and patch crops against references."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from PIL import Image
from skimage import color, data, filters
from skimage import metrics as skmetrics

from zipir_jax import metrics

# ------------------------------------------------------------------------------------------------
# PSNR / SSIM on real photos.
# ------------------------------------------------------------------------------------------------

# (photo, crop size): several sizes, odd ones included.
PHOTO_CROPS = [
  ("astronaut", (301, 257)),
  ("coffee", (97, 131)),
  ("chelsea", (97, 131)),
  ("rocket", (64, 64)),
]
DEGRADATIONS = ["blur", "noise", "jpeg", "saturated"]


def _photo(name: str, size: tuple[int, int]) -> np.ndarray:
  """A crop of a scikit-image photo as float64 in [0, 1] (exact multiples of 1/255)."""
  image = getattr(data, name)()
  top, left = (image.shape[0] - size[0]) // 2, (image.shape[1] - size[1]) // 2
  return image[top : top + size[0], left : left + size[1]].astype(np.float64) / 255.0


def _degrade(image: np.ndarray, kind: str, seed: int) -> np.ndarray:
  if kind == "blur":
    return filters.gaussian(image, sigma=1.3, channel_axis=-1)
  if kind == "noise":
    return np.clip(image + np.random.default_rng(seed).normal(0, 0.06, image.shape), 0, 1)
  if kind == "jpeg":
    buf = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buf, "JPEG", quality=25)
    return np.asarray(Image.open(buf), np.float64) / 255.0
  if kind == "saturated":  # Large flat (clipped) areas: SSIM's near-zero-variance windows.
    bright = np.clip(image * 1.8, 0, 1)
    return np.clip(
      bright + np.random.default_rng(seed).normal(0, 0.02, image.shape) * (bright < 1), 0, 1
    )
  raise ValueError(kind)


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
  return skmetrics.structural_similarity(
    a,
    b,
    gaussian_weights=True,
    sigma=1.5,
    use_sample_covariance=False,
    data_range=1,
    channel_axis=-1,
  )


_psnr = jax.jit(metrics.psnr)
_ssim = jax.jit(metrics.ssim)


@pytest.mark.parametrize("photo,size", PHOTO_CROPS)
def test_psnr_and_ssim_match_scikit_image_on_photos(photo, size):
  clean = _photo(photo, size)
  pairs = []
  for i, kind in enumerate(DEGRADATIONS):
    reference, degraded = clean, _degrade(clean, kind, seed=i)
    if kind == "saturated":  # Compare two saturated images, so both have flat areas.
      reference = np.clip(clean * 1.8, 0, 1)
    pairs.append((reference, degraded))
  a = jnp.asarray(np.stack([p[0] for p in pairs]), jnp.float32)
  b = jnp.asarray(np.stack([p[1] for p in pairs]), jnp.float32)
  want_psnr = [skmetrics.peak_signal_noise_ratio(x, y, data_range=1) for x, y in pairs]
  want_ssim = [_skimage_ssim(x, y) for x, y in pairs]
  got_psnr, got_ssim = _psnr(a, b), _ssim(a, b)
  assert got_psnr.shape == got_ssim.shape == (len(pairs),)
  # float32 inputs vs scikit-image's float64 of the unrounded images: observed < 5e-6.
  np.testing.assert_allclose(got_psnr, want_psnr, rtol=0, atol=1e-4)
  np.testing.assert_allclose(got_ssim, want_ssim, rtol=0, atol=1e-4)
  assert np.ptp(want_ssim) > 0.1  # The degradations span a real range of SSIM.


def test_y_channel_variant_matches_scikit_image():
  a = _photo("coffee", (97, 131))
  b = _degrade(a, "jpeg", seed=0)
  ya, yb = (np.asarray(metrics.rgb_to_y(jnp.asarray(x[None], jnp.float32)))[0] for x in (a, b))
  np.testing.assert_allclose(ya[..., 0], color.rgb2ycbcr(a)[..., 0] / 255, rtol=0, atol=1e-6)
  want_ssim = skmetrics.structural_similarity(
    color.rgb2ycbcr(a)[..., 0] / 255,
    color.rgb2ycbcr(b)[..., 0] / 255,
    gaussian_weights=True,
    sigma=1.5,
    use_sample_covariance=False,
    data_range=1,
  )
  np.testing.assert_allclose(_ssim(ya[None], yb[None])[0], want_ssim, rtol=0, atol=1e-4)
  # Y-channel PSNR is a different number from RGB PSNR: the two must not be mixed up.
  assert (
    abs(float(metrics.psnr(ya[None], yb[None])[0]) - float(metrics.psnr(a[None], b[None])[0])) > 0.1
  )


def test_psnr_data_range_identical_images_and_unit_range_conversion():
  a = _photo("rocket", (64, 64))[None]
  b = _degrade(a[0], "noise", seed=1)[None]
  np.testing.assert_allclose(
    metrics.psnr(a * 255, b * 255, data_range=255.0), metrics.psnr(a, b), rtol=1e-6
  )
  np.testing.assert_allclose(
    metrics.ssim(a * 255, b * 255, data_range=255.0), metrics.ssim(a, b), rtol=0, atol=1e-6
  )
  assert np.isinf(metrics.psnr(a, a)[0])
  np.testing.assert_allclose(
    metrics.ssim(jnp.asarray(a, jnp.float32), jnp.asarray(a, jnp.float32)), [1.0], atol=1e-6
  )
  model_images = jnp.array([[[[-1.5, -1.0, 0.0]], [[0.5, 1.0, 2.0]]]])
  np.testing.assert_allclose(
    metrics.to_unit_range(model_images), [[[[0.0, 0.0, 0.5]], [[0.75, 1.0, 1.0]]]]
  )


def test_image_metric_errors_say_what_was_expected():
  x = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match=r"equal shape.*\(1, 16, 16, 3\).*\(1, 16, 15, 3\)"):
    metrics.psnr(x, jnp.zeros((1, 16, 15, 3)))
  with pytest.raises(TypeError, match="uint8"):
    metrics.ssim(x.astype(jnp.uint8), x.astype(jnp.uint8))
  with pytest.raises(ValueError, match=r"at least 11x11.*10x16"):
    metrics.ssim(jnp.zeros((1, 10, 16, 3)), jnp.zeros((1, 10, 16, 3)))
  with pytest.raises(ValueError, match=r"RGB.*\(2, 4\)"):
    metrics.rgb_to_y(jnp.zeros((2, 4)))


# ------------------------------------------------------------------------------------------------
# Fréchet distance.
# ------------------------------------------------------------------------------------------------


def _pytorch_fid_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """pytorch-fid 0.3.0 ``calculate_frechet_distance`` (scipy.linalg.sqrtm, eps-offset fallback)."""
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _gaussian_samples(rng, n, d, shift=0.0):
  mixing = rng.standard_normal((d, d)) / np.sqrt(d)
  return rng.standard_normal((n, d)) @ mixing + shift + rng.standard_normal(d) * 0.1


def _exact_fid_of_samples(f1, f2):
  """FID of two sample sets via the nuclear norm (SciPy's SVD), accurate even when n < d.

  With centred samples X1, X2 and S_i = X_i^T X_i / (n_i - 1), the nonzero eigenvalues of S1 S2
  are the squared singular values of X1 X2^T / sqrt((n1 - 1)(n2 - 1)), so tr (S1 S2)^½ is that
  matrix's nuclear norm: an SVD of a small well-conditioned matrix, no square roots of rounding
  noise.
  """
  x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
  scale = np.sqrt((len(f1) - 1) * (len(f2) - 1))
  nuclear = scipy.linalg.svdvals(x1 @ x2.T / scale).sum()
  diff = f1.mean(0) - f2.mean(0)
  return diff @ diff + np.sum(x1**2) / (len(f1) - 1) + np.sum(x2**2) / (len(f2) - 1) - 2 * nuclear


@pytest.mark.parametrize("n,d", [(400, 32), (20, 64), (60, 128), (64, 512)])
def test_frechet_distance_matches_scipy_formula_and_exact_value(n, d):
  """Full-rank (n > d) and rank-deficient (n <= d: singular covariances) sample statistics."""
  rng = np.random.default_rng(n * 1000 + d)
  f1, f2 = _gaussian_samples(rng, n, d), _gaussian_samples(rng, n, d, shift=0.3)
  stats1, stats2 = metrics.feature_statistics(f1), metrics.feature_statistics(f2)
  full_rank = n > d
  assert np.linalg.matrix_rank(stats1[1]) == (d if full_rank else n - 1)
  got = metrics.frechet_distance(*stats1, *stats2)
  assert got > 1.0
  # Observed: < 1e-11 in every case.
  np.testing.assert_allclose(got, _exact_fid_of_samples(f1, f2), rtol=0, atol=1e-6)
  np.testing.assert_allclose(metrics.frechet_distance(*stats1, *stats1), 0.0, atol=1e-6)
  if d <= 128:  # sqrtm is slow beyond; its error grows with the number of zero eigenvalues.
    want = _pytorch_fid_reference(*stats1, *stats2)
    # Full rank: sqrtm is exact to rounding (observed 1e-13). Singular: sqrtm itself is off by
    # sqrt(rounding noise) per zero eigenvalue (observed 2e-6 at d=64, 1e-5 at d=256).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 if full_rank else 1e-5)


def test_frechet_distance_analytic_for_commuting_covariances():
  """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: FID = |mu1 - mu2|² + sum (sqrt a - sqrt b)²."""
  rng = np.random.default_rng(7)
  d = 48
  a = rng.uniform(0, 3, d)
  b = rng.uniform(0, 3, d)
  a[:10] = 0.0  # Singular, and singular in different directions.
  b[5:15] = 0.0
  a[20:23] = 1e-10  # Near-singular: tiny but resolvable eigenvalues still count.
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(
    metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want, rtol=1e-12
  )
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), want, rtol=0, atol=1e-6)
  np.testing.assert_allclose(_pytorch_fid_reference(mu1, s1, mu2, s2), want, rtol=0, atol=1e-6)


def test_feature_statistics_fid_from_features_and_statistics_files(tmp_path):
  rng = np.random.default_rng(3)
  f1, f2 = rng.standard_normal((50, 8)), rng.standard_normal((60, 8)) + 0.5
  mu, sigma = metrics.feature_statistics(f1.astype(np.float32))
  np.testing.assert_allclose(mu, f1.mean(0), rtol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(f1, rowvar=False), rtol=1e-5, atol=1e-7)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(
    metrics.fid_from_features(f1, f2),
    _pytorch_fid_reference(*metrics.feature_statistics(f1), *metrics.feature_statistics(f2)),
    rtol=1e-9,
  )
  path = tmp_path / "ref_stats.npz"
  metrics.save_statistics(path, mu, sigma)
  for got, want in zip(metrics.load_statistics(path), (mu, sigma)):
    np.testing.assert_array_equal(got, want)
  np.savez(tmp_path / "bad.npz", mu=mu)
  with pytest.raises(KeyError, match=r"bad\.npz.*'sigma'"):
    metrics.load_statistics(tmp_path / "bad.npz")
  with pytest.raises(ValueError, match=r"\(D,\).*\(8,\), \(8, 8\), \(7,\)"):
    metrics.frechet_distance(mu, sigma, mu[:7], sigma[:7, :7])
  with pytest.raises(ValueError, match=r"N >= 2.*\(1, 8\)"):
    metrics.feature_statistics(f1[:1])


# ------------------------------------------------------------------------------------------------
# KID.
# ------------------------------------------------------------------------------------------------


def _mmd2_unbiased_loops(x, y):
  """Textbook unbiased MMD² with k(a, b) = (a·b/d + 1)³, one kernel value at a time."""
  d = x.shape[1]
  k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
  m, n = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return xx + yy - 2 * xy


def test_mmd2_unbiased_matches_direct_formula():
  rng = np.random.default_rng(11)
  x = rng.standard_normal((9, 5))
  y = rng.standard_normal((12, 5)) * 1.3 + 0.2  # Unequal sizes.
  np.testing.assert_allclose(metrics.mmd2_unbiased(x, y), _mmd2_unbiased_loops(x, y), rtol=1e-12)
  np.testing.assert_allclose(
    metrics.polynomial_kernel(x, y)[2, 7], (x[2] @ y[7] / 5 + 1) ** 3, rtol=1e-12
  )


def test_kid_is_unbiased_for_samples_of_one_distribution():
  """E[MMD²_u] = 0 for equal distributions; the biased estimate (diagonal kept) is positive."""
  rng = np.random.default_rng(5)
  trials, n, d = 2000, 8, 6
  xs = rng.standard_normal((trials, n, d))
  ys = rng.standard_normal((trials, n, d))
  unbiased = np.array([metrics.mmd2_unbiased(x, y) for x, y in zip(xs, ys)])
  standard_error = unbiased.std() / np.sqrt(trials)
  assert abs(unbiased.mean()) < 4 * standard_error
  k = metrics.polynomial_kernel
  biased = np.array([k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean() for x, y in zip(xs, ys)])
  assert biased.mean() > 20 * standard_error  # The test above has the power to see the bias.


def test_kid_subsets_are_seeded_and_separate_distributions():
  rng = np.random.default_rng(9)
  f1 = rng.standard_normal((60, 16))
  f2 = rng.standard_normal((50, 16))
  f3 = rng.standard_normal((50, 16)) * 1.5 + 0.5
  # One subset of every row: a permutation of the full sets, so exactly the full-set estimate.
  mean, std = metrics.kid(f1[:50], f2, num_subsets=1, subset_size=50)
  np.testing.assert_allclose(mean, metrics.mmd2_unbiased(f1[:50], f2), rtol=1e-10)
  assert std == 0.0
  same = metrics.kid(f1, f2, num_subsets=20, subset_size=30, seed=1)
  assert same == metrics.kid(f1, f2, num_subsets=20, subset_size=30, seed=1)
  assert same != metrics.kid(f1, f2, num_subsets=20, subset_size=30, seed=2)
  different = metrics.kid(f1, f3, num_subsets=20, subset_size=30, seed=1)
  assert different[0] > abs(same[0]) + 3 * (different[1] + same[1])
  with pytest.raises(ValueError, match=r"subset_size=1000.*\[2, 50\].*subset_size=50"):
    metrics.kid(f1, f2)


# ------------------------------------------------------------------------------------------------
# Patch crops and streamed features.
# ------------------------------------------------------------------------------------------------


def test_patch_positions_are_seeded_in_bounds_and_shared_by_pairs():
  pos = metrics.patch_positions(2048, 1536, index=3, seed=0)
  assert pos.shape == (metrics.fid.DEFAULT_NUM_CROPS, 2)
  assert pos[:, 0].max() <= 2048 - 299 and pos[:, 1].max() <= 1536 - 299 and pos.min() >= 0
  np.testing.assert_array_equal(pos, metrics.patch_positions(2048, 1536, index=3, seed=0))
  assert not np.array_equal(pos, metrics.patch_positions(2048, 1536, index=4, seed=0))
  assert not np.array_equal(pos, metrics.patch_positions(2048, 1536, index=3, seed=1))
  exact = metrics.patch_positions(299, 400, index=0, num_crops=200)
  assert np.all(exact[:, 0] == 0) and set(exact[:, 1]) >= {0, 101}  # Both extremes reachable.
  with pytest.raises(ValueError, match=r"image 2 is 298x400.*299x299"):
    metrics.patch_positions(298, 400, index=2)


def test_paired_patches_crop_the_same_places():
  rng = np.random.default_rng(0)
  restored = rng.integers(0, 256, (400, 333, 3), dtype=np.uint8)
  reference = rng.integers(0, 256, (400, 333, 3), dtype=np.uint8)
  a, b, pos = metrics.paired_patches(restored, reference, index=5, num_crops=4, size=64, seed=2)
  assert a.shape == b.shape == (4, 64, 64, 3) and a.dtype == np.uint8
  for crop_a, crop_b, (top, left) in zip(a, b, pos):
    np.testing.assert_array_equal(crop_a, restored[top : top + 64, left : left + 64])
    np.testing.assert_array_equal(crop_b, reference[top : top + 64, left : left + 64])
  crops, pos_alone = metrics.random_patches(reference, index=5, num_crops=4, size=64, seed=2)
  np.testing.assert_array_equal(pos_alone, pos)
  np.testing.assert_array_equal(crops, b)
  with pytest.raises(ValueError, match=r"image 5.*\(400, 333, 3\).*\(400, 332, 3\)"):
    metrics.paired_patches(restored, reference[:, :332], index=5)


def test_streamed_patch_features_equal_features_of_all_crops():
  rng = np.random.default_rng(1)
  images = [rng.uniform(0, 1, (80 + 3 * i, 90, 3)).astype(np.float32) for i in range(4)]
  calls = []

  def feature_fn(batch):  # Stand-in for the Inception: per-crop channel means and stds.
    calls.append(batch.shape)
    return np.concatenate([batch.mean(axis=(1, 2)), batch.std(axis=(1, 2))], axis=1)

  streamed = metrics.collect_features(
    feature_fn, metrics.iter_patches(iter(images), num_crops=3, size=32, seed=4)
  )
  assert calls == [(3, 32, 32, 3)] * 4  # One image's crops at a time.
  every_crop = np.concatenate(
    [
      metrics.random_patches(im, index=i, num_crops=3, size=32, seed=4)[0]
      for i, im in enumerate(images)
    ]
  )
  np.testing.assert_allclose(streamed, feature_fn(every_crop), rtol=1e-6)
  batches = list(metrics.iter_batches((im[:80] for im in images), batch_size=3))
  assert [b.shape for b in batches] == [(3, 80, 90, 3), (1, 80, 90, 3)]
  with pytest.raises(ValueError, match="no image batches"):
    metrics.collect_features(feature_fn, [])


@pytest.mark.parametrize("n1,n2,d", [(20, 30, 64), (64, 64, 512), (8, 6, 2048), (70, 90, 64)])
def test_fid_from_features_equals_fid_of_their_statistics(n1, n2, d):
  """Few samples (n <= d): the n1 x n2 nuclear-norm route; many: the statistics route. Both equal
  the Fréchet distance of the sample statistics."""
  rng = np.random.default_rng(n1 + n2 + d)
  f1 = _gaussian_samples(rng, n1, d)
  f2 = _gaussian_samples(rng, n2, d, shift=0.3)
  got = metrics.fid_from_features(f1.astype(np.float32), f2.astype(np.float32))
  want = metrics.frechet_distance(
    *metrics.feature_statistics(f1.astype(np.float32)),
    *metrics.feature_statistics(f2.astype(np.float32)),
  )
  assert got > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-7)
  np.testing.assert_allclose(metrics.fid_from_features(f1, f1), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="one D"):
    metrics.fid_from_features(f1, f2[:, :-1])

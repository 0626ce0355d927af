"""Distribution metrics over Inception pool features: FID, patch FID and KID (paper §4, Table 1).

All of this runs on the host in float64 NumPy/SciPy: the statistics are small (2048-d), the
matrix square root needs float64, and the images never need to be in memory at once — features
are extracted batch by batch with a jitted network (``zipir_jax.models.inception.make_feature_fn``)
and only the (N, 2048) float32 features are kept (30k patches are 245 MB).

* FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to the two feature sets.
* Patch FID (pFID, after Chai et al. 2022 and UltraPixel): FID over random 299x299 crops taken at
  full resolution, so it sees the fine detail that resizing a 2048² image to 299² throws away. The
  paper does not say how many crops; we take ``DEFAULT_NUM_CROPS`` (10) per image, at positions
  that depend only on (seed, image index, image size), so a restored set and its reference set
  are cropped identically when their images have the same sizes.
* KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel
  ``k(x, y) = (x·y / d + 1)³``, averaged over random subsets (torch-fidelity's defaults: 100
  subsets of 1000). The paper reports KID x 10³.

Images fed to the feature extractor are NHWC RGB in [0, 1] (or uint8), the metrics convention.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np

PATCH_SIZE = 299  # Inception's input size: crops need no resizing.
DEFAULT_NUM_CROPS = 10
KID_NUM_SUBSETS = 100
KID_SUBSET_SIZE = 1000

FeatureFn = Callable[[np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------------------------
# Feature statistics and the Fréchet distance.
# ------------------------------------------------------------------------------------------------


def _as_features(features: np.ndarray, name: str, min_rows: int = 2) -> np.ndarray:
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or features.shape[0] < min_rows:
    raise ValueError(
      f"{name} must be a (N, D) array of features with N >= {min_rows}, got shape {features.shape}."
    )
  if not np.all(np.isfinite(features)):
    raise ValueError(f"{name} contains non-finite values.")
  return features


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) features -> mean (D,) and sample covariance (D, D) (ddof=1, as pytorch-fid), float64.

  With N <= D the covariance is singular; :func:`frechet_distance` handles that, but FID is biased
  upwards for small N (use thousands of samples for 2048-d features, and compare equal N).
  """
  features = _as_features(features, "features")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _resolvable(eigvals: np.ndarray) -> np.ndarray:
  """Zeroes eigenvalues below eigh's rounding level (d * eps * max, as numpy's ``matrix_rank``).

  For singular covariances (fewer samples than dimensions) the zero eigenvalues come back as
  +-1e-16 * max; their square roots (1e-8 * sqrt(max) each, hundreds of them) would otherwise
  bias the trace term, which is exactly the error scipy's sqrtm makes there.
  """
  tol = max(float(eigvals.max()), 0.0) * eigvals.shape[0] * np.finfo(np.float64).eps
  return np.where(eigvals > tol, eigvals, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix."""
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(_resolvable(eigvals))) @ eigvecs.T


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
  """Fréchet distance ``|mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½)`` between two Gaussians.

  ``tr (S1 S2)^½`` is computed as the sum of square roots of the eigenvalues of the symmetric PSD
  matrix ``S1^½ S2 S1^½``, which has the same eigenvalues as ``S1 S2``. Unlike pytorch-fid's
  ``scipy.linalg.sqrtm(S1 @ S2)`` this needs no complex arithmetic, no eps-offset fallback for
  singular products (covariances of fewer samples than dimensions) and no check for imaginary
  parts. Eigenvalues below rounding level count as 0 (see ``_resolvable``). Where sqrtm is
  accurate (full rank) the two agree to ~1e-12; for singular covariances this is the more
  accurate one (exact to ~1e-12 vs sqrtm's ~1e-5 at d=256, measured against the nuclear norm of
  the centred feature product). Everything is float64.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(
      f"frechet_distance expects means (D,) and covariances (D, D) of one D, got "
      f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}."
    )
  # Covariances from float32 sums can be asymmetric at the last bit; eigh needs symmetry.
  sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
  root1 = _psd_sqrt(sigma1)
  product = root1 @ sigma2 @ root1
  eigvals = np.linalg.eigvalsh((product + product.T) / 2)
  tr_covmean = np.sum(np.sqrt(_resolvable(eigvals)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two (N, 2048) feature sets (Inception pool3 features of two image sets).

  With fewer samples than dimensions (an evaluation of a few hundred crops) the covariances
  S_i = A_i^T A_i (A_i: the centred features / sqrt(N_i - 1)) have rank < D, and the non-zero
  eigenvalues of S1 S2 are those of (A1 A2^T)(A1 A2^T)^T: ``tr (S1 S2)^½`` is the nuclear norm of
  the N1 x N2 matrix A1 A2^T. Exact, and milliseconds where :func:`frechet_distance`'s D x D
  eigendecompositions take seconds at D = 2048.
  """
  f1, f2 = _as_features(features1, "features1"), _as_features(features2, "features2")
  if f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) > f1.shape[1]:
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
  mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
  a1, a2 = (f1 - mu1) / np.sqrt(len(f1) - 1), (f2 - mu2) / np.sqrt(len(f2) - 1)
  tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.sum(a1 * a1) + np.sum(a2 * a2) - 2.0 * tr_covmean)


def save_statistics(path: str | os.PathLike[str], mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes ``mu``/``sigma`` in pytorch-fid's ``.npz`` format (reference sets are reused)."""
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_statistics(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``mu``/``sigma`` from a pytorch-fid style ``.npz`` file."""
  with np.load(path) as data:
    missing = [k for k in ("mu", "sigma") if k not in data]
    if missing:
      raise KeyError(
        f"{os.fspath(path)}: missing {missing}; expected a pytorch-fid statistics "
        f"file with 'mu' (D,) and 'sigma' (D, D), found {sorted(data.keys())}."
      )
    return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


# ------------------------------------------------------------------------------------------------
# KID: unbiased MMD² with the cubic polynomial kernel.
# ------------------------------------------------------------------------------------------------


def polynomial_kernel(
  x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0
) -> np.ndarray:
  """``(x·y / d + coef0) ** degree`` for all row pairs: the KID kernel (Bińkowski et al. 2018)."""
  return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(
  x: np.ndarray,
  y: np.ndarray,
  kernel: Callable[[np.ndarray, np.ndarray], np.ndarray] = polynomial_kernel,
) -> float:
  """Unbiased MMD² estimate between samples ``x`` (m, d) and ``y`` (n, d).

  ``sum_{i≠j} k(xi, xj) / m(m-1) + sum_{i≠j} k(yi, yj) / n(n-1) - 2 sum_{i,j} k(xi, yj) / mn``:
  the within-set diagonals k(xi, xi) are excluded, which is what makes it unbiased (it can be
  negative; its expectation is 0 when both samples come from the same distribution).
  """
  x = _as_features(x, "x")
  y = _as_features(y, "y")
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"mmd2_unbiased: feature sizes differ, {x.shape} vs {y.shape}.")
  m, n = x.shape[0], y.shape[0]
  k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
  within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
  within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
  return float(within_x + within_y - 2.0 * k_xy.mean())


def kid(
  features1: np.ndarray,
  features2: np.ndarray,
  *,
  num_subsets: int = KID_NUM_SUBSETS,
  subset_size: int = KID_SUBSET_SIZE,
  seed: int = 0,
) -> tuple[float, float]:
  """Kernel Inception Distance: mean and std of :func:`mmd2_unbiased` over random subsets.

  Each of ``num_subsets`` rounds draws ``subset_size`` rows without replacement from each set
  (seeded, so reruns agree). Both sets need at least ``subset_size`` rows; for small evaluation
  sets pass ``subset_size=min(len(features1), len(features2))`` (scores are only comparable at
  equal subset sizes).
  """
  features1 = _as_features(features1, "features1")
  features2 = _as_features(features2, "features2")
  smallest = min(features1.shape[0], features2.shape[0])
  if subset_size < 2 or subset_size > smallest:
    raise ValueError(
      f"kid: subset_size={subset_size} must be in [2, {smallest}] (the smaller "
      f"set has {smallest} features); pass subset_size={smallest} for small sets."
    )
  rng = np.random.default_rng(seed)
  values = np.empty(num_subsets)
  for i in range(num_subsets):
    x = features1[rng.choice(features1.shape[0], subset_size, replace=False)]
    y = features2[rng.choice(features2.shape[0], subset_size, replace=False)]
    values[i] = mmd2_unbiased(x, y)
  return float(values.mean()), float(values.std())


# ------------------------------------------------------------------------------------------------
# Patch crops (pFID) and streamed feature extraction.
# ------------------------------------------------------------------------------------------------


def patch_positions(
  height: int,
  width: int,
  *,
  index: int,
  num_crops: int = DEFAULT_NUM_CROPS,
  size: int = PATCH_SIZE,
  seed: int = 0,
) -> np.ndarray:
  """Top-left corners (num_crops, 2) of random ``size`` crops of image number ``index``.

  Uniform over all valid positions, drawn from ``default_rng([seed, index])``: a pure function of
  its arguments, so the restored and the reference image with the same index and size get the
  same crops without sharing any state.
  """
  if height < size or width < size:
    raise ValueError(
      f"patch_positions: image {index} is {height}x{width}, smaller than the {size}x{size} crop."
    )
  rng = np.random.default_rng([seed, index])
  tops = rng.integers(0, height - size + 1, num_crops)
  lefts = rng.integers(0, width - size + 1, num_crops)
  return np.stack([tops, lefts], axis=1)


def crop_patches(image: np.ndarray, positions: np.ndarray, size: int = PATCH_SIZE) -> np.ndarray:
  """HWC image -> (len(positions), size, size, C) crops at the given top-left corners."""
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"crop_patches expects one HWC image, got shape {image.shape}.")
  return np.stack([image[t : t + size, x : x + size] for t, x in positions])


def random_patches(
  image: np.ndarray,
  *,
  index: int,
  num_crops: int = DEFAULT_NUM_CROPS,
  size: int = PATCH_SIZE,
  seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Random full-resolution crops of one HWC image: (crops, positions); see patch_positions."""
  positions = patch_positions(
    image.shape[0], image.shape[1], index=index, num_crops=num_crops, size=size, seed=seed
  )
  return crop_patches(image, positions, size), positions


def paired_patches(
  restored: np.ndarray,
  reference: np.ndarray,
  *,
  index: int,
  num_crops: int = DEFAULT_NUM_CROPS,
  size: int = PATCH_SIZE,
  seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The same random crops of a restored image and its reference: (restored, reference, pos)."""
  if np.shape(restored) != np.shape(reference):
    raise ValueError(
      f"paired_patches: image {index} has restored shape {np.shape(restored)} but "
      f"reference shape {np.shape(reference)}; crops would not correspond."
    )
  crops, positions = random_patches(
    restored, index=index, num_crops=num_crops, size=size, seed=seed
  )
  return crops, crop_patches(reference, positions, size), positions


def iter_patches(
  images: Iterable[np.ndarray],
  *,
  num_crops: int = DEFAULT_NUM_CROPS,
  size: int = PATCH_SIZE,
  seed: int = 0,
) -> Iterator[np.ndarray]:
  """Yields the (num_crops, size, size, C) crops of each HWC image in turn (index = position).

  Feed it to :func:`collect_features` for patch FID; images are read one at a time, so a loader
  generator keeps only one full-resolution image in memory.
  """
  for index, image in enumerate(images):
    yield random_patches(image, index=index, num_crops=num_crops, size=size, seed=seed)[0]


def collect_features(feature_fn: FeatureFn, batches: Iterable[np.ndarray]) -> np.ndarray:
  """Runs ``feature_fn`` over NHWC image batches and stacks the features, (N, D) float32.

  Only one batch of images is alive at a time; the returned features are all that is kept.
  """
  chunks = [np.asarray(feature_fn(batch), np.float32) for batch in batches]
  if not chunks:
    raise ValueError("collect_features: no image batches were given.")
  return np.concatenate(chunks, axis=0)


def iter_batches(images: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
  """Groups same-size HWC images from an iterable (e.g. a lazy loader) into NHWC batches."""
  batch = []
  for image in images:
    batch.append(np.asarray(image))
    if len(batch) == batch_size:
      yield np.stack(batch)
      batch = []
  if batch:
    yield np.stack(batch)

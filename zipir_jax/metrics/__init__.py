"""Evaluation metrics of the paper (§4, Table 1 and appendix): PSNR, SSIM, FID, patch FID, KID.

Conventions, for every function here:

* Images are NHWC RGB, float in [0, 1] (as dm-pix and scikit-image with ``data_range=1``); the
  feature extractor also takes uint8. Models of this package output [-1, 1]: convert with
  :func:`to_unit_range` at the boundary.
* PSNR/SSIM are on RGB (SSIM per channel, averaged), returned per image with shape (B,); report
  the mean over the dataset. Y-channel variants: apply :func:`rgb_to_y` to both images first.
* FID/pFID/KID use the FID Inception network's 2048-d pool3 features
  (:mod:`zipir_jax.models.inception`, pytorch-fid's ``pt_inception-2015-12-05`` weights) and are
  computed on the host in float64. Features are extracted batch by batch, so a large evaluation
  set is never held in memory as images::

    from zipir_jax import metrics
    from zipir_jax.models import inception

    feature_fn = inception.make_feature_fn(inception.load(path_to_pth), batch_size=10)
    real = metrics.collect_features(feature_fn, metrics.iter_patches(load_references()))
    fake = metrics.collect_features(feature_fn, metrics.iter_patches(load_restored()))
    pfid = metrics.fid_from_features(real, fake)

LPIPS lives in :mod:`zipir_jax.models.lpips` (it takes [-1, 1] images, like the models).
"""

from zipir_jax.metrics.fid import (
  collect_features,
  crop_patches,
  feature_statistics,
  fid_from_features,
  frechet_distance,
  iter_batches,
  iter_patches,
  kid,
  load_statistics,
  mmd2_unbiased,
  paired_patches,
  patch_positions,
  polynomial_kernel,
  random_patches,
  save_statistics,
)
from zipir_jax.metrics.image import psnr, rgb_to_y, ssim, to_unit_range

__all__ = [
  "collect_features",
  "crop_patches",
  "feature_statistics",
  "fid_from_features",
  "frechet_distance",
  "iter_batches",
  "iter_patches",
  "kid",
  "load_statistics",
  "mmd2_unbiased",
  "paired_patches",
  "patch_positions",
  "polynomial_kernel",
  "psnr",
  "random_patches",
  "rgb_to_y",
  "save_statistics",
  "ssim",
  "to_unit_range",
]

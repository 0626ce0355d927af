"""Full-reference pixel metrics: PSNR and SSIM, batched and jittable.

Convention (the whole ``zipir_jax.metrics`` package): images are float NHWC RGB in [0, 1], as in
dm-pix and scikit-image with ``data_range=1``. The package's models work in [-1, 1]; convert with
:func:`to_unit_range` at the boundary. Each function returns one value per image, shape (B,); a
dataset score is the mean of the per-image values (the usual reporting).

Colour space. The paper's tables (PSNR in Table 1, PSNR/SSIM in the appendix) do not say which
colour space they use. Here both metrics are computed on RGB: PSNR over all three channels, SSIM
per channel and averaged, which is scikit-image's ``structural_similarity(...,
channel_axis=-1)`` and dm-pix's behaviour. Super-resolution papers often report the Y channel of
BT.601 YCbCr instead (BasicSR ``test_y_channel=True``, MATLAB ``rgb2ycbcr``), usually with a border
of ``scale`` pixels cropped; use ``psnr(rgb_to_y(a), rgb_to_y(b))`` for that variant. Values from
the two conventions are not comparable (Y-channel PSNR is typically higher).

Images are not quantised here. Papers usually evaluate saved 8-bit images; quantise both images
(``round(x * 255) / 255``) first to reproduce that exactly.
"""

from __future__ import annotations

import dm_pix as pix
import jax
import jax.numpy as jnp

# Wang et al. (2004) SSIM constants; scikit-image's gaussian_weights=True gives the same window
# (sigma 1.5, truncate 3.5 -> radius 5 -> 11 taps).
SSIM_FILTER_SIZE = 11
SSIM_FILTER_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# ITU-R BT.601 luma for [0, 1] RGB, studio swing: Y in [16, 235] / 255 (MATLAB rgb2ycbcr).
_Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)
_Y_OFFSET = 16.0 / 255.0


def _check_pair(a: jax.Array, b: jax.Array, name: str) -> None:
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(
      f"{name} expects two NHWC batches (B, H, W, C) of equal shape, got {a.shape} and {b.shape}."
    )
  for x in (a, b):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(
        f"{name} expects float images in [0, 1], got dtype {x.dtype}; divide uint8 "
        "images by 255 first."
      )


def to_unit_range(images: jax.Array) -> jax.Array:
  """Model images in [-1, 1] -> metric images in [0, 1], clipped as a saved image would be."""
  return jnp.clip((images.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def rgb_to_y(images: jax.Array) -> jax.Array:
  """[0, 1] RGB (..., 3) -> BT.601 luma (..., 1) in [16/255, 235/255], for Y-channel metrics.

  Equals ``skimage.color.rgb2ycbcr(x)[..., :1] / 255`` and BasicSR's ``rgb2ycbcr(y_only=True)``.
  """
  if images.shape[-1] != 3:
    raise ValueError(f"rgb_to_y expects RGB images (..., 3), got shape {images.shape}.")
  y = jnp.tensordot(
    images,
    jnp.asarray(_Y_WEIGHTS, images.dtype),
    axes=([-1], [0]),
    precision=jax.lax.Precision.HIGHEST,
  )
  return (y + _Y_OFFSET)[..., None]


def psnr(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB per image, (B,): ``10 log10(range² / MSE)`` over H, W, C.

  Identical images give ``inf``. Matches ``skimage.metrics.peak_signal_noise_ratio``.
  """
  _check_pair(a, b, "psnr")
  # dm-pix assumes a range of 1; rescaling the images is the same as scaling the peak.
  return pix.psnr(a / data_range, b / data_range)


def ssim(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Mean SSIM per image, (B,): Gaussian window (σ 1.5, 11x11), K1 0.01, K2 0.03, per channel.

  This is dm-pix's SSIM, which is the same computation as ``skimage.metrics.
  structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=data_range, channel_axis=-1)``: dm-pix filters 'VALID' and scikit-image filters with
  reflection then crops the 5-pixel border, so both average the same (H-10) x (W-10) map, and
  both average the channels' maps equally. dm-pix additionally clips (co)variances made slightly
  negative by float32 cancellation; that only moves near-flat windows, by < 1e-5 on real photos.
  """
  _check_pair(a, b, "ssim")
  if min(a.shape[1:3]) < SSIM_FILTER_SIZE:
    raise ValueError(
      f"ssim needs images of at least {SSIM_FILTER_SIZE}x{SSIM_FILTER_SIZE} (the "
      f"Gaussian window), got {a.shape[1]}x{a.shape[2]}."
    )
  return pix.ssim(
    a,
    b,
    max_val=data_range,
    filter_size=SSIM_FILTER_SIZE,
    filter_sigma=SSIM_FILTER_SIGMA,
    k1=SSIM_K1,
    k2=SSIM_K2,
  )

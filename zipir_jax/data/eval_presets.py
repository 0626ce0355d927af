"""Fixed evaluation degradations of the paper, deterministic for a given seed.

``sr16`` / ``sr8``: bicubic down-sampling by 16 / 8 (Table 1). ``mix``: 8x down-sampling,
Gaussian blur σ=2, noise σ=40, JPEG q=50 (Table 1, "mixture degradation"). ``fig4``: 8x
down-sampling, blur σ=1, noise σ=15, JPEG q=65 (Fig. 4, Figs. 21-22). The numbers live in
``config.data.eval_presets`` (:func:`zipir_jax.data.defaults.get_eval_presets`).

The paper lists the steps as "8x downsampling, Gaussian blur, noise, JPEG" and that is the order
used here: blur and noise act on the LQ image, which is what makes the mixture "severe" (a σ=2 blur
before an anti-aliased 8x reduction would be nearly invisible). Down-sampling is anti-aliased
bicubic (PIL, like MATLAB's imresize used by SR benchmarks); LQ↑ is bicubic up-sampling back to the
HQ size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
from PIL import Image

from zipir_jax import errors
from zipir_jax.data import defaults, degradations


@dataclasses.dataclass(frozen=True)
class EvalPreset:
  """One fixed degradation; 0 disables blur, noise or JPEG."""

  scale: int
  blur_sigma: float = 0.0
  noise_sigma: float = 0.0  # in 8-bit levels.
  jpeg_quality: int = 0
  blur_radius_sigmas: float = 3.0  # kernel size 2*ceil(r*σ)+1.


def get_preset(
  preset: str | Mapping[str, Any] | EvalPreset, presets: Mapping[str, Any] | None = None
) -> EvalPreset:
  """Resolves a preset name (looked up in ``presets``, default the paper's) or a mapping."""
  if isinstance(preset, EvalPreset):
    return preset
  if isinstance(preset, str):
    presets = defaults.get_eval_presets() if presets is None else presets
    if preset not in presets:
      raise errors.ConfigError(
        f"eval_presets: unknown preset {preset!r}; known: {', '.join(sorted(presets.keys()))}"
      )
    preset = presets[preset]
  fields = {f.name for f in dataclasses.fields(EvalPreset)}
  values = {k: v for k, v in dict(preset).items() if k in fields}
  unknown = set(dict(preset)) - fields
  if unknown:
    raise ValueError(f"eval_presets: unknown fields {sorted(unknown)}; expected {sorted(fields)}")
  return EvalPreset(**values)


def bicubic_downsample(img: np.ndarray, scale: int) -> np.ndarray:
  """Anti-aliased bicubic reduction of a uint8 RGB image by an integer factor (exact size H/s)."""
  h, w = img.shape[:2]
  if h % scale or w % scale:
    raise ValueError(
      f"bicubic_downsample: image {h}x{w} is not divisible by scale {scale}; "
      f"crop it to a multiple of {scale} first (e.g. center_crop_to_multiple)"
    )
  pil = Image.fromarray(np.ascontiguousarray(img))
  return np.asarray(pil.resize((w // scale, h // scale), Image.Resampling.BICUBIC))


def gaussian_blur(img: np.ndarray, sigma: float, radius_sigmas: float = 3.0) -> np.ndarray:
  """Isotropic Gaussian blur of a float image, kernel 2*ceil(r*σ)+1, reflect borders."""
  size = 2 * int(math.ceil(radius_sigmas * sigma)) + 1
  return cv2.GaussianBlur(img, (size, size), sigma, borderType=cv2.BORDER_REFLECT_101)


def center_crop_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
  """Largest centred crop whose sides are multiples of ``multiple``."""
  h, w = img.shape[:2]
  ch, cw = h - h % multiple, w - w % multiple
  if ch == 0 or cw == 0:
    raise ValueError(f"center_crop_to_multiple: image {h}x{w} is smaller than {multiple}")
  top, left = (h - ch) // 2, (w - cw) // 2
  return img[top : top + ch, left : left + cw]


def make_eval_pair(
  hq: np.ndarray,
  preset: str | Mapping[str, Any] | EvalPreset,
  seed: int,
  *,
  presets: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Degrades a uint8 HxWx3 RGB image with a fixed preset; returns uint8 (lq, lq_up).

  Bit-identical for the same (image, preset, seed); noise is the only random step, so ``sr16`` and
  ``sr8`` do not depend on the seed at all.
  """
  if hq.dtype != np.uint8 or hq.ndim != 3 or hq.shape[2] != 3:
    raise ValueError(f"make_eval_pair: expected uint8 HxWx3 RGB, got {hq.dtype} {hq.shape}")
  p = get_preset(preset, presets)
  rng = np.random.default_rng(seed)
  lq = bicubic_downsample(hq, p.scale)
  if p.blur_sigma or p.noise_sigma or p.jpeg_quality:
    x = degradations.to_float(lq)
    if p.blur_sigma > 0:
      x = gaussian_blur(x, p.blur_sigma, p.blur_radius_sigmas)
    if p.noise_sigma > 0:
      x = degradations.add_gaussian_noise(x, rng, p.noise_sigma)
    lq = degradations.to_uint8(x)
    if p.jpeg_quality > 0:
      lq = degradations.jpeg_compress_uint8(lq, p.jpeg_quality)
  lq_up = degradations.upsample(lq, hq.shape[:2], "bicubic")
  return lq, lq_up

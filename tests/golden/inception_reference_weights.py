"""Deterministic random FID-Inception weights and test images, numpy only.

Shared by ``make_inception_golden.py`` (which loads the weights into pytorch-fid's FID Inception)
and ``tests/test_inception.py`` (which converts them for Flax), so the golden file stores only the
seed and the outputs, not 24M parameters or the input images. The key list is written out here
from torchvision's ``Inception3`` definition, independently of ``zipir_jax/models/inception.py``;
the golden script checks it against the torch model (``load_state_dict``: no missing or
unexpected keys, every shape equal).
"""

from __future__ import annotations

import hashlib

import numpy as np

GOLDEN_SEED = 20151205  # The date in ``pt_inception-2015-12-05``; any fixed value works.
NUM_CLASSES = 1008
BN_EPS = 1e-3

# Input cases: name -> (batch, height, width, seed). 64x80 is upsampled to 299, 299x299 is used
# as is, 347x411 is downsampled (where antialiasing would make a difference).
CASES = {
  "up64x80": (2, 64, 80, 1),
  "exact299": (1, 299, 299, 2),
  "down347x411": (1, 347, 411, 3),
}


def _conv(name: str, cin: int, cout: int, kernel: int | tuple[int, int]):
  kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
  return (name, cin, cout, kh, kw)


def _block_a(p: str, cin: int, pool: int):
  return [
    _conv(f"{p}.branch1x1", cin, 64, 1),
    _conv(f"{p}.branch5x5_1", cin, 48, 1),
    _conv(f"{p}.branch5x5_2", 48, 64, 5),
    _conv(f"{p}.branch3x3dbl_1", cin, 64, 1),
    _conv(f"{p}.branch3x3dbl_2", 64, 96, 3),
    _conv(f"{p}.branch3x3dbl_3", 96, 96, 3),
    _conv(f"{p}.branch_pool", cin, pool, 1),
  ]


def _block_b(p: str, cin: int):
  return [
    _conv(f"{p}.branch3x3", cin, 384, 3),
    _conv(f"{p}.branch3x3dbl_1", cin, 64, 1),
    _conv(f"{p}.branch3x3dbl_2", 64, 96, 3),
    _conv(f"{p}.branch3x3dbl_3", 96, 96, 3),
  ]


def _block_c(p: str, cin: int, c7: int):
  return [
    _conv(f"{p}.branch1x1", cin, 192, 1),
    _conv(f"{p}.branch7x7_1", cin, c7, 1),
    _conv(f"{p}.branch7x7_2", c7, c7, (1, 7)),
    _conv(f"{p}.branch7x7_3", c7, 192, (7, 1)),
    _conv(f"{p}.branch7x7dbl_1", cin, c7, 1),
    _conv(f"{p}.branch7x7dbl_2", c7, c7, (7, 1)),
    _conv(f"{p}.branch7x7dbl_3", c7, c7, (1, 7)),
    _conv(f"{p}.branch7x7dbl_4", c7, c7, (7, 1)),
    _conv(f"{p}.branch7x7dbl_5", c7, 192, (1, 7)),
    _conv(f"{p}.branch_pool", cin, 192, 1),
  ]


def _block_d(p: str, cin: int):
  return [
    _conv(f"{p}.branch3x3_1", cin, 192, 1),
    _conv(f"{p}.branch3x3_2", 192, 320, 3),
    _conv(f"{p}.branch7x7x3_1", cin, 192, 1),
    _conv(f"{p}.branch7x7x3_2", 192, 192, (1, 7)),
    _conv(f"{p}.branch7x7x3_3", 192, 192, (7, 1)),
    _conv(f"{p}.branch7x7x3_4", 192, 192, 3),
  ]


def _block_e(p: str, cin: int):
  return [
    _conv(f"{p}.branch1x1", cin, 320, 1),
    _conv(f"{p}.branch3x3_1", cin, 384, 1),
    _conv(f"{p}.branch3x3_2a", 384, 384, (1, 3)),
    _conv(f"{p}.branch3x3_2b", 384, 384, (3, 1)),
    _conv(f"{p}.branch3x3dbl_1", cin, 448, 1),
    _conv(f"{p}.branch3x3dbl_2", 448, 384, 3),
    _conv(f"{p}.branch3x3dbl_3a", 384, 384, (1, 3)),
    _conv(f"{p}.branch3x3dbl_3b", 384, 384, (3, 1)),
    _conv(f"{p}.branch_pool", cin, 192, 1),
  ]


# (torch module path, in channels, out channels, kernel h, kernel w) of every BasicConv2d.
BASIC_CONVS = (
  [
    _conv("Conv2d_1a_3x3", 3, 32, 3),
    _conv("Conv2d_2a_3x3", 32, 32, 3),
    _conv("Conv2d_2b_3x3", 32, 64, 3),
    _conv("Conv2d_3b_1x1", 64, 80, 1),
    _conv("Conv2d_4a_3x3", 80, 192, 3),
  ]
  + _block_a("Mixed_5b", 192, 32)
  + _block_a("Mixed_5c", 256, 64)
  + _block_a("Mixed_5d", 288, 64)
  + _block_b("Mixed_6a", 288)
  + _block_c("Mixed_6b", 768, 128)
  + _block_c("Mixed_6c", 768, 160)
  + _block_c("Mixed_6d", 768, 160)
  + _block_c("Mixed_6e", 768, 192)
  + _block_d("Mixed_7a", 768)
  + _block_e("Mixed_7b", 1280)
  + _block_e("Mixed_7c", 2048)
)


def state_dict(seed: int = GOLDEN_SEED) -> dict[str, np.ndarray]:
  """The ``pt_inception-2015-12-05`` keys and shapes, with seeded random float32 values.

  Kernels are He-normal so activations stay O(1) through the ~50 layers. BatchNorm gets running
  statistics and affine terms far enough from (0, 1) that a port which skipped or mis-folded BN
  would fail; they are not matched to the activations, so a small gain keeps the scale stable.
  """
  rng = np.random.default_rng(seed)
  state = {}
  for name, cin, cout, kh, kw in BASIC_CONVS:
    std = np.sqrt(2.0 / (cin * kh * kw))
    state[f"{name}.conv.weight"] = (rng.standard_normal((cout, cin, kh, kw)) * std).astype(
      np.float32
    )
    state[f"{name}.bn.weight"] = rng.uniform(0.6, 1.4, cout).astype(np.float32)
    state[f"{name}.bn.bias"] = (rng.standard_normal(cout) * 0.2).astype(np.float32)
    state[f"{name}.bn.running_mean"] = (rng.standard_normal(cout) * 0.2).astype(np.float32)
    state[f"{name}.bn.running_var"] = rng.uniform(0.5, 2.0, cout).astype(np.float32)
  state["fc.weight"] = (rng.standard_normal((NUM_CLASSES, 2048)) * 0.02).astype(np.float32)
  state["fc.bias"] = np.zeros(NUM_CLASSES, np.float32)
  return state


def images(name: str) -> np.ndarray:
  """Test images of ``CASES[name]``: NHWC float32 in [0, 1], exact multiples of 1/255.

  Smooth colour gradients and blobs plus pixel noise, so both the resize (fine detail) and the
  network (structure) are exercised.
  """
  batch, height, width, seed = CASES[name]
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
  out = []
  for _ in range(batch):
    freq = rng.uniform(1, 6, (3, 2))
    phase = rng.uniform(0, 2 * np.pi, 3)
    smooth = np.stack(
      [0.5 + 0.35 * np.sin(2 * np.pi * (f[0] * yy + f[1] * xx) + p) for f, p in zip(freq, phase)],
      axis=-1,
    )
    noise = rng.integers(-40, 41, (height, width, 3)) / 255.0
    out.append(np.round(np.clip(smooth + noise, 0, 1) * 255))
  return (np.stack(out) / 255.0).astype(np.float32)


def images_digest(x: np.ndarray) -> str:
  """SHA-256 of the test images, stored in the golden file to detect a changed numpy RNG."""
  return hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes()).hexdigest()

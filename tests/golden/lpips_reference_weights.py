"""Deterministic random VGG16 trunk weights in torchvision layout, numpy only.

Shared by ``make_lpips_golden.py`` (which loads them into the torch reference) and
``tests/test_lpips.py`` (which converts them for Flax), so the golden file needs to store only the
seed, not 14.7M parameters. The real ImageNet trunk is not needed to check that the port computes
the same function: any weights exercise the same code paths.
"""

from __future__ import annotations

import numpy as np

# (torchvision ``features`` index, in channels, out channels) of the 13 VGG16 convs.
VGG16_CONVS = (
  (0, 3, 64),
  (2, 64, 64),
  (5, 64, 128),
  (7, 128, 128),
  (10, 128, 256),
  (12, 256, 256),
  (14, 256, 256),
  (17, 256, 512),
  (19, 512, 512),
  (21, 512, 512),
  (24, 512, 512),
  (26, 512, 512),
  (28, 512, 512),
)

GOLDEN_SEED = 20180111  # LPIPS arXiv date; any fixed value works.


def vgg16_state_dict(seed: int = GOLDEN_SEED) -> dict[str, np.ndarray]:
  """``features.{i}.weight`` (OIHW) and ``features.{i}.bias`` as float32 numpy arrays.

  Kernels are He-normal (std sqrt(2 / fan_in)) so ReLU activations stay O(1) through 13 layers;
  biases are small so that they matter without dominating.
  """
  rng = np.random.default_rng(seed)
  state = {}
  for idx, cin, cout in VGG16_CONVS:
    std = np.sqrt(2.0 / (cin * 9))
    state[f"features.{idx}.weight"] = (rng.standard_normal((cout, cin, 3, 3)) * std).astype(
      np.float32
    )
    state[f"features.{idx}.bias"] = (rng.standard_normal(cout) * 0.05).astype(np.float32)
  return state


def decode_images(x: np.ndarray) -> np.ndarray:
  """Stored uint8 images -> float32 in [-1, 1]; both the reference and the test use this."""
  if x.dtype != np.uint8:
    raise ValueError(f"golden images must be uint8, found {x.dtype}")
  return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def encode_images(x: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 (the golden file stores images quantised, to stay small)."""
  return np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)

"""The demo's and learning benchmark's photo split (held-out photos are never trained on), and the
learning benchmark's closed-form references."""

import itertools
import sys

import cv2
import numpy as np
from conftest import ROOT

from zipir_jax import demo

sys.path.insert(0, str(ROOT / "bench"))
import learning

SIDE = 64  # every photo's centre square at this size: identical photos agree to rounding


def _thumbnail(package: str, name: str) -> np.ndarray:
  photo = demo.load_photo(package, name)
  assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3, (name, photo.shape)
  return demo.center_crop(photo, SIDE).astype(np.float64) / 255.0


def test_no_held_out_photo_is_a_training_photo():
  # skimage's cat() *is* chelsea(): a split by name alone once evaluated on a training photo.
  train = {key: _thumbnail(*key) for key in demo.TRAIN_PHOTOS}
  for held, trained in itertools.product(demo.HELDOUT_PHOTOS, train):
    mse = np.mean((_thumbnail(*held) - train[trained]) ** 2)
    assert mse > 1e-3, f"held-out {held} is the training photo {trained} (MSE {mse:.2e})"
  assert not set(demo.HELDOUT_PHOTOS) & set(demo.TRAIN_PHOTOS)


def test_block_pca_references_agree_with_direct_computations():
  """The learning table's z_macro and linear-code rows: an exact inverse, a code as wide as its data
  exact,
  z_macro as OpenCV's area shrink + bicubic, and 64 numbers per block beating z_macro's 3."""
  train = [demo.load_photo(*key) for key in list(demo.TRAIN_PHOTOS)[:3]]
  coffee = demo.center_crop(demo.load_photo("skimage", "coffee"), 128)
  hq = coffee[None].astype(np.float32) / 255.0
  rows = learning.blocks(hq)
  assert rows.shape == (16, 32 * 32 * 3)
  np.testing.assert_array_equal(learning.unblocks(rows, hq.shape), hq)
  np.testing.assert_array_equal(rows[1].reshape(32, 32, 3), hq[0, :32, 32:64])  # row-major blocks

  mean, basis = learning.fit_block_pca([coffee], k=16)  # as many as its blocks: exact
  coded = (rows - mean) @ basis.T @ basis + mean
  np.testing.assert_allclose(coded, rows, atol=1e-6)

  scores = learning.reference_scores(hq, train, crop=64)
  small = cv2.resize(coffee, (4, 4), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
  macro = np.clip(cv2.resize(small, (128, 128), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
  direct = 10 * np.log10(1.0 / np.mean((macro - hq[0]) ** 2))
  assert abs(scores[learning.Z_MACRO]["psnr"] - direct) < 0.05
  assert scores[learning.BLOCK_PCA]["psnr"] > scores[learning.Z_MACRO]["psnr"] + 3.0

"""The demo's and learning benchmark's photo split: held-out photos are never trained on."""

import itertools

import numpy as np

from zipir_jax import demo

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

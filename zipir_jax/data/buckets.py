"""Multi-resolution, multi-aspect buckets (§3.2: "we mix crop patches ranging from 512² to 4096²").

A bucket is a crop size with its own batch size. An image may only land in a bucket it covers
(both sides at least the bucket's): crops are never up-sampled. Under the ``downscale`` policy the
image is first shrunk by a random factor between "just covers the bucket" and 1 (log-uniform), so
large photos also give whole-scene crops at small buckets; under ``crop`` a bucket always sees
native-resolution pixels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from zipir_jax import errors

POLICIES = ("downscale", "crop")


@dataclasses.dataclass(frozen=True)
class Bucket:
  """A crop size; ``batch_size`` is per process."""

  height: int
  width: int
  batch_size: int

  @property
  def name(self) -> str:
    return f"{self.height}x{self.width}"

  def fits(self, image_hw: tuple[int, int]) -> bool:
    """Whether an image of ``image_hw`` covers this bucket without up-sampling."""
    return image_hw[0] >= self.height and image_hw[1] >= self.width


def parse_buckets(buckets: Sequence[Sequence[int]], process_count: int = 1) -> tuple[Bucket, ...]:
  """(height, width, global batch) triples → per-process :class:`Bucket`s, validated."""
  if not buckets:
    raise errors.ConfigError(
      "config.data.buckets is empty; expected (height, width, batch size) triples"
    )
  parsed = []
  for entry in buckets:
    if len(entry) != 3:
      raise errors.ConfigError(
        f"config.data.buckets: entry {tuple(entry)} is not (height, width, batch)"
      )
    h, w, b = (int(v) for v in entry)
    if h < 1 or w < 1 or b < 1:
      raise errors.ConfigError(f"config.data.buckets: entry {(h, w, b)} must be positive")
    if b % process_count:
      raise errors.ConfigError(
        f"config.data.buckets: batch size {b} of bucket {h}x{w} is not "
        f"divisible by the process count {process_count}"
      )
    parsed.append(Bucket(h, w, b // process_count))
  if len({(b.height, b.width) for b in parsed}) != len(parsed):
    raise errors.ConfigError(
      f"config.data.buckets: duplicate sizes in {tuple(map(tuple, buckets))}"
    )
  return tuple(parsed)


def bucket_weights(weights: Sequence[float], num_buckets: int) -> tuple[float, ...]:
  """Relative batch frequency per bucket; () means all equal."""
  if not weights:
    return (1.0,) * num_buckets
  if len(weights) != num_buckets or any(w <= 0 for w in weights):
    raise errors.ConfigError(
      f"config.data.bucket_weights: expected {num_buckets} positive "
      f"weights (one per bucket) or (), got {tuple(weights)}"
    )
  return tuple(float(w) for w in weights)


def covers_any(buckets: Sequence[Bucket], image_hw: tuple[int, int]) -> bool:
  return any(b.fits(image_hw) for b in buckets)


def sample_resize_scale(
  rng: np.random.Generator, image_hw: tuple[int, int], bucket: Bucket, policy: str
) -> float:
  """Factor the image is shrunk by before cropping: log-uniform in [just-covers, 1], or 1."""
  if policy not in POLICIES:
    raise errors.ConfigError(
      f"config.data.bucket_policy: unknown policy {policy!r}; expected {POLICIES}"
    )
  if policy == "crop":
    return 1.0
  s_min = max(bucket.height / image_hw[0], bucket.width / image_hw[1])
  if s_min >= 1.0:
    return 1.0
  return float(math.exp(rng.uniform(math.log(s_min), 0.0)))


def resized_size(image_hw: tuple[int, int], scale: float, bucket: Bucket) -> tuple[int, int]:
  """Image size after shrinking by ``scale``, never below the bucket."""
  return (
    max(bucket.height, int(round(image_hw[0] * scale))),
    max(bucket.width, int(round(image_hw[1] * scale))),
  )


def random_crop_origin(
  rng: np.random.Generator, image_hw: tuple[int, int], bucket: Bucket
) -> tuple[int, int]:
  """Uniform (top, left) of a bucket-sized crop inside the image."""
  top = int(rng.integers(0, image_hw[0] - bucket.height + 1))
  left = int(rng.integers(0, image_hw[1] - bucket.width + 1))
  return top, left

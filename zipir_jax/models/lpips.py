"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 trunk, version 0.1, in Flax.

This is a port of ``lpips.LPIPS(net='vgg', version='0.1')`` in evaluation mode (no dropout): it is
used as a perceptual loss for the VAEs and as an evaluation metric, so it must reproduce the
reference numbers, not just resemble them. Convolutions run in float32 with HIGHEST precision.

Weights come from two files: a torchvision VGG16 state dict (the ImageNet trunk) and the
calibrated linear heads shipped inside the ``lpips`` package (``weights/v0.1/vgg.pth``). Both are
read without torch by :mod:`zipir_jax.weights`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zipir_jax import weights as weights_lib

# Output channels of the convs in each VGG16 block; the last conv of a block is an LPIPS tap.
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = (
  (64, 64),
  (128, 128),
  (256, 256, 256),
  (512, 512, 512),
  (512, 512, 512),
)
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
TAP_CHANNELS = tuple(block[-1] for block in VGG16_BLOCKS)
# Indices of the convs inside torchvision's ``vgg16().features`` Sequential.
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# The lpips package splits ``features`` into five slices; slice k holds these feature indices.
_LPIPS_SLICE_STARTS = (0, 4, 9, 16, 23)

# lpips.ScalingLayer: maps [-1, 1] images to (approximately) ImageNet-normalised inputs.
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_NORM_EPS = 1e-10
# Smallest side for which relu5_3 (after four 2x2 pools) is non-empty.
MIN_SIZE = 16

_PRECISION = jax.lax.Precision.HIGHEST


def conv_names() -> list[str]:
  """Flax names of the 13 convs, ``conv{block}_{layer}`` as in the VGG paper."""
  return [f"conv{b + 1}_{i + 1}" for b, block in enumerate(VGG16_BLOCKS) for i in range(len(block))]


class VGG16Features(nn.Module):
  """torchvision ``vgg16().features`` up to relu5_3; returns the five LPIPS taps (NHWC)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    taps = []
    for b, block in enumerate(VGG16_BLOCKS):
      if b > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for i, channels in enumerate(block):
        x = nn.Conv(
          channels,
          (3, 3),
          padding=((1, 1), (1, 1)),
          dtype=jnp.float32,
          param_dtype=jnp.float32,
          precision=_PRECISION,
          name=f"conv{b + 1}_{i + 1}",
        )(x)
        x = nn.relu(x)
      taps.append(x)
    return tuple(taps)


def normalize_channels(x: jax.Array, eps: float = _NORM_EPS) -> jax.Array:
  """lpips ``normalize_tensor``: ``x / (||x||_2 over channels + eps)``.

  The norm's gradient is taken as 0 where the feature vector is exactly zero (common after ReLU)
  instead of the NaN that a plain ``sqrt`` gives; the forward value is unchanged.
  """
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return x / (norm + eps)


class LPIPS(nn.Module):
  """LPIPS-VGG v0.1 distance between two batches of NHWC images in [-1, 1]; returns shape (B,)."""

  @nn.compact
  def __call__(
    self, x0: jax.Array, x1: jax.Array, *, per_tap: bool = False
  ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
    """Returns the distance (B,), and with ``per_tap`` also the five per-tap terms (each (B,))."""
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
      raise ValueError(
        f"LPIPS expects two NHWC RGB batches of equal shape, got {x0.shape} and {x1.shape}."
      )
    if min(x0.shape[1:3]) < MIN_SIZE:
      raise ValueError(
        f"LPIPS-VGG needs images of at least {MIN_SIZE}x{MIN_SIZE} (four 2x2 "
        f"pools), got {x0.shape[1]}x{x0.shape[2]}."
      )
    batch = x0.shape[0]
    x = jnp.concatenate([x0, x1], axis=0).astype(jnp.float32)
    x = (x - _SHIFT) / _SCALE
    feats = VGG16Features(name="vgg")(x)
    terms = []
    for k, f in enumerate(feats):
      f = normalize_channels(f)
      diff = jnp.square(f[:batch] - f[batch:])
      head = nn.Dense(
        1,
        use_bias=False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        precision=_PRECISION,
        name=f"lin{k}",
      )
      terms.append(jnp.mean(head(diff), axis=(1, 2, 3)))
    total = sum(terms[1:], terms[0])
    return (total, tuple(terms)) if per_tap else total


# ------------------------------------------------------------------------------------------------
# Weight conversion from PyTorch layouts.
# ------------------------------------------------------------------------------------------------


def _vgg_key_prefixes(state_dict: Mapping[str, Any]) -> list[str]:
  """Key prefix of each conv: torchvision ``features.{i}`` or lpips ``net.slice{k}.{i}``."""
  if any(k.startswith("net.slice") for k in state_dict):
    prefixes = []
    for idx in TORCHVISION_CONV_INDICES:
      s = sum(1 for start in _LPIPS_SLICE_STARTS if idx >= start)
      prefixes.append(f"net.slice{s}.{idx}")
    return prefixes
  return [f"features.{idx}" for idx in TORCHVISION_CONV_INDICES]


def convert_vgg16(state_dict: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """torchvision VGG16 (or lpips ``net.slice*``) state dict -> ``VGG16Features`` params.

  Conv kernels go from OIHW to HWIO; the classifier and any other keys are ignored.
  """
  params = {}
  in_channels = 3
  prefixes = _vgg_key_prefixes(state_dict)
  channels = [c for block in VGG16_BLOCKS for c in block]
  for name, prefix, out_channels in zip(conv_names(), prefixes, channels):
    w = weights_lib.tensor(
      state_dict, f"{prefix}.weight", (out_channels, in_channels, 3, 3), "VGG16"
    )
    b = weights_lib.tensor(state_dict, f"{prefix}.bias", (out_channels,), "VGG16")
    params[name] = {"kernel": np.transpose(w, (2, 3, 1, 0)), "bias": b}
    in_channels = out_channels
  return params


def convert_heads(state_dict: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """lpips ``vgg.pth`` (``lin{k}.model.1.weight``, (1, C, 1, 1)) -> ``lin{k}`` Dense params."""
  params = {}
  for k, channels in enumerate(TAP_CHANNELS):
    w = weights_lib.tensor(state_dict, f"lin{k}.model.1.weight", (1, channels, 1, 1), "LPIPS heads")
    params[f"lin{k}"] = {"kernel": w.reshape(1, channels).T}
  return params


def convert(
  vgg16_state_dict: Mapping[str, Any], heads_state_dict: Mapping[str, Any]
) -> dict[str, Any]:
  """Both state dicts -> the ``{'params': ...}`` variables of :class:`LPIPS`."""
  return {"params": {"vgg": convert_vgg16(vgg16_state_dict), **convert_heads(heads_state_dict)}}


def load(
  vgg16_path: weights_lib.PathLike, heads_path: weights_lib.PathLike | None = None
) -> dict[str, Any]:
  """Reads the VGG16 trunk and the LPIPS heads (default: those in the lpips package) from disk."""
  if heads_path is None:
    heads_path = weights_lib.lpips_heads_path()
  variables = convert(
    weights_lib.load_state_dict(vgg16_path), weights_lib.load_state_dict(heads_path)
  )
  return jax.tree_util.tree_map(jnp.asarray, variables)

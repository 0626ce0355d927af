"""The DiT's latent space: image -> normalised latent and back (§3.1 -> §3.2).

The DiT sees the VAE latent normalised per channel with statistics measured on training data
(``latent_stats = {'mean', 'std'}``, one value per latent channel, stored with every export and
bundle). These are the only functions that apply or undo that normalisation, so training (the
dit stage's step and its previews) and restoration cannot disagree about it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

Array = jax.Array


def normalize(z: Array, stats: Mapping[str, Array]) -> Array:
  """VAE latent -> the DiT's latent: (z - mean) / std per channel."""
  return (z - stats["mean"]) / stats["std"]


def denormalize(z: Array, stats: Mapping[str, Array]) -> Array:
  """The DiT's latent -> VAE latent: z * std + mean per channel."""
  return z * stats["std"] + stats["mean"]


def encode(
  vae: Any, encoder_params: Mapping[str, Any], image: Array, stats: Mapping[str, Array]
) -> Array:
  """Image in [-1, 1] (B, H, W, 3) -> normalised latent (B, H/f, W/f, C), the posterior mode.

  ``encoder_params`` holds the encoder sub-networks only (E_c and E_f, or the SD-VAE's encoder).
  """
  z, _ = vae.apply({"params": dict(encoder_params)}, image, method="encode")
  return normalize(z, stats)


def decode(
  pixel_decoder: Any,
  decoder_params: Any,
  z: Array,
  lq_up: Array,
  stats: Mapping[str, Array],
  fusion_weight: float | Array = 1.0,
) -> Array:
  """Normalised latent -> image in [-1, 1] by D_f*(z, LQ↑) (the plain decoder without fusion)."""
  return pixel_decoder.apply(
    {"params": decoder_params}, denormalize(z, stats), lq_up, fusion_weight
  )

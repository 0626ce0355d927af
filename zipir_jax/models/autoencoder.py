"""Builds the autoencoder networks of an experiment config (``config.vae`` and friends).

The one place that maps config fields onto module attributes, so that training, restoration, the
summary and tests all build identical networks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from zipir_jax import errors
from zipir_jax.models.discriminator import PatchDiscriminator
from zipir_jax.models.lpvae import LPVAE
from zipir_jax.models.pixel_decoder import PixelAwareDecoder
from zipir_jax.models.sdvae import SDVAE

VAE_KINDS = ("lpvae", "sdvae")


def compute_dtype(name: str) -> jnp.dtype:
  """'float32' | 'bfloat16' | 'float16' -> dtype, with a clear error otherwise."""
  valid = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if name not in valid:
    raise errors.ConfigError(f"unknown dtype {name!r}; valid: {', '.join(valid)}")
  return valid[name]


def build_autoencoder(config: ml_collections.ConfigDict, dtype: str | None = None) -> LPVAE | SDVAE:
  """The experiment's VAE: the LP-VAE (§3.1) or the f32c64 SD-VAE baseline (Table 4).

  ``dtype`` overrides ``config.vae.dtype`` (the frozen encoders run at ``vae.frozen_dtype``).
  """
  vae = config.vae
  dtype = compute_dtype(dtype or vae.dtype)
  if vae.kind == "lpvae":
    return LPVAE(
      ch=vae.ch,
      coarse_ch_mult=tuple(vae.coarse_ch_mult),
      fine_ch_mult=tuple(vae.fine_ch_mult),
      num_res_blocks=vae.num_res_blocks,
      coarse_channels=vae.coarse_channels,
      fine_channels=vae.fine_channels,
      num_groups=vae.num_groups,
      init_logvar=vae.get("init_logvar", 0.0),  # initialisation only: old bundles lack it
      dtype=dtype,
    )
  if vae.kind == "sdvae":
    return SDVAE(
      ch=vae.ch,
      ch_mult=tuple(vae.ch_mult),
      num_res_blocks=vae.num_res_blocks,
      z_channels=vae.z_channels,
      mid_attention=vae.mid_attention,
      num_groups=vae.num_groups,
      init_logvar=vae.get("init_logvar", 0.0),  # initialisation only: old bundles lack it
      dtype=dtype,
    )
  raise errors.ConfigError(f"config.vae.kind={vae.kind!r}; valid kinds: {', '.join(VAE_KINDS)}")


def build_pixel_decoder(config: ml_collections.ConfigDict) -> PixelAwareDecoder:
  """D_f*: its extractor mirrors the autoencoder's full-resolution encoder (E_f for the LP-VAE)."""
  vae = config.vae
  lpvae = vae.kind == "lpvae"
  return PixelAwareDecoder(
    ch=vae.ch,
    ch_mult=tuple(vae.fine_ch_mult if lpvae else vae.ch_mult),
    num_res_blocks=vae.num_res_blocks,
    encoder_out_channels=vae.fine_channels if lpvae else vae.z_channels,
    fusion_levels=tuple(config.pixel_decoder.fusion_levels),
    mid_attention=False if lpvae else vae.mid_attention,
    num_groups=vae.num_groups,
    dtype=compute_dtype(vae.dtype),
  )


def build_discriminator(config: ml_collections.ConfigDict) -> PatchDiscriminator:
  return PatchDiscriminator(
    ch=config.discriminator.ch,
    num_layers=config.discriminator.num_layers,
    dtype=compute_dtype(config.vae.dtype),
  )


def init_autoencoder(module: LPVAE | SDVAE, rng: jax.Array, image_shape: Sequence[int]) -> dict:
  """Unboxed parameters of every sub-network for images of ``image_shape`` (NHWC).

  Jitted: op-by-op, the forward pass that ``init`` traces through every sub-network dispatches
  hundreds of small programs (twice the time on CPU); the values are the same.
  """
  init = jax.jit(functools.partial(module.init, method="init_all"))
  variables = init(rng, jnp.zeros(image_shape, jnp.float32))
  return nn.meta.unbox(variables)["params"]

"""Latent Pyramid VAE, LP-VAE (§3.1, supp. A).

Three levels compress an image I (H x W, multiples of 32) into a 64-channel latent at H/32 x W/32:

* ``z_macro  = (I↓32 - μ) / σ``              3 channels, μ/σ the training data's RGB statistics,
* ``z_coarse = E_c(I↓4)``                     9 channels, E_c with mult [1, 2, 4, 4],
* ``z_fine   = E_f(I)``                       52 channels, E_f with mult [1, 2, 4, 4, 4, 4],

concatenated as ``z = [z_macro | z_coarse | z_fine]``. D_c decodes ``[z_macro | z_coarse]`` (12 ch) to
I↓4 and is used only while training E_c (stage ``vae_coarse``); D_f decodes all 64 channels to I.

μ and σ are parameters of the ``macro`` sub-network, never trained: stage ``vae_coarse`` measures
them on its data before its first step and every later export and bundle carries them, like the
latent statistics. Until then they are ImageNet's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zipir_jax.models.vae_blocks import Decoder, DiagonalGaussian, Encoder

Array = jax.Array
MACRO_CHANNELS = 3


def check_spatial_shape(shape: Sequence[int], multiple: int, what: str = "image") -> None:
  """Raises a ValueError unless ``shape`` is (B, H, W, C) with H and W multiples of ``multiple``."""
  if len(shape) != 4:
    raise ValueError(
      f"{what} must be NHWC (batch, height, width, channels); got shape {tuple(shape)}"
    )
  _, h, w, _ = shape
  if h % multiple or w % multiple or h == 0 or w == 0:
    raise ValueError(
      f"{what} of shape {tuple(shape)}: height and width must be positive multiples of "
      f"{multiple} (got {h} x {w}); pad the image first (the restore path pads and crops back)"
    )


def area_downsample(image: Array, factor: int) -> Array:
  """Exact area (box) down-sampling by an integer factor: the mean of each factor x factor cell."""
  b, h, w, c = image.shape
  check_spatial_shape(image.shape, factor)
  return image.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


# RGB statistics of ImageNet in the model's [-1, 1] pixel range: z_macro's μ/σ before a
# vae_coarse run replaces them with its training data's.
IMAGENET_MEAN = (2 * 0.485 - 1, 2 * 0.456 - 1, 2 * 0.406 - 1)
IMAGENET_STD = (2 * 0.229, 2 * 0.224, 2 * 0.225)


def macro_latent(image: Array, mean: Array, std: Array, factor: int = 32) -> Array:
  """z_macro = (I↓32 - μ) / σ with the dataset's RGB statistics (§3.1)."""
  down = area_downsample(image.astype(jnp.float32), factor)
  return (down - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


class MacroLevel(nn.Module):
  """z_macro's statistics as (untrained) parameters ``mean`` and ``std``, one per RGB channel."""

  factor: int = 32

  @nn.compact
  def __call__(self, image: Array) -> Array:
    def constant(values):
      init = lambda _, shape, dtype=jnp.float32: jnp.asarray(values, dtype).reshape(shape)
      return nn.with_logical_partitioning(init, ("norm",))

    mean = self.param("mean", constant(IMAGENET_MEAN), (MACRO_CHANNELS,))
    std = self.param("std", constant(IMAGENET_STD), (MACRO_CHANNELS,))
    return macro_latent(image, mean, std, self.factor)


class LPVAE(nn.Module):
  """E_c, E_f, D_c, D_f and the macro level (μ/σ only).

  Methods (use with ``module.apply(params, ..., method=...)``): ``encode``, ``encode_coarse``,
  ``decode``, ``decode_coarse``; ``__call__`` is encode + decode; ``init_all`` creates every
  sub-network's parameters.
  """

  ch: int = 128
  coarse_ch_mult: Sequence[int] = (1, 2, 4, 4)
  fine_ch_mult: Sequence[int] = (1, 2, 4, 4, 4, 4)
  num_res_blocks: int = 2
  coarse_channels: int = 9
  fine_channels: int = 52
  num_groups: int = 32
  init_logvar: float = 0.0  # the encoders' initial log-variance (Encoder's docstring)
  dtype: Any = jnp.float32

  @property
  def factor(self) -> int:
    """Spatial compression: 2^(levels of E_f - 1) = 32 for the paper's f32c64."""
    return 2 ** (len(self.fine_ch_mult) - 1)

  @property
  def coarse_input_factor(self) -> int:
    """E_c sees I↓(factor / E_c's own compression) = I↓4 in the paper."""
    return self.factor // 2 ** (len(self.coarse_ch_mult) - 1)

  @property
  def latent_channels(self) -> int:
    return MACRO_CHANNELS + self.coarse_channels + self.fine_channels

  def setup(self):
    if self.coarse_input_factor < 1 or self.factor % 2 ** (len(self.coarse_ch_mult) - 1):
      raise ValueError(
        f"E_c mult {tuple(self.coarse_ch_mult)} compresses more than E_f mult "
        f"{tuple(self.fine_ch_mult)}; the coarse latent must match H/{self.factor}"
      )
    common = dict(
      ch=self.ch, num_res_blocks=self.num_res_blocks, num_groups=self.num_groups, dtype=self.dtype
    )
    self.macro = MacroLevel(self.factor)
    encoder = dict(init_logvar=self.init_logvar, **common)
    self.coarse_encoder = Encoder(
      ch_mult=self.coarse_ch_mult, out_channels=self.coarse_channels, **encoder
    )
    self.fine_encoder = Encoder(
      ch_mult=self.fine_ch_mult, out_channels=self.fine_channels, **encoder
    )
    self.coarse_decoder = Decoder(ch_mult=self.coarse_ch_mult, **common)
    self.fine_decoder = Decoder(ch_mult=self.fine_ch_mult, **common)

  def encode_coarse(
    self, image: Array, rng: Array | None = None
  ) -> tuple[Array, dict[str, DiagonalGaussian]]:
    """I -> [z_macro | z_coarse] (12 channels); samples the posterior when ``rng`` is given."""
    check_spatial_shape(image.shape, self.factor)
    posterior = DiagonalGaussian.from_moments(
      self.coarse_encoder(area_downsample(image, self.coarse_input_factor))
    )
    z_coarse = posterior.mode() if rng is None else posterior.sample(rng)
    z_macro = self.macro(image)
    return jnp.concatenate([z_macro, z_coarse], axis=-1), {"coarse": posterior}

  def encode(
    self, image: Array, rng: Array | None = None
  ) -> tuple[Array, dict[str, DiagonalGaussian]]:
    """I -> z = [z_macro | z_coarse | z_fine] (64 channels at H/32 x W/32)."""
    rng_coarse, rng_fine = (None, None) if rng is None else jax.random.split(rng)
    z12, posteriors = self.encode_coarse(image, rng_coarse)
    posteriors["fine"] = DiagonalGaussian.from_moments(self.fine_encoder(image))
    z_fine = posteriors["fine"].mode() if rng is None else posteriors["fine"].sample(rng_fine)
    return jnp.concatenate([z12, z_fine], axis=-1), posteriors

  def decode_coarse(self, z12: Array) -> Array:
    """D_c: [z_macro | z_coarse] -> I↓4 (training stage ``vae_coarse`` only)."""
    return self.coarse_decoder(z12)

  def decode(self, z: Array) -> Array:
    """D_f: the 64-channel latent -> I."""
    if z.shape[-1] != self.latent_channels:
      raise ValueError(
        f"D_f expects a latent with {self.latent_channels} channels "
        f"[macro {MACRO_CHANNELS} | coarse {self.coarse_channels} | fine "
        f"{self.fine_channels}]; got shape {tuple(z.shape)}"
      )
    return self.fine_decoder(z)

  def __call__(
    self, image: Array, rng: Array | None = None
  ) -> tuple[Array, Array, dict[str, DiagonalGaussian]]:
    """Reconstruction through the full pyramid: returns (D_f(z), z, posteriors)."""
    z, posteriors = self.encode(image, rng)
    return self.decode(z), z, posteriors

  def init_all(self, image: Array) -> Array:
    """Touches every sub-network so ``init(..., method='init_all')`` creates all parameters."""
    z, _ = self.encode(image)
    return self.decode(z), self.decode_coarse(z[..., : MACRO_CHANNELS + self.coarse_channels])

"""The f32c64 SD-VAE ablation baseline (Table 4, supp. A).

"Modified from the LDM baseline, using z_channels = 64 and ch_mult = [1, 2, 4, 4, 4, 4]": one encoder
on the full image and one decoder, with LDM's middle attention kept (``mid_attention``). Same
interface as :class:`~zipir_jax.models.lpvae.LPVAE` (``encode``/``decode``/``__call__``/``init_all``),
so every later stage can swap it in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zipir_jax.models.lpvae import check_spatial_shape
from zipir_jax.models.vae_blocks import Decoder, DiagonalGaussian, Encoder

Array = jax.Array


class SDVAE(nn.Module):
  """Single-encoder KL autoencoder, f = 2^(len(ch_mult) - 1), ``z_channels`` latent channels."""

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 64
  mid_attention: bool = True
  num_groups: int = 32
  init_logvar: float = 0.0  # the encoders' initial log-variance (Encoder's docstring)
  dtype: Any = jnp.float32

  @property
  def factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def latent_channels(self) -> int:
    return self.z_channels

  def setup(self):
    common = dict(
      ch=self.ch,
      ch_mult=self.ch_mult,
      num_res_blocks=self.num_res_blocks,
      num_groups=self.num_groups,
      mid_attention=self.mid_attention,
      dtype=self.dtype,
    )
    self.encoder = Encoder(out_channels=self.z_channels, init_logvar=self.init_logvar, **common)
    self.decoder = Decoder(**common)

  def encode(
    self, image: Array, rng: Array | None = None
  ) -> tuple[Array, dict[str, DiagonalGaussian]]:
    check_spatial_shape(image.shape, self.factor)
    posterior = DiagonalGaussian.from_moments(self.encoder(image))
    return (posterior.mode() if rng is None else posterior.sample(rng)), {"latent": posterior}

  def decode(self, z: Array) -> Array:
    if z.shape[-1] != self.z_channels:
      raise ValueError(
        f"decoder expects {self.z_channels} latent channels; got shape {tuple(z.shape)}"
      )
    return self.decoder(z)

  def __call__(
    self, image: Array, rng: Array | None = None
  ) -> tuple[Array, Array, dict[str, DiagonalGaussian]]:
    z, posteriors = self.encode(image, rng)
    return self.decode(z), z, posteriors

  def init_all(self, image: Array) -> Array:
    return self.decode(self.encode(image)[0])

"""Patch discriminator of the latent-diffusion autoencoder (pix2pix ``NLayerDiscriminator``).

Used by the VAE stages with a hinge loss and LDM's adaptive generator weight (§3.1: "discriminator
loss and LPIPS loss as recommended in [13]"). Each output logit judges one ~70x70 patch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _conv(features: int, strides: int, use_bias: bool, dtype: Any, name: str) -> nn.Conv:
  return nn.Conv(
    features,
    (4, 4),
    strides=(strides, strides),
    padding=((1, 1), (1, 1)),
    use_bias=use_bias,
    dtype=dtype,
    name=name,
    kernel_init=nn.with_logical_partitioning(
      nn.initializers.normal(0.02), ("kernel_h", "kernel_w", "conv_in", "conv_out")
    ),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
  )


class PatchDiscriminator(nn.Module):
  """conv4/2 + LeakyReLU, (num_layers - 1) x [conv4/2 + BN + LReLU], conv4/1 + BN + LReLU, conv4/1."""

  ch: int = 64
  num_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: Array, train: bool = True) -> Array:
    def bn(name):
      return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        scale_init=lambda k, s, d=jnp.float32: 1.0 + 0.02 * jax.random.normal(k, s, d),
        dtype=jnp.float32,
        name=name,
      )

    h = nn.leaky_relu(_conv(self.ch, 2, True, self.dtype, "conv_0")(image), 0.2)
    for n in range(1, self.num_layers + 1):
      strides = 2 if n < self.num_layers else 1
      h = _conv(self.ch * min(2**n, 8), strides, False, self.dtype, f"conv_{n}")(h)
      h = nn.leaky_relu(bn(f"norm_{n}")(h), 0.2)
    return _conv(1, 1, True, self.dtype, "conv_out")(h).astype(jnp.float32)

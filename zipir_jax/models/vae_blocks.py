"""Convolutional encoder/decoder of the latent-diffusion autoencoder, shared by every VAE here.

The LP-VAE sub-networks E_c, E_f, D_c, D_f (§3.1, supp. A), the f32c64 SD-VAE baseline (Table 4) and
the pixel-aware decoder D_f* all use the LDM layout (Rombach et al. 2022): conv_in, per level
``num_res_blocks`` residual blocks (decoder: one more) and a 2x resampler, a middle block, GroupNorm +
Swish + conv_out. Layer names follow LDM's (``down_{i}_block_{j}``, ``mid_block_1``, ``up_{i}_...``) so
a reader can map them onto the reference code. The LP-VAE is "pure convolutional" (§3.1): the
middle attention block exists only for the SD-VAE baseline (``mid_attention``).

Parameters carry logical axis names (``conv_in``/``conv_out`` …) that the sharding rules map onto the
device mesh; activations are constrained to ``('batch', 'height', 'width', 'channels')``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from zipir_jax.models import tiling

Array = jax.Array
Dtype = Any

ACTIVATION_AXES = ("batch", "height", "width", "channels")


def _kernel_init(zero: bool = False):
  init = nn.initializers.zeros_init() if zero else nn.initializers.lecun_normal()
  return nn.with_logical_partitioning(init, ("kernel_h", "kernel_w", "conv_in", "conv_out"))


def conv(
  features: int,
  kernel_size: int = 3,
  strides: int = 1,
  padding: str | Sequence = "SAME",
  zero_init: bool = False,
  bias_init: Array | None = None,
  dtype: Dtype = jnp.float32,
  name: str | None = None,
) -> nn.Conv:
  """A 2D convolution with logically named parameters (zero-initialised when ``zero_init``; the bias
  starts at ``bias_init``, one value per output channel, where given, else at zero)."""
  bias = nn.initializers.zeros_init()
  if bias_init is not None:
    bias = lambda _, shape, dtype=jnp.float32: jnp.broadcast_to(bias_init, shape).astype(dtype)
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(strides, strides),
    padding=padding,
    dtype=dtype,
    kernel_init=_kernel_init(zero_init),
    bias_init=nn.with_logical_partitioning(bias, ("conv_out",)),
    name=name,
  )


NORM_EPS = 1e-6


def group_norm(num_groups: int, name: str | None = None) -> nn.GroupNorm:
  """GroupNorm as in LDM (eps 1e-6), computed in float32 whatever the compute dtype."""
  return nn.GroupNorm(
    num_groups=num_groups,
    epsilon=NORM_EPS,
    dtype=jnp.float32,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
    name=name,
  )


class ResnetBlock(nn.Module):
  """Norm-Swish-Conv twice plus a (1x1-projected when the width changes) shortcut."""

  features: int
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.swish(group_norm(self.num_groups, name="norm1")(x))
    h = conv(self.features, dtype=self.dtype, name="conv1")(h)
    h = nn.swish(group_norm(self.num_groups, name="norm2")(h))
    h = conv(self.features, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, kernel_size=1, dtype=self.dtype, name="nin_shortcut")(x)
    return nn.with_logical_constraint(x.astype(h.dtype) + h, ACTIVATION_AXES)

  def tiled_call(self, x: Array | Sequence[Array], strip_rows: int) -> Array:
    """``__call__`` on a huge image (models/tiling.py): each norm + swish is applied inside the
    next convolution's strips and a concatenated input (``x`` a list) is never built, so at most
    the input, two intermediates and the output are alive."""
    parts = list(x) if isinstance(x, (list, tuple)) else [x]
    p = self.variables["params"]
    affine = tiling.group_norm_affine(parts, p["norm1"], self.num_groups, NORM_EPS)
    h = tiling.tiled_conv(
      tiling.bound_conv(p["conv1"], self.dtype), parts, strip_rows, affine=affine, swish=True
    )
    affine = tiling.group_norm_affine([h], p["norm2"], self.num_groups, NORM_EPS)
    h = tiling.tiled_conv(
      tiling.bound_conv(p["conv2"], self.dtype), h, strip_rows, affine=affine, swish=True
    )
    if "nin_shortcut" in p:
      shortcut = tiling.tiled_conv(
        tiling.bound_conv(p["nin_shortcut"], self.dtype), parts, strip_rows
      )
    else:
      (shortcut,) = parts
    return tiling.add_into(h, shortcut)


class AttnBlock(nn.Module):
  """LDM's single-head spatial self-attention (used only by the SD-VAE baseline's middle block)."""

  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    y = group_norm(self.num_groups, name="norm")(x)
    q, k, v = (
      conv(c, kernel_size=1, dtype=self.dtype, name=n)(y).reshape(b, h * w, 1, c)
      for n in ("q", "k", "v")
    )
    y = jax.nn.dot_product_attention(q, k, v).reshape(b, h, w, c)
    return x + conv(c, kernel_size=1, dtype=self.dtype, name="proj_out")(y)


class Downsample(nn.Module):
  """Stride-2 3x3 conv with LDM's asymmetric (0, 1) padding, so H/2 exactly for even H."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(x.shape[-1], strides=2, padding="VALID", dtype=self.dtype, name="conv")(x)

  def tiled_call(self, x: Array, strip_rows: int) -> Array:
    """``__call__`` in strips, the (0, 1) padding inside them (no padded copy of the image)."""
    conv_ = tiling.bound_conv(
      self.variables["params"]["conv"], self.dtype, strides=2, padding=((0, 1), (0, 1))
    )
    return tiling.tiled_conv(conv_, x, strip_rows)


class Upsample(nn.Module):
  """Nearest-neighbour 2x followed by a 3x3 conv (LDM)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(x.shape[-1], dtype=self.dtype, name="conv")(x)

  def tiled_call(self, x: Array, strip_rows: int) -> Array:
    """``__call__`` in strips, each upsampled on its own (no 4x-size copy of the image)."""
    conv_ = tiling.bound_conv(self.variables["params"]["conv"], self.dtype)
    return tiling.tiled_conv(conv_, x, strip_rows, up=2)


class Encoder(nn.Module):
  """LDM encoder: image (H, W) -> ``out_channels`` (x2 for mean/log-variance) at H/2^(L-1).

  With ``features_only`` it stops after the last level and returns the per-level features (level i at
  H/2^i with ``ch * ch_mult[i]`` channels) instead: that is the degradation-aware extractor of D_f*,
  whose parameters are then exactly the matching subset of E_f's.

  ``init_logvar`` is the initial bias of the log-variance outputs: LDM's zero starts the posterior at
  unit variance, as large as the means, and the small KL weight takes far longer to bring it down
  than a short run has (docs/DESIGN.md, "Posterior variance at initialisation").
  """

  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  out_channels: int
  double_z: bool = True
  num_groups: int = 32
  mid_attention: bool = False
  init_logvar: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, features_only: bool = False) -> Array | list[Array]:
    h = conv(self.ch, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    features = []
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, self.num_groups, self.dtype, name=f"down_{i}_block_{j}")(h)
      features.append(h)
      if i != len(self.ch_mult) - 1:
        h = Downsample(self.dtype, name=f"down_{i}_downsample")(h)
    if features_only:
      return features
    h = ResnetBlock(h.shape[-1], self.num_groups, self.dtype, name="mid_block_1")(h)
    if self.mid_attention:
      h = AttnBlock(self.num_groups, self.dtype, name="mid_attn_1")(h)
    h = ResnetBlock(h.shape[-1], self.num_groups, self.dtype, name="mid_block_2")(h)
    h = nn.swish(group_norm(self.num_groups, name="norm_out")(h))
    if not self.double_z:
      return conv(self.out_channels, dtype=self.dtype, name="conv_out")(h).astype(jnp.float32)
    bias = jnp.repeat(jnp.asarray([0.0, self.init_logvar]), self.out_channels)  # [mean | logvar]
    moments = conv(2 * self.out_channels, bias_init=bias, dtype=self.dtype, name="conv_out")
    return moments(h).astype(jnp.float32)


class PixelFusion(nn.Module):
  """Residual injection of extractor features into a decoder level (D_f*, §3.1 / Fig. 8).

  A spatial feature transform (as StableSR's feature warping, the paper's [46]): from the
  extractor's feature ``f`` a residual block predicts a per-pixel scale and shift, and
  ``h + w * (h * tanh(scale) + rms(h) * shift)`` is returned (rms per image). Both predicting convs
  are zero-initialised, so a freshly built D_f* equals D_f exactly; ``w`` is an inference-time
  fidelity knob (0 = ignore the LQ image); the tanh bounds a level's effect (at most 2h).
  Scale-free by design: a trained D_f's residual stream is hundreds in size (the demo's tiny D_f:
  RMS 835 at full resolution), and predicted from the raw [h; f], one AdamW step set tanh(scale)
  to ±0.95 at every level. Read through GroupNorm + swish, with the shift in units of rms(h), an
  update changes every level by the same relative amount whatever the stream's size.
  """

  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, feature: Array, weight: float | Array = 1.0) -> Array:
    c = h.shape[-1]
    e = ResnetBlock(c, self.num_groups, self.dtype, name="block")(feature.astype(h.dtype))
    e = nn.swish(group_norm(self.num_groups, name="norm")(e))
    scale = conv(c, zero_init=True, dtype=self.dtype, name="scale")(e)
    shift = conv(c, zero_init=True, dtype=self.dtype, name="shift")(e)
    # The weight arrives as a float32 array (a traced knob): cast it, or bf16 h is promoted to a
    # float32 full-resolution copy (32 GiB at 8192² x 128 channels: what ran out of memory).
    return _fusion(scale, h, shift, stream_rms(h), jnp.asarray(weight, h.dtype))

  def tiled_call(
    self, h: Array, feature: Array, weight: float | Array = 1.0, *, strip_rows: int
  ) -> Array:
    """``__call__`` on a huge image: the block and the norm + swish run inside the convolutions'
    strips; the output overwrites ``scale``."""
    p = self.variables["params"]
    block = ResnetBlock(h.shape[-1], self.num_groups, self.dtype, parent=None).bind(
      {"params": p["block"]}
    )
    e = block.tiled_call(feature.astype(h.dtype), strip_rows)
    affine = tiling.group_norm_affine([e], p["norm"], self.num_groups, NORM_EPS)
    scale, shift = (
      tiling.tiled_conv(
        tiling.bound_conv(p[n], self.dtype), e, strip_rows, affine=affine, swish=True
      )
      for n in ("scale", "shift")
    )
    del e
    return _fusion_output(scale, h, shift, stream_rms(h), jnp.asarray(weight, h.dtype))


@jax.jit
def stream_rms(h: Array) -> Array:
  """Per-image RMS of a decoder's residual stream, (B, 1, 1, 1) in h's dtype (float32 sums)."""
  rms = jnp.sqrt(jnp.mean(jnp.square(h.astype(jnp.float32)), axis=(1, 2, 3), keepdims=True))
  return rms.astype(h.dtype)


def _fusion(scale: Array, h: Array, shift: Array, rms: Array, weight: Array) -> Array:
  return h + weight * (h * jnp.tanh(scale) + rms * shift)


_fusion_output = jax.jit(_fusion, donate_argnums=0)  # the tiled path: written over ``scale``


class Decoder(nn.Module):
  """LDM decoder: latent at H/2^(L-1) -> ``out_channels`` image at H.

  With ``fusion_levels`` non-empty it is the decoder half of D_f*: after the residual blocks of each
  listed level a :class:`PixelFusion` adds the extractor's feature of the same resolution. All other
  parameter names equal the plain decoder's, so D_f's parameters load into it unchanged.
  """

  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  out_channels: int = 3
  num_groups: int = 32
  mid_attention: bool = False
  fusion_levels: Sequence[int] = ()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, z: Array, skips: Sequence[Array] | None = None, fusion_weight: float | Array = 1.0
  ) -> Array:
    if self.fusion_levels and skips is None:
      raise ValueError(
        "this decoder fuses extractor features at levels "
        f"{tuple(self.fusion_levels)}: pass skips=extractor(lq)"
      )
    h = conv(self.ch * self.ch_mult[-1], dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
    h = ResnetBlock(h.shape[-1], self.num_groups, self.dtype, name="mid_block_1")(h)
    if self.mid_attention:
      h = AttnBlock(self.num_groups, self.dtype, name="mid_attn_1")(h)
    h = ResnetBlock(h.shape[-1], self.num_groups, self.dtype, name="mid_block_2")(h)
    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = ResnetBlock(
          self.ch * self.ch_mult[i], self.num_groups, self.dtype, name=f"up_{i}_block_{j}"
        )(h)
      if i in self.fusion_levels:
        h = PixelFusion(self.num_groups, self.dtype, name=f"up_{i}_fusion")(
          h, skips[i], fusion_weight
        )
      if i != 0:
        h = Upsample(self.dtype, name=f"up_{i}_upsample")(h)
    h = nn.swish(group_norm(self.num_groups, name="norm_out")(h))
    return conv(self.out_channels, dtype=self.dtype, name="conv_out")(h).astype(jnp.float32)


@flax.struct.dataclass
class DiagonalGaussian:
  """The VAE posterior q(z|x) = N(mean, exp(logvar)); log-variance clipped to [-30, 20] as in LDM."""

  mean: Array
  logvar: Array

  @classmethod
  def from_moments(cls, moments: Array) -> DiagonalGaussian:
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  def sample(self, rng: Array) -> Array:
    return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(rng, self.mean.shape)

  def mode(self) -> Array:
    return self.mean

  def kl(self) -> Array:
    """KL(q || N(0, I)) summed over latent positions and channels; shape (batch,)."""
    return 0.5 * jnp.sum(
      jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3)
    )

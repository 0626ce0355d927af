"""Pixel-aware decoder D_f* (§3.1 "Pixel-aware Decoder-only Finetuning", supp. A / Fig. 8).

A degradation-aware feature extractor — E_f's architecture, initialised from the trained E_f — reads
the LQ image (resized to the output size) and hands its multi-scale features to D_f through new
residual layers between the up-sampling blocks (:class:`~zipir_jax.models.vae_blocks.PixelFusion`).
Those layers are zero-initialised, so right after :func:`init_from_autoencoder` D_f*(z, LQ) == D_f(z)
exactly; stage ``pixel_decoder`` then trains extractor and whole decoder with E_c/E_f frozen.
With ``fusion_levels=()`` it is the plain decoder (no extractor): how the SD-VAE ablation decodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from zipir_jax.models.lpvae import check_spatial_shape
from zipir_jax.models.vae_blocks import Decoder, Encoder

Array = jax.Array


class PixelAwareDecoder(nn.Module):
  """D_f*(z, lq): ``extractor`` (E_f-shaped) + ``decoder`` (D_f plus fusion layers)."""

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4, 4, 4)
  num_res_blocks: int = 2
  encoder_out_channels: int = 52
  fusion_levels: Sequence[int] = (0, 1, 2, 3, 4, 5)
  mid_attention: bool = False
  num_groups: int = 32
  dtype: Any = jnp.float32

  @property
  def factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @nn.compact
  def __call__(self, z: Array, lq: Array, fusion_weight: float | Array = 1.0) -> Array:
    """Decodes ``z`` (B, H/f, W/f, C) using the LQ image ``lq`` (B, H, W, 3) in [-1, 1]."""
    check_spatial_shape(lq.shape, self.factor, "LQ image")
    if z.shape[1:3] != (lq.shape[1] // self.factor, lq.shape[2] // self.factor):
      raise ValueError(
        f"latent {tuple(z.shape)} does not match LQ image {tuple(lq.shape)} "
        f"at compression {self.factor}"
      )
    bad = [i for i in self.fusion_levels if not 0 <= i < len(self.ch_mult)]
    if bad:
      raise ValueError(
        f"fusion_levels {tuple(bad)} outside decoder levels 0..{len(self.ch_mult) - 1}"
      )
    features = None
    if self.fusion_levels:  # none: the plain decoder (the SD-VAE ablation), no extractor
      features = Encoder(
        self.ch,
        self.ch_mult,
        self.num_res_blocks,
        self.encoder_out_channels,
        num_groups=self.num_groups,
        mid_attention=self.mid_attention,
        dtype=self.dtype,
        name="extractor",
      )(lq, features_only=True)
    return Decoder(
      self.ch,
      self.ch_mult,
      self.num_res_blocks,
      num_groups=self.num_groups,
      mid_attention=self.mid_attention,
      fusion_levels=tuple(self.fusion_levels),
      dtype=self.dtype,
      name="decoder",
    )(z, features, fusion_weight)


def _flatten(tree: Mapping) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def init_from_autoencoder(fresh: Mapping, encoder_params: Mapping, decoder_params: Mapping) -> dict:
  """D_f* parameters: extractor <- E_f, decoder <- D_f, fusion layers as freshly initialised.

  ``fresh`` are D_f*'s own initial parameters (``PixelAwareDecoder.init``'s ``params``). Every
  extractor weight must exist in E_f and every D_f weight must land in the decoder, with equal shapes;
  anything else is a mismatch between configs and raises naming the parameter.
  """
  flat = _flatten(fresh)
  enc, dec = _flatten(encoder_params), _flatten(decoder_params)
  used_dec = set()
  for path, value in flat.items():
    part, rest = path[0], path[1:]
    if part == "extractor":
      source, name = enc, "E_f"
    elif part == "decoder" and not rest[0].endswith("_fusion"):
      source, name = dec, "D_f"
      used_dec.add(rest)
    else:
      continue
    if rest not in source:
      raise KeyError(
        f"D_f* parameter {'/'.join(path)} has no counterpart {'/'.join(rest)} in {name}"
      )
    if source[rest].shape != value.shape:
      raise ValueError(
        f"D_f* parameter {'/'.join(path)} has shape {value.shape} but {name}'s "
        f"{'/'.join(rest)} has {source[rest].shape}"
      )
    flat[path] = source[rest]
  unused = sorted("/".join(p) for p in set(dec) - used_dec)
  if unused:
    raise KeyError(f"D_f parameters with no place in D_f*: {unused[:5]}")
  return flax.traverse_util.unflatten_dict(flat)

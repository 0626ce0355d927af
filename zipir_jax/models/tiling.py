"""Tiled execution of the convolutional VAE networks for very large images (4096² and up).

One XLA program for a whole 4096²+ encoder or decoder takes minutes to compile and holds many
full-resolution buffers at once (8192² x 128 channels is 17 GB in bf16). Here the network runs
eagerly instead, module by module, and every convolution whose input is taller than ``strip_rows``
runs as a sequence of row strips, each with exactly the halo its kernel needs. GroupNorm,
activations, residual sums and resampling see whole arrays, so GroupNorm uses the statistics of the
*whole image* and the result equals the untiled network up to float summation order — unlike tiled
VAEs that normalise each tile separately and shift colours between tiles. Only small per-strip
convolution programs are compiled (once per strip shape). GroupNorm runs as one fused program that
accumulates its statistics in float32 but returns the input's dtype: the networks' float32 norm
output would be a second, twice-as-large copy of a full-resolution activation (16 GiB at 4096² x
256 channels, which is what ran an H100 out of memory).

  with tiled_convolutions(strip_rows=256):
    z, _ = vae.apply({"params": params}, image, method="encode")   # not inside jax.jit
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("strides",))
def _conv_strip(x: Array, kernel: Array, bias: Array | None, strides: tuple[int, int]) -> Array:
  y = jax.lax.conv_general_dilated(x, kernel, strides, "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y if bias is None else y + bias


def _pair(value: int | tuple[int, ...] | None) -> tuple[int, int]:
  if value is None:
    return (1, 1)
  return (value, value) if isinstance(value, int) else tuple(value)


def _explicit_padding(conv: nn.Conv, in_hw: tuple[int, int]) -> list[tuple[int, int]]:
  kernel = tuple(conv.kernel_size)
  strides = _pair(conv.strides)
  if isinstance(conv.padding, str):
    if conv.padding not in ("SAME", "VALID"):
      raise NotImplementedError(f"tiled convolution: padding {conv.padding!r} is not supported")
    return list(jax.lax.padtype_to_pads(in_hw, kernel, strides, conv.padding))
  return [tuple(p) for p in conv.padding]


def tiled_conv(conv: nn.Conv, x: Array, strip_rows: int) -> Array:
  """``conv(x)`` computed in strips of at most ``strip_rows`` output rows (exact halos)."""
  if (conv.feature_group_count != 1 or _pair(conv.kernel_dilation) != (1, 1)
      or _pair(conv.input_dilation) != (1, 1)):
    raise NotImplementedError("tiled convolution supports plain (ungrouped, undilated) convs")
  params = conv.variables["params"]
  dtype = conv.dtype or jnp.result_type(x, params["kernel"])
  kernel = jnp.asarray(params["kernel"], dtype)
  bias = jnp.asarray(params["bias"], dtype) if conv.use_bias else None
  strides = _pair(conv.strides)
  (pt, pb), (pl, pr) = _explicit_padding(conv, x.shape[1:3])
  x = jnp.pad(x.astype(dtype), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, sh = kernel.shape[0], strides[0]
  out_rows = (x.shape[1] - kh) // sh + 1
  strips = []
  for r0 in range(0, out_rows, strip_rows):
    r1 = min(out_rows, r0 + strip_rows)
    strips.append(_conv_strip(x[:, r0 * sh:(r1 - 1) * sh + kh], kernel, bias, strides))
  return jnp.concatenate(strips, axis=1)


@functools.partial(jax.jit, static_argnames=("num_groups", "epsilon"))
def _group_norm(x: Array, scale: Array | None, bias: Array | None, num_groups: int,
                epsilon: float) -> Array:
  """GroupNorm over (H, W, channels-in-group) with float32 statistics, output in ``x.dtype``."""
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, num_groups, c // num_groups)
  mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True, dtype=jnp.float32)
  var = jnp.mean(jnp.square(g.astype(jnp.float32) - mean), axis=(1, 2, 4), keepdims=True)
  y = ((g - mean) * jax.lax.rsqrt(var + epsilon)).reshape(b, h, w, c)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y.astype(x.dtype)


def tiled_group_norm(norm: nn.GroupNorm, x: Array) -> Array:
  """``norm(x)`` on the whole image (exact statistics) without a float32 copy of ``x``."""
  if norm.num_groups is None or norm.group_size is not None or x.ndim != 4:
    raise NotImplementedError("tiled GroupNorm supports num_groups on NHWC inputs")
  params = norm.variables.get("params", {})
  return _group_norm(x, params.get("scale"), params.get("bias"), num_groups=norm.num_groups,
                     epsilon=norm.epsilon)


@contextlib.contextmanager
def tiled_convolutions(strip_rows: int = 256) -> Iterator[None]:
  """Within this context, every ``nn.Conv`` on inputs taller than ``strip_rows`` runs in strips.

  Use it around an eager (un-jitted) ``module.apply``: under ``jax.jit`` the strips would be
  traced into one program again and nothing would be gained.
  """
  if strip_rows < 1:
    raise ValueError(f"strip_rows must be positive, got {strip_rows}")

  def interceptor(next_fun, args, kwargs, context):
    if (context.method_name == "__call__" and not kwargs and len(args) == 1
        and args[0].ndim == 4 and args[0].shape[1] > strip_rows):
      if isinstance(context.module, nn.Conv):
        return tiled_conv(context.module, args[0], strip_rows)
      if isinstance(context.module, nn.GroupNorm):
        return tiled_group_norm(context.module, args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield

"""Tiled execution of the convolutional VAE networks for very large images (4096² and up).

One XLA program for a whole 4096²+ encoder or decoder takes minutes to compile and holds many
full-resolution buffers at once (8192² x 128 channels is 16 GiB in bf16). Here the network runs
eagerly instead, module by module, and every convolution whose input is taller than ``strip_rows``
runs as a sequence of row strips, each with exactly the halo its kernel needs, written in place into
one preallocated output. What a convolution's input would otherwise need as whole-image copies is
done per strip: zero padding, nearest 2x upsampling (``vae_blocks.Upsample``), the channel
concatenation of D_f*'s fusion input, and GroupNorm + swish (``vae_blocks.ResnetBlock``), whose
statistics come from a first pass over the *whole image* (per-channel moments, folded into a
per-channel affine) — so the result equals the untiled network up to float summation order, unlike
tiled VAEs that normalise each tile separately and shift colours between tiles. Blocks that know a
strip-wise form expose it as ``tiled_call``; any other ``nn.Conv`` and ``nn.GroupNorm`` are tiled
one by one (GroupNorm with float32 statistics, returning the input's dtype: no float32 copy).
Only small per-strip programs are compiled (once per strip shape).

  with tiled_convolutions(strip_rows=256):
    z, _ = vae.apply({"params": params}, image, method="encode")   # not inside jax.jit
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@functools.partial(
  jax.jit, static_argnames=("strides", "up", "skip", "rows", "pads", "swish"), donate_argnums=0
)
def _conv_strip_into(
  out: Array,
  xs: tuple[Array, ...],
  row: Array,
  kernel: Array,
  bias: Array | None,
  affine: tuple[Array, Array, Array] | None,
  strides: tuple[int, int],
  up: int,
  skip: int,
  rows: int,
  pads: tuple[tuple[int, int], tuple[int, int]],
  swish: bool,
) -> Array:
  """Writes one strip of ``conv(pad(nearest_up(act(a·concat(xs) + b))))`` into ``out`` at output
  row ``row``, in place (``out`` is donated).

  ``xs`` hold the input rows the strip needs (before the ``up``-fold nearest upsampling, of which
  ``rows`` rows from ``skip`` on are used), concatenated along channels here, per strip; ``affine``
  is a whole-image GroupNorm (:func:`group_norm_affine`; float32, then swish if ``swish``);
  ``pads`` is the zero padding of the window: the conv's own padding where it touches the image
  border, else 0 (the halo is real data).
  """
  if affine is None:
    x = jnp.concatenate([x.astype(kernel.dtype) for x in xs], axis=-1)
  else:
    x = _normalize(jnp.concatenate([x.astype(jnp.float32) for x in xs], axis=-1), affine)
    x = (jax.nn.swish(x) if swish else x).astype(kernel.dtype)
  if up > 1:
    x = jnp.repeat(jnp.repeat(x, up, axis=1), up, axis=2)
  x = jnp.pad(x[:, skip : skip + rows], ((0, 0), *pads, (0, 0)))
  y = jax.lax.conv_general_dilated(
    x, kernel, strides, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  if bias is not None:
    y = y + bias
  return jax.lax.dynamic_update_slice(out, y.astype(out.dtype), (0, row, 0, 0))


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


def tiled_conv(
  conv: nn.Conv,
  x: Array | Sequence[Array],
  strip_rows: int,
  up: int = 1,
  affine: tuple[Array, Array, Array] | None = None,
  swish: bool = False,
) -> Array:
  """``conv(x)`` in strips of at most ``strip_rows`` output rows with exact halos, written into one
  preallocated output: besides the input and the result only one strip is ever alive.

  ``x`` may be several arrays, concatenated along channels strip by strip (never whole); the
  input may first go through a GroupNorm and swish (``affine``: :func:`group_norm_affine`) and a
  nearest ``up``-fold upsampling — both per strip, so the normalised or upsampled image is never
  materialised.
  """
  if (
    conv.feature_group_count != 1
    or _pair(conv.kernel_dilation) != (1, 1)
    or _pair(conv.input_dilation) != (1, 1)
  ):
    raise NotImplementedError("tiled convolution supports plain (ungrouped, undilated) convs")
  xs = tuple(x) if isinstance(x, (list, tuple)) else (x,)
  params = conv.variables["params"]
  dtype = conv.dtype or jnp.result_type(*xs, params["kernel"])
  kernel = jnp.asarray(params["kernel"], dtype)
  bias = jnp.asarray(params["bias"], dtype) if conv.use_bias else None
  strides = _pair(conv.strides)
  b, h, w, _ = xs[0].shape
  hu, wu = h * up, w * up  # the (virtual) convolution input
  (pt, pb), (pl, pr) = _explicit_padding(conv, (hu, wu))
  kh, sh = kernel.shape[0], strides[0]
  out_rows = (hu + pt + pb - kh) // sh + 1
  out_cols = (wu + pl + pr - kernel.shape[1]) // strides[1] + 1
  out = jnp.zeros((b, out_rows, out_cols, kernel.shape[-1]), dtype)
  for r0 in range(0, out_rows, strip_rows):
    r1 = min(out_rows, r0 + strip_rows)
    lo, hi = r0 * sh - pt, (r1 - 1) * sh - pt + kh  # input rows of the strip, padding included
    a, z = max(lo, 0), min(hi, hu)
    xa, xz = a // up, -(-z // up)
    out = _conv_strip_into(
      out,
      tuple(x[:, xa:xz] for x in xs),
      jnp.int32(r0),
      kernel,
      bias,
      affine,
      strides=strides,
      up=up,
      skip=a - xa * up,
      rows=z - a,
      pads=((a - lo, hi - z), (pl, pr)),
      swish=swish,
    )
  return out


def bound_conv(params: dict, dtype, strides: int = 1, padding: str | Sequence = "SAME") -> nn.Conv:
  """A standalone ``nn.Conv`` bound to ``params`` (a block's sub-convolution, for tiled_conv)."""
  kernel = params["kernel"]
  return nn.Conv(
    kernel.shape[-1],
    kernel.shape[:2],
    strides=strides,
    padding=padding,
    use_bias="bias" in params,
    dtype=dtype,
    parent=None,
  ).bind({"params": params})


@jax.jit
def _channel_moments(x: Array) -> tuple[Array, Array]:
  """Per-(batch, channel) mean and variance in float32 (two passes: no cancellation)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=(1, 2))
  return mean, jnp.mean(jnp.square(x - mean[:, None, None]), axis=(1, 2))


def group_norm_affine(
  parts: Sequence[Array], params: dict, num_groups: int, epsilon: float
) -> tuple[Array, Array, Array]:
  """GroupNorm of ``concat(parts)`` over the whole image as per-(batch, channel) ``(m, a, b)``.

  ``(x - m)·a + b`` (:func:`_normalize`) equals flax's ``nn.GroupNorm`` up to float32 rounding,
  from per-channel moments of each part (groups combine them exactly: the mean of the channel
  variances plus the variance of the channel means), so the concatenated or normalised image is
  never built. The mean is subtracted before scaling, as flax does: folding it into the shift would
  cancel digits when the mean is large against the spread.
  """
  moments = [_channel_moments(p) for p in parts]
  mean_c = jnp.concatenate([m for m, _ in moments], axis=-1)
  var_c = jnp.concatenate([v for _, v in moments], axis=-1)
  b, c = mean_c.shape
  mean_c, var_c = mean_c.reshape(b, num_groups, -1), var_c.reshape(b, num_groups, -1)
  mean = jnp.mean(mean_c, axis=-1)
  var = jnp.mean(var_c + jnp.square(mean_c - mean[..., None]), axis=-1)
  rstd = jnp.repeat(jax.lax.rsqrt(var + epsilon), c // num_groups, axis=-1)
  mean = jnp.repeat(mean, c // num_groups, axis=-1)
  return mean, rstd * params.get("scale", 1.0), jnp.broadcast_to(params.get("bias", 0.0), (b, c))


def _normalize(x: Array, affine: tuple[Array, Array, Array]) -> Array:
  m, a, b = (v[:, None, None] for v in affine)
  return (x - m) * a + b


@functools.partial(jax.jit, donate_argnums=0)
def add_into(y: Array, x: Array) -> Array:
  """``x + y`` in ``y``'s dtype, written over ``y`` (a residual sum without a third copy)."""
  return y + x.astype(y.dtype)


@jax.jit
def _apply_norm(x: Array, affine: tuple[Array, Array, Array]) -> Array:
  return _normalize(x.astype(jnp.float32), affine).astype(x.dtype)


def tiled_group_norm(norm: nn.GroupNorm, x: Array) -> Array:
  """``norm(x)`` on the whole image (exact statistics) without a float32 copy of ``x``."""
  if norm.num_groups is None or norm.group_size is not None or x.ndim != 4:
    raise NotImplementedError("tiled GroupNorm supports num_groups on NHWC inputs")
  params = norm.variables.get("params", {})
  return _apply_norm(x, group_norm_affine([x], params, norm.num_groups, norm.epsilon))


@contextlib.contextmanager
def tiled_convolutions(strip_rows: int = 256) -> Iterator[None]:
  """Within this context, every ``nn.Conv`` on inputs taller than ``strip_rows`` runs in strips.

  Use it around an eager (un-jitted) ``module.apply``: under ``jax.jit`` the strips would be
  traced into one program again and nothing would be gained.
  """
  if strip_rows < 1:
    raise ValueError(f"strip_rows must be positive, got {strip_rows}")

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name == "__call__"
      and args
      and getattr(args[0], "ndim", 0) == 4
      and args[0].shape[1] > strip_rows
    ):
      if hasattr(module, "tiled_call"):  # a block that knows its strip-wise form (vae_blocks)
        return module.tiled_call(*args, strip_rows=strip_rows, **kwargs)
      if not kwargs and len(args) == 1:
        if isinstance(module, nn.Conv):
          return tiled_conv(module, args[0], strip_rows)
        if isinstance(module, nn.GroupNorm):
          return tiled_group_norm(module, args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield

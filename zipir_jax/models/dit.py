r"""ZipDiT: the diffusion transformer of ZipIR (§3.2, supp. A).

The network predicts the noise ε of the DDPM forward process from

* the noisy latent ``z_t`` and the LQ latent (both NHWC, 64 channels at H/32 x W/32), each
  tokenised by its *own* linear patch embedder (§3.2: "separate, parameter-independent Patch
  Embedders"),
* the timestep, through a sinusoidal embedding and an MLP that drive adaLN modulation (DiT),
* T5 caption tokens, through cross-attention with a key padding mask (§3.2, "Text Semantic
  Guidance").

``lq_fusion="sum"`` adds the two embeddings of the same position (h·w tokens; the token count
behind the paper's 250 ms/step, docs/DESIGN.md); ``"concat"`` places both token sets side by side in the
sequence (2·h·w tokens) and reads ε from the noisy half. Where the paper is silent we take the
well-known modern choices and say so: 2D rotary position embedding over (row, col) so any latent
size works (both halves of a ``concat`` sequence share positions), RMS-normalised queries and keys
(QK-norm, as in SD3 / Flux), a GELU-tanh MLP (its width is the free dimension that sets the
parameter count; docs/DESIGN.md), PixArt-α's caption projection (T5 width ->
hidden, once), and adaLN-Zero (DiT) with nine modulation vectors, so every residual branch
(self-attention, cross-attention, MLP) is gated and starts at zero. ``cross_attn_modulation=False``
gives PixArt's six-vector layout instead: an affine LayerNorm before cross-attention and a
zero-initialised cross-attention output projection.

Parameters are float32 with logical axis names; the compute dtype is configurable (bf16 on
accelerators). Layers are an ``nn.scan`` over one block (parameters stacked along ``'layers'``),
wrapped in ``nn.remat`` with a configurable policy. Attention goes through
``jax.nn.dot_product_attention``: cuDNN flash attention on GPU (``attention_impl="auto"`` or
``"cudnn"``), XLA elsewhere.

Logical axis names (mapped onto the mesh by the sharding rules):
  parameters   'embed' (hidden), 'mlp' (MLP / embedder hidden), 'heads', 'kv' (head dim),
               'patch' (p·p·C patch values), 'text_embed' (T5 width), 'freq' (timestep
               frequencies), 'modulation' (adaLN outputs), 'norm', and 'layers' (scanned axis);
  activations  ('batch', 'length', 'embed'), ('batch', 'text_length', 'embed'),
               ('batch', 'length', 'heads', 'kv'), ('batch', 'length', 'mlp').
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from zipir_jax import errors, parallel
from zipir_jax.models import autoencoder, count_params

Array = jax.Array
Dtype = Any

LQ_FUSIONS = ("sum", "concat")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
REMAT_POLICIES = {
  "none": None,  # no rematerialisation: fastest, most memory.
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
TOKEN_AXES = ("batch", "length", "embed")
TEXT_AXES = ("batch", "text_length", "embed")
HEAD_AXES = ("batch", "length", "heads", "kv")


# ------------------------------------------------------------------ layers with named params


def _dense(
  features: int,
  axes: tuple[str, str],
  *,
  zero_init: bool = False,
  dtype: Dtype = jnp.float32,
  name: str | None = None,
) -> nn.Dense:
  """Linear layer (Xavier-uniform as in DiT, or zeros for adaLN-Zero) with named parameters."""
  init = nn.initializers.zeros_init() if zero_init else nn.initializers.xavier_uniform()
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=nn.with_logical_partitioning(init, axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
    name=name,
  )


def _to_heads(features: tuple[int, int], in_axis: str, dtype: Dtype, name: str) -> nn.DenseGeneral:
  """Projection to (heads, head_dim): kernel ('embed' | 'text_embed', 'heads', 'kv')."""
  init = nn.initializers.xavier_uniform()  # DenseGeneral initialises the flat (in, out) kernel.
  return nn.DenseGeneral(
    features,
    axis=-1,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=parallel.with_dense_general_partitioning(init, (in_axis, "heads", "kv")),
    bias_init=parallel.with_dense_general_partitioning(
      nn.initializers.zeros_init(), ("heads", "kv")
    ),
    name=name,
  )


def _from_heads(features: int, zero_init: bool, dtype: Dtype, name: str) -> nn.DenseGeneral:
  """Projection from (heads, head_dim) back to the hidden size: kernel ('heads', 'kv', 'embed')."""
  init = nn.initializers.zeros_init() if zero_init else nn.initializers.xavier_uniform()
  return nn.DenseGeneral(
    features,
    axis=(-2, -1),
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=parallel.with_dense_general_partitioning(init, ("heads", "kv", "embed")),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
    name=name,
  )


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
  """Parameter-free LayerNorm in float32 (adaLN supplies scale and shift, DiT)."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """adaLN: x * (1 + scale) + shift, with (B, D) modulation broadcast over tokens (DiT)."""
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class RMSNorm(nn.Module):
  """RMS normalisation over the head dimension with a learned scale (QK-norm)."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones_init(), ("kv",)),
      (x.shape[-1],),
      jnp.float32,
    )
    y = x.astype(jnp.float32)
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(x.dtype)


# ------------------------------------------------------------------ positions and attention


def token_positions(height: int, width: int) -> Array:
  """(row, col) of each token of an ``height x width`` grid in row-major order: (h·w, 2) int32."""
  rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
  return jnp.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1).astype(jnp.int32)


def rope_2d(positions: Array, head_dim: int, theta: float = 10000.0) -> tuple[Array, Array]:
  """2D rotary embedding angles: (cos, sin), each (N, head_dim // 2) in float32.

  Half of the rotated pairs encode the row, half the column, each with the frequencies of 1D RoPE
  (Su et al.) over head_dim / 4 pairs. Positions are plain integers, so no maximum size exists:
  the embedding is resolution-agnostic and q·k depends only on the (row, col) difference.
  """
  if head_dim % 4:
    raise ValueError(
      f"2D RoPE needs a head dimension divisible by 4; got {head_dim} (hidden_size / num_heads)"
    )
  quarter = head_dim // 4
  freqs = theta ** (-jnp.arange(quarter, dtype=jnp.float32) / quarter)
  pos = positions.astype(jnp.float32)
  angles = jnp.concatenate([pos[:, :1] * freqs, pos[:, 1:2] * freqs], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates pairs (x[i], x[i + head_dim/2]) of ``x`` (B, N, heads, head_dim) by the RoPE angles."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def resolve_attention_impl(name: str) -> str | None:
  """'auto' -> cuDNN flash attention on GPU, XLA elsewhere; 'xla' | 'cudnn' as given."""
  if name not in ATTENTION_IMPLS:
    raise errors.ConfigError(f"attention_impl={name!r}; valid: {', '.join(ATTENTION_IMPLS)}")
  if name == "auto":
    return "cudnn" if jax.default_backend() == "gpu" else "xla"
  return name


def attention(
  q: Array, k: Array, v: Array, key_mask: Array | None = None, implementation: str = "auto"
) -> Array:
  """Multi-head attention on (B, N, heads, head_dim) through ``jax.nn.dot_product_attention``.

  ``key_mask`` (B, S) marks valid keys. cuDNN takes it as per-example key lengths, so there it
  must be right-padded (a prefix of True, as tokenisers produce); cuDNN also needs 16-bit inputs,
  so float32 inputs are cast to bfloat16 for it. XLA applies the boolean mask as it is.
  """
  impl = resolve_attention_impl(implementation)
  if impl == "cudnn":
    dtype = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    lengths = None if key_mask is None else key_mask.sum(-1).astype(jnp.int32)
    out = jax.nn.dot_product_attention(
      q.astype(dtype),
      k.astype(dtype),
      v.astype(dtype),
      key_value_seq_lengths=lengths,
      implementation="cudnn",
    )
  else:
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  return out.astype(q.dtype)


# ------------------------------------------------------------------ embedders


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps (B,) -> (B, dim), DiT."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedder(nn.Module):
  """t -> sinusoidal (256) -> Linear -> SiLU -> Linear: the conditioning vector of adaLN (DiT)."""

  hidden_size: int
  frequency_size: int = 256

  @nn.compact
  def __call__(self, t: Array) -> Array:
    h = timestep_embedding(t, self.frequency_size)
    h = nn.silu(_dense(self.hidden_size, ("freq", "mlp"), name="linear_1")(h))
    return _dense(self.hidden_size, ("mlp", "embed"), name="linear_2")(h)


class PatchEmbedder(nn.Module):
  """Linear patchify: (B, h, w, C) -> (B, h/p · w/p, hidden), a p x p stride-p conv as a matmul."""

  hidden_size: int
  patch_size: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    return _dense(self.hidden_size, ("patch", "embed"), dtype=self.dtype, name="proj")(
      patchify(z.astype(self.dtype), self.patch_size)
    )


def patchify(z: Array, p: int) -> Array:
  """(B, h, w, C) -> (B, (h/p)(w/p), p·p·C), patches in row-major order."""
  b, h, w, c = z.shape
  z = z.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return z.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Array, p: int, height: int, width: int) -> Array:
  """Inverse of :func:`patchify`: (B, (h/p)(w/p), p·p·C) -> (B, h, w, C)."""
  b, _, d = tokens.shape
  c = d // (p * p)
  z = tokens.reshape(b, height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return z.reshape(b, height, width, c)


# ------------------------------------------------------------------ transformer block


class Attention(nn.Module):
  """Self- or cross-attention with optional QK-RMSNorm and RoPE; returns (B, N, hidden)."""

  hidden_size: int
  num_heads: int
  qk_norm: bool = True
  zero_init_out: bool = False
  implementation: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Array,
    context: Array,
    context_axis: str = "embed",
    key_mask: Array | None = None,
    rope: tuple[Array, Array] | None = None,
  ) -> Array:
    heads = (self.num_heads, self.hidden_size // self.num_heads)
    q = _to_heads(heads, "embed", self.dtype, "query")(x)
    k = _to_heads(heads, context_axis, self.dtype, "key")(context)
    v = _to_heads(heads, context_axis, self.dtype, "value")(context)
    if self.qk_norm:
      q, k = RMSNorm(name="query_norm")(q), RMSNorm(name="key_norm")(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = nn.with_logical_constraint(q, HEAD_AXES)
    out = attention(q, k, v, key_mask, self.implementation)
    return _from_heads(self.hidden_size, self.zero_init_out, self.dtype, "out")(out)


class DiTBlock(nn.Module):
  """adaLN-Zero block: gated self-attention (RoPE) -> cross-attention to text -> gated MLP.

  ``cross_attn_modulation`` gives the cross-attention branch its own shift/scale/gate (9 modulation
  vectors); otherwise (PixArt-α, 6 vectors) it reads an affine LayerNorm of x and its output
  projection starts at zero, so the block is the identity at initialisation either way.
  """

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  cross_attn_modulation: bool = True
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Array,
    c: Array,
    text: Array,
    text_mask: Array,
    has_text: Array,
    rope_cos: Array,
    rope_sin: Array,
  ) -> tuple[Array, None]:
    d = self.hidden_size
    n_mod = 9 if self.cross_attn_modulation else 6
    # Modulation is computed for B rows only, so float32 costs nothing.
    mod = _dense(n_mod * d, ("embed", "modulation"), zero_init=True, name="adaLN_modulation")(
      nn.silu(c.astype(jnp.float32))
    )
    mod = jnp.split(mod, n_mod, axis=-1)
    shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
    attn = lambda name, zero: Attention(
      d, self.num_heads, self.qk_norm, zero, self.attention_impl, self.dtype, name=name
    )

    h = modulate(layer_norm(x), shift_sa, scale_sa).astype(self.dtype)
    h = attn("self_attn", False)(h, h, rope=(rope_cos, rope_sin))
    x = x + (gate_sa[:, None, :] * h).astype(x.dtype)
    x = nn.with_logical_constraint(x, TOKEN_AXES)

    if self.cross_attn_modulation:
      shift_ca, scale_ca, gate_ca = mod[6:]
      h = modulate(layer_norm(x), shift_ca, scale_ca).astype(self.dtype)
      h = attn("cross_attn", False)(h, text, key_mask=text_mask)
      h = gate_ca[:, None, :] * h
    else:
      h = nn.LayerNorm(
        epsilon=1e-6,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name="cross_attn_norm",
      )(x).astype(self.dtype)
      h = attn("cross_attn", True)(h, text, key_mask=text_mask)
    # An example whose caption mask is all False gets no text contribution (not a uniform average).
    x = x + jnp.where(has_text[:, None, None], h, 0).astype(x.dtype)
    x = nn.with_logical_constraint(x, TOKEN_AXES)

    h = modulate(layer_norm(x), shift_mlp, scale_mlp).astype(self.dtype)
    h = _dense(int(d * self.mlp_ratio), ("embed", "mlp"), dtype=self.dtype, name="fc1")(h)
    h = nn.with_logical_constraint(nn.gelu(h, approximate=True), ("batch", "length", "mlp"))
    h = _dense(d, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)
    x = x + (gate_mlp[:, None, :] * h).astype(x.dtype)
    return nn.with_logical_constraint(x, TOKEN_AXES), None


class FinalLayer(nn.Module):
  """adaLN (shift, scale) + zero-initialised linear to p·p·C: ε is exactly zero at init (DiT)."""

  hidden_size: int
  out_features: int

  @nn.compact
  def __call__(self, x: Array, c: Array) -> Array:
    shift, scale = jnp.split(
      _dense(
        2 * self.hidden_size, ("embed", "modulation"), zero_init=True, name="adaLN_modulation"
      )(nn.silu(c.astype(jnp.float32))),
      2,
      axis=-1,
    )
    h = modulate(layer_norm(x), shift, scale)
    return _dense(self.out_features, ("embed", "patch"), zero_init=True, name="linear")(h)


# ------------------------------------------------------------------ the model


class ZipDiT(nn.Module):
  """ε_θ(z_t, t, z_LQ, y): the ZipIR diffusion transformer (§3.2, supp. A).

  ``__call__(z_t, t, lq_latent, text_emb, text_mask) -> eps`` with z_t and lq_latent
  (B, h, w, C), t (B,) integer or float timesteps, text_emb (B, L, text_dim) T5 states and
  text_mask (B, L) bool, right-padded (cuDNN reads it as lengths); eps is float32 (B, h, w, C).
  h and w must be multiples of ``patch_size``; any size works otherwise.
  """

  depth: int = 24
  hidden_size: int = 2048
  num_heads: int = 16
  mlp_ratio: float = 4.0
  patch_size: int = 1
  lq_fusion: str = "sum"
  text_dim: int = 4096
  text_projection: bool = True
  cross_attn_modulation: bool = True
  qk_norm: bool = True
  rope_theta: float = 10000.0
  attention_impl: str = "auto"
  scan_layers: bool = True
  remat_policy: str = "nothing_saveable"
  dtype: Dtype = jnp.float32

  def _check_inputs(self, z_t: Array, lq_latent: Array, text_emb: Array, text_mask: Array) -> None:
    if self.lq_fusion not in LQ_FUSIONS:
      raise errors.ConfigError(f"lq_fusion={self.lq_fusion!r}; valid: {', '.join(LQ_FUSIONS)}")
    if self.remat_policy not in REMAT_POLICIES:
      raise errors.ConfigError(
        f"remat_policy={self.remat_policy!r}; valid: {', '.join(REMAT_POLICIES)}"
      )
    if self.hidden_size % self.num_heads:
      raise errors.ConfigError(
        f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
      )
    if z_t.ndim != 4:
      raise ValueError(
        f"ZipDiT: z_t must be NHWC (batch, h, w, channels); got shape {tuple(z_t.shape)}"
      )
    if lq_latent.shape != z_t.shape:
      raise ValueError(
        f"ZipDiT: lq_latent shape {tuple(lq_latent.shape)} must equal z_t shape {tuple(z_t.shape)}"
      )
    b, h, w, _ = z_t.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(
        f"ZipDiT: latent of shape {tuple(z_t.shape)}: height {h} and width {w} must "
        f"be multiples of patch_size {p}; pad the latent first"
      )
    if text_emb.ndim != 3 or text_emb.shape[0] != b or text_emb.shape[-1] != self.text_dim:
      raise ValueError(
        f"ZipDiT: text_emb must be (batch={b}, length, text_dim={self.text_dim}); "
        f"got shape {tuple(text_emb.shape)}"
      )
    if text_mask.shape != text_emb.shape[:2]:
      raise ValueError(
        f"ZipDiT: text_mask shape {tuple(text_mask.shape)} must be "
        f"{tuple(text_emb.shape[:2])} (batch, length)"
      )

  @nn.compact
  def __call__(
    self, z_t: Array, t: Array, lq_latent: Array, text_emb: Array, text_mask: Array
  ) -> Array:
    self._check_inputs(z_t, lq_latent, text_emb, text_mask)
    b, h, w, c = z_t.shape
    p, d = self.patch_size, self.hidden_size
    t = jnp.broadcast_to(jnp.asarray(t), (b,))

    # Two parameter-independent patch embedders (§3.2).
    x = PatchEmbedder(d, p, self.dtype, name="x_embedder")(z_t)
    lq = PatchEmbedder(d, p, self.dtype, name="lq_embedder")(lq_latent)
    positions = token_positions(h // p, w // p)
    num_tokens = x.shape[1]
    if self.lq_fusion == "sum":
      x = x + lq
    else:  # "concat": both halves share the same 2D positions.
      x = jnp.concatenate([x, lq], axis=1)
      positions = jnp.concatenate([positions, positions], axis=0)
    x = nn.with_logical_constraint(x, TOKEN_AXES)
    rope_cos, rope_sin = rope_2d(positions, d // self.num_heads, self.rope_theta)

    c_emb = TimestepEmbedder(d, name="t_embedder")(t)
    text = text_emb.astype(self.dtype)
    if self.text_projection:  # PixArt-α's caption projection: T5 width -> hidden, once.
      text = _dense(d, ("text_embed", "mlp"), dtype=self.dtype, name="text_projection_1")(text)
      text = _dense(d, ("mlp", "embed"), dtype=self.dtype, name="text_projection_2")(
        nn.gelu(text, approximate=True)
      )
    text = nn.with_logical_constraint(
      text, TEXT_AXES if self.text_projection else ("batch", "text_length", "text_embed")
    )
    text_mask = text_mask.astype(bool)
    has_text = text_mask.any(axis=-1)

    block_args = dict(
      hidden_size=d,
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      qk_norm=self.qk_norm,
      cross_attn_modulation=self.cross_attn_modulation,
      attention_impl=self.attention_impl,
      dtype=self.dtype,
    )
    block = DiTBlock
    policy = REMAT_POLICIES[self.remat_policy]
    if self.remat_policy != "none":
      block = nn.remat(DiTBlock, policy=policy, prevent_cse=not self.scan_layers)
    inputs = (c_emb, text, text_mask, has_text, rope_cos, rope_sin)
    x = x.astype(self.dtype)
    if self.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * len(inputs),
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = stack(**block_args, name="blocks")(x, *inputs)
    else:
      for i in range(self.depth):
        x, _ = block(**block_args, name=f"blocks_{i}")(x, *inputs)

    x = x[:, :num_tokens]  # "concat": ε is read from the noisy-token half.
    out = FinalLayer(d, p * p * c, name="final_layer")(x, c_emb)
    return unpatchify(out.astype(jnp.float32), p, h, w)


# ------------------------------------------------------------------ config, init, counts


def build_dit(config: ml_collections.ConfigDict) -> ZipDiT:
  """The experiment's ZipDiT from ``config.dit``: the one place mapping config fields to it."""
  from zipir_jax.models.autoencoder import compute_dtype  # one dtype parser for every model.

  dit = config.dit
  return ZipDiT(
    depth=dit.depth,
    hidden_size=dit.hidden_size,
    num_heads=dit.num_heads,
    mlp_ratio=dit.mlp_ratio,
    patch_size=dit.patch_size,
    lq_fusion=dit.lq_fusion,
    text_dim=dit.text_dim,
    text_projection=dit.text_projection,
    cross_attn_modulation=dit.cross_attn_modulation,
    qk_norm=dit.qk_norm,
    rope_theta=dit.rope_theta,
    attention_impl=dit.attention_impl,
    scan_layers=dit.scan_layers,
    remat_policy=dit.remat_policy,
    dtype=compute_dtype(dit.dtype),
  )


def dummy_inputs(
  model: ZipDiT,
  channels: int,
  batch: int = 1,
  height: int | None = None,
  width: int | None = None,
  text_length: int = 8,
) -> tuple[Array, ...]:
  """Zeros of the right shapes for ``init`` (parameters do not depend on the latent size)."""
  height = height or model.patch_size
  width = width or model.patch_size
  z = jnp.zeros((batch, height, width, channels), jnp.float32)
  return (
    z,
    jnp.zeros((batch,), jnp.int32),
    z,
    jnp.zeros((batch, text_length, model.text_dim)),
    jnp.ones((batch, text_length), bool),
  )


def init_dit(model: ZipDiT, rng: Array, channels: int = 64) -> dict:
  """Unboxed float32 parameters of ``model`` for latents with ``channels`` channels."""
  return nn.meta.unbox(jax.jit(model.init)(rng, *dummy_inputs(model, channels)))["params"]


def inference_params(params: Any, dtype: Any) -> Any:
  """``params`` with every matmul kernel cast to the compute ``dtype`` once, for sampling.

  Training keeps float32 master weights and casts inside each step; a 25-step sampler would
  otherwise re-read the float32 kernels (10 GB for the paper's DiT) on every step. Norm scales,
  biases and embeddings stay float32, as the modules compute them. Kernels are cast on the device
  one at a time, so host (loaded) parameters never need a whole float32 copy there.
  """

  def cast(path, x):
    return jnp.asarray(x).astype(dtype) if path[-1].key == "kernel" else x

  return jax.tree_util.tree_map_with_path(cast, params)


def as_denoise_fn(model: ZipDiT) -> Callable[..., Array]:
  """``denoise_fn(params, z_t, t, lq_latent, text_emb, text_mask) -> eps`` for the samplers."""

  def denoise_fn(params, z_t, t, lq_latent, text_emb, text_mask):
    return model.apply({"params": params}, z_t, t, lq_latent, text_emb, text_mask)

  return denoise_fn


def param_breakdown(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Exact parameter counts of the config's ZipDiT per component, by ``jax.eval_shape``.

  No weight is allocated. Block entries are summed over all ``depth`` layers; ``total`` is the
  whole network.
  """
  model = build_dit(config).clone(scan_layers=True)
  params = jax.eval_shape(
    lambda: init_dit(
      model, jax.random.key(0), autoencoder.build_autoencoder(config).latent_channels
    )
  )
  blocks = params["blocks"]
  counts = {
    "x_embedder (z_t patches)": count_params(params["x_embedder"]),
    "lq_embedder (LQ patches)": count_params(params["lq_embedder"]),
    "t_embedder (timestep MLP)": count_params(params["t_embedder"]),
    "text_projection (T5 -> hidden)": count_params(
      {k: v for k, v in params.items() if k.startswith("text_projection")}
    ),
    "blocks: self-attention": count_params(blocks["self_attn"]),
    "blocks: cross-attention": count_params(
      {k: v for k, v in blocks.items() if k.startswith("cross_attn")}
    ),
    "blocks: MLP": count_params({k: blocks[k] for k in ("fc1", "fc2")}),
    "blocks: adaLN modulation": count_params(blocks["adaLN_modulation"]),
    "final_layer": count_params(params["final_layer"]),
  }
  counts["total"] = count_params(params)
  if sum(counts.values()) != 2 * counts["total"]:
    raise AssertionError(f"param_breakdown misses parameters: {sorted(params)} / {sorted(blocks)}")
  return counts


def unstack_layers(params: dict, depth: int) -> dict:
  """Scanned parameters (``blocks`` stacked on 'layers') -> the unrolled layout (``blocks_{i}``)."""
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(depth):
    out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
  return out


def stack_layers(params: dict, depth: int) -> dict:
  """Inverse of :func:`unstack_layers`."""
  out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
  out["blocks"] = jax.tree.map(
    lambda *xs: jnp.stack(xs), *[params[f"blocks_{i}"] for i in range(depth)]
  )
  return out

"""Tiled VAE execution (models/tiling.py) equals the untiled networks; GroupNorm sees the whole image."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jitted_apply, perturbed

from zipir_jax.models import autoencoder, tiling, vae_blocks
from zipir_jax.models.pixel_decoder import init_from_autoencoder

pytestmark = pytest.mark.xdist_group("tiny_lpvae")

SHAPE = (1, 96, 64, 3)  # non-square; 16-row strips give 6 strips at full resolution


def test_tiled_encode_decode_and_pixel_decoder_equal_untiled(tiny_config, tiny_lpvae, monkeypatch):
  vae, params = tiny_lpvae
  params = perturbed(params, 0, scale=0.02)
  image = jax.random.uniform(jax.random.key(1), SHAPE, minval=-1, maxval=1)
  z, _ = jitted_apply(vae, "encode")(params, image)
  recon = jitted_apply(vae, "decode")(params, z)
  calls = []
  original = tiling.tiled_conv

  def counting(conv, x, strip_rows, **kwargs):
    calls.append(
      {
        "up": kwargs.get("up", 1),
        "norm": kwargs.get("affine") is not None,
        "parts": len(x) if isinstance(x, (list, tuple)) else 1,
        "strided": conv.strides not in (None, 1, (1, 1)),
      }
    )
    return original(conv, x, strip_rows, **kwargs)

  tiling.tiled_conv = counting
  try:
    with tiling.tiled_convolutions(strip_rows=16):
      z_tiled, _ = vae.apply({"params": params}, image, method="encode")
      recon_tiled = vae.apply({"params": params}, z, method="decode")
  finally:
    tiling.tiled_conv = original
  assert len(calls) > 10  # the full-resolution convs really ran in strips
  # ... with each block's strip-wise form: norm + swish inside the conv strips (ResnetBlock),
  # strided with the padding inside (Downsample), upsampled per strip (Upsample).
  assert any(c["norm"] for c in calls) and any(c["up"] == 2 for c in calls)
  assert any(c["strided"] for c in calls)
  # Measured max over perturbation/image seeds 0-2 and shapes (1, 96, 64) and (2, 64, 96): z 2.7e-6,
  # recon 8.6e-6, D_f* 1.2e-5 (outputs of magnitude 1-5); the bounds are ~10x that.
  np.testing.assert_allclose(z_tiled, z, atol=3e-5, rtol=0)
  np.testing.assert_allclose(recon_tiled, recon, atol=9e-5, rtol=0)

  pdec = autoencoder.build_pixel_decoder(tiny_config)
  fresh = nn.meta.unbox(jax.jit(pdec.init)(jax.random.key(2), z, image))["params"]
  pd_params = init_from_autoencoder(fresh, params["fine_encoder"], params["fine_decoder"])
  decoder = dict(pd_params["decoder"])
  for name in [k for k in decoder if k.endswith("_fusion")]:  # make the fusion layers act
    decoder[name] = jax.tree.map(lambda x: x + 1e-3, decoder[name])
  pd_params = {**pd_params, "decoder": decoder}
  out = jax.jit(pdec.apply)({"params": pd_params}, z, image)
  fused, fusion_tiled_call = [], vae_blocks.PixelFusion.tiled_call

  def counting_fusion(module, h, *args, **kwargs):
    fused.append(h.shape[1])
    return fusion_tiled_call(module, h, *args, **kwargs)

  monkeypatch.setattr(vae_blocks.PixelFusion, "tiled_call", counting_fusion)
  with tiling.tiled_convolutions(strip_rows=16):
    out_tiled = pdec.apply({"params": pd_params}, z, image)
  # D_f*'s fusion layers ran their strip-wise form (norm + swish inside the scale/shift strips) at
  # every level taller than a strip, from the decoder's 24-row level up to full resolution.
  assert fused == [24, 48, 96]
  assert np.abs(out - recon).max() > 1e-3
  np.testing.assert_allclose(out_tiled, out, atol=1.3e-4, rtol=0)


def test_strided_and_explicitly_padded_convs_are_exact():
  x = jax.random.normal(jax.random.key(0), (2, 37, 11, 5))
  for conv in (
    nn.Conv(7, (3, 3), strides=(2, 2), padding="VALID"),
    nn.Conv(7, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1))),
    nn.Conv(7, (3, 3), padding="SAME"),
    nn.Conv(7, (1, 1)),
  ):
    variables = conv.init(jax.random.key(1), x)
    want = conv.apply(variables, x)
    with tiling.tiled_convolutions(strip_rows=4):
      got = conv.apply(variables, x)
    np.testing.assert_allclose(got, want, atol=4e-6, rtol=0)  # measured max 3.6e-7 (seeds 0-2)


def test_upsampling_conv_in_strips_equals_conv_of_the_upsampled_image():
  x = jax.random.normal(jax.random.key(0), (2, 13, 7, 5))
  up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  for conv in (
    nn.Conv(6, (3, 3), padding="SAME"),
    nn.Conv(6, (3, 3), padding="VALID"),
    nn.Conv(6, (4, 4), strides=(2, 2), padding=((1, 2), (1, 1))),
  ):
    variables = conv.init(jax.random.key(1), up)
    want = conv.apply(variables, up)
    for strip_rows in (1, 3, 5, 40):
      got = tiling.tiled_conv(conv.bind(variables), x, strip_rows, up=2)
      np.testing.assert_allclose(got, want, atol=4e-6, rtol=0)  # measured max 3.6e-7 (seeds 0-2)


def test_norm_swish_and_concat_inside_strips_equal_the_whole_image_ops():
  """GroupNorm (whole-image statistics, groups straddling the two parts) + swish + concat, done
  per strip inside the convolution, equal the same ops on whole arrays."""
  keys = jax.random.split(jax.random.key(0), 3)
  parts = [
    2.0 + jax.random.normal(keys[0], (2, 19, 9, 6)),
    jax.random.normal(keys[1], (2, 19, 9, 10)),
  ]
  x = jnp.concatenate(parts, axis=-1)
  norm = nn.GroupNorm(num_groups=4, epsilon=1e-6)
  norm_vars = jax.tree.map(lambda p: p + jax.random.normal(keys[2], p.shape), norm.init(keys[2], x))
  conv = nn.Conv(5, (3, 3), padding="SAME")
  conv_vars = conv.init(jax.random.key(3), x)
  want = conv.apply(conv_vars, jax.nn.swish(norm.apply(norm_vars, x)))
  affine = tiling.group_norm_affine(parts, norm_vars["params"], 4, 1e-6)
  for strip_rows in (1, 4, 19):
    got = tiling.tiled_conv(conv.bind(conv_vars), parts, strip_rows, affine=affine, swish=True)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_group_norm_statistics_are_those_of_the_whole_image():
  """Per-tile normalisation (what tiled VAEs usually do) would flatten this left/right contrast."""
  norm = nn.GroupNorm(num_groups=1)
  x = jnp.concatenate([jnp.zeros((1, 64, 8, 4)), jnp.ones((1, 64, 8, 4))], axis=2)
  model = nn.Sequential([nn.Conv(4, (3, 3)), norm])
  variables = model.init(jax.random.key(0), x)
  with tiling.tiled_convolutions(strip_rows=8):
    got = model.apply(variables, x)
  np.testing.assert_allclose(got, model.apply(variables, x), atol=5e-6, rtol=0)  # measured 4.8e-7


def test_bad_strip_rows():
  with pytest.raises(ValueError, match="strip_rows"), tiling.tiled_convolutions(strip_rows=0):
    pass


def test_tiled_group_norm_keeps_the_input_dtype_and_equals_the_exact_norm():
  """The tiled GroupNorm returns bf16 for bf16 input (no float32 full-size copy); in float32 it
  equals a float64 reference to 1e-5 (flax's one-pass variance is 3e-5 off here: mean 3, std 1)."""
  norm = nn.GroupNorm(num_groups=4, epsilon=1e-6, dtype=jnp.float32)
  x = 3.0 + jax.random.normal(jax.random.key(0), (2, 40, 12, 16))
  variables = jax.tree.map(
    lambda p: p + jax.random.normal(jax.random.key(1), p.shape), norm.init(jax.random.key(0), x)
  )
  with tiling.tiled_convolutions(strip_rows=8):
    got32 = norm.apply(variables, x)
    got16 = norm.apply(variables, x.astype(jnp.bfloat16))
  g = np.asarray(x, np.float64).reshape(2, 40, 12, 4, 4)
  exact = (
    (g - g.mean(axis=(1, 2, 4), keepdims=True))
    / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
  ).reshape(x.shape)
  params = jax.tree.map(lambda p: np.asarray(p, np.float64), variables["params"])
  np.testing.assert_allclose(got32, exact * params["scale"] + params["bias"], atol=1e-5, rtol=0)
  assert got16.dtype == jnp.bfloat16
  want16 = norm.apply(variables, x.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(got16.astype(jnp.float32), want16, atol=0.05, rtol=0.01)

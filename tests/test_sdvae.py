"""The f32c64 SD-VAE baseline (Table 4) shares the LP-VAE's interface and restores with its own
decoder (training it: tests/test_train.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jitted_apply

from zipir_jax import config_lib
from zipir_jax.models import autoencoder


@pytest.fixture(scope="module")
def sdvae():
  config = config_lib.load_config("configs/tiny_sdvae.py")
  module = autoencoder.build_autoencoder(config)
  return module, autoencoder.init_autoencoder(module, jax.random.key(0), (1, 64, 64, 3))


def test_shapes_and_interface(sdvae):
  module, params = sdvae
  assert set(params) == {"encoder", "decoder"}
  assert "mid_attn_1" in params["encoder"] and "mid_attn_1" in params["decoder"]
  image = jax.random.uniform(jax.random.key(1), (2, 96, 160, 3), minval=-1, maxval=1)
  z, posteriors = jitted_apply(module, "encode")(params, image)
  assert z.shape == (2, 3, 5, 64)
  np.testing.assert_array_equal(z, posteriors["latent"].mean)
  recon, z2, _ = jitted_apply(module)(params, image)
  assert recon.shape == image.shape
  np.testing.assert_array_equal(z, z2)


def test_paper_sdvae_latent_by_eval_shape():
  config = config_lib.load_config("configs/sdvae_f32c64.py:vae")
  module = autoencoder.build_autoencoder(config)
  image = jax.ShapeDtypeStruct((1, 2048, 2048, 3), jnp.float32)
  params = jax.eval_shape(
    lambda x: autoencoder.init_autoencoder(module, jax.random.key(0), x.shape), image
  )
  z, _ = jax.eval_shape(lambda p, x: module.apply({"params": p}, x, method="encode"), params, image)
  assert z.shape == (1, 64, 64, 64)


def test_refuses_bad_size(sdvae):
  module, params = sdvae
  with pytest.raises(ValueError, match=r"\(1, 80, 64, 3\).*multiples of 32"):
    module.apply({"params": params}, jnp.zeros((1, 80, 64, 3)), method="encode")


def test_ablation_restores_with_the_plain_sdvae_decoder(sdvae):
  """No fusion levels: D_f* is the SD-VAE's decoder itself (no extractor, blind to the LQ image)."""
  module, params = sdvae
  config = config_lib.load_config("configs/tiny_sdvae.py:dit")
  decoder = autoencoder.build_pixel_decoder(config)
  z = jax.random.normal(jax.random.key(1), (2, 2, 3, 64))
  lq = jax.random.uniform(jax.random.key(2), (2, 64, 96, 3), minval=-1, maxval=1)
  shapes = nn.meta.unbox(jax.eval_shape(decoder.init, jax.random.key(0), z, lq))["params"]
  assert set(shapes) == {"decoder"}
  assert jax.tree.structure(shapes["decoder"]) == jax.tree.structure(params["decoder"])
  out = jax.jit(decoder.apply)({"params": {"decoder": params["decoder"]}}, z, lq)
  np.testing.assert_array_equal(out, jitted_apply(module, "decode")(params, z))
  np.testing.assert_array_equal(
    out, jax.jit(decoder.apply)({"params": {"decoder": params["decoder"]}}, z, -lq)
  )

"""LP-VAE (§3.1): latent layout, shapes for odd sizes, the macro level, errors on bad sizes."""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jitted_apply

from zipir_jax import config_lib
from zipir_jax.models import autoencoder
from zipir_jax.models.lpvae import (
  IMAGENET_MEAN,
  MACRO_CHANNELS,
  area_downsample,
  check_spatial_shape,
)

# Shares the session fixture it needs with the other files of this group on one xdist worker.
pytestmark = pytest.mark.xdist_group("tiny_lpvae")


@pytest.fixture(scope="module")
def lpvae(tiny_lpvae):
  return tiny_lpvae


def _image(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


@pytest.mark.parametrize("height,width", [(96, 160), (256, 256)])
def test_latent_shapes_and_channel_order(lpvae, height, width):
  module, params = lpvae
  image = _image((2, height, width, 3))
  z, posteriors = jitted_apply(module, "encode")(params, image)
  assert z.shape == (2, height // 32, width // 32, 64)
  # Order [macro 3 | coarse 9 | fine 52]; without an rng the posteriors' modes are used.
  np.testing.assert_array_equal(z[..., 3:12], posteriors["coarse"].mean)
  np.testing.assert_array_equal(z[..., 12:], posteriors["fine"].mean)
  assert posteriors["coarse"].mean.shape[-1] == 9 and posteriors["fine"].mean.shape[-1] == 52

  recon = jitted_apply(module, "decode")(params, z)
  assert recon.shape == image.shape and recon.dtype == jnp.float32
  coarse = jitted_apply(module, "decode_coarse")(params, z[..., :12])
  assert coarse.shape == (2, height // 4, width // 4, 3)


def test_z_macro_is_normalised_area_downsample(lpvae, tiny_config):
  module, params = lpvae
  image = np.asarray(_image((1, 96, 160, 3), seed=3))
  z, _ = jitted_apply(module, "encode")(params, image)
  # Independent reference: OpenCV's area interpolation is the box mean for integer factors.
  down = cv2.resize(image[0], (160 // 32, 96 // 32), interpolation=cv2.INTER_AREA)
  macro = params["macro"]  # z_macro's μ/σ: ImageNet's until vae_coarse measures its data's
  np.testing.assert_allclose(macro["mean"], IMAGENET_MEAN, rtol=1e-6)
  expected = (down - np.asarray(macro["mean"])) / np.asarray(macro["std"])
  np.testing.assert_allclose(z[0, ..., :MACRO_CHANNELS], expected, atol=1e-6, rtol=0)


def test_pyramid_levels_see_their_own_resolution(lpvae):
  """A zero-mean pattern inside every 4x4 cell leaves I↓4, hence macro and coarse, unchanged."""
  module, params = lpvae
  image = _image((1, 64, 96, 3), seed=1) * 0.5
  pattern = np.tile(np.array([[1, -1, 1, -1], [-1, 1, -1, 1]] * 2, np.float32), (16, 24))
  perturbed = image + 0.3 * pattern[None, :, :, None]
  np.testing.assert_allclose(area_downsample(perturbed, 4), area_downsample(image, 4), atol=1e-6)
  encode = jitted_apply(module, "encode")
  z0, _ = encode(params, image)
  z1, _ = encode(params, perturbed)
  np.testing.assert_allclose(z1[..., :12], z0[..., :12], atol=1e-5)
  assert np.abs(z1[..., 12:] - z0[..., 12:]).max() > 1e-3  # E_f sees the full-resolution detail.


def test_sampling_uses_the_rng(lpvae):
  module, params = lpvae
  image = _image((1, 64, 64, 3))
  encode = jitted_apply(module, "encode")
  mode, _ = encode(params, image)
  s1, _ = encode(params, image, jax.random.key(1))
  s2, _ = encode(params, image, jax.random.key(1))
  s3, _ = encode(params, image, jax.random.key(2))
  np.testing.assert_array_equal(s1, s2)
  assert not np.allclose(s1[..., 3:], mode[..., 3:]) and not np.allclose(s1, s3)
  np.testing.assert_array_equal(s1[..., :3], mode[..., :3])  # z_macro is deterministic


def test_paper_shapes_by_eval_shape():
  config = config_lib.load_config("configs/zipir_3b.py:vae_fine")
  module = autoencoder.build_autoencoder(config)
  image = jax.ShapeDtypeStruct((1, 2048, 1376, 3), jnp.float32)
  params = jax.eval_shape(
    lambda x: autoencoder.init_autoencoder(module, jax.random.key(0), x.shape), image
  )
  z, post = jax.eval_shape(
    lambda p, x: module.apply({"params": p}, x, method="encode"), params, image
  )
  assert z.shape == (1, 64, 43, 64)
  assert post["coarse"].mean.shape == (1, 64, 43, 9) and post["fine"].mean.shape == (1, 64, 43, 52)
  recon = jax.eval_shape(lambda p, z: module.apply({"params": p}, z, method="decode"), params, z)
  assert recon.shape == (1, 2048, 1376, 3)
  # E_c runs on I↓4: its input convolution sees 512 x 344.
  assert params["coarse_encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 128)


@pytest.mark.parametrize("shape", [(1, 100, 160, 3), (1, 96, 161, 3), (1, 16, 32, 3)])
def test_sizes_not_multiple_of_32_are_refused(lpvae, shape):
  module, params = lpvae
  with pytest.raises(ValueError, match=r"multiples of 32") as info:
    module.apply({"params": params}, jnp.zeros(shape), method="encode")
  assert str(shape) in str(info.value)


def test_non_nhwc_input_is_refused():
  with pytest.raises(ValueError, match="NHWC"):
    check_spatial_shape((96, 160, 3), 32)


def test_decode_refuses_wrong_channel_count(lpvae):
  module, params = lpvae
  with pytest.raises(ValueError, match="64 channels"):
    module.apply({"params": params}, jnp.zeros((1, 2, 2, 12)), method="decode")


def test_parameters_carry_logical_axis_names(tiny_lpvae):
  """Sharding rules (training issue) map these names onto the mesh; every weight must have them."""
  import flax.linen as nn

  module, _ = tiny_lpvae
  boxed = jax.eval_shape(
    lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), method="init_all")
  )["params"]
  specs = nn.get_partition_spec(boxed)
  flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, tuple))
  assert flat
  for path, spec in flat:
    assert spec is not None and all(isinstance(a, str) for a in spec), path
  kernel = specs["fine_encoder"]["down_0_block_0"]["conv1"]["kernel"]
  assert tuple(kernel) == ("kernel_h", "kernel_w", "conv_in", "conv_out")


def test_fresh_posterior_noise_is_small_against_the_means(lpvae, tiny_config):
  """With LDM's zero log-variance bias a fresh posterior's noise is as large as its means, and a
  run of a few hundred steps never brings it down: z_fine then carried almost nothing (measured:
  std 0.74 against mean RMS 0.78 after 300 steps). The configured start keeps the latent usable."""
  module, params = lpvae
  _, posteriors = jitted_apply(module, "encode")(params, _image((2, 64, 64, 3)))
  assert set(posteriors) == {"coarse", "fine"}
  for name, posterior in posteriors.items():
    mean_rms = float(jnp.sqrt(jnp.mean(jnp.square(posterior.mean))))
    std = np.asarray(jnp.exp(0.5 * posterior.logvar))
    assert np.median(np.asarray(posterior.logvar)) == pytest.approx(
      tiny_config.vae.init_logvar, abs=1
    )
    assert np.percentile(std, 99) < 0.2 * mean_rms, (name, np.percentile(std, 99), mean_rms)
  # The SD-VAE baseline's encoder starts the same way (Table 4 compares like with like).
  sdvae = config_lib.apply_overrides(
    tiny_config.copy_and_resolve_references(), {"vae.kind": "sdvae"}
  )
  assert autoencoder.build_autoencoder(sdvae).init_logvar == tiny_config.vae.init_logvar

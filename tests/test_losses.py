"""Autoencoder losses and the patch discriminator (LDM autoencoder recipe, §3.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zipir_jax import losses
from zipir_jax.models import autoencoder
from zipir_jax.models.vae_blocks import DiagonalGaussian


def test_hinge_losses():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.0])
  # relu(1 - real) = [0, .5, 2]; relu(1 + fake) = [0, 1, 2]  ->  0.5 * (2.5/3 + 3/3)
  np.testing.assert_allclose(
    losses.hinge_discriminator_loss(real, fake), 0.5 * (2.5 / 3 + 1.0), rtol=1e-6
  )
  np.testing.assert_allclose(losses.generator_loss(fake), 1.0 / 3, rtol=1e-6)
  # A perfect discriminator (margins met) has zero loss.
  assert losses.hinge_discriminator_loss(jnp.full(4, 3.0), jnp.full(4, -3.0)) == 0.0


def test_disc_factor_switches_on_at_start():
  steps = jnp.arange(8)
  np.testing.assert_array_equal(
    losses.disc_factor(steps, 5, 0.75), [0, 0, 0, 0, 0, 0.75, 0.75, 0.75]
  )


def test_kl_matches_closed_form():
  mean = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  logvar = jax.random.normal(jax.random.key(1), (2, 3, 4, 5))
  post = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], -1))
  var = np.exp(np.asarray(logvar, np.float64))
  expected = 0.5 * (np.asarray(mean, np.float64) ** 2 + var - 1 - np.log(var)).sum((1, 2, 3))
  np.testing.assert_allclose(post.kl(), expected, rtol=1e-5)
  np.testing.assert_allclose(losses.kl_loss({"a": post, "b": post}), 2 * expected.mean(), rtol=1e-5)
  standard = DiagonalGaussian(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)))
  assert float(standard.kl()[0]) == 0.0


def test_sample_has_posterior_moments():
  post = DiagonalGaussian(jnp.full((1, 64, 64, 8), 2.0), jnp.full((1, 64, 64, 8), np.log(0.25)))
  s = post.sample(jax.random.key(0))
  assert abs(float(s.mean()) - 2.0) < 0.01 and abs(float(s.std()) - 0.5) < 0.01


def test_adaptive_weight_is_ratio_of_last_layer_gradient_norms():
  w = jax.random.normal(jax.random.key(0), (4, 3))
  x = jax.random.normal(jax.random.key(1), (8, 4))
  target = jax.random.normal(jax.random.key(2), (8, 3))
  nll = lambda w: jnp.mean(jnp.abs(x @ w - target))
  g = lambda w: -jnp.mean(3.0 * (x @ w))
  expected = (np.linalg.norm(jax.grad(nll)(w)) / (np.linalg.norm(jax.grad(g)(w)) + 1e-4)) * 0.5
  got = losses.adaptive_disc_weight(nll, g, w, disc_weight=0.5)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Clipped to max_weight when the GAN gradient vanishes.
  assert losses.adaptive_disc_weight(nll, lambda w: jnp.sum(0.0 * w), w, max_weight=10.0) == 10.0
  # Constant for the outer gradient.
  assert float(jax.grad(lambda w: losses.adaptive_disc_weight(nll, g, w))(w).sum()) == 0.0


def test_reconstruction_loss_adds_perceptual_term():
  a = jnp.zeros((2, 32, 32, 3))
  b = jnp.full((2, 32, 32, 3), 0.5)
  assert float(losses.reconstruction_loss(a, b)) == pytest.approx(0.5)
  fake_lpips = lambda x, y: jnp.array([1.0, 3.0])
  assert float(losses.reconstruction_loss(a, b, fake_lpips, 2.0, 0.1)) == pytest.approx(1.2)


@pytest.mark.parametrize("height,width", [(64, 64), (96, 160), (70, 45)])
def test_patch_discriminator_shapes_and_modes(tiny_config, height, width):
  disc = autoencoder.build_discriminator(tiny_config)  # 2 layers: /2, /2, then two stride-1 convs
  image = jax.random.uniform(jax.random.key(0), (2, height, width, 3), minval=-1, maxval=1)
  variables = disc.init(jax.random.key(1), image, train=False)
  logits, updates = disc.apply(variables, image, train=True, mutable=["batch_stats"])
  size = lambda n: (((n // 2) // 2) - 1) - 1  # k4 s2 p1 halves (floor); k4 s1 p1 loses one
  assert logits.shape == (2, size(height), size(width), 1)
  # Training mode uses batch statistics and updates the running averages; eval mode uses them.
  assert not np.allclose(
    updates["batch_stats"]["norm_1"]["mean"], variables["batch_stats"]["norm_1"]["mean"]
  )
  eval_logits = disc.apply({**variables, **updates}, image, train=False)
  assert eval_logits.shape == logits.shape and not np.allclose(eval_logits, logits)


def test_paper_discriminator_receptive_patches():
  config = __import__("zipir_jax.config_lib", fromlist=["x"]).load_config("configs/zipir_3b.py")
  disc = autoencoder.build_discriminator(config)
  out = jax.eval_shape(
    lambda x: disc.init_with_output(jax.random.key(0), x, train=False)[0],
    jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32),
  )
  assert out.shape == (1, 30, 30, 1)  # pix2pix's 70x70 PatchGAN on 256² gives 30x30 logits

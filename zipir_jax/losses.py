"""Autoencoder losses of the LP-VAE stages (§3.1: L1 + LPIPS + patch GAN, as in LDM [13]; small KL).

Pure functions on arrays. The training step composes them:

  nll   = l1_weight * |x - x̂| + lpips_weight * LPIPS(x, x̂)          (per pixel, then mean)
  g     = -mean(D(x̂))                                                 (hinge generator loss)
  loss  = nll + kl_weight * KL + d_weight * disc_factor(step) * g
  d_weight = disc_weight * ||∇_W nll|| / (||∇_W g|| + 1e-4),  W = decoder's last layer
  D-loss = disc_factor(step) * hinge(D(x), D(x̂))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from zipir_jax.models import lpips
from zipir_jax.models.vae_blocks import DiagonalGaussian

Array = jax.Array


def reconstruction_loss(
  target: Array,
  reconstruction: Array,
  perceptual: Callable[[Array, Array], Array] | None = None,
  l1_weight: float = 1.0,
  perceptual_weight: float = 1.0,
) -> Array:
  """Mean of L1 (per pixel) plus the perceptual distance (per image, e.g. LPIPS)."""
  loss = l1_weight * jnp.mean(jnp.abs(target.astype(jnp.float32) - reconstruction))
  if perceptual is not None and perceptual_weight:
    loss = loss + perceptual_weight * jnp.mean(perceptual(target, reconstruction))
  return loss


def perceptual_from_config(
  loss_config: ml_collections.ConfigDict,
) -> Callable[[Array, Array], Array] | None:
  """LPIPS(x, y) -> (B,) from ``config.loss`` weight files, or None when no VGG16 file is given.

  The VGG16 trunk is the user's (torchvision state dict, .pth or .safetensors); the heads default to
  the file shipped in the lpips wheel. Nothing is downloaded.
  """
  if not loss_config.lpips_vgg16 or not loss_config.lpips_weight:
    return None
  variables = lpips.load(loss_config.lpips_vgg16, loss_config.lpips_heads or None)
  model = lpips.LPIPS()
  return lambda x, y: model.apply(variables, x, y)


def kl_loss(posteriors: Mapping[str, DiagonalGaussian]) -> Array:
  """Sum over the learned latent levels (coarse, fine) of KL(q || N(0, I)), mean over the batch."""
  return sum(jnp.mean(p.kl()) for p in posteriors.values())


def hinge_discriminator_loss(logits_real: Array, logits_fake: Array) -> Array:
  """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x̂))]) (LDM's hinge_d_loss)."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_loss(logits_fake: Array) -> Array:
  """The generator side of the hinge GAN: -E[D(x̂)]."""
  return -jnp.mean(logits_fake)


def disc_factor(step: Array | int, start: int, factor: float = 1.0) -> Array:
  """``factor`` from step ``start`` on, 0 before (the delayed discriminator start of LDM)."""
  return jnp.where(jnp.asarray(step) >= start, factor, 0.0)


def adaptive_disc_weight(
  nll_of_last_layer: Callable[[Array], Array],
  g_of_last_layer: Callable[[Array], Array],
  last_layer: Array,
  disc_weight: float = 1.0,
  max_weight: float = 1e4,
) -> Array:
  """LDM's adaptive generator weight: balances the GAN gradient against the reconstruction one.

  Both callables map the decoder's last-layer kernel ``last_layer`` to a scalar loss (close over the
  rest of the computation). Only the last layer is differentiated, so the cost is small; the result is
  a constant for the outer gradient (stop_gradient), as in LDM.
  """
  nll_grad = jax.grad(nll_of_last_layer)(last_layer)
  g_grad = jax.grad(g_of_last_layer)(last_layer)
  weight = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight) * disc_weight)

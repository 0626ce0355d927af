"""Autoencoder losses of the LP-VAE stages (§3.1: L1 + LPIPS + patch GAN, as in [13] and LDM; KL).

Pure functions on arrays. The training step composes them as LDM's objective divided by N, the
number of elements (pixels x channels) of one target image, so that no term's weight depends on
the crop size:

  nll   = l1_weight * mean|x - x̂| + lpips_weight * mean LPIPS(x, x̂)    (= LDM's per-example sum / N)
  kl    = mean over the batch of KL(q(z|x) || N(0, I)) summed over latent elements
  g     = -mean(D(x̂))                                                  (hinge generator loss)
  loss  = nll + kl_weight * kl / N + d_weight * disc_factor(step) * g
  d_weight = disc_weight * ||∇_W nll|| / (||∇_W g|| + 1e-4),  W = decoder's last layer
  D-loss = disc_factor(step) * hinge(D(x), D(x̂))

LDM weighs the per-example *sums* of reconstruction and KL with ``kl_weight`` 1e-6; dividing both by
N keeps that balance and is resolution-independent (the KL sum and N both grow with H·W). The
adaptive weight follows nll's scale, so the GAN term keeps LDM's balance too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from zipir_jax import errors
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
  """LPIPS(x, y) -> (B,) from ``config.loss`` weight files; None when ``lpips_weight`` is 0.

  The VGG16 trunk is the user's (torchvision state dict, .pth or .safetensors); the heads default to
  the file shipped in the lpips wheel. Nothing is downloaded. A positive weight without the VGG16
  file is refused: the paper's perceptual term is never switched off silently.
  """
  if not loss_config.lpips_weight:
    return None
  path = loss_config.lpips_vgg16
  if not path or not os.path.isfile(path):
    where = f"{path!r} does not exist" if path else "is not set"
    raise errors.ConfigError(
      f"config.loss.lpips_weight={loss_config.lpips_weight} needs torchvision's VGG16 weights, but "
      f"config.loss.lpips_vgg16 {where}. Make the file once with torchvision: torch.save("
      "torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), 'vgg16.pth'), then pass "
      "--config.loss.lpips_vgg16=vgg16.pth (or --config.loss.lpips_weight=0 to train without LPIPS)"
    )
  variables = lpips.load(path, loss_config.lpips_heads or None)
  model = lpips.LPIPS()
  return lambda x, y: model.apply(variables, x, y)


def kl_loss(posteriors: Mapping[str, DiagonalGaussian]) -> Array:
  """Sum over the learned latent levels (coarse, fine) of KL(q || N(0, I)), mean over the batch."""
  return sum(jnp.mean(p.kl()) for p in posteriors.values())


def per_target_element(value: Array, target: Array) -> Array:
  """``value`` (a per-example sum, e.g. the KL) divided by one target image's element count."""
  return value / math.prod(target.shape[1:])


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

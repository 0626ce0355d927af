"""The pure training step of every stage, jitted once per stage with explicit shardings.

Autoencoder stages (§3.1; LDM's autoencoder recipe): one generator update (L1 + LPIPS + KL +
adaptively weighted hinge-GAN generator term, as ``losses.py`` writes them), then one discriminator
update on the same batch; the GAN terms and the discriminator's updates start at the stage's
``stages.disc_start``. The dit stage (§3.2) encodes HQ and LQ↑ with the frozen VAE encoders into the
normalised latent (``latents.py``) and takes the ε-prediction loss with caption dropout for
classifier-free guidance.

Gradient accumulation splits the batch into ``config.optim.grad_accum`` micro-batches inside the step
(``lax.scan``); a non-finite loss or gradient leaves the whole state unchanged except the counters.
"""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from zipir_jax import diffusion, errors, latents, losses, parallel
from zipir_jax import flops as flops_lib
from zipir_jax.models import dit as dit_lib
from zipir_jax.models.lpvae import area_downsample
from zipir_jax.training import stages
from zipir_jax.training.state import Models, TrainState, learning_rate, make_optimizer

Array = jax.Array


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _replace(tree, path, value):
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
  flat[path] = value
  return flax.traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------ autoencoder stages


def _reconstruct_coarse(models, params, frozen, hq, lq_up, rng):
  """vae_coarse: [z_macro | z_coarse] from E_c on I↓4, decoded by D_c; the target is I↓4."""
  vae, variables = models.vae, {"params": {**frozen, **params}}
  z, post = vae.apply(variables, hq, rng, method="encode_coarse")
  recon = vae.apply(variables, z, method="decode_coarse")
  return area_downsample(hq, vae.coarse_input_factor), recon, post


def _reconstruct_fine(models, params, frozen, hq, lq_up, rng):
  """vae_fine: the full pyramid with E_c frozen; only the fine level's posterior is trained."""
  variables = {"params": {**frozen, **params}}
  z, post = models.vae.apply(variables, hq, rng, method="encode")
  return hq, models.vae.apply(variables, z, method="decode"), {"fine": post["fine"]}


def _reconstruct_sdvae(models, params, frozen, hq, lq_up, rng):
  """vae (SD-VAE ablation): one encoder and decoder, trained together."""
  z, post = models.vae.apply({"params": params}, hq, rng, method="encode")
  return hq, models.vae.apply({"params": params}, z, method="decode"), post


def _reconstruct_pixel(models, params, frozen, hq, lq_up, rng):
  """pixel_decoder: D_f*(z(HQ), LQ↑) with the frozen encoders' posterior mode; no posterior."""
  z, _ = models.frozen_vae.apply({"params": frozen}, hq, method="encode")
  return hq, models.pixel_decoder.apply({"params": params["pixel_decoder"]}, z, lq_up), {}


# Each autoencoder stage's own reconstruction (target, output, trained posteriors).
RECONSTRUCT = {
  "vae_coarse": _reconstruct_coarse,
  "vae_fine": _reconstruct_fine,
  "vae": _reconstruct_sdvae,
  "pixel_decoder": _reconstruct_pixel,
}


def reconstruct(
  models: Models, params: dict, frozen: dict, batch: dict, rng: Array | None
) -> tuple[Array, Array, dict]:
  """(target, reconstruction, posteriors of the trained levels) of an autoencoder stage."""
  fn = RECONSTRUCT[models.stage.name]
  return fn(models, params, frozen, batch["hq"], batch.get("lq_up"), rng)


def _discriminate(models: Models, disc: dict, image: Array) -> tuple[Array, dict]:
  logits, updates = models.discriminator.apply(disc, image, train=True, mutable=["batch_stats"])
  return logits, updates["batch_stats"]


def _nll(models, target, recon):
  cfg = models.config.loss
  return losses.reconstruction_loss(
    target, recon, models.perceptual, cfg.l1_weight, cfg.lpips_weight
  )


def gan_enabled(config) -> bool:
  """Whether the stage trains a discriminator in this run (its start is inside the run)."""
  return stages.disc_start(config) is not None


def generator_loss(
  params: dict, frozen: dict, disc: dict, batch: dict, rng: Array, step: Array, models: Models
) -> tuple[Array, dict]:
  """The autoencoder stages' generator objective (``losses.py``'s formula) and its terms."""
  cfg = models.config.loss
  target, recon, post = reconstruct(models, params, frozen, batch, rng)
  nll = _nll(models, target, recon)
  kl = losses.kl_loss(post) if post else jnp.zeros(())
  loss = nll + cfg.kl_weight * losses.per_target_element(kl, target)
  metrics = {"nll": nll, "kl": kl}
  start = stages.disc_start(models.config)
  if start is None:  # a stage without a GAN term (disc_weight=0): no discriminator at all.
    return loss, dict(metrics, loss=loss)
  factor = losses.disc_factor(step, start, cfg.disc_factor)
  logits_fake, _ = _discriminate(models, disc, recon)
  g = losses.generator_loss(logits_fake)

  def adaptive(_):
    path = models.stage.last_layer

    def with_kernel(w):
      return reconstruct(models, _replace(params, path, w), frozen, batch, rng)[1]

    return losses.adaptive_disc_weight(
      lambda w: _nll(models, target, with_kernel(w)),
      lambda w: losses.generator_loss(_discriminate(models, disc, with_kernel(w))[0]),
      _get(params, path),
      cfg.disc_weight,
    )

  d_weight = jax.lax.cond(factor > 0, adaptive, lambda _: jnp.zeros(()), None)
  loss = loss + d_weight * factor * g
  return loss, dict(metrics, loss=loss, g_loss=g, d_weight=d_weight)


def discriminator_loss(
  disc_params: dict,
  disc: dict,
  params: dict,
  frozen: dict,
  batch: dict,
  rng: Array,
  step: Array,
  models: Models,
) -> tuple[Array, dict]:
  cfg = models.config.loss
  target, recon, _ = reconstruct(models, params, frozen, batch, rng)
  start = stages.disc_start(models.config)
  variables = {"params": disc_params, "batch_stats": disc["batch_stats"]}
  logits_real, stats = _discriminate(models, variables, target)
  logits_fake, stats = _discriminate(
    models, {**variables, "batch_stats": stats}, jax.lax.stop_gradient(recon)
  )
  factor = losses.disc_factor(step, start, cfg.disc_factor)
  d_loss = factor * losses.hinge_discriminator_loss(logits_real, logits_fake)
  return d_loss, {
    "d_loss": d_loss,
    "logits_real": jnp.mean(logits_real),
    "logits_fake": jnp.mean(logits_fake),
    "batch_stats": stats,
  }


# ------------------------------------------------------------------ dit stage


def encode_latents(models: Models, frozen: dict, image: Array) -> Array:
  """Frozen VAE encoders (posterior mode), normalised per channel with the measured stats."""
  encoders = stages.select(frozen, stages.experiment(models.config.vae.kind).encoders)
  return latents.encode(models.frozen_vae, encoders, image, frozen["latent_stats"])


def dit_loss(
  params: dict, frozen: dict, batch: dict, rng: Array, models: Models
) -> tuple[Array, dict]:
  config = models.config
  x0 = jax.lax.stop_gradient(encode_latents(models, frozen, batch["hq"]))
  lq = jax.lax.stop_gradient(encode_latents(models, frozen, batch["lq_up"]))
  null = frozen["null_text"]
  loss, _ = diffusion.training_loss(
    dit_lib.as_denoise_fn(models.dit),
    params["dit"],
    diffusion.schedule_from_config(config.diffusion),
    rng,
    x0,
    lq,
    batch["text_emb"],
    batch["text_mask"],
    null["emb"],
    null["mask"],
    text_dropout=config.dit.text_dropout,
    sampling=config.diffusion.timestep_sampling,
    logit_mean=config.diffusion.logit_mean,
    logit_std=config.diffusion.logit_std,
    uniform_fraction=config.diffusion.uniform_fraction,
  )
  return loss, {"loss": loss}


# ------------------------------------------------------------------ the step


def _microbatches(batch: dict, k: int) -> dict:
  def split(x):
    if x.shape[0] % k:
      raise errors.ConfigError(
        f"batch of {x.shape[0]} is not divisible by config.optim.grad_accum={k}"
      )
    return x.reshape((k, x.shape[0] // k) + x.shape[1:])

  return jax.tree.map(split, batch)


def accumulate(grad_fn, params, batch: dict, rng: Array, k: int):
  """Mean gradient and aux over ``k`` micro-batches (k=1: one plain call)."""
  if k == 1:
    return grad_fn(params, batch, rng)
  micro = _microbatches(batch, k)
  rngs = jax.random.split(rng, k)

  def body(carry, xs):
    (_, aux), grads = grad_fn(params, *xs)
    acc_grads, acc_aux = carry
    acc_grads = jax.tree.map(lambda a, g: a + g / k, acc_grads, grads)
    acc_aux = jax.tree.map(
      lambda a, x: a + x / k if jnp.issubdtype(x.dtype, jnp.floating) else x, acc_aux, aux
    )
    return (acc_grads, acc_aux), None

  (_, aux0), grads0 = grad_fn(params, jax.tree.map(lambda x: x[0], micro), rngs[0])
  zeros = (
    jax.tree.map(jnp.zeros_like, grads0),
    jax.tree.map(lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, aux0),
  )
  (grads, aux), _ = jax.lax.scan(body, zeros, (micro, rngs))
  return (aux.get("loss", aux.get("d_loss")), aux), grads


def _all_finite(*trees) -> Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]))


def _ema(ema, params, decay, step):
  decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))  # warm-up: short runs still average.
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def train_step(state: TrainState, batch: dict, *, models: Models) -> tuple[TrainState, dict]:
  """One update of the stage's trainable networks (and of the discriminator for VAE stages)."""
  config = models.config
  optim = config.optim
  k = int(optim.grad_accum)
  rng_g = jax.random.fold_in(state.rng, state.step)  # the step's randomness: resumable
  if models.stage.objective == "diffusion":

    def g_fn(p, b, r):
      return jax.value_and_grad(dit_loss, has_aux=True)(p, state.frozen, b, r, models)
  else:

    def g_fn(p, b, r):
      return jax.value_and_grad(generator_loss, has_aux=True)(
        p, state.frozen, state.disc, b, r, state.step, models
      )

  (loss, metrics), grads = accumulate(g_fn, state.params, batch, rng_g, k)
  tx = make_optimizer(optim)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = _ema(state.ema_params, params, optim.ema_decay, state.step)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  metrics = dict(metrics, grad_norm=grad_norm)

  disc, disc_opt_state = state.disc, state.disc_opt_state
  if gan_enabled(config):

    def d_fn(dp, b, r):
      return jax.value_and_grad(discriminator_loss, has_aux=True)(
        dp, state.disc, state.params, state.frozen, b, r, state.step, models
      )

    (_, d_metrics), d_grads = accumulate(d_fn, state.disc["params"], batch, rng_g, k)
    stats = d_metrics.pop("batch_stats")
    d_tx = make_optimizer(optim, optim.disc_lr)
    d_updates, new_d_opt = d_tx.update(d_grads, state.disc_opt_state, state.disc["params"])
    new_disc = {
      "params": optax.apply_updates(state.disc["params"], d_updates),
      "batch_stats": stats,
    }
    active = state.step >= stages.disc_start(config)  # delayed discriminator start
    d_finite = _all_finite(d_metrics["d_loss"], d_grads)
    finite = finite & d_finite
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)
    disc = keep_old(new_disc, state.disc)
    disc_opt_state = keep_old(new_d_opt, state.disc_opt_state)
    metrics.update(d_metrics, d_grad_norm=optax.global_norm(d_grads))

  new = state.replace(
    step=state.step + 1,
    params=params,
    ema_params=ema,
    opt_state=opt_state,
    disc=disc,
    disc_opt_state=disc_opt_state,
    rng=state.rng,
    nonfinite=jnp.zeros_like(state.nonfinite),
    skipped=state.skipped,
  )
  skipped = state.replace(
    step=state.step + 1, nonfinite=state.nonfinite + 1, skipped=state.skipped + 1
  )
  out = jax.tree.map(lambda n, s: jnp.where(finite, n, s), new, skipped)
  metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
  metrics.update(
    finite=finite.astype(jnp.float32),
    skipped=out.skipped.astype(jnp.float32),
    lr=learning_rate(optim)(state.step),
  )
  return out, metrics


def model_flops(models: Models, state: TrainState, batch: dict) -> float:
  """FLOPs one ``train_step`` needs (what MFU counts; remat recomputation excluded).

  dit: 3x the DiT's analytic forward (forward + backward) plus the frozen encoders' forward on HQ
  and LQ↑; VAE stages: the step's matmuls and convolutions counted from its jaxpr.
  """
  config = models.config
  if models.stage.objective != "diffusion":
    return flops_lib.jaxpr_flops(functools.partial(train_step, models=models), state, batch)
  b, h, w, _ = batch["hq"].shape
  encode = flops_lib.jaxpr_flops(lambda img: encode_latents(models, state.frozen, img), batch["hq"])
  factor = models.vae.factor
  return (
    3.0
    * flops_lib.dit_forward_flops(config, b, (h // factor, w // factor), batch["text_emb"].shape[1])
    + 2.0 * encode
  )


def jit_train_step(models: Models, mesh, shardings: TrainState):
  """``train_step`` jitted once with explicit in/out shardings and the state donated.

  ``run(state, batch)`` runs it; ``run.compile(state, batch)`` compiles it ahead of time for the
  batch's shapes (arrays or ``jax.ShapeDtypeStruct``s) and keeps the executable, which later steps
  with those shapes run: the loop reads XLA's memory analysis of it before step 1 without compiling
  twice.
  """
  batch_sh = {k: parallel.batch_sharding(mesh) for k in models.stage.batch_keys}
  step = jax.jit(
    functools.partial(train_step, models=models),
    in_shardings=(shardings, batch_sh),
    out_shardings=(shardings, parallel.replicated(mesh)),
    donate_argnums=0,
  )
  executables = {}

  def compile(state, batch):  # pylint: disable=redefined-builtin
    key = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))
    if key not in executables:
      with parallel.use_mesh(mesh, models.config.train.logical_axis_rules):
        executables[key] = step.lower(state, batch).compile()
    return executables[key]

  def run(state, batch):
    return compile(state, batch)(state, batch)

  def flops(state, batch):  # model FLOPs of one step, for the MFU reports
    with parallel.use_mesh(mesh, models.config.train.logical_axis_rules):
      return model_flops(models, state, batch)

  run.jitted, run.compile, run.flops = step, compile, flops
  return run


# Sampling steps of the dit stage's preview when config.train.preview_steps is 0 (capped at
# config.diffusion.sample_steps): enough to tell a restoration from noise, cheap next to image_every
# training steps.
PREVIEW_SAMPLE_STEPS = 8


def preview(
  models: Models, state: TrainState, batch: dict, pixel_decoder: dict | None = None
) -> Array:
  """The stage's output for the HQ | LQ↑ | output grid, at HQ size, from the EMA weights.

  Autoencoder stages: the reconstruction (nearest-up-sampled when the target is smaller: vae_coarse
  reconstructs I↓4). dit: a short restoration as restore.py does it — DDIM with CFG
  from the LQ↑ latent (config.diffusion's scale, η, strength; the unconditional branch is the empty
  prompt the state holds, not config.diffusion.negative_prompt), noise fixed per run so previews
  compare across steps — decoded by D_f*, whose ``pixel_decoder`` params the caller passes (the dit
  state does not hold them: ``export.restoration_decoder`` takes them from the earlier export).
  """
  if models.stage.objective == "diffusion":
    if pixel_decoder is None:
      raise ValueError("the dit preview decodes with D_f*: pass the pixel_decoder export's params")
    return _restore_preview(models, state, batch, pixel_decoder)
  _, recon, _ = reconstruct(models, state.ema_params, state.frozen, batch, None)
  f = batch["hq"].shape[1] // recon.shape[1]
  return jnp.repeat(jnp.repeat(recon, f, axis=1), f, axis=2) if f > 1 else recon


def _restore_preview(models: Models, state: TrainState, batch: dict, pixel_decoder: dict) -> Array:
  config, frozen = models.config, state.frozen
  diff = config.diffusion
  num_steps = int(config.train.preview_steps) or min(PREVIEW_SAMPLE_STEPS, int(diff.sample_steps))
  null = frozen["null_text"]
  rules = parallel.axis_rules(config.train.logical_axis_rules)
  with nn.logical_axis_rules(rules):  # as in the train step
    lq_latent = encode_latents(models, frozen, batch["lq_up"])
    z = diffusion.ddim_sample(
      dit_lib.as_denoise_fn(models.dit),
      state.ema_params["dit"],
      diffusion.schedule_from_config(diff),
      lq_latent,
      batch["text_emb"],
      batch["text_mask"],
      null["emb"],
      null["mask"],
      jax.random.fold_in(state.rng, 0x5EED),
      num_steps=num_steps,
      cfg_scale=diff.cfg_scale,
      eta=diff.eta,
      strength=diff.strength,
      clip_x0=diff.clip_x0 or None,
    )
    return latents.decode(
      models.pixel_decoder,
      pixel_decoder,
      z,
      batch["lq_up"],
      frozen["latent_stats"],
      config.restore.fusion_weight,
    )

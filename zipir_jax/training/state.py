"""Train state of a stage: its trained and frozen networks (``stages.py``), optimizer, EMA, shardings.

Frozen parts live in ``TrainState.frozen``: outside the optimizer, never differentiated, saved with
the checkpoint so a run is self-contained. The T5 encoder is frozen too but runs on the host side of
the step (captions -> embeddings), so it is not part of the state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from zipir_jax import errors, losses, parallel
from zipir_jax.models import autoencoder
from zipir_jax.models import dit as dit_lib
from zipir_jax.models.pixel_decoder import init_from_autoencoder
from zipir_jax.training import stages


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict  # trained networks (fp32 master weights)
  ema_params: dict  # EMA of ``params``: evaluation and export
  opt_state: Any
  frozen: dict  # frozen networks / constants: bit-identical through training
  disc: dict  # {'params', 'batch_stats'} of the patch discriminator ({} without one)
  disc_opt_state: Any
  rng: jax.Array  # raw uint32 key (checkpointable)
  nonfinite: jax.Array  # consecutive skipped (non-finite) updates
  skipped: jax.Array  # all skipped updates


@dataclasses.dataclass(frozen=True)
class Models:
  """The stage's networks (static: hashed into the jitted step by identity)."""

  config: ml_collections.ConfigDict
  stage: stages.Stage
  vae: Any
  frozen_vae: Any  # the same VAE at config.vae.frozen_dtype: where its encoders are frozen
  pixel_decoder: Any  # D_f* (trained by pixel_decoder; the dit stage restores with it)
  discriminator: Any
  dit: Any
  perceptual: Any  # LPIPS(x, y) -> (B,), or None when the stage's lpips_weight is 0

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


def check_config(config: ml_collections.ConfigDict) -> stages.Stage:
  """The active :class:`~zipir_jax.training.stages.Stage`, after the checks a run needs first."""
  stage = stages.current(config)
  fusion = tuple(config.pixel_decoder.fusion_levels)
  if stage.objective == "pixel_decoder" and not fusion:
    raise errors.ConfigError(
      "stage pixel_decoder with config.pixel_decoder.fusion_levels=() has nothing to train "
      "(D_f* without fusion levels is D_f); to restore with D_f, train the dit stage with "
      "--config.train.init_from.pixel_decoder=WORKDIR/vae_fine/export"
    )
  if config.vae.kind == "sdvae" and fusion:
    raise errors.ConfigError(
      "the SD-VAE ablation has no pixel_decoder stage and decodes with its own decoder: set "
      f"config.pixel_decoder.fusion_levels=() (configs/sdvae_f32c64.py does), not {fusion}"
    )
  stages.data_phases(config)
  stages.disc_start(config)
  return stage


def build_models(config: ml_collections.ConfigDict) -> Models:
  stage = check_config(config)
  reconstructs = stage.objective != "diffusion"
  return Models(
    config=config,
    stage=stage,
    vae=autoencoder.build_autoencoder(config),
    frozen_vae=autoencoder.build_autoencoder(config, config.vae.frozen_dtype),
    pixel_decoder=autoencoder.build_pixel_decoder(config),
    discriminator=autoencoder.build_discriminator(config) if stage.discriminator else None,
    dit=dit_lib.build_dit(config) if "dit" in stage.trains else None,
    perceptual=losses.perceptual_from_config(config.loss) if reconstructs else None,
  )


def boxed_init(models: Models, rng: jax.Array) -> dict[str, Any]:
  """Boxed (logically named) initial variables of every network the stage touches."""
  config, vae, stage = models.config, models.vae, models.stage
  f = vae.factor
  rng_vae, rng_pd, rng_disc, rng_dit = jax.random.split(rng, 4)
  out = dict(vae.init(rng_vae, jnp.zeros((1, f, f, 3)), method="init_all")["params"])
  if "pixel_decoder" in stage.trains:
    latent = jnp.zeros((1, 1, 1, vae.latent_channels))
    image = jnp.zeros((1, f, f, 3))
    out["pixel_decoder"] = models.pixel_decoder.init(rng_pd, latent, image)["params"]
  if stage.discriminator:
    # The discriminator sees I↓4 in vae_coarse; its parameters do not depend on the image size.
    out["discriminator"] = models.discriminator.init(rng_disc, jnp.zeros((1, 64, 64, 3)))
  length, c = int(config.text.max_length), vae.latent_channels
  if "dit" in stage.trains:
    dummies = dit_lib.dummy_inputs(models.dit, c, text_length=length)
    out["dit"] = models.dit.init(rng_dit, *dummies)["params"]
  if "latent_stats" in stage.freezes:
    out["latent_stats"] = {"mean": jnp.zeros(c), "std": jnp.ones(c)}
  if "null_text" in stage.freezes:
    out["null_text"] = {
      "emb": jnp.zeros((1, length, config.dit.text_dim)),
      "mask": jnp.zeros((1, length), jnp.int32),
    }
  return out


def learning_rate(optim: ml_collections.ConfigDict, peak: float | None = None) -> optax.Schedule:
  """Linear warm-up to ``lr``, cosine decay to ``end_lr`` at ``num_steps`` (supp. A: 5e-5 -> 5e-6)."""
  peak = optim.lr if peak is None else peak
  end = optim.end_lr * peak / optim.lr
  warmup = min(int(optim.warmup_steps), max(int(optim.num_steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    0.0, peak, warmup, max(int(optim.num_steps), warmup + 1), end_value=end
  )


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)  # no weight decay on norms and biases.


def make_optimizer(
  optim: ml_collections.ConfigDict, peak: float | None = None
) -> optax.GradientTransformation:
  """AdamW (β 0.9/0.95, wd 0.05) after global-norm clipping (supp. A)."""
  parts = []
  if optim.grad_clip:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(
    optax.adamw(
      learning_rate(optim, peak),
      b1=optim.b1,
      b2=optim.b2,
      weight_decay=optim.weight_decay,
      mask=_decay_mask,
    )
  )
  return optax.chain(*parts)


def init_state(models: Models, rng: jax.Array, prerequisites: dict[str, Any]) -> TrainState:
  """Fresh state; networks and constants named in ``prerequisites`` (an earlier stage's export,
  measured statistics, the null text) replace the random ones; a stage with ``init_from`` builds
  its trained network from those prerequisites (D_f* from E_f and D_f)."""
  return _init_with_boxed(models, rng, prerequisites)[0]


def _init_with_boxed(
  models: Models, rng: jax.Array, prerequisites: dict[str, Any]
) -> tuple[TrainState, dict[str, Any]]:
  """(:func:`init_state`, the boxed variables that name its parameters' logical axes)."""
  config, stage = models.config, models.stage
  rng_init, rng_train = jax.random.split(rng)
  boxed = boxed_init(models, rng_init)
  variables = nn.meta.unbox(boxed)
  for name in (*stage.trains, *stage.freezes):
    if name in prerequisites:
      variables[name] = prerequisites[name]
  if stage.init_from:  # D_f*: extractor <- E_f, decoder <- D_f, fusion layers freshly initialised
    encoder, decoder = (prerequisites[k] for k in stage.init_from)
    variables["pixel_decoder"] = init_from_autoencoder(variables["pixel_decoder"], encoder, decoder)
  params = stages.select(variables, stage.trains)
  frozen = stages.select(variables, stage.freezes)
  tx = make_optimizer(config.optim)
  disc, disc_opt_state = {}, ()
  if stage.discriminator:
    disc = dict(variables["discriminator"])
    disc_opt_state = make_optimizer(config.optim, config.optim.disc_lr).init(disc["params"])
  zero = jnp.zeros((), jnp.int32)
  state = TrainState(
    step=zero,
    params=params,
    ema_params=jax.tree.map(jnp.copy, params),
    opt_state=tx.init(params),
    frozen=frozen,
    disc=disc,
    disc_opt_state=disc_opt_state,
    rng=rng_train,
    nonfinite=zero,
    skipped=zero,
  )
  return state, boxed


def state_shardings(
  models: Models,
  mesh: jax.sharding.Mesh,
  abstract_state: TrainState,
  boxed: dict[str, Any] | None = None,
) -> TrainState:
  """NamedShardings of every state leaf: params/EMA/optimizer moments from the logical axes (of
  ``boxed``, :func:`boxed_init`'s variables, traced here when not given)."""
  stage, optim = models.stage, models.config.optim
  if boxed is None:
    boxed = jax.eval_shape(lambda: boxed_init(models, jax.random.PRNGKey(0)))
  named = parallel.logical_shardings(boxed, mesh, models.config.train.logical_axis_rules)
  repl = parallel.replicated(mesh)
  params = stages.select(named, stage.trains)
  frozen = stages.select(named, stage.freezes)

  def opt_shardings(tx, opt_state, tree):
    return optax.tree_map_params(
      tx, lambda _, s: s, opt_state, tree, transform_non_params=lambda _: repl
    )

  opt = opt_shardings(make_optimizer(optim), abstract_state.opt_state, params)
  disc, disc_opt = {}, ()
  if stage.discriminator:
    disc = dict(named["discriminator"])
    disc_tx = make_optimizer(optim, optim.disc_lr)
    disc_opt = opt_shardings(disc_tx, abstract_state.disc_opt_state, disc["params"])
  return TrainState(
    step=repl,
    params=params,
    ema_params=params,
    opt_state=opt,
    frozen=frozen,
    disc=disc,
    disc_opt_state=disc_opt,
    rng=repl,
    nonfinite=repl,
    skipped=repl,
  )


def abstract_state(
  models: Models, mesh: jax.sharding.Mesh, rng: jax.Array, prerequisites: dict[str, Any]
) -> tuple[TrainState, TrainState]:
  """(shapes of the fresh state, its shardings on ``mesh``) from one trace of the initialisation:
  tracing the networks costs seconds at paper size, and a run needs both before it initialises
  or restores."""
  abstract, boxed = jax.eval_shape(lambda r, p: _init_with_boxed(models, r, p), rng, prerequisites)
  return abstract, state_shardings(models, mesh, abstract, boxed)


def create_train_state(
  models: Models,
  mesh: jax.sharding.Mesh,
  rng: jax.Array,
  prerequisites: dict[str, Any],
  shardings: TrainState | None = None,
) -> tuple[TrainState, TrainState]:
  """(state placed on ``mesh``, its shardings). Initialised by one jit with sharded outputs, so no
  device ever holds the whole model. ``shardings``: from :func:`abstract_state`, if already made."""
  if shardings is None:
    _, shardings = abstract_state(models, mesh, rng, prerequisites)
  with parallel.use_mesh(mesh, models.config.train.logical_axis_rules):
    state = jax.jit(lambda r, p: init_state(models, r, p), out_shardings=shardings)(
      rng, prerequisites
    )
  return state, shardings


def abstract_with_shardings(abstract: TrainState, shardings: TrainState) -> TrainState:
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )

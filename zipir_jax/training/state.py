"""Train state of every stage: trainable vs frozen networks, optimizer, EMA and shardings.

Progressive training (§3.1, §4) trains different sub-networks per stage; the rest is frozen:

  stage          trainable                        frozen (no optimizer state)      discriminator
  vae_coarse     coarse_encoder, coarse_decoder   -                                yes
  vae_fine       fine_encoder, fine_decoder       coarse_encoder                   yes
  pixel_decoder  pixel_decoder (extractor+D_f*)   coarse_encoder, fine_encoder     yes
  dit            dit                              encoders, latent_stats, null_text  no

The SD-VAE ablation (Table 4, ``config.vae.kind="sdvae"``) has two: ``vae`` trains its one
encoder and decoder (as the LP-VAE stages: discriminator, same losses), then ``dit`` trains on
that encoder's latent (frozen: ``encoder``, latent_stats, null_text).

Frozen parts live in ``TrainState.frozen``: outside the optimizer, never differentiated, saved with
the checkpoint so a run is self-contained. The T5 encoder is frozen too but runs on the host side of
the step (captions -> embeddings), so it is not part of the state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from zipir_jax import config_lib, errors, losses, parallel
from zipir_jax.models import autoencoder
from zipir_jax.models import dit as dit_lib

STAGES = {"lpvae": config_lib.LPVAE_STAGES, "sdvae": config_lib.SDVAE_STAGES}
TRAINABLE = {
  "vae_coarse": ("coarse_encoder", "coarse_decoder"),
  "vae_fine": ("fine_encoder", "fine_decoder"),
  "pixel_decoder": ("pixel_decoder",),
  "vae": ("encoder", "decoder"),
  "dit": ("dit",),
}
_FROZEN = {
  "vae_coarse": (),
  "vae_fine": ("coarse_encoder",),
  "pixel_decoder": ("coarse_encoder", "fine_encoder"),
  "vae": (),
}
GAN_STAGES = ("vae_coarse", "vae_fine", "pixel_decoder", "vae")


def frozen_parts(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The frozen networks/constants of ``config.stage`` (dit: the VAE kind's encoders)."""
  if config.stage == "dit":
    return autoencoder.encoder_keys(config) + ("latent_stats", "null_text")
  return _FROZEN[config.stage]


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict  # trainable networks (fp32 master weights)
  ema_params: dict  # EMA of ``params``: evaluation and export
  opt_state: Any
  frozen: dict  # frozen networks / constants: bit-identical through training
  disc: dict  # {'params', 'batch_stats'} of the patch discriminator ({} for the dit stage)
  disc_opt_state: Any
  rng: jax.Array  # raw uint32 key (checkpointable)
  nonfinite: jax.Array  # consecutive skipped (non-finite) updates
  skipped: jax.Array  # all skipped updates


@dataclasses.dataclass(frozen=True)
class Models:
  """The stage's networks (static: hashed into the jitted step by identity)."""

  config: ml_collections.ConfigDict
  vae: Any
  frozen_vae: Any  # the same VAE at config.vae.frozen_dtype: where its encoders are frozen
  pixel_decoder: Any
  discriminator: Any
  dit: Any
  perceptual: Any

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


def check_stage(config: ml_collections.ConfigDict) -> str:
  kind = config.vae.kind
  if kind not in STAGES:
    raise errors.ConfigError(f"config.vae.kind={kind!r}; valid kinds: {', '.join(STAGES)}")
  if config.stage not in STAGES[kind]:
    raise errors.ConfigError(
      f"config.stage={config.stage!r} is not a stage of the {kind} "
      f"experiments; valid: {', '.join(STAGES[kind])}"
    )
  if config.stage == "pixel_decoder" and not tuple(config.pixel_decoder.fusion_levels):
    raise errors.ConfigError(
      "stage pixel_decoder with config.pixel_decoder.fusion_levels=() "
      "has nothing to train (D_f* without fusion levels is D_f); to "
      "restore with D_f, train the dit stage with "
      "--config.train.init_from.pixel_decoder=WORKDIR/vae_fine/export"
    )
  if kind == "sdvae" and tuple(config.pixel_decoder.fusion_levels):
    raise errors.ConfigError(
      "the SD-VAE ablation has no pixel_decoder stage and decodes with "
      "its own decoder: set config.pixel_decoder.fusion_levels=() "
      "(configs/sdvae_f32c64.py does), not "
      f"{tuple(config.pixel_decoder.fusion_levels)}"
    )
  return config.stage


def build_models(config: ml_collections.ConfigDict) -> Models:
  stage = check_stage(config)
  gan = stage in GAN_STAGES
  return Models(
    config=config,
    vae=autoencoder.build_autoencoder(config),
    frozen_vae=autoencoder.build_autoencoder(config, config.vae.frozen_dtype),
    pixel_decoder=autoencoder.build_pixel_decoder(config),
    discriminator=autoencoder.build_discriminator(config) if gan else None,
    dit=dit_lib.build_dit(config) if stage == "dit" else None,
    perceptual=losses.perceptual_from_config(config.loss) if gan else None,
  )


def _text_length(config) -> int:
  return int(config.text.max_length)


def boxed_init(models: Models, rng: jax.Array) -> dict[str, Any]:
  """Boxed (logically named) initial variables of every network the stage touches."""
  config, vae = models.config, models.vae
  stage = config.stage
  f = vae.factor
  rng_vae, rng_pd, rng_disc, rng_dit = jax.random.split(rng, 4)
  out = dict(vae.init(rng_vae, jnp.zeros((1, f, f, 3)), method="init_all")["params"])
  if stage in ("pixel_decoder", "dit"):
    latent = jnp.zeros((1, 1, 1, vae.latent_channels))
    out["pixel_decoder"] = models.pixel_decoder.init(rng_pd, latent, jnp.zeros((1, f, f, 3)))[
      "params"
    ]
  if stage in GAN_STAGES:
    # The discriminator sees I↓4 in vae_coarse; its parameters do not depend on the image size.
    out["discriminator"] = models.discriminator.init(rng_disc, jnp.zeros((1, 64, 64, 3)))
  if stage == "dit":
    out["dit"] = models.dit.init(
      rng_dit,
      *dit_lib.dummy_inputs(models.dit, vae.latent_channels, text_length=_text_length(config)),
    )["params"]
    c = vae.latent_channels
    out["latent_stats"] = {"mean": jnp.zeros(c), "std": jnp.ones(c)}
    out["null_text"] = {
      "emb": jnp.zeros((1, _text_length(config), config.dit.text_dim)),
      "mask": jnp.zeros((1, _text_length(config)), jnp.int32),
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
  """Fresh state; networks named in ``prerequisites`` (loaded from earlier stages) replace the
  random ones (D_f* of stage pixel_decoder is built from E_f/D_f by ``init_from_autoencoder``)."""
  return _init_with_boxed(models, rng, prerequisites)[0]


def _init_with_boxed(
  models: Models, rng: jax.Array, prerequisites: dict[str, Any]
) -> tuple[TrainState, dict[str, Any]]:
  """(:func:`init_state`, the boxed variables that name its parameters' logical axes)."""
  from zipir_jax.models.pixel_decoder import init_from_autoencoder  # pylint: disable=g-import-not-at-top

  config = models.config
  stage = config.stage
  rng_init, rng_train = jax.random.split(rng)
  boxed = boxed_init(models, rng_init)
  variables = nn.meta.unbox(boxed)
  if stage == "pixel_decoder":
    variables["pixel_decoder"] = init_from_autoencoder(
      variables["pixel_decoder"], prerequisites["fine_encoder"], prerequisites["fine_decoder"]
    )
  for name, value in prerequisites.items():
    if name in variables and not (stage == "pixel_decoder" and name == "pixel_decoder"):
      variables[name] = value
  params = {k: variables[k] for k in TRAINABLE[stage]}
  frozen = {k: variables[k] for k in frozen_parts(config)}
  tx = make_optimizer(config.optim)
  disc, disc_opt_state = {}, ()
  if stage in GAN_STAGES:
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
  stage = models.config.stage
  if boxed is None:
    boxed = jax.eval_shape(lambda: boxed_init(models, jax.random.PRNGKey(0)))
  named = parallel.logical_shardings(boxed, mesh, models.config.train.logical_axis_rules)
  repl = parallel.replicated(mesh)
  params = {k: named[k] for k in TRAINABLE[stage]}
  frozen = {k: named[k] for k in frozen_parts(models.config)}
  opt = optax.tree_map_params(
    make_optimizer(models.config.optim),
    lambda _, s: s,
    abstract_state.opt_state,
    params,
    transform_non_params=lambda _: repl,
  )
  disc, disc_opt = {}, ()
  if stage in GAN_STAGES:
    disc = dict(named["discriminator"])
    disc_opt = optax.tree_map_params(
      make_optimizer(models.config.optim, models.config.optim.disc_lr),
      lambda _, s: s,
      abstract_state.disc_opt_state,
      disc["params"],
      transform_non_params=lambda _: repl,
    )
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


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def flat_names(tree: Any) -> list[str]:
  return (
    sorted("/".join(k) for k in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)))
    if tree
    else []
  )

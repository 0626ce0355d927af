"""The training recipe, stage by stage (§3.1, §3.2, §4, supp. A): the one place that says what each
stage trains, on what, with which losses, and what it hands to the next.

A :class:`Stage` is declarative. Its structure — the networks it trains and freezes, what it reads
from the previous stage's export and what its own export holds, whether a discriminator trains
beside it, the arrays a batch carries — is fixed here. Its numbers — steps, data phases (crop sizes
and global batch), learning-rate schedule, loss weights, discriminator start — are the paper's
:class:`Recipe`, copied into the experiment config by :func:`apply_recipe` (``config_lib.base_config``
calls it), where configs and the command line may change them. :func:`describe` joins the two for
``python -m zipir_jax.models.summary --stages`` and for the log line each stage prints at start.

This module imports nothing heavy (configs import it).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from zipir_jax import errors
from zipir_jax.data.defaults import DIT_BUCKETS

Buckets = tuple[tuple[int, int, int], ...]  # (height, width, global batch size)

# What the dit stage captions an LQ-looking target with (§3.2: "we annotated low-quality images with
# negative prompts"); the first is the default negative prompt of restoration.
NEGATIVE_PROMPTS = (
  "blurry, noisy, low resolution, jpeg artifacts, low quality",
  "blurry",
  "noisy, grainy",
  "jpeg artifacts, compression artifacts",
  "low resolution, pixelated",
  "out of focus, smeared details",
)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A stage's numbers in the paper (§4; supp. A for the optimiser; the rest as noted)."""

  num_steps: int
  buckets: Buckets  # the first data phase
  phases: tuple[tuple[int, Buckets], ...] = ()  # later phases: (first step, buckets)
  l1_weight: float = 1.0
  lpips_weight: float = 1.0
  # Weight of the per-example KL *sum* against the per-example *sum* of the reconstruction loss
  # over the target's pixels and channels (LDM's convention; the step divides both by that count).
  kl_weight: float = 1e-6
  disc_weight: float = 0.5  # LDM: the adaptive GAN weight's multiplier.
  # Fraction of the stage's steps before the discriminator (and its term) starts (LDM's delay).
  disc_start_fraction: float = 0.5
  negative_rate: float = 0.0  # dit: share of examples trained as LQ target + negative prompt.


@dataclasses.dataclass(frozen=True)
class Stage:
  """What one stage of progressive training is (see the module docstring)."""

  name: str
  summary: str  # one line: what the stage learns, with its paper reference
  trains: tuple[str, ...]  # networks the optimizer updates (EMA'd, exported)
  freezes: tuple[str, ...]  # networks and constants carried unchanged through the stage
  prerequisite: str | None  # the stage whose export this one starts from
  reads: tuple[str, ...]  # what it takes from that export (frozen parts, initial weights)
  exports: tuple[str, ...]  # what its export holds for the stages after it
  batch_keys: tuple[str, ...]  # the arrays a training batch carries to the device
  objective: str  # "autoencoder" | "pixel_decoder" | "diffusion": which loss family
  discriminator: bool = False  # a patch-GAN trains beside it (LDM's autoencoder recipe)
  last_layer: tuple[str, ...] = ()  # the decoder kernel of LDM's adaptive GAN weight
  init_from: tuple[
    str, ...
  ] = ()  # prerequisite nets its trained nets start from (D_f* <- E_f, D_f)
  measures: tuple[
    str, ...
  ] = ()  # constants measured on its data: "macro" (start), "latent_stats" (end)
  recipe: Recipe | None = None

  @property
  def needs_lq(self) -> bool:
    return "lq_up" in self.batch_keys


_VAE_LOSSES = "L1 + LPIPS + hinge patch-GAN with LDM's adaptive weight + KL (§3.1, [13])"
_LPVAE_STAGES = (
  Stage(
    name="vae_coarse",
    summary="E_c on I↓4 and D_c back to I↓4, z_macro statistics measured first (§3.1)",
    trains=("coarse_encoder", "coarse_decoder"),
    freezes=("macro",),
    prerequisite=None,
    reads=(),
    exports=("macro", "coarse_encoder"),  # D_c is discarded (§3.1)
    batch_keys=("hq",),
    objective="autoencoder",
    discriminator=True,
    last_layer=("coarse_decoder", "conv_out", "kernel"),
    measures=("macro",),
    # §4: batch 512 for 50K iterations. The crop size is not given; 512² as in the fine stage's
    # first phase, so E_c sees 128² inputs.
    recipe=Recipe(num_steps=50_000, buckets=((512, 512, 512),)),
  ),
  Stage(
    name="vae_fine",
    summary="E_f and D_f on the 64-channel latent with E_c frozen; latent statistics (§3.1)",
    trains=("fine_encoder", "fine_decoder"),
    freezes=("macro", "coarse_encoder"),
    prerequisite="vae_coarse",
    reads=("macro", "coarse_encoder"),
    exports=("macro", "coarse_encoder", "fine_encoder", "fine_decoder", "latent_stats"),
    batch_keys=("hq",),
    objective="autoencoder",
    discriminator=True,
    last_layer=("fine_decoder", "conv_out", "kernel"),
    measures=("latent_stats",),
    # §4: 512² crops x 160 for 100K iterations, then the "1K patch adaptation": 1024² x 32 for 50K.
    recipe=Recipe(
      num_steps=150_000,
      buckets=((512, 512, 160),),
      phases=((100_000, ((1024, 1024, 32),)),),
    ),
  ),
  Stage(
    name="pixel_decoder",
    summary="D_f*: extractor (from E_f) + D_f + zero-initialised fusion, LQ↑ in (§3.1, Fig. 8)",
    trains=("pixel_decoder",),
    freezes=("macro", "coarse_encoder", "fine_encoder"),
    prerequisite="vae_fine",
    reads=("macro", "coarse_encoder", "fine_encoder", "fine_decoder", "latent_stats"),
    exports=("macro", "coarse_encoder", "fine_encoder", "pixel_decoder", "latent_stats"),
    batch_keys=("hq", "lq_up"),
    objective="pixel_decoder",
    discriminator=True,
    last_layer=("pixel_decoder", "decoder", "conv_out", "kernel"),
    init_from=("fine_encoder", "fine_decoder"),
    # The paper gives "image reconstruction as the learning objective" and builds on StableSR's
    # jointly trained feature warping [46], which keeps the autoencoder's L1 + LPIPS + GAN with a
    # small adversarial weight (0.025) from its first few hundred steps; no KL (no posterior).
    # Data: the 1K patches of vae_fine's adaptation phase, batch 32, 50K steps (not in the paper).
    recipe=Recipe(
      num_steps=50_000,
      buckets=((1024, 1024, 32),),
      kl_weight=0.0,
      disc_weight=0.025,
      disc_start_fraction=0.01,
    ),
  ),
)


def _dit_stage(prerequisite: str, encoders: tuple[str, ...], decoder: str) -> Stage:
  return Stage(
    name="dit",
    summary="ZipDiT on the frozen latent: ε-prediction, caption dropout, negative prompts (§3.2)",
    trains=("dit",),
    freezes=(*encoders, "latent_stats", "null_text"),
    prerequisite=prerequisite,
    reads=(*encoders, "latent_stats", decoder),
    exports=("bundle",),
    batch_keys=("hq", "lq_up", "text_emb", "text_mask"),
    objective="diffusion",
    # §4: mixed resolutions and aspects, batch 128, 250K iterations. Negative prompts: 5 % of
    # examples, the rate of caption dropout (the paper gives none).
    recipe=Recipe(num_steps=250_000, buckets=DIT_BUCKETS, negative_rate=0.05),
  )


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The stages of one autoencoder kind, in training order, and what restoration decodes with."""

  kind: str
  stages: tuple[Stage, ...]
  encoders: tuple[str, ...]  # what makes the DiT's latent (bundle part "vae")
  full_resolution_encoder: str  # the encoder D_f*'s extractor copies (E_f)
  plain_decoder: str  # the autoencoder's own decoder (Table 4's rows before D_f*)
  plain_decoder_stage: str  # the stage whose export holds it

  def stage(self, name: str) -> Stage:
    for s in self.stages:
      if s.name == name:
        return s
    raise errors.ConfigError(
      f"config.stage={name!r} is not a stage of the {self.kind} experiments; valid: "
      f"{', '.join(self.names)}"
    )

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.stages)


_LPVAE_ENCODERS = ("macro", "coarse_encoder", "fine_encoder")
_SDVAE_ENCODERS = ("encoder",)
EXPERIMENTS = {
  "lpvae": Experiment(
    kind="lpvae",
    stages=(*_LPVAE_STAGES, _dit_stage("pixel_decoder", _LPVAE_ENCODERS, "pixel_decoder")),
    encoders=_LPVAE_ENCODERS,
    full_resolution_encoder="fine_encoder",
    plain_decoder="fine_decoder",
    plain_decoder_stage="vae_fine",
  ),
  # The f32c64 SD-VAE of Table 4: one encoder and decoder trained "with the same settings as
  # f32c64-LP-VAE" (vae_fine's numbers), then the DiT; it decodes with its own decoder.
  "sdvae": Experiment(
    kind="sdvae",
    stages=(
      Stage(
        name="vae",
        summary="the f32c64 SD-VAE's encoder and decoder together; latent statistics (Table 4)",
        trains=("encoder", "decoder"),
        freezes=(),
        prerequisite=None,
        reads=(),
        exports=("encoder", "decoder", "latent_stats"),
        batch_keys=("hq",),
        objective="autoencoder",
        discriminator=True,
        last_layer=("decoder", "conv_out", "kernel"),
        measures=("latent_stats",),
        recipe=_LPVAE_STAGES[1].recipe,
      ),
      _dit_stage("vae", _SDVAE_ENCODERS, "decoder"),
    ),
    encoders=_SDVAE_ENCODERS,
    full_resolution_encoder="encoder",
    plain_decoder="decoder",
    plain_decoder_stage="vae",
  ),
}


def experiment(kind: str) -> Experiment:
  if kind not in EXPERIMENTS:
    raise errors.ConfigError(f"config.vae.kind={kind!r}; valid kinds: {', '.join(EXPERIMENTS)}")
  return EXPERIMENTS[kind]


def current(config: Any) -> Stage:
  """The :class:`Stage` that ``config.stage`` names in its autoencoder kind's experiment."""
  return experiment(config.vae.kind).stage(config.stage)


def parse_stage(arg: str | None, kind: str, where: str) -> str:
  """The stage named by ``arg`` (the part after ':' in --config=file.py:stage); default: dit."""
  names = experiment(kind).names
  if not arg:
    return names[-1]
  if arg not in names:
    raise errors.ConfigError(
      f"{where}: unknown stage {arg!r}; valid stages are: {', '.join(names)} "
      f"(e.g. --config={where}:{names[0]})"
    )
  return arg


def apply_recipe(config: Any, stage: Stage) -> None:
  """Copies ``stage``'s paper numbers into the config sections that the code reads."""
  r = stage.recipe
  config.optim.num_steps = r.num_steps
  config.data.buckets = r.buckets
  config.data.phases = r.phases
  loss = config.loss
  loss.l1_weight, loss.lpips_weight, loss.kl_weight = r.l1_weight, r.lpips_weight, r.kl_weight
  loss.disc_weight, loss.disc_start_fraction = r.disc_weight, r.disc_start_fraction
  config.dit.negative_rate = r.negative_rate


# ------------------------------------------------------------------ resolved values


def data_phases(config: Any) -> tuple[tuple[int, Buckets], ...]:
  """((first step, buckets), ...) of the active stage, the first phase starting at step 0."""
  phases = ((0, tuple(map(tuple, config.data.buckets))),) + tuple(
    (int(start), tuple(map(tuple, buckets))) for start, buckets in config.data.phases
  )
  starts = [s for s, _ in phases]
  if any(b <= a for a, b in itertools.pairwise(starts)):
    raise errors.ConfigError(
      f"config.data.phases: first steps must increase after 0 (config.data.buckets), got {starts}"
    )
  return phases


def phase_at(config: Any, step: int) -> int:
  """Index of the data phase that trains step ``step`` (0-based)."""
  return max(i for i, (start, _) in enumerate(data_phases(config)) if start <= step)


def disc_start(config: Any) -> int | None:
  """Step from which the discriminator and its term are on; None if the stage has no GAN."""
  if not current(config).discriminator or not config.loss.disc_weight:
    return None
  fraction = float(config.loss.disc_start_fraction)
  if not 0.0 <= fraction < 1.0:
    raise errors.ConfigError(
      f"config.loss.disc_start_fraction={fraction}: must be in [0, 1) (a fraction of the stage's "
      "steps); to train without the GAN set config.loss.disc_weight=0"
    )
  return int(fraction * int(config.optim.num_steps))


def loss_terms(config: Any) -> dict[str, str]:
  """The active loss terms of the stage and their weights, as printed at start."""
  stage, loss = current(config), config.loss
  if stage.objective == "diffusion":
    d = config.diffusion
    return {
      "epsilon MSE": f"1 (t: {d.timestep_sampling}({d.logit_mean}, {d.logit_std}) mixed with "
      f"uniform at {d.uniform_fraction})",
      "caption dropout": str(config.dit.text_dropout),
      "negative prompts": f"{config.dit.negative_rate} of examples",
    }
  terms = {"L1": str(loss.l1_weight)}
  terms["LPIPS"] = str(loss.lpips_weight) if loss.lpips_weight else "off (lpips_weight=0)"
  if stage.objective == "autoencoder":
    terms["KL"] = f"{loss.kl_weight} (per-example sum vs reconstruction sum)"
  start = disc_start(config)
  terms["GAN"] = (
    "off (disc_weight=0)"
    if start is None
    else f"{loss.disc_weight} x adaptive weight from step {start} of {config.optim.num_steps}"
  )
  return terms


def describe(config: Any) -> list[tuple[str, str]]:
  """(field, value) rows of the active stage: structure and effective numbers."""
  stage, optim = current(config), config.optim
  phases = data_phases(config)
  rows = [
    ("stage", f"{stage.name}: {stage.summary}"),
    ("trains", ", ".join(stage.trains)),
    ("frozen", ", ".join(stage.freezes) or "-"),
    (
      "prerequisite",
      f"{stage.prerequisite} export: {', '.join(stage.reads)}" if stage.prerequisite else "-",
    ),
    ("steps", str(optim.num_steps)),
  ]
  for i, (start, buckets) in enumerate(phases):
    end = phases[i + 1][0] if i + 1 < len(phases) else int(optim.num_steps)
    sizes = ", ".join(f"{h}x{w} x {b}" for h, w, b in buckets)
    note = "" if start < int(optim.num_steps) else " (never reached)"
    rows.append((f"data phase {i + 1}", f"steps {start}..{end}: {sizes} (global batch){note}"))
  rows.append(
    (
      "lr",
      f"AdamW {optim.lr} -> {optim.end_lr} cosine, {optim.warmup_steps} warm-up steps, "
      f"wd {optim.weight_decay}, betas ({optim.b1}, {optim.b2})",
    )
  )
  rows += [(f"loss {k}", v) for k, v in loss_terms(config).items()]
  measured = ", ".join(stage.measures) or "-"
  rows += [("measures", measured), ("exports", ", ".join(stage.exports))]
  return rows


def format_table(rows: Sequence[tuple[str, str]]) -> str:
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def select(tree: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
  """The entries of ``tree`` named in ``names`` (in that order); a missing one raises KeyError."""
  return {k: tree[k] for k in names}

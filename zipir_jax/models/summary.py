r"""Parameter counts per component and latent shapes, without allocating a single weight.

  python -m zipir_jax.models.summary --config=configs/zipir_3b.py [--size=2048 | --size=2048x1376]
  python -m zipir_jax.models.summary            # every config in configs/
  python -m zipir_jax.models.summary --config=configs/zipir_3b.py --stages   # the training recipe

Everything is computed with ``jax.eval_shape`` (abstract shapes only), so the 3 B model's summary
runs on a laptop.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from zipir_jax import config_lib
from zipir_jax.models import autoencoder, count_params, dit
from zipir_jax.training import stages


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so imports never clash)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config (default: all).")
  flags.DEFINE_string("size", "2048", "Input size for the latent shapes: N or HxW.")
  flags.DEFINE_bool("stages", False, "Print the training recipe, stage by stage, instead.")


def parse_size(size: str) -> tuple[int, int]:
  """'2048' -> (2048, 2048); '2048x1376' -> (2048, 1376)."""
  try:
    parts = [int(p) for p in size.lower().split("x")]
  except ValueError:
    raise ValueError(f"--size={size!r}: expected N or HxW, e.g. 2048 or 2048x1376") from None
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2:
    raise ValueError(f"--size={size!r}: expected N or HxW, e.g. 2048 or 2048x1376")
  return parts[0], parts[1]


def summarize(
  config: ml_collections.ConfigDict, height: int = 2048, width: int = 2048
) -> dict[str, object]:
  """Per-component parameter counts (VAE parts, discriminator, DiT breakdown) and latent shapes."""
  vae = autoencoder.build_autoencoder(config)
  image = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  params = jax.eval_shape(
    lambda x: autoencoder.init_autoencoder(vae, jax.random.key(0), x.shape), image
  )
  latent, posteriors = jax.eval_shape(
    lambda p, x: vae.apply({"params": p}, x, method="encode"), params, image
  )

  pixel_decoder = autoencoder.build_pixel_decoder(config)
  pd_params = jax.eval_shape(
    lambda z, x: pixel_decoder.init(jax.random.key(0), jnp.zeros(z.shape), jnp.zeros(x.shape)),
    latent,
    image,
  )["params"]
  fusion = {k: v for k, v in pd_params["decoder"].items() if k.endswith("_fusion")}
  disc = autoencoder.build_discriminator(config)
  disc_params = jax.eval_shape(
    lambda x: disc.init(jax.random.key(0), jnp.zeros(x.shape), train=False), image
  )["params"]

  counts = {}
  if config.vae.kind == "lpvae":
    counts["E_c  coarse encoder"] = count_params(params["coarse_encoder"])
    counts["D_c  coarse decoder (training only)"] = count_params(params["coarse_decoder"])
    counts["E_f  fine encoder"] = count_params(params["fine_encoder"])
    counts["D_f  fine decoder"] = count_params(params["fine_decoder"])
    shapes = {
      "z_macro": (1, latent.shape[1], latent.shape[2], 3),
      "z_coarse": posteriors["coarse"].mean.shape,
      "z_fine": posteriors["fine"].mean.shape,
    }
  else:
    counts["encoder"] = count_params(params["encoder"])
    counts["decoder"] = count_params(params["decoder"])
    shapes = {}
  if "extractor" in pd_params:  # else (no fusion levels: the SD-VAE ablation) the plain decoder
    counts["D_f* pixel-aware decoder"] = count_params(pd_params)
    counts["  of which extractor"] = count_params(pd_params["extractor"])
    counts["  of which new fusion layers"] = count_params(fusion)
  counts["discriminator"] = count_params(disc_params)
  for key, value in dit.param_breakdown(config).items():
    counts[f"DiT  {key}"] = value
  shapes["z"] = latent.shape
  return {"counts": counts, "shapes": shapes, "input": (1, height, width, 3)}


def format_summary(name: str, config: ml_collections.ConfigDict, summary: Mapping) -> str:
  lines = [
    f"== {name}  (vae: {config.vae.kind}, stage: {config.stage})",
    f"{'component':40s} {'parameters':>16s}",
  ]
  for key, value in summary["counts"].items():
    lines.append(f"{key:40s} {value:16,d}")
  lines.append(f"latents for input {tuple(summary['input'])}:")
  for key, shape in summary["shapes"].items():
    lines.append(f"  {key:10s} {tuple(shape)}")
  return "\n".join(lines)


def format_stages(config_file: str, config: ml_collections.ConfigDict) -> str:
  """Every stage of ``config_file``'s experiment as ``stages.describe`` resolves it; the loaded
  ``config`` (command-line overrides included) stands for its own stage."""
  blocks = []
  for name in stages.experiment(config.vae.kind).names:
    stage_config = (
      config if name == config.stage else config_lib.load_config(f"{config_file}:{name}")
    )
    blocks.append(f"== {config_file}:{name}\n" + stages.format_table(stages.describe(stage_config)))
  return "\n\n".join(blocks)


def main(argv):
  del argv
  if flags.FLAGS.stages:
    if flags.FLAGS.config is None:
      raise app.UsageError("--stages needs --config=configs/<experiment>.py")
    print(
      format_stages(flags.FLAGS["config"].config_filename.partition(":")[0], flags.FLAGS.config)
    )
    return
  height, width = parse_size(flags.FLAGS.size)
  if flags.FLAGS.config is not None:
    items = [(flags.FLAGS["config"].config_filename, flags.FLAGS.config)]
  else:
    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    items = [
      (os.path.relpath(p), config_lib.load_config(p))
      for p in sorted(glob.glob(os.path.join(root, "*.py")))
    ]
  for name, config in items:
    print(format_summary(name, config, summarize(config, height, width)), end="\n\n")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_lib.flags_parser)

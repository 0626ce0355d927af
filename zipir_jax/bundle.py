"""The inference bundle: everything restoration needs, in one folder.

  BUNDLE/
    config.json      the experiment config (ml_collections as JSON)
    params/          Orbax checkpoint of {'vae': the encoders (E_c, E_f; the SD-VAE ablation's
                     one encoder), 'pixel_decoder': D_f* (the ablation: its plain decoder),
                     'dit': ZipDiT, 'latent_stats': {'mean', 'std'} (per latent channel)}
    text_encoder/    a Hugging Face T5 encoder folder (config.json, model.safetensors, tokenizer);
                     absent when ``config.text.encoder_path`` names an external folder instead

Training exports this (EMA weights); :func:`load_bundle` checks every part against the networks
the config builds, so a missing or mismatched part fails with its name before any compilation.

A bundle to share (no Orbax, no pickles; any safetensors reader opens it) holds the same parts as
one ``<part>.safetensors`` per network beside ``config.json`` and ``text_encoder/`` (which it
always contains): ``vae``, ``pixel_decoder``, ``dit`` and ``latent_stats``, keys the parameter
paths joined by ``/``. :func:`load_bundle` reads either layout.

  python -m zipir_jax.bundle export BUNDLE OUT --format=safetensors
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from zipir_jax import param_io, text
from zipir_jax.errors import BundleError, BundleNotFoundError
from zipir_jax.models import autoencoder, t5
from zipir_jax.models import dit as dit_lib
from zipir_jax.models.pixel_decoder import init_from_autoencoder
from zipir_jax.training import stages

PARTS = ("vae", "pixel_decoder", "dit", "latent_stats")


@dataclasses.dataclass
class Bundle:
  """Config, network parameters and the text encoder of one trained ZipIR."""

  config: ml_collections.ConfigDict
  params: dict[str, Any]
  text_config: t5.T5Config
  text_params: Any
  tokenizer: Any


def expected_shapes(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Parameter shapes of every part, from ``jax.eval_shape`` (nothing allocated)."""
  vae = autoencoder.build_autoencoder(config)
  factor = vae.factor
  image = (1, factor, factor, 3)
  vae_params = jax.eval_shape(lambda: autoencoder.init_autoencoder(vae, jax.random.key(0), image))
  latent = jnp.zeros((1, 1, 1, vae.latent_channels))
  pd = autoencoder.build_pixel_decoder(config)
  pd_params = jax.eval_shape(
    lambda: nn.meta.unbox(pd.init(jax.random.key(0), latent, jnp.zeros(image)))["params"]
  )
  dit = dit_lib.build_dit(config)
  dit_params = jax.eval_shape(lambda: dit_lib.init_dit(dit, jax.random.key(0), vae.latent_channels))
  stats = jax.ShapeDtypeStruct((vae.latent_channels,), jnp.float32)
  return {
    "vae": stages.select(vae_params, stages.experiment(config.vae.kind).encoders),
    "pixel_decoder": pd_params,
    "dit": dit_params,
    "latent_stats": {"mean": stats, "std": stats},
  }


def check_params(config: ml_collections.ConfigDict, params: dict[str, Any], where: str) -> None:
  """Raises a BundleError naming the first missing, unexpected or wrongly shaped parameters."""
  missing_parts = [p for p in PARTS if p not in params]
  if missing_parts:
    raise BundleError(
      f"{where}: bundle has no {', '.join(missing_parts)} parameters "
      f"(a restoration bundle holds {', '.join(PARTS)})"
    )
  want = flax.traverse_util.flatten_dict(expected_shapes(config), sep="/")
  have = flax.traverse_util.flatten_dict(params, sep="/")
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  wrong = sorted(k for k in set(want) & set(have) if tuple(want[k].shape) != tuple(have[k].shape))
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} parameters, e.g. {missing[:3]}")
  if extra:
    problems.append(f"{len(extra)} parameters the config does not build, e.g. {extra[:3]}")
  if wrong:
    k = wrong[0]
    problems.append(
      f"{len(wrong)} with wrong shapes, e.g. {k}: {tuple(have[k].shape)} in the "
      f"bundle, {tuple(want[k].shape)} from the config"
    )
  if problems:
    raise BundleError(
      f"{where}: parameters do not match config '{config.name}': " + "; ".join(problems)
    )


def random_bundle(config: ml_collections.ConfigDict, rng: jax.Array) -> Bundle:
  """A bundle with freshly initialised weights (tests, benchmarks, pipeline checks).

  D_f* starts from the LP-VAE as in training (extractor = E_f, decoder = D_f, fusion zero), the
  latent statistics are (0, 1) and the text encoder is the tiny random ByT5-style one unless
  ``config.text.encoder_path`` names a folder.
  """
  rng_vae, rng_pd, rng_dit, rng_text = jax.random.split(rng, 4)
  vae = autoencoder.build_autoencoder(config)
  image = (1, vae.factor, vae.factor, 3)
  vae_params = jax.jit(lambda k: autoencoder.init_autoencoder(vae, k, image))(rng_vae)
  pd = autoencoder.build_pixel_decoder(config)
  latent = jnp.zeros((1, 1, 1, vae.latent_channels))
  fresh = nn.meta.unbox(jax.jit(pd.init)(rng_pd, latent, jnp.zeros(image)))["params"]
  experiment = stages.experiment(config.vae.kind)
  pd_params = init_from_autoencoder(
    fresh,
    vae_params[experiment.full_resolution_encoder],
    vae_params[experiment.plain_decoder],
  )
  dit = dit_lib.build_dit(config)
  params = {
    "vae": stages.select(vae_params, experiment.encoders),
    "pixel_decoder": pd_params,
    "dit": dit_lib.init_dit(dit, rng_dit, vae.latent_channels),
    "latent_stats": {"mean": jnp.zeros(vae.latent_channels), "std": jnp.ones(vae.latent_channels)},
  }
  return Bundle(config, params, *text.build_text_encoder(config, rng_text))


def save_bundle(path: str, bundle: Bundle) -> None:
  """Writes ``bundle`` to the folder ``path`` (created; an existing bundle there is refused).

  In a multi-process run every process calls it with the same bundle: sharded arrays are written
  by the processes that hold them (``param_io.save``), the config and text encoder by process 0.
  """
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, "params")):
    raise FileExistsError(f"{path}: a bundle already exists there; choose another folder")
  check_params(bundle.config, bundle.params, path)
  param_io.sync_processes(f"bundle {path}")  # every process has looked before any writes
  param_io.save(os.path.join(path, "params"), bundle.params)
  if jax.process_index() == 0:
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
      f.write(bundle.config.to_json(indent=2))
    if not bundle.config.text.encoder_path:
      t5.save_hf_encoder(
        os.path.join(path, "text_encoder"), bundle.text_config, bundle.text_params, bundle.tokenizer
      )
  param_io.sync_processes(f"bundle {path} written")


def _read_config(path: str) -> ml_collections.ConfigDict:
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise BundleError(
      f"{path}: not a ZipIR bundle (no config.json); export one from training or "
      "make one with zipir_jax.bundle.save_bundle"
    )
  try:
    with open(config_path, encoding="utf-8") as f:
      return ml_collections.ConfigDict(json.load(f))
  except json.JSONDecodeError as e:
    raise BundleError(f"{config_path}: corrupt config ({e})") from None


def load_bundle(path: str) -> Bundle:
  """Reads and checks a bundle folder; every problem names the file or parameter at fault.

  The weights come back as numpy arrays, whatever mesh wrote them (``param_io.restore``).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise BundleNotFoundError(f"{path}: checkpoint bundle folder not found")
  config = _read_config(path)
  params_path = os.path.join(path, "params")
  if os.path.isfile(os.path.join(path, f"{PARTS[0]}.safetensors")):
    params = _read_safetensors_params(path)
  elif not os.path.isdir(params_path):
    raise BundleError(
      f"{path}: bundle has no params/ folder (network weights) and no "
      f"{PARTS[0]}.safetensors (the shared layout)"
    )
  else:
    try:
      params = param_io.restore(params_path)
    except Exception as e:  # Orbax raises several types for unreadable checkpoints.
      raise BundleError(f"{params_path}: cannot read the weights ({type(e).__name__}: {e})") from e
  check_params(config, params, path)
  text_path = config.text.encoder_path or os.path.join(path, "text_encoder")
  if not os.path.isdir(text_path):
    raise BundleError(f"{path}: no text encoder: neither {text_path} nor config.text.encoder_path")
  text_config, text_params, tokenizer = t5.load_t5_encoder(text_path, dtype=config.text.dtype)
  if text_config.d_model != config.dit.text_dim:
    raise BundleError(
      f"{text_path}: text encoder width {text_config.d_model} != the DiT's "
      f"text_dim {config.dit.text_dim}"
    )
  return Bundle(config, params, text_config, text_params, tokenizer)


def with_plain_decoder(bundle: Bundle, export_path: str) -> Bundle:
  """``bundle`` decoding with the autoencoder's plain decoder from a training export, not D_f*.

  The paper's "w/o pixel-aware decoder" (Fig. 6; Table 4's rows before "+ Pixel-aware Decoder")
  decodes the same DiT's latents with D_f. D_f* only changes decoding (§3.1: the latent space is
  frozen), so the decoder can be swapped after diffusion training. ``export_path`` is the
  ``vae_fine`` stage's export (``WORKDIR/vae_fine/export``; the SD-VAE's ``vae``). Its latent
  statistics must equal the bundle's: a training chain copies them bit for bit, so a difference
  means a decoder from another run, whose latent space the DiT never saw.
  """
  experiment = stages.experiment(bundle.config.vae.kind)
  key, stage = experiment.plain_decoder, experiment.plain_decoder_stage
  params_path = os.path.join(os.path.abspath(export_path), "params")
  if not os.path.isdir(params_path):
    raise BundleError(
      f"{params_path}: no training export there (the plain decoder comes from "
      f"the {stage} stage's export, WORKDIR/{stage}/export)"
    )
  try:
    export = param_io.restore(params_path)
  except Exception as e:  # Orbax raises several types for unreadable checkpoints.
    raise BundleError(f"{params_path}: cannot read the export ({type(e).__name__}: {e})") from e
  if key not in export:
    raise BundleError(
      f"{export_path}: export has no {key} (it holds {', '.join(sorted(export))}); "
      f"the plain decoder comes from the {stage} stage's export"
    )
  stats, ours = export.get("latent_stats"), bundle.params["latent_stats"]
  if stats is None or any(
    not np.array_equal(np.asarray(stats[k]), np.asarray(ours[k])) for k in ("mean", "std")
  ):
    raise BundleError(
      f"{export_path}: its latent statistics differ from the bundle's: the "
      f"decoder is from another training run than the bundle's DiT"
    )
  config = copy.deepcopy(bundle.config)
  with config.unlocked():
    config.pixel_decoder.fusion_levels = ()
  params = dict(bundle.params, pixel_decoder={"decoder": export[key]})
  check_params(config, params, export_path)
  return dataclasses.replace(bundle, config=config, params=params)


def _read_safetensors_params(path: str) -> dict[str, Any]:
  """The parameters of a shared bundle: one ``<part>.safetensors`` per part, keys joined by /."""
  from zipir_jax import weights  # pylint: disable=g-import-not-at-top

  params = {}
  for part in PARTS:
    file = os.path.join(path, f"{part}.safetensors")
    if not os.path.isfile(file):
      raise BundleError(f"{path}: shared bundle has no {part}.safetensors")
    try:
      flat = weights.load_safetensors(file)
    except ValueError as e:
      raise BundleError(str(e)) from e
    params[part] = flax.traverse_util.unflatten_dict(flat, sep="/")
  return params


def save_safetensors(path: str, bundle: Bundle) -> None:
  """Writes ``bundle`` in the shared layout: config.json, ``<part>.safetensors``, text_encoder/.

  The text encoder is always written into the folder (``config.text.encoder_path`` is cleared),
  so the folder is complete on its own.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(path)
  if os.path.exists(path) and os.listdir(path):
    raise BundleError(f"{path}: folder exists and is not empty; choose another folder")
  check_params(bundle.config, bundle.params, path)
  os.makedirs(path, exist_ok=True)
  config = copy.deepcopy(bundle.config)
  with config.unlocked():
    config.text.encoder_path = ""
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json(indent=2))
  for part in PARTS:
    flat = flax.traverse_util.flatten_dict(bundle.params[part], sep="/")
    safetensors.numpy.save_file(
      {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()},
      os.path.join(path, f"{part}.safetensors"),
      metadata={"format": "zipir_jax", "config": config.name, "part": part},
    )
  t5.save_hf_encoder(
    os.path.join(path, "text_encoder"), bundle.text_config, bundle.text_params, bundle.tokenizer
  )


EXPORT_FORMATS = {"safetensors": save_safetensors, "orbax": save_bundle}


def main(argv: list[str] | None = None) -> int:
  """``python -m zipir_jax.bundle export BUNDLE OUT --format=safetensors|orbax``."""
  import argparse  # pylint: disable=g-import-not-at-top

  from zipir_jax import cli  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
    prog="python -m zipir_jax.bundle", description=__doc__.split("\n")[0]
  )
  commands = parser.add_subparsers(dest="command", required=True)
  export = commands.add_parser("export", help="write a bundle (either layout) in another layout")
  export.add_argument("bundle", help="bundle folder to read")
  export.add_argument("out", help="new folder to write")
  export.add_argument("--format", choices=sorted(EXPORT_FORMATS), default="safetensors")
  export.add_argument("--verbosity", type=int, default=0, help="1: library INFO logs")
  args = parser.parse_args(argv)
  cli.quiet_library_logs(args.verbosity)
  try:
    EXPORT_FORMATS[args.format](args.out, load_bundle(args.bundle))
  except cli.USER_ERRORS as e:
    return cli.fail(e, status=2)
  print(f"wrote {os.path.abspath(args.out)} ({args.format})")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

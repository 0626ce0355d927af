r"""Does it learn? A small ZipIR trained through every ``train.py`` stage, measured on held-out photos.

  python bench/learning.py [--budget=cpu|smoke] [--config=configs/learning.py] [--output=learning_out]
  make learn                      # the same, at the default budget (under an hour on 2 CPU cores)

Trains on the photos that installed packages ship (``zipir_jax.demo``'s training set) and evaluates
only on its held-out photos. Every stage is the real ``train.py`` run with checkpoints at the
evaluation interval; the curves are computed afterwards from those checkpoints' EMA weights, so
evaluation never changes training. On a GPU or TPU the same command runs with a wider config
(``--config``) and a longer budget (``--steps``).

Writes ``<output>/``:
  table.md, results.json     the measurements below, with the command and machine
  curves/<stage>.png         training loss and held-out PSNR against step, per stage
  work/, photos/, logs/      the runs, the photos, the train.py logs

The table answers, in the paper's terms:
  1. LP-VAE reconstruction (clean HQ -> z -> D_f) at 256² and at the training crop size;
  2. LP-VAE vs the f32c64 SD-VAE at equal steps and comparable parameters (Table 4's direction),
     with two references at the same 32x compression: z_macro alone (I↓32, bicubic up: the
     LP-VAE's three fixed channels) and a linear code (PCA, 64 per 32² block, on the training
     photos), what an autoencoder should reach at least;
  3. D_f* vs D_f, with z from HQ and with the restored z (Fig. 6's direction);
  4. restorations at strength 1 and 0.5 (and 0.5 with the wavelet colour fix) against bicubic and
     Real-ESRGAN at fig4 and sr8 (Table 1), and without the DiT (D_f* on E(LQ↑)), each with the
     restored latent's error against E(HQ): whether the DiT moves the latent towards HQ's;
  5. the ceiling of any DiT with this decoder (D_f* on E(HQ)), and every fig4 row's error per
     wavelet band: which scales of detail a method gets right.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cv2  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

from zipir_jax import (  # noqa: E402
  api,
  baselines,
  bundle,
  config_lib,
  demo,
  evaluate,
  metrics,
  restore,
)
from zipir_jax.data import eval_presets  # noqa: E402
from zipir_jax.models import count_params, lpvae  # noqa: E402
from zipir_jax.training import checkpointing, stages  # noqa: E402
from zipir_jax.training import state as state_lib  # noqa: E402
from zipir_jax.training import steps as steps_lib  # noqa: E402

LPVAE_STAGES = ("vae_coarse", "vae_fine", "pixel_decoder", "dit")
# What the LP-VAE keeps after training (D_c is discarded), against the SD-VAE's encoder + decoder.
LPVAE_AUTOENCODER = ("coarse_encoder", "fine_encoder", "fine_decoder")
PRESETS = ("fig4", "sr8")
STRENGTHS = (1.0, 0.5)
NO_DIT = "D_f*(E(LQ↑)): no DiT"
PERFECT_DIT = "D_f*(E(HQ)): a perfect DiT, wavelet colour fix"
Z_MACRO = "z_macro alone: I↓32, bicubic up"
BLOCK_PCA = "linear code: PCA, 64 per 32² block"
BAND_NAMES = ("1–2 px", "2–4 px", "4–8 px", "8–16 px", "16–32 px", "> 32 px")


@dataclasses.dataclass(frozen=True)
class Budget:
  """Steps per stage ("sdvae": the SD-VAE's one autoencoder stage) and evaluation points."""

  steps: dict[str, int]
  evals: int  # checkpoints evaluated per stage (the curves' points)
  size: int  # side of the held-out crops

  def every(self, stage: str) -> int:
    return max(1, self.steps[stage] // self.evals)


BUDGETS = {
  # The SD-VAE trains as many steps as the LP-VAE's two autoencoder stages together.
  "cpu": Budget(
    steps={"vae_coarse": 500, "vae_fine": 500, "pixel_decoder": 300, "dit": 600, "sdvae": 1000},
    evals=5,
    size=256,
  ),
  "smoke": Budget(
    steps={"vae_coarse": 2, "vae_fine": 2, "pixel_decoder": 2, "dit": 2, "sdvae": 2},
    evals=1,
    size=64,
  ),
}


def say(message: str) -> None:
  print(f"[learning {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------ training


def train_command(
  config_file: str, stage: str, workdir: str, data: str, num_steps: int, every: int
) -> list[str]:
  """``train.py`` for one stage: checkpoints (all kept) at the evaluation interval."""
  return [
    sys.executable,
    "train.py",
    f"--config={config_file}:{stage}",
    f"--workdir={workdir}",
    f"--config.data.path={data}",
    f"--config.optim.num_steps={num_steps}",
    f"--config.train.checkpoint_every={every}",
    f"--config.train.keep_checkpoints={num_steps // every + 2}",
    f"--config.train.log_every={max(1, min(every, num_steps // 20 or 1))}",
    f"--config.train.image_every={num_steps}",
  ]


def train_all(args, budget: Budget, data: str, work: str, logs: str) -> None:
  """The LP-VAE's four stages, then the SD-VAE's autoencoder stage (finished stages are reused)."""
  runs = [(args.config, s, os.path.join(work, "lpvae"), budget.steps[s]) for s in LPVAE_STAGES]
  if args.sdvae_config:
    runs.append((args.sdvae_config, "vae", os.path.join(work, "sdvae"), budget.steps["sdvae"]))
  for config_file, stage, workdir, num_steps in runs:
    name = "sdvae" if "sdvae" in workdir else stage
    if demo.stage_done(workdir, stage):
      say(f"{name}: finished earlier, reusing {workdir}/{stage}")
      continue
    every = budget.every(name)
    cmd = train_command(config_file, stage, workdir, data, num_steps, every) + args.override
    start = time.time()
    demo.run_logged(cmd, os.path.join(logs, f"train_{name}.log"), name, num_steps)
    say(f"{name}: {num_steps} steps in {time.time() - start:.0f} s")


# ------------------------------------------------------------------ evaluation helpers


def load_stage_config(config_file: str, stage: str, overrides: Sequence[str]):
  """The stage's config as train.py built it (the command's ``--config.KEY=VALUE`` overrides)."""
  config = config_lib.load_config(f"{config_file}:{stage}")
  values = {}
  for flag in overrides:
    key, _, value = flag.removeprefix("--config.").partition("=")
    try:
      values[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      values[key] = value  # a plain string, as absl reads it
  return config_lib.apply_overrides(config, values)


def checkpoints(workdir: str, stage: str) -> list[int]:
  folder = os.path.join(checkpointing.stage_dir(workdir, stage), "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def read_state(workdir: str, stage: str, step: int) -> dict[str, Any]:
  """A checkpoint's train state as numpy (``ema_params``, ``frozen``, …)."""
  import orbax.checkpoint as ocp

  path = os.path.join(checkpointing.stage_dir(workdir, stage), "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)


def to_model(images: Sequence[np.ndarray]) -> jax.Array:
  return jnp.asarray(np.stack(images), jnp.float32) / 127.5 - 1.0


def scores(restored: jax.Array, reference: jax.Array) -> dict[str, float]:
  """Mean PSNR and SSIM of [0, 1] NHWC images."""
  a, b = jnp.clip(restored, 0.0, 1.0), jnp.clip(reference, 0.0, 1.0)
  return {"psnr": float(jnp.mean(metrics.psnr(a, b))), "ssim": float(jnp.mean(metrics.ssim(a, b)))}


def band_rms(images: jax.Array) -> list[float]:
  """RMS of each wavelet band (``restore.wavelet_bands``) of [0, 1] NHWC images, in 8-bit levels."""
  return [float(jnp.sqrt(jnp.mean(jnp.square(b))) * 255) for b in restore.wavelet_bands(images)]


def restoration_scores(restored: jax.Array, reference: jax.Array) -> dict[str, Any]:
  """:func:`scores` and ``band_rmse``: the error per wavelet band, where the PSNR is lost or won."""
  a, b = jnp.clip(restored, 0.0, 1.0), jnp.clip(reference, 0.0, 1.0)
  return {**scores(a, b), "band_rmse": band_rms(a - b)}


def reconstruction_scores(models, params: dict, frozen: dict, hq: jax.Array, lq_up=None):
  """The stage's own reconstruction (``steps.RECONSTRUCT``) of held-out images against its target."""
  batch = {"hq": hq} if lq_up is None else {"hq": hq, "lq_up": lq_up}
  fn = jax.jit(lambda p, f, b: steps_lib.reconstruct(models, p, f, b, None)[:2])
  target, recon = fn(params, frozen, batch)
  return scores(metrics.to_unit_range(recon), metrics.to_unit_range(target))


def blocks(images: np.ndarray, block: int = 32) -> np.ndarray:
  """NHWC [0, 1] images (H, W multiples of ``block``) -> (N * H/block * W/block, block² * C) rows."""
  n, h, w, c = images.shape
  x = images.reshape(n, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, block * block * c)


def unblocks(rows: np.ndarray, shape: tuple[int, ...], block: int = 32) -> np.ndarray:
  """The inverse of :func:`blocks` for images of ``shape`` (N, H, W, C)."""
  n, h, w, c = shape
  x = rows.reshape(n, h // block, w // block, block, block, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(shape)


def fit_block_pca(images: Sequence[np.ndarray], k: int = 64, block: int = 32):
  """(mean, k x block²·3 basis) of the block x block RGB patches of uint8 photos (any size).

  The best linear code with ``k`` numbers per 32² block: an autoencoder with the LP-VAE's
  compression (64 channels at H/32) should reconstruct at least this well.
  """
  rows = []
  for image in images:
    h, w = (image.shape[0] // block) * block, (image.shape[1] // block) * block
    rows.append(blocks(image[None, :h, :w].astype(np.float64) / 255.0, block))
  x = np.concatenate(rows)
  mean = x.mean(axis=0)
  centred = x - mean
  # The top k eigenvectors of the scatter matrix: the SVD's right singular vectors, 7x faster.
  n = min(k, x.shape[1], len(x))
  _, vectors = scipy.linalg.eigh(
    centred.T @ centred, subset_by_index=(x.shape[1] - n, x.shape[1] - 1)
  )
  return mean, vectors[:, ::-1].T


def reference_scores(hq: np.ndarray, train_images: Sequence[np.ndarray], crop: int) -> dict:
  """z_macro alone and the block PCA code on [0, 1] NHWC ``hq``: :func:`scores` (+ ``psnr_crop``)."""
  mean, basis = fit_block_pca(train_images)
  coded = unblocks((blocks(hq) - mean) @ basis.T @ basis + mean, hq.shape)
  size = hq.shape[1:3]
  macro = baselines.resize(
    np.asarray(lpvae.area_downsample(jnp.asarray(hq), 32)), size, cv2.INTER_CUBIC
  )
  o = (hq.shape[1] - crop) // 2
  out = {}
  for name, images in ((Z_MACRO, macro), (BLOCK_PCA, coded)):
    images = jnp.asarray(images, jnp.float32)
    reference = jnp.asarray(hq, jnp.float32)
    out[name] = scores(images, reference)
    out[name]["psnr_crop"] = scores(
      images[:, o : o + crop, o : o + crop], reference[:, o : o + crop, o : o + crop]
    )["psnr"]
  return out


def degraded(items, preset: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """(LQ, LQ↑) of each held-out (name, HQ, caption), the preset's fixed degradation."""
  return [eval_presets.make_eval_pair(hq, preset, 1000 + i) for i, (_, hq, _) in enumerate(items)]


# ------------------------------------------------------------------ the measurements


def autoencoder_curve(args, workdir, stage, items, crop) -> list[dict[str, Any]]:
  """Held-out reconstruction PSNR of every checkpoint of an autoencoder stage."""
  config = load_stage_config(
    args.config if stage != "vae" else args.sdvae_config, stage, args.override
  )
  models = state_lib.build_models(config)
  hq = to_model([hq for _, hq, _ in items])
  lq_up = None
  if models.stage.needs_lq:
    lq_up = to_model([up for _, up in degraded(items, "fig4")])
  rows = []
  for step in checkpoints(workdir, stage):
    state = read_state(workdir, stage, step)
    row = {"step": step}
    row.update(reconstruction_scores(models, state["ema_params"], state["frozen"], hq, lq_up))
    if crop and crop < hq.shape[1] and lq_up is None:
      o = (hq.shape[1] - crop) // 2  # the centre crop at the training crop size
      row["psnr_crop"] = reconstruction_scores(
        models, state["ema_params"], state["frozen"], hq[:, o : o + crop, o : o + crop]
      )["psnr"]
    rows.append(row)
  return rows


def dit_bundle(args, workdir: str, step: int | None = None, plain: bool = False) -> bundle.Bundle:
  """The restoration bundle of the dit stage, or of its checkpoint ``step`` (EMA weights)."""
  path = os.path.join(checkpointing.stage_dir(workdir, "dit"), "bundle")
  b = bundle.load_bundle(path)
  if step is not None:
    b.params["dit"] = read_state(workdir, "dit", step)["ema_params"]["dit"]
  if plain:
    b = bundle.with_plain_decoder(b, checkpointing.export_dir(workdir, "vae_fine"))
  return b


def latent_error(z: jax.Array, reference: jax.Array) -> float:
  """Mean squared difference of two normalised latents (the DiT's space: unit variance per channel)."""
  return float(jnp.mean(jnp.square(jnp.asarray(z) - reference)))


def restore_scores(pipe, items, preset: str, **options) -> dict[str, Any]:
  """PSNR/SSIM of the restorations, and ``z_mse``: the sampled latent against E(HQ)'s."""
  pairs = degraded(items, preset)
  hq = jnp.asarray(np.stack([hq for _, hq, _ in items]), jnp.float32) / 255.0
  restorer, out, errors = pipe.restorer, [], []
  for (lq, _), (_, image, caption) in zip(pairs, items):
    final = {}
    keep = lambda step, t, z, final=final: final.update(z=z)  # the last call holds the result
    out.append(
      pipe(
        lq,
        size=hq.shape[1:3],
        prompt=caption,
        output_type="np",
        progress=False,
        callback=keep,
        **options,
      )
    )
    errors.append(latent_error(final["z"], restorer.encode(restorer.params, to_model([image]))))
  return {**restoration_scores(jnp.asarray(np.stack(out)), hq), "z_mse": float(np.mean(errors))}


def decoder_scores(
  pipe, items, preset: str, latent: str = "LQ↑", color_fix: str | None = None
) -> dict[str, Any]:
  """D_f*(z, LQ↑) without the DiT: z = E(LQ↑) (the no-DiT ablation) or E(HQ) (a perfect DiT).

  ``z_mse`` is that latent's error against E(HQ)'s; the E(HQ) row bounds what any DiT could add.
  """
  restorer, params = pipe.restorer, pipe.restorer.params
  out, errors = [], []
  for (lq, _), (_, image, _) in zip(degraded(items, preset), items):
    lq_up = jnp.asarray(restorer.upsample_lq([restore.to_unit_float(lq)], image.shape[:2]))
    target = restorer.encode(params, to_model([image]))
    z = target if latent == "HQ" else restorer.encode(params, lq_up)
    decoded = restorer.decode(params, z, lq_up, jnp.float32(1.0))  # sizes: multiples of 32
    if color_fix:
      decoded = restore.color_fix(decoded, lq_up, color_fix)
    out.append(decoded[0])
    errors.append(latent_error(z, target))
  restored = metrics.to_unit_range(jnp.stack(out))
  hq = jnp.asarray(np.stack([hq for _, hq, _ in items]), jnp.float32) / 255.0
  return {**restoration_scores(restored, hq), "z_mse": float(np.mean(errors))}


def baseline_scores(name: str, items, preset: str) -> dict[str, Any]:
  restorer = baselines.make_restorer(name)
  hq = jnp.asarray(np.stack([hq for _, hq, _ in items]), jnp.float32) / 255.0
  out = [restorer(lq, hq.shape[1:3]) for lq, _ in degraded(items, preset)]
  return restoration_scores(jnp.asarray(np.stack(out), jnp.float32), hq)


def dit_curve(args, workdir, items) -> list[dict[str, Any]]:
  """Per checkpoint: fig4 restorations at strength 0.5 and the latent error at strengths 1 and 0.5."""
  rows = []
  for step in checkpoints(workdir, "dit"):
    pipe = api.ZipIRPipeline(dit_bundle(args, workdir, step))
    row = {"step": step, **restore_scores(pipe, items, "fig4", strength=0.5)}
    row["z_mse_strength_1"] = restore_scores(pipe, items, "fig4", strength=1.0)["z_mse"]
    rows.append(row)
  return rows


def autoencoder_params(workdir: str, stage: str, names: Sequence[str]) -> int:
  export = checkpointing.restore_export(checkpointing.export_dir(workdir, stage))
  return count_params(stages.select(export, names))


def measure(args, budget: Budget, work: str, train: str, heldout: str) -> dict[str, Any]:
  items = evaluate.load_hq_images(heldout, budget.size, 0, say)
  lp, sd = os.path.join(work, "lpvae"), os.path.join(work, "sdvae")
  crop = load_stage_config(args.config, "vae_fine", args.override).data.buckets[0][0]
  say("evaluating the LP-VAE stages' checkpoints on the held-out photos")
  curves = {s: autoencoder_curve(args, lp, s, items, crop) for s in LPVAE_STAGES[:3]}
  if args.sdvae_config:
    curves["sdvae"] = autoencoder_curve(args, sd, "vae", items, crop)
  say("evaluating the dit stage's checkpoints (restorations at fig4, strength 0.5)")
  curves["dit"] = dit_curve(args, lp, items)

  result = {"curves": curves, "size": budget.size, "crop": crop, "images": [n for n, _, _ in items]}
  last = lambda stage: {k: v for k, v in curves[stage][-1].items() if k != "step"}
  result["vae"] = {
    "lpvae": {
      **last("vae_fine"),
      "params": autoencoder_params(lp, "vae_fine", LPVAE_AUTOENCODER),
      "steps": budget.steps["vae_coarse"] + budget.steps["vae_fine"],
    }
  }
  if args.sdvae_config:
    result["vae"]["sdvae"] = {
      **last("sdvae"),
      "params": autoencoder_params(sd, "vae", ("encoder", "decoder")),
      "steps": budget.steps["sdvae"],
    }
  train_images = [
    demo.read_rgb(os.path.join(train, n)) for n in sorted(os.listdir(train)) if n.endswith(".png")
  ]
  hq = np.stack([hq for _, hq, _ in items]).astype(np.float32) / 255.0
  result["vae"]["references"] = reference_scores(hq, train_images, crop)
  say("D_f* against D_f, with z from HQ and with the restored z (fig4)")
  # D_f on z(HQ) is vae_fine's reconstruction; D_f* also reads the fig4 LQ↑.
  pixel = {
    "z from HQ": {
      "D_f": curves["vae_fine"][-1]["psnr"],
      "D_f*": curves["pixel_decoder"][-1]["psnr"],
    }
  }
  pipes = {
    "D_f*": api.ZipIRPipeline(dit_bundle(args, lp)),
    "D_f": api.ZipIRPipeline(dit_bundle(args, lp, plain=True)),
  }
  pixel["restored z"] = {k: restore_scores(p, items, "fig4")["psnr"] for k, p in pipes.items()}
  result["pixel_decoder"] = pixel

  say("restorations against bicubic and Real-ESRGAN (fig4, sr8)")
  table = {}
  for preset in PRESETS:
    rows = {
      "bicubic": baseline_scores("bicubic", items, preset),
      "Real-ESRGAN": baseline_scores("realesrgan", items, preset),
    }
    for strength in STRENGTHS:
      rows[f"ZipIR, strength {strength:g}"] = restore_scores(
        pipes["D_f*"], items, preset, strength=strength
      )
    # StableSR's wavelet colour fix (sample.py --color_fix=wavelet): low frequencies from LQ↑.
    rows[f"ZipIR, strength {STRENGTHS[-1]:g}, wavelet colour fix"] = restore_scores(
      pipes["D_f*"], items, preset, strength=STRENGTHS[-1], color_fix="wavelet"
    )
    rows[NO_DIT] = decoder_scores(pipes["D_f*"], items, preset)
    rows[f"{NO_DIT}, wavelet colour fix"] = decoder_scores(
      pipes["D_f*"], items, preset, color_fix="wavelet"
    )
    rows[PERFECT_DIT] = decoder_scores(pipes["D_f*"], items, preset, "HQ", "wavelet")
    table[preset] = rows
  result["restoration"] = table
  result["hq_band_rms"] = band_rms(jnp.asarray(np.stack([hq for _, hq, _ in items])) / 255.0)
  return result


# ------------------------------------------------------------------ report


def read_losses(workdir: str, stage: str) -> tuple[list[int], list[float]]:
  path = os.path.join(checkpointing.stage_dir(workdir, stage), "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return [r["step"] for r in rows], [r["loss"] for r in rows]


def plot_curves(result: dict, work: str, folder: str) -> list[str]:
  """One PNG per stage: training loss (left) and held-out PSNR (right) against step."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(folder, exist_ok=True)
  written = []
  for stage, rows in result["curves"].items():
    workdir = os.path.join(work, "sdvae" if stage == "sdvae" else "lpvae")
    x, loss = read_losses(workdir, "vae" if stage == "sdvae" else stage)
    fig, left = plt.subplots(figsize=(5, 3), dpi=80)
    left.plot(x, loss, color="tab:gray", linewidth=1)
    left.set_xlabel("step")
    left.set_ylabel("training loss", color="tab:gray")
    right = left.twinx()
    right.plot([r["step"] for r in rows], [r["psnr"] for r in rows], "o-", color="tab:blue")
    right.set_ylabel("held-out PSNR (dB)", color="tab:blue")
    left.set_title(stage)
    if stage == "dit":  # the DiT's own output: its latent against E(HQ)'s, and E(LQ↑)'s baseline
      fig.set_size_inches(9, 3)
      left.set_position([0.08, 0.17, 0.34, 0.72])
      right.set_position([0.08, 0.17, 0.34, 0.72])
      z = fig.add_axes([0.6, 0.17, 0.36, 0.72])
      steps = [r["step"] for r in rows]
      for key, label in (("z_mse_strength_1", "strength 1"), ("z_mse", "strength 0.5")):
        z.plot(steps, [r[key] for r in rows], "o-", label=label)
      baseline = result["restoration"]["fig4"][NO_DIT]["z_mse"]
      z.axhline(baseline, color="black", linestyle="--", label="E(LQ↑), no DiT")
      z.set_yscale("log")
      z.set_xlabel("step")
      z.set_ylabel("latent MSE vs E(HQ)")
      z.legend(fontsize=7)
    else:
      fig.tight_layout()
    path = os.path.join(folder, f"{stage}.png")
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
  return written


def markdown(result: dict, command: str) -> str:
  vae, pixel, size, crop = result["vae"], result["pixel_decoder"], result["size"], result["crop"]
  lines = [
    f"Held-out photos ({len(result['images'])}, {size}² crops): {', '.join(result['images'])}",
    f"Command: `{command}`; machine: {platform.machine()}, {os.cpu_count()} cores, "
    f"{jax.devices()[0].platform}; {time.strftime('%Y-%m-%d')}",
    "",
    f"| autoencoder | params | steps | PSNR {size}² | SSIM {size}² | PSNR {crop}² |",
    "|---|---|---|---|---|---|",
  ]
  for name, label in (("lpvae", "LP-VAE (E_c + E_f + D_f)"), ("sdvae", "f32c64 SD-VAE")):
    if name not in vae:
      lines.append(f"| {label} | not trained (--sdvae_config='') | | | | |")
      continue
    v = vae[name]
    lines.append(
      f"| {label} | {v['params']:,} | {v['steps']} | {v['psnr']:.2f} | "
      f"{v['ssim']:.4f} | {v.get('psnr_crop', float('nan')):.2f} |"
    )
  for label, v in vae.get("references", {}).items():
    params = "0" if label == Z_MACRO else "basis 64 x 3,072"
    lines.append(
      f"| {label} | {params} | closed form | {v['psnr']:.2f} | {v['ssim']:.4f} | "
      f"{v['psnr_crop']:.2f} |"
    )
  lines += ["", "| decoder (fig4) | z from HQ | restored z |", "|---|---|---|"]
  for dec in ("D_f", "D_f*"):
    lines.append(f"| {dec} | {pixel['z from HQ'][dec]:.2f} | {pixel['restored z'][dec]:.2f} |")
  lines += [
    "",
    "| degradation | method | PSNR | SSIM | latent MSE vs E(HQ) |",
    "|---|---|---|---|---|",
  ]
  for preset, rows in result["restoration"].items():
    for method, s in rows.items():
      z = f"{s['z_mse']:.3f}" if "z_mse" in s else ""
      lines.append(f"| {preset} | {method} | {s['psnr']:.2f} | {s['ssim']:.4f} | {z} |")
  lines += [
    "",
    "| fig4: RMS error per wavelet band, 8-bit levels | " + " | ".join(BAND_NAMES) + " |",
    "|---" * (len(BAND_NAMES) + 1) + "|",
    "| HQ's own band: the error of restoring none of it | "
    + " | ".join(f"{v:.1f}" for v in result["hq_band_rms"][:-1])
    + " | |",
  ]
  for method, s in result["restoration"]["fig4"].items():
    lines.append(f"| {method} | " + " | ".join(f"{v:.1f}" for v in s["band_rmse"]) + " |")
  lines += ["", "| target (issue: CPU, default budget) | measured | needed | margin |"]
  lines.append("|---|---|---|---|")
  for name, got, needed in targets(result):
    lines.append(f"| {name} | {got:.2f} | {needed:.2f} | {got - needed:+.2f} dB |")
  return "\n".join(lines) + "\n"


def targets(result: dict) -> list[tuple[str, float, float]]:
  """(target, measured PSNR, PSNR needed): what a CPU run at the default budget should reach."""
  size, pixel, fig4 = result["size"], result["pixel_decoder"], result["restoration"]["fig4"]
  zipir = {k: v["psnr"] for k, v in fig4.items() if k.startswith("ZipIR")}
  best = max(zipir, key=zipir.get)
  return [
    (f"LP-VAE reconstruction, unseen {size}²", result["vae"]["lpvae"]["psnr"], 22.0),
    *(
      (f"D_f* >= D_f + 1 dB, fig4, {z}", pixel[z]["D_f*"], pixel[z]["D_f"] + 1.0)
      for z in ("z from HQ", "restored z")
    ),
    (f"{best} >= bicubic, fig4 8x", zipir[best], fig4["bicubic"]["psnr"]),
  ]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--budget", default="cpu", choices=sorted(BUDGETS))
  parser.add_argument("--config", default="configs/learning.py")
  parser.add_argument(
    "--sdvae_config", default="configs/learning_sdvae.py", help="the SD-VAE compared; '' skips it"
  )
  parser.add_argument("--output", default="learning_out")
  parser.add_argument(
    "--steps",
    default="",
    help="per-stage steps: vae_coarse,vae_fine,pixel_decoder,dit,sdvae (overrides the budget)",
  )
  parser.add_argument(
    "--override",
    action="append",
    default=[],
    help="--config.KEY=VALUE added to every train.py command",
  )
  args = parser.parse_args(argv)
  budget = BUDGETS[args.budget]
  if args.steps:
    counts = [int(s) for s in args.steps.split(",")]
    budget = dataclasses.replace(budget, steps=dict(zip((*LPVAE_STAGES, "sdvae"), counts)))
  out = os.path.abspath(args.output)
  work, logs = os.path.join(out, "work"), os.path.join(out, "logs")
  os.makedirs(logs, exist_ok=True)
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, "xla_cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  os.environ["PYTHONUNBUFFERED"] = "1"
  t0 = time.time()
  train, heldout = demo.gather_photos(os.path.join(out, "photos"), budget.size)
  say(f"training {args.config} (and {args.sdvae_config}) on {train}; held out: {heldout}")
  train_all(args, budget, train, work, logs)
  result = measure(args, budget, work, train, heldout)
  result["budget"], result["seconds"] = dataclasses.asdict(budget), time.time() - t0
  command = " ".join(["python bench/learning.py", *(argv if argv is not None else sys.argv[1:])])
  table = markdown(result, command)
  with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
    f.write(table)
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  plot_curves(result, work, os.path.join(out, "curves"))
  print(table)
  say(f"done in {time.time() - t0:.0f} s; {out}/table.md, {out}/curves/")
  return 0


if __name__ == "__main__":
  sys.exit(main())

r"""`make demo`: the whole ZipIR pipeline on this machine's CPU, in minutes, stated honestly.

1. Gathers the photos that installed packages ship (scikit-image, scikit-learn, matplotlib; list and
   licences in the README) into ``<output>/photos/{train,heldout}`` with one-line captions.
2. Trains the *tiny* configuration through the paper's four stages with ``train.py``:
   ``vae_coarse`` -> ``vae_fine`` -> ``pixel_decoder`` -> ``dit`` (``<output>/work``; TensorBoard
   logs and metrics.jsonl per stage). A stage whose export exists is reused, so a re-run resumes.
3. Degrades the held-out photos with the paper's Fig. 4 preset (8x down-sampling, blur, noise,
   JPEG) and restores them with ``sample.py`` at ``--strength=0.5`` (a DiT trained for minutes
   cannot generate from pure noise yet; the paper samples from noise, strength 1) and the wavelet
   colour fix.
4. Scores ZipIR against bicubic and Real-ESRGAN (x4plus, the real network) with
   ``python -m zipir_jax.evaluate``; writes side-by-side panels LQ | bicubic | Real-ESRGAN | ZipIR |
   HQ and the metrics table.

A model trained for a few CPU minutes on eleven photos is a demonstration that every part of the
pipeline runs and connects, not the paper's 3 B-parameter model: expect its restorations to lose to
Real-ESRGAN.

  python -m zipir_jax.demo --output demo_out [--steps 300,250,250,200] [--fresh]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("vae_coarse", "vae_fine", "pixel_decoder", "dit")
# D_f* gains most per step (bench/learning.py's curves); the DiT's few hundred steps barely move
# its restorations, so it gets the fewest.
DEFAULT_STEPS = (300, 250, 250, 200)
# One training crop size per stage (every distinct shape is another XLA compilation, which costs
# more CPU time here than the steps themselves): 96² x 4; at 8x a 64² crop leaves D_f* an LQ image
# 8 pixels wide. D_f*, the stage that reads LQ↑, trains on 128² (LQ 16 px wide: +0.1 dB on unseen
# photos for 120 s more, BENCHMARKS.md); 128² everywhere would not fit the 15-minute budget.
DEMO_BUCKETS = {"pixel_decoder": "((128,128,4),)"}
DEFAULT_BUCKETS = "((96,96,4),)"
SIZE = 256  # HQ side of the held-out evaluation crops; LQ is SIZE / 8 = 32 px.
PRESET = "fig4"
STRENGTH = 0.5  # sample.py --strength: see main()
# StableSR's wavelet colour fix (low frequencies from LQ↑): +1.8 dB at fig4 in bench/learning.py,
# where a DiT trained for minutes still gets colours and tones wrong.
COLOR_FIX = "wavelet"

# (package, name) -> caption. The README lists each photo's source and licence.
TRAIN_PHOTOS = {
  ("skimage", "astronaut"): "an astronaut in a white spacesuit in front of a flag",
  ("skimage", "chelsea"): "a tabby cat looking to the side",
  ("skimage", "rocket"): "a rocket on a launch pad",
  ("skimage", "immunohistochemistry"): "a stained tissue section under a microscope",
  ("skimage", "hubble_deep_field"): "galaxies in deep space",
  ("skimage", "retina"): "a photograph of a human retina",
  ("sklearn", "china"): "a chinese temple with trees",
  # Grey photos (used as RGB): with the seven colour photos alone the tiny decoders learn the
  # training photos rather than restoration, 0.7 dB below bicubic on unseen ones (BENCHMARKS.md).
  ("skimage", "camera"): "a man with a camera on a tripod",
  ("skimage", "coins"): "old coins on a dark background",
  ("skimage", "grass"): "a field of grass",
  ("skimage", "cell"): "a cell under a microscope",
}
HELDOUT_PHOTOS = {
  ("skimage", "coffee"): "a cup of coffee on a saucer",
  ("sklearn", "flower"): "a pink flower with yellow centre",
  ("matplotlib", "grace_hopper"): "a portrait of a woman in a navy uniform",
}
PANELS = ("LQ (nearest)", "bicubic", "Real-ESRGAN", "ZipIR (tiny)", "HQ")


def say(message: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_photo(package: str, name: str) -> np.ndarray:
  """A uint8 RGB photo from an installed package's bundled sample data (no download); grey -> RGB."""
  if package == "skimage":
    from skimage import data  # pylint: disable=g-import-not-at-top

    image = getattr(data, name)()
  elif package == "sklearn":
    from sklearn.datasets import load_sample_image  # pylint: disable=g-import-not-at-top

    image = load_sample_image(f"{name}.jpg")
  elif package == "matplotlib":
    from matplotlib import cbook  # pylint: disable=g-import-not-at-top

    with cbook.get_sample_data(f"{name}.jpg") as f:
      image = np.asarray(Image.open(f).convert("RGB"))
  else:
    raise ValueError(f"unknown photo package {package!r}")
  image = np.asarray(image, np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return np.ascontiguousarray(image[..., :3])


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  square = Image.fromarray(image[top : top + side, left : left + side])
  return (
    np.asarray(square.resize((size, size), Image.Resampling.LANCZOS))
    if side != size
    else np.asarray(square)
  )


def gather_photos(root: str, size: int = SIZE) -> tuple[str, str]:
  """Writes train photos (full size) and held-out ``size``² crops, each with a caption .txt."""
  train, heldout = os.path.join(root, "train"), os.path.join(root, "heldout")
  for folder, photos, crop in ((train, TRAIN_PHOTOS, False), (heldout, HELDOUT_PHOTOS, True)):
    os.makedirs(folder, exist_ok=True)
    for (package, name), caption in photos.items():
      path = os.path.join(folder, f"{name}.png")
      if not os.path.exists(path):
        image = load_photo(package, name)
        Image.fromarray(center_crop(image, size) if crop else image).save(path)
      with open(os.path.join(folder, f"{name}.txt"), "w", encoding="utf-8") as f:
        f.write(caption + "\n")
  return train, heldout


def stage_done(workdir: str, stage: str) -> bool:
  """Whether ``stage`` has written what it hands on: its export, or the dit stage's bundle."""
  from zipir_jax.training import checkpointing  # pylint: disable=g-import-not-at-top

  finished = (
    checkpointing.export_dir(workdir, stage),
    os.path.join(checkpointing.stage_dir(workdir, stage), "bundle"),
  )
  return any(os.path.isdir(os.path.join(folder, "params")) for folder in finished)


_STEP_LINE = re.compile(r"\] step (\d+): (.*)")


def run_logged(
  cmd: Sequence[str], log_path: str, label: str, total_steps: int | None = None
) -> None:
  """Runs ``cmd``; its whole output goes to ``log_path``, progress lines to the console."""
  say(f"{label}: {' '.join(cmd)}")
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen(
      cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    for line in proc.stdout:
      log.write(line)
      match = _STEP_LINE.search(line)
      if match and total_steps:
        values = dict(kv.split("=", 1) for kv in match.group(2).split(", ") if "=" in kv)
        eta = float(values.get("eta_hours", "nan")) * 3600
        print(
          f"    {label} step {match.group(1)}/{total_steps}  loss {values.get('loss', '?')}  "
          f"{float(values.get('steps_per_sec', 'nan')):.1f} steps/s  ETA {eta:.0f} s",
          flush=True,
        )
      elif total_steps is None and ("100%|" in line or "FAILED" in line or "restored" in line):
        print("    " + line.rstrip().split("\r")[-1][-150:], flush=True)
    if proc.wait():
      tail = open(log_path, encoding="utf-8").read()[-3000:]
      raise RuntimeError(f"{label} failed (exit {proc.returncode}); log: {log_path}\n{tail}")


def stage_command(
  stage: str, workdir: str, data: str, num_steps: int, config_file: str = "configs/tiny.py"
) -> list[str]:
  """The ``train.py`` command line of one demo stage (the tiny config, the stage's crop size).

  The GAN term is switched off by name (``disc_weight=0``, printed in each stage's recipe): in a
  few hundred CPU steps the discriminator cannot learn enough to help the reconstructions.
  Training degrades at 8x only, the scale of the preset the demo is scored on.
  """
  return [
    sys.executable,
    "train.py",
    f"--config={config_file}:{stage}",
    f"--workdir={workdir}",
    f"--config.data.path={data}",
    f"--config.data.buckets={DEMO_BUCKETS.get(stage, DEFAULT_BUCKETS)}",
    f"--config.optim.num_steps={num_steps}",
    f"--config.optim.warmup_steps={max(1, num_steps // 10)}",
    f"--config.train.log_every={max(1, num_steps // 6)}",
    f"--config.train.image_every={num_steps}",
    f"--config.train.checkpoint_every={num_steps}",
    "--config.train.latent_stats_batches=16",
    "--config.loss.disc_weight=0",
    # The preset the demo is scored on (fig4: 8x); lr 3e-4 trained D_f* best of 1e-4 / 3e-4 / 1e-3.
    "--config.data.degradation.scale_range=(8.0,8.0)",
    "--config.optim.lr=3e-4",
    "--config.optim.end_lr=3e-5",
  ]


def train_stages(workdir: str, data: str, steps: Sequence[int], logs: str) -> str:
  """Runs (or reuses) every stage; returns the dit stage's restoration bundle."""
  from zipir_jax.training import checkpointing  # pylint: disable=g-import-not-at-top

  for stage, num_steps in zip(STAGES, steps):
    if stage_done(workdir, stage):
      say(f"{stage}: finished earlier, reusing {workdir}/{stage}")
      continue
    start = time.time()
    run_logged(
      stage_command(stage, workdir, data, num_steps),
      os.path.join(logs, f"train_{stage}.log"),
      stage,
      num_steps,
    )
    say(f"{stage}: done in {time.time() - start:.0f} s")
  return os.path.join(checkpointing.stage_dir(workdir, "dit"), "bundle")


def side_by_side(rows: Sequence[np.ndarray], labels: Sequence[str]) -> Image.Image:
  """Equal-size uint8 images in a row with a label strip above each."""
  h, w = rows[0].shape[:2]
  canvas = Image.new("RGB", (w * len(rows), h + 16), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (image, label) in enumerate(zip(rows, labels)):
    canvas.paste(Image.fromarray(image), (i * w, 16))
    draw.text((i * w + 4, 2), label, fill="black")
  return canvas


def read_rgb(path: str) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", default="demo_out", help="everything the demo writes")
  parser.add_argument(
    "--steps",
    default=",".join(map(str, DEFAULT_STEPS)),
    help="training steps of vae_coarse,vae_fine,pixel_decoder,dit",
  )
  parser.add_argument("--fresh", action="store_true", help="retrain every stage")
  args = parser.parse_args(argv)
  steps = [int(s) for s in args.steps.split(",")]
  if len(steps) != len(STAGES) or min(steps) < 1:
    parser.error(f"--steps needs {len(STAGES)} positive counts ({','.join(STAGES)})")
  out = os.path.abspath(args.output)
  work, logs = os.path.join(out, "work"), os.path.join(out, "logs")
  if args.fresh and os.path.isdir(work):
    shutil.rmtree(work)
  os.makedirs(logs, exist_ok=True)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["PYTHONUNBUFFERED"] = "1"  # progress lines of the subprocesses as they happen
  # One compilation cache for every subprocess: a re-run skips XLA compilation.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, "xla_cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  t0 = time.time()
  say(
    f"ZipIR demo: a tiny model trained for a few CPU minutes on {len(TRAIN_PHOTOS)} photos. It "
    "shows the pipeline end to end; it is NOT the paper's model and will not restore like it."
  )

  say(f"1/4 photos from scikit-image, scikit-learn and matplotlib -> {out}/photos")
  train, heldout = gather_photos(os.path.join(out, "photos"))
  say(
    f"    {len(TRAIN_PHOTOS)} for training, {len(HELDOUT_PHOTOS)} held out "
    f"({', '.join(n for _, n in HELDOUT_PHOTOS)})"
  )

  say("2/4 training the tiny config through the four stages with train.py")
  bundle = train_stages(work, train, steps, logs)

  say(
    f"3/4 degrading the held-out photos ({PRESET}: 8x, blur, noise, JPEG) and restoring them "
    "with sample.py"
  )
  from zipir_jax import evaluate  # pylint: disable=g-import-not-at-top

  items = evaluate.load_hq_images(heldout, SIZE, 0, say)
  lq_dir, restored_dir = os.path.join(out, "lq"), os.path.join(out, "restored")
  os.makedirs(lq_dir, exist_ok=True)
  for (name, _, caption), lq in zip(items, evaluate.degrade(items, PRESET, seed=0)):
    Image.fromarray(lq).save(os.path.join(lq_dir, f"{name}.png"))
    with open(os.path.join(lq_dir, f"{name}.txt"), "w", encoding="utf-8") as f:
      f.write(caption + "\n")
  # A DiT trained for minutes cannot yet generate from pure noise (strength 1, the paper's
  # setting); the demo starts from the LQ latent noised to half strength (the fidelity knob).
  run_logged(
    [
      sys.executable,
      "sample.py",
      f"--checkpoint={bundle}",
      f"--input={lq_dir}",
      f"--output={restored_dir}",
      "--scale=8",
      f"--strength={STRENGTH}",
      f"--color_fix={COLOR_FIX}",
      "--seed=0",
      "--overwrite",
    ],
    os.path.join(logs, "sample.log"),
    "sample.py",
  )

  say("4/4 scoring ZipIR against bicubic and Real-ESRGAN with zipir_jax.evaluate")
  eval_dir = os.path.join(out, "eval")
  run_logged(
    [
      sys.executable,
      "-m",
      "zipir_jax.evaluate",
      "--method=bicubic,realesrgan",
      f"--restored=zipir={restored_dir}",
      f"--data={heldout}",
      f"--preset={PRESET}",
      f"--size={SIZE}",
      "--seed=0",
      f"--output={eval_dir}",
    ],
    os.path.join(logs, "evaluate.log"),
    "evaluate",
  )
  panels = os.path.join(out, "side_by_side")
  os.makedirs(panels, exist_ok=True)
  for name, hq, _ in items:
    lq = read_rgb(os.path.join(lq_dir, f"{name}.png"))
    if not np.array_equal(lq, read_rgb(os.path.join(eval_dir, "lq", f"{name}.png"))):
      raise RuntimeError(f"{name}: evaluate degraded the photo differently from the demo")
    lq_big = np.asarray(Image.fromarray(lq).resize((SIZE, SIZE), Image.Resampling.NEAREST))
    rows = (
      [lq_big]
      + [
        read_rgb(os.path.join(eval_dir, m, f"{name}.png"))
        for m in ("bicubic", "realesrgan", "zipir")
      ]
      + [hq]
    )
    side_by_side(rows, PANELS).save(os.path.join(panels, f"{name}.png"))
  table = open(os.path.join(eval_dir, "table.md"), encoding="utf-8").read()
  shutil.copy(os.path.join(eval_dir, "table.md"), os.path.join(out, "metrics.md"))

  print()
  print(table)
  say(f"finished in {time.time() - t0:.0f} s. Where to look:")
  print(f"  side-by-side panels  {panels}/<photo>.png   ({' | '.join(PANELS)})")
  print(f"  metrics table        {out}/metrics.md  (per image: {eval_dir}/metrics.json)")
  print(f"  training logs        tensorboard --logdir {work}   (also {work}/<stage>/metrics.jsonl)")
  print(f"  restoration bundle   {bundle}   (python sample.py --checkpoint=... --input=...)")
  print(
    f"  Reminder: a few-minute CPU model demonstrates the pipeline; it is not the paper's model "
    f"(it samples at --strength={STRENGTH}, not from pure noise, with the {COLOR_FIX} colour fix)."
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())

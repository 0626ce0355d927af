r"""The paper's evaluation (§4, Table 1): degrade HQ photos with a fixed preset, restore, score.

  python -m zipir_jax.evaluate --method=bicubic,realesrgan,zipir --checkpoint=BUNDLE \
      --data=photos/ --preset=sr8 --size=2048 --output=eval_out \
      --inception=pt_inception-2015-12-05-6726825d.pth --lpips_vgg16=vgg16.pth

Each HQ image is centre-cropped to --size (images smaller than that are skipped and reported),
degraded with the preset (sr16 | sr8 | mix | fig4, deterministic per seed and image) and restored by
every method. ``--restored=NAME=FOLDER`` scores restorations another program already wrote for these
LQ images (e.g. ``sample.py`` on ``<output>/lq``; ``FOLDER/<image>.png``) as method NAME. Written to
--output: ``lq/`` and ``<method>/`` PNGs, ``metrics.json`` (per image and
mean, per method) and ``table.md`` (Table 1's layout, one row per method). PSNR/SSIM are on RGB in
[0, 1] (SSIM per channel, averaged); LPIPS-VGG on [-1, 1]; FID/KID on Inception pool features of
whole images, patch-FID on seeded random 299² crops at full resolution. A metric whose weights are
not given is omitted with a note in the table, never estimated.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np
from absl import app, flags

from zipir_jax import cli, errors, image_io

METHODS = ("zipir", "bicubic", "lanczos", "realesrgan")
COLUMNS = (("PSNR", "↑"), ("SSIM", "↑"), ("LPIPS", "↓"), ("FID", "↓"), ("pFID", "↓"), ("KID", "↓"))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top : top + size, left : left + size]


def load_hq_images(
  folder: str, size: int, limit: int, log: Callable[[str], None]
) -> list[tuple[str, np.ndarray, str]]:
  """(name, uint8 HQ crop, caption) for every usable image; unusable ones are reported."""
  from zipir_jax.data.decode import decode_image  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(folder):
    raise errors.MissingInputError(f"--data={folder}: folder not found")
  paths = sorted(
    os.path.join(r, f)
    for r, _, files in os.walk(folder)
    for f in files
    if f.lower().endswith(image_io.IMAGE_SUFFIXES)
  )
  items = []
  for path in paths:
    if limit and len(items) >= limit:
      break
    try:
      with open(path, "rb") as f:
        image = decode_image(f.read())
    except (OSError, ValueError) as e:
      log(f"skipped {path}: {e}")
      continue
    if min(image.shape[:2]) < size:
      log(f"skipped {path}: {image.shape[0]}x{image.shape[1]} is smaller than --size={size}")
      continue
    caption = image_io.sidecar_prompt(path, "")
    name = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "__")
    items.append((name, np.ascontiguousarray(center_crop(image, size)), caption))
  if not items:
    raise errors.DataError(f"--data={folder}: no usable image of at least {size}x{size}")
  return items


def degrade(
  items: Sequence[tuple[str, np.ndarray, str]], preset: str, seed: int
) -> list[np.ndarray]:
  """The LQ image of every (name, HQ, caption) item: preset with seed ``seed + index``."""
  from zipir_jax.data import eval_presets  # pylint: disable=g-import-not-at-top

  return [
    eval_presets.make_eval_pair(hq, preset, seed + index)[0]
    for index, (_, hq, _) in enumerate(items)
  ]


def read_restored(folder: str) -> Callable[[str, tuple[int, int]], np.ndarray]:
  """``read(image name, size) -> float [0, 1] HWC`` from ``folder/<name>.png`` (checked)."""
  from zipir_jax.data.decode import decode_image  # pylint: disable=g-import-not-at-top

  def read(name: str, size: tuple[int, int]) -> np.ndarray:
    path = os.path.join(folder, f"{name}.png")
    if not os.path.isfile(path):
      raise errors.MissingInputError(f"--restored: {path} is missing (no restoration of {name!r})")
    with open(path, "rb") as f:
      image = decode_image(f.read())
    if image.shape[:2] != tuple(size):
      raise errors.DataError(
        f"--restored: {path} is {image.shape[0]}x{image.shape[1]}, expected {size[0]}x{size[1]}"
      )
    return image.astype(np.float32) / 255.0

  return read


def make_method(
  name: str, checkpoint: str | None, steps: int | None, seed: int
) -> Callable[[np.ndarray, tuple[int, int], str], np.ndarray]:
  """``method(lq uint8 HWC, out_size, caption) -> float [0, 1] HWC`` for every method name."""
  if name == "zipir":
    if not checkpoint:
      raise errors.OptionError("--method=zipir needs --checkpoint=BUNDLE")
    from zipir_jax import api  # pylint: disable=g-import-not-at-top

    pipe = api.ZipIRPipeline.from_pretrained(checkpoint)
    return lambda lq, size, caption: pipe(
      lq, size=size, prompt=caption, steps=steps, seed=seed, output_type="np"
    )
  from zipir_jax import baselines  # pylint: disable=g-import-not-at-top

  restorer = baselines.make_restorer(name)
  return lambda lq, size, caption: restorer(lq, size)


class Scorer:
  """Per-image PSNR/SSIM/LPIPS, and streamed Inception features for FID/KID/patch-FID."""

  def __init__(self, lpips_path: str | None, inception_path: str | None, num_crops: int, seed: int):
    import jax  # pylint: disable=g-import-not-at-top

    from zipir_jax import metrics  # pylint: disable=g-import-not-at-top
    from zipir_jax.models import inception, lpips  # pylint: disable=g-import-not-at-top

    self.metrics, self.num_crops, self.seed = metrics, num_crops, seed
    self.notes: dict[str, str] = {}
    self.lpips = None
    if lpips_path:
      variables = lpips.load(lpips_path)
      model = lpips.LPIPS()
      self.lpips = jax.jit(lambda a, b: model.apply(variables, a, b))
    else:
      self.notes["LPIPS"] = "omitted: no VGG16 weights (--lpips_vgg16)"
    self.features = None
    if inception_path:
      # One batch size for whole images and crops: the network compiles once.
      self.features = inception.make_feature_fn(
        inception.load(inception_path), batch_size=max(num_crops, 1)
      )
    else:
      for key in ("FID", "pFID", "KID"):
        self.notes[key] = "omitted: no Inception weights (--inception)"
    self._psnr = jax.jit(metrics.psnr)
    self._ssim = jax.jit(metrics.ssim)

  def pair(self, restored: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    a, b = restored[None].astype(np.float32), reference[None].astype(np.float32)
    scores = {"PSNR": float(self._psnr(a, b)[0]), "SSIM": float(self._ssim(a, b)[0])}
    if self.lpips is not None:
      scores["LPIPS"] = float(self.lpips(a * 2 - 1, b * 2 - 1)[0])
    return scores

  def image_features(self, image: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(whole-image features (1, 2048), crop features (num_crops, 2048) or None if too small)."""
    whole = self.features(image[None])
    if min(image.shape[:2]) < 299:
      self.notes["pFID"] = "omitted: images smaller than the 299x299 crops"
      return whole, None
    crops, _ = self.metrics.random_patches(
      image, index=index, num_crops=self.num_crops, seed=self.seed
    )
    return whole, self.features(crops)

  def distribution_scores(
    self, real: tuple[list, list], fake: tuple[list, list]
  ) -> dict[str, float]:
    if self.features is None:
      return {}
    scores = {}
    real_whole, fake_whole = np.concatenate(real[0]), np.concatenate(fake[0])
    n = min(len(real_whole), len(fake_whole))
    if n < 2:
      self.notes["FID"] = self.notes["KID"] = "omitted: needs at least 2 images"
    else:
      scores["FID"] = self.metrics.fid_from_features(real_whole, fake_whole)
      scores["KID"] = self.metrics.kid(
        real_whole, fake_whole, subset_size=min(n, 1000), seed=self.seed
      )[0]
    if real[1] and real[1][0] is not None:
      scores["pFID"] = self.metrics.fid_from_features(
        np.concatenate(real[1]), np.concatenate(fake[1])
      )
    return scores


def markdown_table(
  preset: str, size: int, count: int, means: dict[str, dict[str, float]], notes: dict[str, str]
) -> str:
  """Table 1's layout: one row per method, the degradation's metrics as columns."""
  header = " | ".join(f"{name} {arrow}" for name, arrow in COLUMNS)
  lines = [
    f"Degradation: {preset} · {count} images · HQ {size}x{size}",
    "",
    f"| Method | {header} |",
    "|---|" + "---|" * len(COLUMNS),
  ]
  for method, scores in means.items():
    cells = []
    for name, _ in COLUMNS:
      value = scores.get(name)
      cells.append(
        "—"
        if value is None
        else f"{value:.4f}"
        if name in ("SSIM", "LPIPS", "KID")
        else f"{value:.2f}"
      )
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  if notes:
    lines.append("")
    lines.extend(f"- {name}: {note}" for name, note in sorted(notes.items()))
  return "\n".join(lines) + "\n"


def evaluate(
  methods: Sequence[str],
  data: str,
  preset: str,
  size: int,
  output: str,
  *,
  checkpoint: str | None = None,
  limit: int = 0,
  seed: int = 0,
  steps: int | None = None,
  lpips_path: str | None = None,
  inception_path: str | None = None,
  num_crops: int = 10,
  log: Callable[[str], None] = print,
  restored: dict[str, str] | None = None,
) -> dict:
  """Runs every method on the degraded images, scores ``restored`` folders too; writes metrics."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  from zipir_jax.data import eval_presets  # pylint: disable=g-import-not-at-top

  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise errors.OptionError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
  restored = dict(restored or {})
  clash = sorted(set(restored) & set(methods))
  if clash:
    raise errors.OptionError(f"{clash} named both as --method and --restored")
  for name, folder in restored.items():
    if not os.path.isdir(folder):
      raise errors.MissingInputError(f"--restored={name}={folder}: folder not found")
  eval_presets.get_preset(preset)  # fails early on an unknown preset, naming the valid ones
  items = load_hq_images(data, size, limit, log)
  scorer = Scorer(lpips_path, inception_path, num_crops, seed)
  os.makedirs(os.path.join(output, "lq"), exist_ok=True)

  pairs = degrade(items, preset, seed)
  for (name, _, _), lq in zip(items, pairs):
    Image.fromarray(lq).save(os.path.join(output, "lq", f"{name}.png"))
  references = [hq.astype(np.float32) / 255.0 for _, hq, _ in items]
  real = ([], [])
  if scorer.features is not None:
    for index, hq in enumerate(references):
      whole, crops = scorer.image_features(hq, index)
      real[0].append(whole)
      real[1].append(crops)

  results = {
    "preset": preset,
    "size": size,
    "seed": seed,
    "images": [n for n, _, _ in items],
    "methods": {},
  }
  for method in [*methods, *restored]:
    if method in restored:
      read = read_restored(restored[method])
      restore_fn = lambda lq, size, caption, name, read=read: read(name, size)
    else:
      fn = make_method(method, checkpoint, steps, seed)
      restore_fn = lambda lq, size, caption, name, fn=fn: fn(lq, size, caption)
    os.makedirs(os.path.join(output, method), exist_ok=True)
    per_image, fake = {}, ([], [])
    for index, ((name, _, caption), lq, hq) in enumerate(
      tqdm(list(zip(items, pairs, references)), desc=method, unit="img", file=sys.stdout)
    ):
      out = np.clip(restore_fn(lq, (size, size), caption, name), 0.0, 1.0)
      # Scored as written (8-bit PNG), so a method's scores and its files agree exactly.
      out8 = np.round(out * 255).astype(np.uint8)
      Image.fromarray(out8).save(os.path.join(output, method, f"{name}.png"))
      out = out8.astype(np.float32) / 255.0
      per_image[name] = scorer.pair(out, hq)
      if scorer.features is not None:
        whole, crops = scorer.image_features(out, index)
        fake[0].append(whole)
        fake[1].append(crops)
    means = {
      k: float(np.mean([s[k] for s in per_image.values()])) for k in next(iter(per_image.values()))
    }
    means.update(scorer.distribution_scores(real, fake))
    results["methods"][method] = {"mean": means, "per_image": per_image}

  results["notes"] = scorer.notes
  table = markdown_table(
    preset, size, len(items), {m: r["mean"] for m, r in results["methods"].items()}, scorer.notes
  )
  with open(os.path.join(output, "metrics.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(output, "table.md"), "w", encoding="utf-8") as f:
    f.write(table)
  results["table"] = table
  return results


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so imports never clash)."""
  flags.DEFINE_string("method", "bicubic", "Comma-separated: zipir, bicubic, lanczos, realesrgan.")
  flags.DEFINE_string("checkpoint", None, "ZipIR bundle (needed for --method=zipir).")
  flags.DEFINE_string("data", None, "Folder of HQ images (recursive); .txt sidecar captions.")
  flags.DEFINE_string("preset", "sr8", "Degradation preset: sr16, sr8, mix or fig4.")
  flags.DEFINE_integer("size", 2048, "Side of the square HQ centre crop.")
  flags.DEFINE_string("output", None, "Output folder.")
  flags.DEFINE_integer("limit", 0, "Evaluate at most this many images (0 = all).")
  flags.DEFINE_integer("seed", 0, "Seed of the degradation noise, sampling and crops.")
  flags.DEFINE_integer("steps", None, "DDIM steps for zipir (config default).")
  flags.DEFINE_string("lpips_vgg16", None, "torchvision VGG16 weights for LPIPS.")
  flags.DEFINE_string(
    "inception", None, "pt_inception-2015-12-05 weights for FID / KID / patch-FID."
  )
  flags.DEFINE_integer("num_crops", 10, "Random 299² crops per image for patch-FID.")
  flags.DEFINE_multi_string(
    "restored",
    [],
    "NAME=FOLDER: score FOLDER/<image>.png (restorations "
    "made elsewhere, e.g. by sample.py on <output>/lq) as method NAME.",
  )


def main(argv):
  del argv
  f = flags.FLAGS
  cli.quiet_library_logs()
  if not f.data or not f.output:
    raise app.UsageError("--data and --output are required")
  methods = [m.strip() for m in f.method.split(",") if m.strip()]
  restored = {}
  for spec in f.restored:
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
      raise app.UsageError(f"--restored={spec!r}: expected NAME=FOLDER")
    restored[name] = folder
  try:
    results = evaluate(
      methods,
      f.data,
      f.preset,
      f.size,
      f.output,
      checkpoint=f.checkpoint,
      limit=f.limit,
      seed=f.seed,
      steps=f.steps,
      lpips_path=f.lpips_vgg16,
      inception_path=f.inception,
      num_crops=f.num_crops,
      log=lambda m: print(m, file=sys.stderr),
      restored=restored,
    )
  except cli.USER_ERRORS as e:
    return cli.fail(e, status=2)
  print(results["table"])
  print(f"wrote {os.path.join(f.output, 'metrics.json')} and table.md")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)

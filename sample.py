r"""Restores images with a trained ZipIR bundle.

  python sample.py --checkpoint=BUNDLE --input=photos/ --output=restored/ --scale=8 \
      --prompt="a photo of a cat" --negative_prompt="blurry, noisy" --cfg=3.5 --steps=25

--input is a file, a folder (recursive) or a glob. The prompt of an image is, in this order, the
text of a sidecar ``<image>.txt``, the content of --prompt_file, or --prompt. Outputs are PNGs named
after their inputs; existing files are never replaced without --overwrite. An unreadable, corrupt
or too small input is reported by name and skipped while the rest are restored; the exit status is
1 if any image failed, 2 if nothing could start (e.g. a missing or mismatched checkpoint).
"""

from __future__ import annotations

import collections
import glob
import os
import sys
import time

import numpy as np
from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Bundle folder exported by training.")
_INPUT = flags.DEFINE_string("input", None, "An image file, a folder (recursive) or a glob.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for the restored PNGs.")
_SCALE = flags.DEFINE_float("scale", None, "Up-scaling factor (e.g. 8); or use --size.")
_SIZE = flags.DEFINE_string("size", None, "Output size HxW (e.g. 2048x1536) for every input.")
_PROMPT = flags.DEFINE_string("prompt", "", "Caption used for every image without a sidecar .txt.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File whose text is the caption.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Unconditional-branch prompt for CFG.")
_CFG = flags.DEFINE_float("cfg", None, "Classifier-free guidance scale (config default 3.5).")
_STEPS = flags.DEFINE_integer("steps", None, "DDIM steps (config default 25).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the start noise.")
_STRENGTH = flags.DEFINE_float(
  "strength",
  None,
  "1 = from pure noise; < 1 starts from the noised LQ latent (more fidelity, less generation).",
)
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (0 = deterministic).")
_COLOR_FIX = flags.DEFINE_enum(
  "color_fix", None, ["none", "wavelet", "adain"], "Colour correction towards the LQ input."
)
_BATCH = flags.DEFINE_integer("batch_size", 1, "Images of the same size restored together.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype of all networks.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
_PLAIN_DECODER = flags.DEFINE_string(
  "plain_decoder",
  None,
  "Decode with the plain D_f of this training export (WORKDIR/vae_fine/"
  "export) instead of the bundle's D_f*: the paper's 'w/o pixel-aware decoder' (Fig. 6).",
)
_CACHE = flags.DEFINE_string(
  "compilation_cache",
  None,
  "Folder of the persistent XLA compilation "
  "cache (default $JAX_COMPILATION_CACHE_DIR or ~/.cache/zipir_jax/xla; "
  "'' disables).",
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def list_inputs(spec: str) -> list[str]:
  """Image paths named by a file, a folder (recursive) or a glob, sorted."""
  if os.path.isdir(spec):
    paths = [os.path.join(root, f) for root, _, files in os.walk(spec) for f in files]
  elif os.path.isfile(spec):
    return [spec]
  else:
    paths = glob.glob(spec, recursive=True)
  return sorted(p for p in paths if p.lower().endswith(IMAGE_SUFFIXES))


def output_path(path: str, input_spec: str, output: str) -> str:
  """Mirrors the input's place under a folder input; PNG named after the input."""
  base = input_spec if os.path.isdir(input_spec) else os.path.dirname(path)
  rel = os.path.relpath(path, base) if base else os.path.basename(path)
  return os.path.join(output, os.path.splitext(rel)[0] + ".png")


def prompt_for(path: str, default: str) -> str:
  sidecar = os.path.splitext(path)[0] + ".txt"
  if os.path.isfile(sidecar):
    with open(sidecar, encoding="utf-8") as f:
      return f.read().strip()
  return default


def write_png(path: str, image: np.ndarray) -> None:
  """Atomic write: a crash never leaves a half-written PNG under the final name."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".partial.png"
  Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(tmp)
  os.replace(tmp, path)


def parse_size(size: str) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in size.lower().split("x"))
  except ValueError:
    raise app.UsageError(f"--size={size!r}: expected HxW, e.g. 2048x1536") from None
  return h, w


def main(argv):
  del argv
  for flag in (_CHECKPOINT, _INPUT, _OUTPUT):
    if not flag.value:
      raise app.UsageError(f"--{flag.name} is required")
  if (_SCALE.value is None) == (_SIZE.value is None):
    raise app.UsageError("give exactly one of --scale or --size")
  if _PROMPT_FILE.value and _PROMPT.value:
    raise app.UsageError("give --prompt or --prompt_file, not both")
  default_prompt = _PROMPT.value
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value, encoding="utf-8") as f:
      default_prompt = f.read().strip()

  # Heavy imports after flag checks, so usage errors are instant.
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  from zipir_jax import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  from zipir_jax import restore
  from zipir_jax.data.decode import decode_image  # pylint: disable=g-import-not-at-top

  restore.enable_compilation_cache(_CACHE.value)
  paths = list_inputs(_INPUT.value)
  if not paths:
    print(
      f"error: no images ({', '.join(IMAGE_SUFFIXES)}) found at {_INPUT.value}", file=sys.stderr
    )
    return 2
  try:
    bundle = bundle_lib.load_bundle(_CHECKPOINT.value)
    if _PLAIN_DECODER.value:
      bundle = bundle_lib.with_plain_decoder(bundle, _PLAIN_DECODER.value)
  except (OSError, ValueError) as e:
    print(f"error: cannot load checkpoint: {e}", file=sys.stderr)
    return 2
  if _DTYPE.value:
    with bundle.config.unlocked():
      bundle.config.vae.dtype = bundle.config.dit.dtype = _DTYPE.value
  restorer = restore.Restorer(bundle)
  del bundle  # the Restorer holds its own device copy; this frees the float32 DiT
  options = restore.RestoreOptions(
    steps=_STEPS.value,
    cfg_scale=_CFG.value,
    negative_prompt=_NEGATIVE.value,
    eta=_ETA.value,
    strength=_STRENGTH.value,
    color_fix=_COLOR_FIX.value,
    seed=_SEED.value,
  )
  size = parse_size(_SIZE.value) if _SIZE.value else None

  failures: dict[str, str] = {}
  groups = collections.defaultdict(list)  # (LQ shape, output size) -> [(path, image, prompt)]
  for path in paths:
    out = output_path(path, _INPUT.value, _OUTPUT.value)
    if os.path.exists(out) and not _OVERWRITE.value:
      failures[path] = f"output {out} exists (use --overwrite to replace it)"
      continue
    try:
      with open(path, "rb") as f:
        image = decode_image(f.read())
      out_size = restore.target_size(image.shape[:2], _SCALE.value, size)
      if min(image.shape[:2]) < restorer.config.restore.min_lq_size:
        raise ValueError(
          f"too small ({image.shape[0]}x{image.shape[1]}; sides of at least "
          f"{restorer.config.restore.min_lq_size} px)"
        )
    except (OSError, ValueError) as e:
      failures[path] = str(e)
      continue
    groups[(image.shape, out_size)].append((path, image, prompt_for(path, default_prompt)))

  todo = sum(len(g) for g in groups.values())
  with tqdm(total=todo, unit="img", file=sys.stdout, disable=todo == 0) as progress:
    for (_, out_size), items in groups.items():
      for start in range(0, len(items), _BATCH.value):
        batch = items[start : start + _BATCH.value]
        t0 = time.time()
        try:
          restored = restorer.restore(
            [im for _, im, _ in batch], out_size, [p for _, _, p in batch], options
          )
        except ValueError as e:
          failures.update({path: str(e) for path, _, _ in batch})
          progress.update(len(batch))
          continue
        for (path, _, _), image in zip(batch, restored):
          write_png(output_path(path, _INPUT.value, _OUTPUT.value), image)
        per_image = (time.time() - t0) / len(batch)
        progress.set_postfix_str(f"{per_image:.2f} s/img, {out_size[0]}x{out_size[1]}")
        progress.update(len(batch))

  done = len(paths) - len(failures)
  print(f"restored {done} of {len(paths)} images into {_OUTPUT.value}")
  for path, reason in failures.items():
    print(f"FAILED {path}: {reason}", file=sys.stderr)
  return 1 if failures else 0


if __name__ == "__main__":
  app.run(main)

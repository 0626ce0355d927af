r"""Restores images with a trained ZipIR bundle.

  python sample.py --checkpoint=BUNDLE --input=photos/ --output=restored/ --scale=8 \
      --prompt="a photo of a cat" --negative_prompt="blurry, noisy" --cfg=3.5 --steps=25

--input is a file, a folder (recursive) or a glob; an --output folder inside it is not read. The
prompt of an image is, in this order, the text of a sidecar ``<image>.txt``, the content of
--prompt_file, or --prompt. Outputs are PNGs named after their inputs, decided for the whole run
before any work (``zipir_jax.image_io.output_paths``: ``photo.jpg`` -> ``photo.png``; inputs that
share a stem keep their extension, ``photo.jpg.png``); an existing file is never replaced without
--overwrite, and an input never. An unreadable, corrupt or too small input is reported by name and
skipped while the rest are restored; the summary counts the files written. Exit status: 1 if any
image failed, 2 if nothing could start (e.g. a missing or mismatched checkpoint). Library log lines
are off unless --verbosity=1. Restoration goes through ``zipir_jax.api.ZipIRPipeline``.
"""

from __future__ import annotations

import os
import sys

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
_COLOR_FIX = flags.DEFINE_string(
  "color_fix", None, "Colour correction towards the LQ input: none, wavelet or adain."
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
  if _BATCH.value < 1:
    raise app.UsageError(f"--batch_size={_BATCH.value}: must be at least 1")
  size = parse_size(_SIZE.value) if _SIZE.value else None
  default_prompt = _PROMPT.value
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value, encoding="utf-8") as f:
      default_prompt = f.read().strip()

  from zipir_jax import cli, image_io  # pylint: disable=g-import-not-at-top  # light: no JAX

  cli.quiet_library_logs()
  # The whole run's output names, before any work: two inputs never share an output.
  paths = image_io.list_images(_INPUT.value, exclude=_OUTPUT.value)
  if not paths:
    return cli.fail(
      f"no images ({', '.join(image_io.IMAGE_SUFFIXES)}) found at {_INPUT.value}", status=2
    )
  try:
    outputs = image_io.output_paths(paths, _INPUT.value, _OUTPUT.value)
  except cli.USER_ERRORS as e:
    return cli.fail(e, status=2)
  failures: dict[str, str] = {}
  inputs = {os.path.realpath(p) for p in paths}
  for path in paths:
    out = outputs[path]
    if os.path.realpath(out) in inputs:
      failures[path] = f"its output {out} is an input file, which is never replaced"
    elif os.path.exists(out) and not _OVERWRITE.value:
      failures[path] = f"output {out} exists (use --overwrite to replace it)"

  if len(failures) == len(paths):  # nothing to restore: no need to load the weights
    return _summary(0, paths, failures)

  # Heavy imports after the cheap checks, so mistakes are reported at once.
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  from zipir_jax import api, restore  # pylint: disable=g-import-not-at-top

  restore.enable_compilation_cache(_CACHE.value)
  options = dict(
    steps=_STEPS.value,
    cfg=_CFG.value,
    negative_prompt=_NEGATIVE.value,
    strength=_STRENGTH.value,
    eta=_ETA.value,
    seed=_SEED.value,
    color_fix=_COLOR_FIX.value,
  )
  try:
    api.restore_options(**options)  # checked before the weights load
  except cli.USER_ERRORS as e:
    return cli.fail(e, status=2)
  try:
    pipe = api.ZipIRPipeline.from_pretrained(
      _CHECKPOINT.value, dtype=_DTYPE.value, plain_decoder=_PLAIN_DECODER.value
    )
  except cli.USER_ERRORS as e:
    return cli.fail(f"cannot load checkpoint: {e}", status=2)

  todo = []  # (input path, image, prompt)
  for path in paths:
    if path in failures:
      continue
    try:
      todo.append((path, pipe.prepare(path), image_io.sidecar_prompt(path, default_prompt)))
    except cli.USER_ERRORS as e:
      failures[path] = str(e).removeprefix(f"{path}: ")

  written: set[str] = set()
  with tqdm(total=len(todo), unit="img", disable=not todo) as progress:
    try:
      for index, image in pipe.iter_restore(
        [image for _, image, _ in todo],
        scale=_SCALE.value,
        size=size,
        prompt=[prompt for _, _, prompt in todo],
        batch_size=_BATCH.value,
        **options,
      ):
        path = todo[index][0]
        out = outputs[path]
        if out in written:  # impossible by output_paths; checked because losing work is worse
          failures[path] = f"{out} was already written by this run; not replaced"
          continue
        image_io.write_png(out, image)
        written.add(out)
        progress.update(1)
    except cli.USER_ERRORS as e:  # a batch the checks above did not foresee: report, keep the rest
      failures.update({p: str(e) for p, _, _ in todo if outputs[p] not in written})

  return _summary(len(written), paths, failures)


def _summary(written: int, paths: list[str], failures: dict[str, str]) -> int:
  """Prints the count of files written and one line per failed input; the exit status."""
  print(f"restored {written} of {len(paths)} images into {_OUTPUT.value}")
  for path, reason in failures.items():
    print(f"FAILED {path}: {reason}", file=sys.stderr)
  return 1 if failures else 0


if __name__ == "__main__":
  app.run(main)

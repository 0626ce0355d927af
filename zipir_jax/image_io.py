"""Image files at the edges of restoration: which files a run reads, what its outputs are called,
reading with errors that name the file, and PNG writes that never leave half a file.

Light (numpy and PIL, no JAX), so a command line can plan a whole run before loading any model.
"""

from __future__ import annotations

import collections
import glob
import os
from collections.abc import Sequence

import numpy as np

from zipir_jax.errors import BadImageError, OutputNameError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return os.path.commonpath([path, folder]) == folder


def list_images(spec: str, exclude: str | None = None) -> list[str]:
  """Image paths named by a file, a folder (recursive) or a glob, sorted.

  Files under ``exclude`` are left out: an output folder inside the input folder is never read
  back as input.
  """
  if os.path.isfile(spec):
    return [spec]
  if os.path.isdir(spec):
    paths = [os.path.join(root, f) for root, _, files in os.walk(spec) for f in files]
  else:
    paths = glob.glob(spec, recursive=True)
  paths = [p for p in paths if p.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(p)]
  if exclude and os.path.isdir(exclude):
    paths = [p for p in paths if not _inside(p, exclude)]
  return sorted(paths)


def _input_root(spec: str) -> str:
  """The folder outputs mirror: the input folder, or a glob's leading folders without wildcards."""
  if os.path.isdir(spec):
    return spec
  if os.path.isfile(spec):
    return os.path.dirname(spec)
  parts = os.path.normpath(spec).split(os.sep)
  magic = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
  return os.sep.join(parts[:magic])


def output_paths(paths: Sequence[str], input_spec: str, output: str) -> dict[str, str]:
  """The output PNG of every input, decided for the whole run before any work.

  An input keeps its place under ``output`` (relative to the input folder, or a glob's folder) and
  its stem: ``photo.jpg`` -> ``photo.png``. Inputs whose outputs would coincide, compared without
  case as macOS and Windows file systems do (``photo.jpg``, ``photo.png`` and ``photo.webp``), keep
  their extension instead: ``photo.jpg.png``, ``photo.png.png``, ``photo.webp.png``. Two inputs
  that still coincide (``Photo.JPG`` beside ``photo.jpg``) raise :class:`OutputNameError` naming
  both: the run refuses rather than let one result replace the other.
  """
  root = _input_root(input_spec)
  rel = {p: os.path.relpath(p, root) if root else os.path.basename(p) for p in paths}
  full = set()  # inputs named with their extension
  while True:
    names = {p: (rel[p] if p in full else os.path.splitext(rel[p])[0]) + ".png" for p in paths}
    groups = collections.defaultdict(list)
    for p, name in names.items():
      groups[os.path.normcase(name).casefold()].append(p)
    clashes = [g for g in groups.values() if len(g) > 1]
    if not clashes:
      return {p: os.path.join(output, name) for p, name in names.items()}
    stuck = [g for g in clashes if all(p in full for p in g)]
    if stuck:
      raise OutputNameError(
        f"{' and '.join(stuck[0])} would both be written to "
        f"{os.path.join(output, names[stuck[0][0]])}: rename one of them"
      )
    full.update(p for g in clashes for p in g)


def read_image(path: str) -> np.ndarray:
  """The image file ``path`` as uint8 HxWx3 RGB; a BadImageError names the file and the problem."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise BadImageError("unreadable", f"{path}: cannot read the file ({e.strerror})") from e
  return decode_named(data, path)


def decode_named(data: bytes, name: str) -> np.ndarray:
  """Encoded image bytes (a file's, an upload's) as uint8 HxWx3 RGB; errors begin with ``name``."""
  from zipir_jax.data.decode import decode_image  # pylint: disable=g-import-not-at-top  # cv2

  try:
    return decode_image(data)
  except BadImageError as e:
    raise BadImageError(e.kind, f"{name}: {e}") from e


def sidecar_prompt(path: str, default: str) -> str:
  """The caption in ``<image stem>.txt`` beside ``path`` if there is one, else ``default``."""
  sidecar = os.path.splitext(path)[0] + ".txt"
  if os.path.isfile(sidecar):
    with open(sidecar, encoding="utf-8") as f:
      return f.read().strip()
  return default


def to_uint8(image: np.ndarray) -> np.ndarray:
  """Float [0, 1] (or uint8) HWC -> uint8, rounded: what an 8-bit file holds."""
  if image.dtype == np.uint8:
    return image
  return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def write_png(path: str, image: np.ndarray) -> None:
  """Writes ``image`` (float [0, 1] or uint8 HWC) as a PNG; a crash never leaves half a file
  under the final name."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".partial.png"
  Image.fromarray(to_uint8(image)).save(tmp)
  os.replace(tmp, path)

"""Robust image decoding for training data and restoration inputs, and the log of skipped files.

Real image collections contain corrupt, truncated and empty files, CMYK JPEGs, 16-bit PNGs, palette
and gray images, alpha channels and EXIF-rotated photos. :func:`decode_image` turns every decodable
one into uint8 HxWx3 RGB (EXIF orientation applied, alpha composited on a background, 16-bit scaled
to 8-bit) and raises :class:`BadImageError` with a reason for the rest, so the pipeline can skip the
file instead of crashing. :class:`SkipLog` logs each skipped file once and counts skips.
"""

from __future__ import annotations

import collections
import io
import os
import socket
import threading
from typing import Any

import cv2
import numpy as np
from absl import logging
from PIL import Image, ImageOps

from zipir_jax.errors import BadImageError

# EXIF orientations 5-8 swap width and height.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def _open(data: bytes) -> Image.Image:
  if data is None or len(data) == 0:
    raise BadImageError("empty", "empty file (0 bytes)")
  try:
    return Image.open(io.BytesIO(data))
  except Image.UnidentifiedImageError as e:  # PIL's message is the repr of our BytesIO.
    raise BadImageError(
      "not_an_image", "not an image, or in a format that cannot be read (JPEG, PNG, WebP, …)"
    ) from e
  except Image.DecompressionBombError as e:
    raise BadImageError("too_large", str(e)) from e
  except (OSError, SyntaxError, ValueError) as e:
    raise _unreadable(e, "damaged image header") from e


def _unreadable(error: Exception, what: str) -> BadImageError:
  """A decoder's exception as a BadImageError in plain words: truncated files said so."""
  message = str(error)
  if "truncated" in message.lower():
    return BadImageError("truncated", f"the file is cut short (truncated: {message})")
  return BadImageError("corrupt", f"{what} ({message})")


def image_size(image: bytes | np.ndarray) -> tuple[int, int]:
  """(height, width) as displayed (after EXIF rotation), reading only the header."""
  if isinstance(image, np.ndarray):
    _check_array(image)
    return int(image.shape[0]), int(image.shape[1])
  im = _open(image)
  try:
    w, h = im.size
    orientation = _orientation(im)
  except Exception as e:  # pylint: disable=broad-except  # any parser error means a bad file.
    raise BadImageError("corrupt", f"unreadable image metadata ({e})") from e
  return (w, h) if orientation in _TRANSPOSING_ORIENTATIONS else (h, w)


def _orientation(im: Image.Image) -> int:
  try:
    return int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
  except Exception:  # pylint: disable=broad-except  # broken EXIF: keep the stored orientation.
    return 1


def decode_image(
  image: bytes | np.ndarray | Image.Image, *, alpha_background: int = 255, min_scale: float = 1.0
) -> np.ndarray:
  """Decodes encoded bytes (or normalises a decoded array or PIL image) to uint8 HxWx3 RGB.

  Complete JPEGs go through OpenCV (fast path); everything else, and any JPEG OpenCV rejects,
  through PIL, which also names the reason a file is bad. ``min_scale`` < 1 lets JPEG decoding use
  libjpeg's DCT scaling to a size still at least ``min_scale`` times the full size: the caller
  down-scales anyway, and a 1/2, 1/4 or 1/8 decode is 1.5-4x faster.
  """
  if isinstance(image, np.ndarray):
    return _array_to_rgb(image, alpha_background)
  if isinstance(image, Image.Image):
    return _load_pil(image, alpha_background, 1.0)
  if _is_complete_jpeg(image):
    decoded = _decode_jpeg_opencv(image, min_scale)
    if decoded is not None:
      return decoded
  return _load_pil(_open(image), alpha_background, min_scale)


def _load_pil(im: Image.Image, alpha_background: int, min_scale: float) -> np.ndarray:
  """A PIL image (lazily opened or already loaded) to uint8 HxWx3 RGB, EXIF orientation applied."""
  try:
    if min_scale < 1.0 and im.format == "JPEG":
      w, h = im.size
      im.draft(im.mode, (max(1, int(np.ceil(w * min_scale))), max(1, int(np.ceil(h * min_scale)))))
    im.load()
    if _orientation(im) != 1:
      im = ImageOps.exif_transpose(im)
    return _pil_to_rgb(im, alpha_background)
  except BadImageError:
    raise
  except Image.DecompressionBombError as e:
    raise BadImageError("too_large", str(e)) from e
  except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
    raise _unreadable(e, "damaged image data") from e


def _is_complete_jpeg(data: bytes) -> bool:
  """A JPEG that ends with its EOI marker (truncated ones go to PIL, which reports them)."""
  return (
    len(data) > 4
    and data[:2] == b"\xff\xd8"
    and (data[-2:] == b"\xff\xd9" or data.rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9")
  )


def _decode_jpeg_opencv(data: bytes, min_scale: float) -> np.ndarray | None:
  """The fast path for JPEG: OpenCV decodes straight into an array (PIL's load + asarray costs
  about twice as much), applies EXIF orientation and CMYK conversion, and can decode at 1/2, 1/4
  or 1/8 scale. None when OpenCV cannot decode (PIL then reports why)."""
  reduction = 1
  while reduction < 8 and 2 * reduction * min_scale <= 1.0:
    reduction *= 2
  flag = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
  }[reduction]
  try:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
  except cv2.error:
    return None
  if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
    return None
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _pil_to_rgb(im: Image.Image, alpha_background: int) -> np.ndarray:
  mode = im.mode
  if mode == "RGB":
    return np.asarray(im)
  if mode in ("L", "1"):
    return _gray_to_rgb(np.asarray(im.convert("L")))
  if mode.startswith("I;16") or mode == "I":
    # 16-bit gray (PNG/TIFF); Pillow already reduces 16-bit RGB to 8-bit RGB on load.
    return _gray_to_rgb(_sixteen_to_eight(np.asarray(im)))
  if mode == "F":
    raise BadImageError("unsupported", "unsupported floating-point image (mode F)")
  if mode == "P":
    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    mode = im.mode
    if mode == "RGB":
      return np.asarray(im)
  if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    return _composite(np.asarray(im.convert("RGBA")), alpha_background)
  # CMYK, YCbCr, LAB, HSV, ...: Pillow's converters (CMYK JPEGs from Adobe tools included).
  return np.asarray(im.convert("RGB"))


def _sixteen_to_eight(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)


def _gray_to_rgb(x: np.ndarray) -> np.ndarray:
  return np.repeat(x[..., None], 3, axis=-1)


def _composite(rgba: np.ndarray, background: int) -> np.ndarray:
  alpha = rgba[..., 3:4].astype(np.float32) / 255.0
  rgb = rgba[..., :3].astype(np.float32)
  return np.rint(rgb * alpha + float(background) * (1.0 - alpha)).astype(np.uint8)


def _check_array(x: np.ndarray) -> None:
  if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (1, 3, 4)):
    raise BadImageError("bad_array", f"decoded image has shape {x.shape}; expected HxW[x1|3|4]")
  if x.dtype not in (np.uint8, np.uint16):
    raise BadImageError("bad_array", f"decoded image has dtype {x.dtype}; expected uint8/uint16")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise BadImageError("empty", f"decoded image has shape {x.shape}")


def _array_to_rgb(x: np.ndarray, alpha_background: int) -> np.ndarray:
  """An already decoded array (e.g. from TFDS) to uint8 HxWx3."""
  _check_array(x)
  if x.dtype == np.uint16:
    x = _sixteen_to_eight(x)
  if x.ndim == 2:
    x = x[..., None]
  if x.shape[2] == 1:
    return _gray_to_rgb(x[..., 0])
  if x.shape[2] == 4:
    return _composite(x, alpha_background)
  return np.ascontiguousarray(x)


class SkipLog:
  """Logs each skipped file once (per process) with its reason, and counts them.

  grain workers are separate processes, each holding its own copy; counts are per process. With
  ``log_dir`` each skip is also appended to ``<log_dir>/skipped-<host>-<pid>.tsv`` and
  :func:`summarize_skips` merges the files of every worker and host.
  """

  def __init__(self, log_dir: str = ""):
    self.log_dir = log_dir
    self.counts: collections.Counter[str] = collections.Counter()
    self._seen: set[str] = set()
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    del state["_lock"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def record(self, name: str, kind: str, message: str) -> None:
    """Records one skip; logs and writes it only the first time ``name`` is seen."""
    with self._lock:
      if name in self._seen:
        return
      self._seen.add(name)
      self.counts[kind] += 1
    logging.warning("Skipping %s: %s (%s)", name, message, kind)
    if self.log_dir:
      os.makedirs(self.log_dir, exist_ok=True)
      path = os.path.join(self.log_dir, f"skipped-{socket.gethostname()}-{os.getpid()}.tsv")
      line = "\t".join(_one_line(v) for v in (kind, name, message))
      with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def _one_line(text: str) -> str:
  return " ".join(str(text).replace("\t", " ").split())


def summarize_skips(log_dir: str) -> dict[str, dict[str, str]]:
  """Merges every ``skipped-*.tsv`` in ``log_dir``: {kind: {file name: message}}, each file once."""
  summary: dict[str, dict[str, str]] = collections.defaultdict(dict)
  if not os.path.isdir(log_dir):
    return {}
  for entry in sorted(os.listdir(log_dir)):
    if not (entry.startswith("skipped-") and entry.endswith(".tsv")):
      continue
    with open(os.path.join(log_dir, entry), encoding="utf-8") as f:
      for line in f:
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 3:
          summary[parts[0]].setdefault(parts[1], parts[2])
  return dict(summary)

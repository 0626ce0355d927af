"""Synthetic image folders for tests, benchmarks and demos (no downloads).

Images are crops and resizes of the public-domain photos that ship with scikit-image, so they have
natural statistics (JPEG, blur and noise behave as on real data).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image


def natural_image(height: int, width: int, index: int = 0) -> np.ndarray:
  """A uint8 HxWx3 RGB photo-like image: one of scikit-image's bundled photos, resized."""
  import skimage.data  # pylint: disable=g-import-not-at-top  # only needed here.

  photos = (
    skimage.data.astronaut,
    skimage.data.coffee,
    skimage.data.chelsea,
    skimage.data.rocket,
    skimage.data.hubble_deep_field,
  )
  photo = photos[index % len(photos)]()[..., :3]
  interpolation = (
    cv2.INTER_AREA if height * width < photo.shape[0] * photo.shape[1] else (cv2.INTER_CUBIC)
  )
  return cv2.resize(photo, (width, height), interpolation=interpolation)


def write_image_folder(
  root: str,
  sizes: Sequence[tuple[int, int]],
  *,
  fmt: str = "jpg",
  quality: int = 92,
  captions: bool = True,
) -> list[str]:
  """Writes one natural image per (height, width) (+ ``.txt`` caption "image i"); returns paths."""
  os.makedirs(root, exist_ok=True)
  paths = []
  for i, (h, w) in enumerate(sizes):
    path = os.path.join(root, f"image{i:03d}.{fmt}")
    kwargs = {"quality": quality} if fmt in ("jpg", "jpeg", "webp") else {}
    Image.fromarray(natural_image(h, w, i)).save(path, **kwargs)
    if captions:
      with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as f:
        f.write(f"image {i}")
    paths.append(path)
  return paths


def _jpeg_bytes(img: np.ndarray, **kwargs) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(img).save(buffer, format="JPEG", quality=92, **kwargs)
  return buffer.getvalue()


def write_bad_files(root: str, size: tuple[int, int] = (96, 128)) -> dict[str, str]:
  """Writes one file of every awkward kind; returns {file path: expected outcome}.

  The outcome is "ok" for files that must decode (CMYK, 16-bit, palette, gray, alpha, EXIF-rotated,
  webp/bmp/tiff) or the :class:`~zipir_jax.data.decode.BadImageError` kind of the skip.
  """
  os.makedirs(root, exist_ok=True)
  h, w = size
  rgb = natural_image(h, w, 1)
  expected = {}

  def put(name: str, data: bytes, outcome: str) -> None:
    path = os.path.join(root, name)
    with open(path, "wb") as f:
      f.write(data)
    expected[path] = outcome

  def put_pil(name: str, im: Image.Image, outcome: str = "ok", **kwargs) -> None:
    buffer = io.BytesIO()
    im.save(buffer, format=kwargs.pop("format", None) or _format(name), **kwargs)
    put(name, buffer.getvalue(), outcome)

  good_jpeg = _jpeg_bytes(rgb)
  put(
    "corrupt.jpg",
    np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes(),
    "not_an_image",
  )
  put("truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "truncated")
  put("zero_bytes.png", b"", "empty")
  put("garbage_after_header.png", _png_header_then_garbage(rgb), "corrupt")
  put_pil("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=92)
  ok, png16 = cv2.imencode(".png", (rgb[..., ::-1].astype(np.uint16) * 257))
  assert ok
  put("rgb16.png", png16.tobytes(), "ok")
  ok, gray16 = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257)
  assert ok
  put("gray16.png", gray16.tobytes(), "ok")
  put_pil("palette.png", Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE))
  transparent = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
  transparent.info["transparency"] = 0
  put_pil("palette_transparent.png", transparent, transparency=0)
  put_pil("gray.png", Image.fromarray(rgb).convert("L"))
  rgba = np.concatenate([rgb, np.full((h, w, 1), 128, np.uint8)], axis=-1)
  put_pil("alpha.png", Image.fromarray(rgba, "RGBA"))
  put_pil("gray_alpha.png", Image.fromarray(rgba, "RGBA").convert("LA"))
  # Stored transposed (w x h) with EXIF orientation 6 (rotate 90° CW to display): displays h x w.
  exif = Image.Exif()
  exif[0x0112] = 6
  put_pil(
    "exif_rotated.jpg",
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1))),
    exif=exif.tobytes(),
    quality=92,
  )
  put_pil("photo.webp", Image.fromarray(rgb), quality=90)
  put_pil("photo.bmp", Image.fromarray(rgb))
  put_pil("photo.tiff", Image.fromarray(rgb))
  put_pil("too_small.png", Image.fromarray(natural_image(16, 16, 2)), "too_small")
  return expected


def _format(name: str) -> str:
  ext = os.path.splitext(name)[1].lower()
  return {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".tiff": "TIFF"}[ext]


def _png_header_then_garbage(rgb: np.ndarray) -> bytes:
  """A PNG whose signature and IHDR are valid but whose image data is noise."""
  buffer = io.BytesIO()
  Image.fromarray(rgb).save(buffer, format="PNG")
  data = bytearray(buffer.getvalue())
  start = data.find(b"IDAT") + 4
  data[start : start + 64] = bytes(range(64))
  return bytes(data)

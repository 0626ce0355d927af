"""Input listing and output naming of a restoration run (image_io): no output is ever shared."""

import os

import numpy as np
import pytest
from PIL import Image

from zipir_jax import errors, image_io


def _touch(folder, *names):
  for name in names:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, format="PNG")
  return [str(folder / n) for n in names]


def _names(paths, spec, out="out"):
  return {
    os.path.relpath(p, spec): os.path.relpath(o, out)
    for p, o in image_io.output_paths(paths, str(spec), out).items()
  }


def test_shared_stems_keep_their_suffix_and_other_names_stay_short(tmp_path):
  paths = _touch(tmp_path, "photo.jpg", "photo.png", "photo.webp", "cat.jpg", "sub/photo.jpg")
  assert _names(paths, tmp_path) == {
    "photo.jpg": "photo.jpg.png",
    "photo.png": "photo.png.png",
    "photo.webp": "photo.webp.png",
    "cat.jpg": "cat.png",
    "sub/photo.jpg": "sub/photo.png",  # another folder: no clash
  }


def test_clashes_are_resolved_until_none_is_left_or_refused(tmp_path):
  # a.jpg and a.png take their suffix; a.jpg's new name is then a.jpg.png's short one: it too.
  paths = _touch(tmp_path, "a.jpg", "a.png", "a.jpg.png")
  assert _names(paths, tmp_path) == {
    "a.jpg": "a.jpg.png",
    "a.png": "a.png.png",
    "a.jpg.png": "a.jpg.png.png",
  }
  # Names that differ only in case are one file on macOS and Windows: refused, both named.
  paths = [str(tmp_path / "Photo.JPG"), str(tmp_path / "photo.jpg")]
  with pytest.raises(errors.OutputNameError, match=r"Photo\.JPG and .*photo\.jpg would both"):
    image_io.output_paths(paths, str(tmp_path), "out")


def test_globs_mirror_below_their_folder_and_outputs_inside_inputs_are_not_read(tmp_path):
  paths = _touch(tmp_path, "x/a.png", "y/a.png", "x/out/old.png")
  spec = str(tmp_path / "**" / "*.png")
  listed = image_io.list_images(spec, exclude=str(tmp_path / "x" / "out"))
  assert listed == sorted(paths[:2])
  assert _names(listed, tmp_path) == {"x/a.png": "x/a.png", "y/a.png": "y/a.png"}
  assert image_io.list_images(str(tmp_path), exclude=str(tmp_path / "x" / "out")) == sorted(
    paths[:2]
  )


def test_read_image_names_the_file(tmp_path):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"not a picture" * 50)
  with pytest.raises(errors.BadImageError, match=r"broken\.jpg: not an image") as info:
    image_io.read_image(str(bad))
  assert " at 0x" not in str(info.value)
  with pytest.raises(errors.BadImageError, match=r"missing\.png: cannot read the file"):
    image_io.read_image(str(tmp_path / "missing.png"))

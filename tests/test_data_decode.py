"""Awkward and broken image files: decoded correctly or skipped, logged once, counted."""

import os

import numpy as np
import pytest

from zipir_jax.data import decode, defaults, pipeline, testing

_COLOUR_EXACT = (
  "cmyk.jpg",
  "rgb16.png",
  "palette.png",
  "exif_rotated.jpg",
  "photo.webp",
  "photo.bmp",
  "photo.tiff",
)


@pytest.fixture(name="bad_files", scope="module")
def fixture_bad_files(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bad"))
  return root, testing.write_bad_files(root)


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def test_each_file_kind_decodes_or_raises_its_reason(bad_files):
  _, expected = bad_files
  reference = testing.natural_image(96, 128, 1).astype(np.float32)
  for path, outcome in expected.items():
    name = os.path.basename(path)
    data = _read(path)
    if outcome == "ok":
      image = decode.decode_image(data)
      assert image.shape == (96, 128, 3) and image.dtype == np.uint8, name
      assert decode.image_size(data) == (96, 128), name
      diff = np.abs(image - reference).mean()
      if name in _COLOUR_EXACT:
        assert diff < 6, (name, diff)
      elif name.startswith("gray"):
        assert np.array_equal(image[..., 0], image[..., 2]), name
      if name == "alpha.png":  # alpha 128 over white
        np.testing.assert_allclose(image, (reference * 128 + 255 * 127) / 255, atol=1.5)
    elif outcome == "too_small":
      assert decode.image_size(data) == (16, 16)
    else:
      with pytest.raises(decode.BadImageError) as info:
        decode.decode_image(data)
      assert info.value.kind == outcome, (name, info.value)
      # Plain words for a person, not the repr of a Python object ("<_io.BytesIO at 0x…>").
      assert " at 0x" not in str(info.value) and "_io." not in str(info.value), str(info.value)
      if outcome in ("truncated", "corrupt"):  # a sound header: only decoding the body fails
        assert decode.image_size(data) == (96, 128), name
      else:
        with pytest.raises(decode.BadImageError) as info:
          decode.image_size(data)
        assert info.value.kind == outcome, (name, info.value)


def test_sixteen_bit_is_scaled_not_truncated(bad_files):
  root, _ = bad_files
  gray = decode.decode_image(_read(os.path.join(root, "gray16.png")))
  import cv2  # pylint: disable=g-import-not-at-top

  expected = cv2.cvtColor(testing.natural_image(96, 128, 1), cv2.COLOR_RGB2GRAY)
  assert np.abs(gray[..., 0].astype(int) - expected).max() <= 1


def test_decoded_arrays_are_normalised():
  rgb = testing.natural_image(20, 30)
  assert decode.decode_image(rgb[..., 0]).shape == (20, 30, 3)
  assert decode.decode_image(rgb[..., :1]).shape == (20, 30, 3)
  np.testing.assert_array_equal(decode.decode_image(rgb.astype(np.uint16) * 257), rgb)
  rgba = np.concatenate([rgb, np.zeros((20, 30, 1), np.uint8)], -1)
  assert (decode.decode_image(rgba, alpha_background=0) == 0).all()
  with pytest.raises(decode.BadImageError, match="shape"):
    decode.decode_image(np.zeros((4, 4, 2), np.uint8))
  with pytest.raises(decode.BadImageError, match="dtype"):
    decode.decode_image(np.zeros((4, 4, 3), np.float32))


def test_jpeg_draft_decode_is_never_below_the_requested_scale(tmp_path):
  path = testing.write_image_folder(str(tmp_path), [(480, 640)])[0]
  data = _read(path)
  full = decode.decode_image(data)
  for scale in (0.9, 0.5, 0.3, 0.1):
    small = decode.decode_image(data, min_scale=scale)
    assert small.shape[0] >= np.ceil(480 * scale) and small.shape[1] >= np.ceil(640 * scale)
    assert small.shape[0] <= full.shape[0]
  assert decode.decode_image(data, min_scale=0.2).shape[0] < 480


def test_skip_log_logs_each_file_once_and_summarises(tmp_path):
  log = decode.SkipLog(str(tmp_path))
  for _ in range(3):
    log.record("a.jpg", "corrupt", "bad\tbytes")
  log.record("b.png", "empty", "empty file")
  assert log.counts == {"corrupt": 1, "empty": 1}
  assert decode.summarize_skips(str(tmp_path)) == {
    "corrupt": {"a.jpg": "bad bytes"},
    "empty": {"b.png": "empty file"},
  }


def _config(root, **overrides):
  config = defaults.get_data_config()
  config.path = root
  config.buckets = ((64, 64, 2), (64, 96, 2))
  config.num_workers = 0
  config.update(overrides)
  return config


def test_folder_of_every_bad_kind_runs_through_and_reports_each_skip(tmp_path):
  root = str(tmp_path / "images")
  expected = testing.write_bad_files(root)
  log_dir = str(tmp_path / "skips")
  config = _config(root, skip_log_dir=log_dir, size_probe_records=1)
  it = pipeline.create_train_iterator(config, seed=0)
  for _ in range(12):  # > 2 epochs of each bucket's stream
    batch = next(it)
    assert np.isfinite(batch["hq"]).all() and batch["hq"].shape[1] == 64
  summary = decode.summarize_skips(log_dir)
  skipped = {name: kind for kind, files in summary.items() for name in files}
  assert skipped == {p: k for p, k in expected.items() if k != "ok"}


def test_source_with_no_usable_image_fails_at_start(tmp_path):
  root = str(tmp_path)
  expected = testing.write_bad_files(root)
  for path, outcome in expected.items():
    if outcome == "ok":
      os.remove(path)
  config = _config(root)
  with pytest.raises(ValueError, match="no usable image") as info:
    pipeline.create_train_dataset(config, seed=0)
  assert "1 truncated" in str(info.value) and "1 too_small" in str(info.value)


def test_bucket_no_image_covers_fails_at_start(tmp_path):
  root = str(tmp_path)
  testing.write_image_folder(root, [(64, 64), (80, 70)])
  config = _config(root)
  with pytest.raises(ValueError, match=r"covers bucket.*64x96"):
    pipeline.create_train_dataset(config, seed=0)

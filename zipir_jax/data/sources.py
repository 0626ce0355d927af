"""Random-access data sources of (image, caption) records for grain.

Every source returns the same record: ``{"image": bytes | uint8 array | None, "caption": str,
"name": str, "error": str}``. ``image`` is undecoded when possible (decoding happens in the grain
workers, where a bad file is skipped, not raised); ``error`` is non-empty when the record could not
even be read, and the pipeline skips it with that reason.

* :class:`ImageFolderSource`: a directory tree of jpg/png/webp/bmp/tiff files; ``x.txt`` beside
  ``x.jpg`` is its caption.
* :class:`TfdsSource`: a TFDS dataset already built in ArrayRecord format, through
  ``tfds.data_source`` (no TensorFlow, nothing downloaded); image and caption feature names come
  from the config.
* :class:`ArrayRecordSource`: shards written by ``python -m zipir_jax.data.prepare``.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from zipir_jax import errors

Record = dict[str, Any]

# ArrayRecord payload: magic, little-endian uint32 metadata length, UTF-8 JSON metadata, image
# bytes.
RECORD_MAGIC = b"ZIR1"
_HEADER = struct.Struct("<4sI")
DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def make_record(image: Any, caption: str = "", name: str = "", error: str = "") -> Record:
  return {"image": image, "caption": caption, "name": name, "error": error}


# ------------------------------------------------------------------------------------------------
# Image folder.


def scan_image_folder(root: str, extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> list[str]:
  """Sorted image paths under ``root`` (recursive, extensions case-insensitive)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"ImageFolderSource: {root!r} is not a directory (config.data.path)")
  extensions = tuple(e.lower() for e in extensions)
  paths = []
  for directory, dirs, files in os.walk(root):
    dirs.sort()
    for f in sorted(files):
      if f.lower().endswith(extensions):
        paths.append(os.path.join(directory, f))
  return paths


def _read_caption(image_path: str) -> str:
  caption_path = os.path.splitext(image_path)[0] + ".txt"
  try:
    with open(caption_path, encoding="utf-8", errors="replace") as f:
      return f.read().strip()
  except OSError:
    return ""


def read_image_file(path: str) -> Record:
  """One image file's record: its encoded bytes and the caption in ``x.txt`` beside ``x.jpg``."""
  try:
    with open(path, "rb") as f:
      image = f.read()
  except OSError as e:
    return make_record(None, name=path, error=f"cannot read file ({e})")
  return make_record(image, caption=_read_caption(path), name=path)


class ImageFolderSource:
  """Every image file under a directory (recursive), in sorted path order."""

  def __init__(self, root: str, extensions: Sequence[str] = DEFAULT_EXTENSIONS):
    self.root = root
    self._paths = scan_image_folder(root, extensions)
    if not self._paths:
      raise ValueError(
        f"ImageFolderSource: no files with extensions {tuple(extensions)} under "
        f"{root!r} (config.data.path)"
      )

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> Record:
    return read_image_file(self._paths[index])

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.root!r}, {len(self)} files)"


# ------------------------------------------------------------------------------------------------
# TFDS.


def _feature(example: Mapping[str, Any], key: str) -> Any:
  """``example[key]`` where key may be a '/'-separated path into nested features."""
  value: Any = example
  for part in key.split("/"):
    value = value[part]
  return value


def _to_text(value: Any) -> str:
  """A TFDS text feature (str, bytes, or an array of them: the first one) as str."""
  if isinstance(value, np.ndarray):
    if value.size == 0:
      return ""
    value = value.reshape(-1)[0]
  if isinstance(value, (list, tuple)):
    return _to_text(value[0]) if value else ""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  return str(value)


def _nested(key: str, value: Any) -> dict[str, Any]:
  """{'a': {'b': value}} for the feature path 'a/b'."""
  for part in reversed(key.split("/")):
    value = {part: value}
  return value


class TfdsSource:
  """A TFDS dataset through ``tfds.data_source`` (random access, no TensorFlow).

  The dataset must already be built in ArrayRecord format (``tfds build NAME --data_dir=DIR
  --file_format=array_record``): nothing is downloaded at training time, and a missing dataset is
  a :class:`~zipir_jax.errors.ConfigError` naming that command. The image feature is not decoded
  by TFDS (``SkipDecoding``): records carry its encoded bytes, like the folder and ArrayRecord
  sources, so the pipeline probes the header for the size and decodes at reduced DCT scale.
  """

  def __init__(
    self,
    name: str,
    split: str = "train",
    data_dir: str = "",
    image_key: str = "image",
    caption_key: str = "",
  ):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # heavy, optional.

    if not name:
      raise ValueError("TfdsSource: config.data.tfds_name is empty")
    self.name, self.split = name, split
    self.image_key, self.caption_key = image_key, caption_key
    where = data_dir or f"the TFDS default ({tfds.core.constants.DATA_DIR}, or $TFDS_DATA_DIR)"
    try:
      self._source = tfds.data_source(
        name,
        split=split,
        data_dir=data_dir or None,
        download=False,
        decoders=_nested(image_key, tfds.decode.SkipDecoding()),
      )
    except tfds.core.registered.DatasetNotFoundError as e:
      raise errors.ConfigError(
        f"config.data.tfds_name={name!r}: {str(e).splitlines()[0]} (not a registered TFDS "
        "dataset; a custom one must be importable or built under config.data.tfds_data_dir)"
      ) from None
    except (NotImplementedError, AssertionError, FileNotFoundError) as e:
      # Not built there, or built as TFRecord (no random access), or another version.
      raise errors.ConfigError(
        f"config.data.tfds_name={name!r}: no ArrayRecord copy in {where} "
        f"(config.data.tfds_data_dir); build it once with `tfds build {name} "
        f"--data_dir={data_dir or '<dir>'} --file_format=array_record` (TFDS says: "
        f"{str(e).splitlines()[0]})"
      ) from None
    except (KeyError, ValueError) as e:  # an unknown split or feature
      raise errors.ConfigError(
        f"config.data.tfds_name={name!r}, tfds_split={split!r}, image_key={image_key!r}: "
        f"{str(e).splitlines()[0]}"
      ) from None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    name = f"{self.name}/{self.split}[{index}]"
    try:
      example = self._source[index]
      image = _feature(example, self.image_key)
    except KeyError as e:
      raise KeyError(
        f"TfdsSource {self.name}: no feature {self.image_key!r} (config.data.image_key)"
      ) from e
    except Exception as e:  # pylint: disable=broad-except  # TFDS decode failure of one record.
      return make_record(None, name=name, error=f"TFDS cannot read the record ({e})")
    caption = ""
    if self.caption_key:
      try:
        caption = _to_text(_feature(example, self.caption_key))
      except KeyError as e:
        raise KeyError(
          f"TfdsSource {self.name}: no feature {self.caption_key!r} (config.data.caption_key)"
        ) from e
    if isinstance(image, (bytes, np.bytes_)):
      image = bytes(image)
    return make_record(image, caption=caption, name=name)

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"


# ------------------------------------------------------------------------------------------------
# ArrayRecord shards of (encoded image, caption).


def encode_record(image_bytes: bytes, caption: str = "", name: str = "", **metadata: Any) -> bytes:
  """Serialises one example for an ArrayRecord shard (see :func:`decode_record`)."""
  meta = json.dumps({"caption": caption, "name": name, **metadata}).encode("utf-8")
  return _HEADER.pack(RECORD_MAGIC, len(meta)) + meta + image_bytes


def decode_record(payload: bytes, default_name: str = "") -> Record:
  """Parses :func:`encode_record` output; a malformed payload becomes an error record."""
  if len(payload) < _HEADER.size:
    return make_record(None, name=default_name, error="record shorter than its header")
  magic, meta_len = _HEADER.unpack_from(payload)
  if magic != RECORD_MAGIC or _HEADER.size + meta_len > len(payload):
    return make_record(
      None, name=default_name, error="not a zipir_jax.data.prepare record (bad magic or length)"
    )
  try:
    meta = json.loads(payload[_HEADER.size : _HEADER.size + meta_len].decode("utf-8"))
  except ValueError as e:
    return make_record(None, name=default_name, error=f"bad record metadata ({e})")
  image = payload[_HEADER.size + meta_len :]
  return make_record(
    image, caption=str(meta.get("caption", "")), name=str(meta.get("name") or default_name)
  )


def array_record_paths(path: str) -> list[str]:
  """A directory (its *.array_record files), a single file, or a glob → sorted shard paths."""
  if os.path.isdir(path):
    paths = sorted(glob.glob(os.path.join(path, "*.array_record")))
  else:
    paths = sorted(glob.glob(path))
  if not paths:
    raise FileNotFoundError(
      f"ArrayRecordSource: no .array_record files at {path!r} "
      "(config.data.path; write them with python -m zipir_jax.data.prepare)"
    )
  return paths


class ArrayRecordSource:
  """ArrayRecord shards written by ``python -m zipir_jax.data.prepare``."""

  def __init__(self, path: str):
    import grain  # pylint: disable=g-import-not-at-top

    self.path = path
    self._paths = array_record_paths(path)
    self._source = grain.sources.ArrayRecordDataSource(self._paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    return decode_record(self._source[index], default_name=f"{self.path}[{index}]")

  def __repr__(self) -> str:
    return f"ArrayRecordSource({self.path!r}, {len(self._paths)} shards, {len(self)} records)"


def create_source(config_data: Mapping[str, Any]):
  """The source named by ``config.data.source``."""
  kind = config_data["source"]
  if kind == "folder":
    if not config_data["path"]:
      raise ValueError("config.data.path is empty: set it to the image folder")
    return ImageFolderSource(config_data["path"], tuple(config_data["extensions"]))
  if kind == "tfds":
    return TfdsSource(
      config_data["tfds_name"],
      config_data["tfds_split"],
      config_data["tfds_data_dir"],
      config_data["image_key"],
      config_data["caption_key"],
    )
  if kind == "array_record":
    if not config_data["path"]:
      raise ValueError("config.data.path is empty: set it to the ArrayRecord directory or glob")
    return ArrayRecordSource(config_data["path"])
  raise ValueError(
    f"config.data.source: unknown source {kind!r}; expected 'folder', 'tfds' or 'array_record'"
  )

"""Reads weight files of other frameworks into ``dict[str, np.ndarray]`` without importing torch.

Pretrained networks that ZipIR leans on (LPIPS-VGG, T5, Real-ESRGAN, Inception) are distributed as
PyTorch checkpoints or safetensors. Installing torch only to read a few tensors is heavy, and
``torch.load`` of an untrusted pickle can run arbitrary code, so this module parses the formats
itself with a restricted unpickler that only rebuilds what a state dict needs.

Supported PyTorch formats:

* the zip format written by ``torch.save`` since 1.6 (``<name>/data.pkl`` plus one
  ``<name>/data/<key>`` file per storage, optional ``<name>/byteorder``);
* the legacy format written before 1.6 (a stream of pickles: magic number, protocol version,
  system info, the object, the storage keys, then the raw storages), which is what the ``lpips``
  package ships its linear heads in.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import io
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import ml_dtypes
import numpy as np

from zipir_jax.errors import CheckpointError, UnsafeCheckpointError

PathLike = str | os.PathLike[str]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)

# Legacy (pre-1.6) torch.save constants, from torch/serialization.py.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# torch storage class name -> numpy dtype of its elements.
_STORAGE_DTYPES: dict[str, np.dtype] = {
  "DoubleStorage": np.dtype(np.float64),
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
}

# torch dtype objects (``torch.float32`` pickles as the global ``torch float32``) -> numpy dtype.
_TORCH_DTYPES: dict[str, np.dtype] = {
  "float64": np.dtype(np.float64),
  "double": np.dtype(np.float64),
  "float32": np.dtype(np.float32),
  "float": np.dtype(np.float32),
  "float16": np.dtype(np.float16),
  "half": np.dtype(np.float16),
  "bfloat16": np.dtype(ml_dtypes.bfloat16),
  "int64": np.dtype(np.int64),
  "long": np.dtype(np.int64),
  "int32": np.dtype(np.int32),
  "int": np.dtype(np.int32),
  "int16": np.dtype(np.int16),
  "short": np.dtype(np.int16),
  "int8": np.dtype(np.int8),
  "uint8": np.dtype(np.uint8),
  "bool": np.dtype(np.bool_),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stand-in for a torch ``*Storage`` class: only its element dtype matters."""

  name: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A flat, read-only numpy buffer standing in for a torch storage."""

  array: np.ndarray


# ------------------------------------------------------------------------------------------------
# Tensor rebuilding (the only callables a pickled state dict may invoke).
# ------------------------------------------------------------------------------------------------


def _as_shape(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
    isinstance(v, int) and not isinstance(v, bool) for v in value
  ):
    raise CheckpointError(f"tensor {what} must be a tuple of ints, found {value!r}")
  return tuple(int(v) for v in value)


def _rebuild_array(storage: Any, storage_offset: Any, size: Any, stride: Any) -> np.ndarray:
  """Copies the strided view ``storage[offset:]`` with ``size``/``stride`` into a new array.

  Bounds are checked before ``as_strided`` because a hostile or corrupt file could otherwise make
  it read memory outside the storage.
  """
  if not isinstance(storage, _Storage):
    raise CheckpointError(f"tensor storage must be a persistent id, found {type(storage)!r}")
  size = _as_shape(size, "size")
  stride = _as_shape(stride, "stride")
  if len(size) != len(stride):
    raise CheckpointError(f"tensor size {size} and stride {stride} have different ranks")
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise CheckpointError(f"invalid tensor storage offset {storage_offset!r}")
  if any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise CheckpointError(f"negative tensor size {size} or stride {stride}")
  buf = storage.array
  if 0 in size:
    return np.zeros(size, dtype=buf.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= buf.size:
    raise CheckpointError(
      f"tensor (offset {storage_offset}, size {size}, stride {stride}) reaches element {last} "
      f"of a storage with only {buf.size} elements"
    )
  item = buf.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
    buf[storage_offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
  )
  return np.array(view, order="C", copy=True)


Rebuild = Callable[[Any, Any, Any, Any], Any]


def _tensor_globals(rebuild: Rebuild) -> dict[tuple[str, str], Callable[..., Any]]:
  """The ``torch._utils`` rebuild functions, implemented on top of ``rebuild``."""

  def rebuild_tensor(storage, storage_offset, size, stride):
    return rebuild(storage, storage_offset, size, stride)

  def rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
  ):
    del requires_grad, backward_hooks, metadata  # Training-time state; irrelevant for weights.
    return rebuild(storage, storage_offset, size, stride)

  def rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    return data

  def rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    del requires_grad, backward_hooks, state
    return data

  return {
    ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter_with_state,
  }


_DATA_GLOBALS: dict[tuple[str, str], Any] = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
  **{("torch", name): dtype for name, dtype in _TORCH_DTYPES.items()},
}

LoadStorage = Callable[[_StorageType, str, int, Any], _Storage]


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only state-dict globals and maps storages to numpy buffers."""

  def __init__(
    self, file: IO[bytes], load_storage: LoadStorage | None, rebuild: Rebuild = _rebuild_array
  ):
    super().__init__(file, encoding="utf-8")
    self._load_storage = load_storage
    self._globals = {**_DATA_GLOBALS, **_tensor_globals(rebuild)}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._globals[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
        f"refusing to load global '{module}.{name}': only tensors, parameters and "
        "OrderedDicts of a state dict are allowed"
      ) from None

  def persistent_load(self, pid: Any) -> _Storage:
    if (
      self._load_storage is None
      or not isinstance(pid, tuple)
      or len(pid) < 5
      or _text(pid[0]) != "storage"
    ):
      raise CheckpointError(f"unexpected persistent id {pid!r}")
    storage_type, key, _location, numel = pid[1:5]
    view_metadata = pid[5] if len(pid) > 5 else None
    if not isinstance(storage_type, _StorageType):
      raise CheckpointError(
        f"persistent id names storage type {storage_type!r}, expected one "
        f"of torch.{{{', '.join(_STORAGE_DTYPES)}}}"
      )
    if not isinstance(numel, int) or numel < 0:
      raise CheckpointError(f"invalid storage size {numel!r}")
    return self._load_storage(storage_type, _text(key), numel, view_metadata)


def _text(value: Any) -> str:
  return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _buffer(raw: bytes, dtype: np.dtype, numel: int, byteorder: str, where: str) -> np.ndarray:
  """Interprets ``raw`` as ``numel`` elements of ``dtype`` stored in ``byteorder``."""
  expected = numel * dtype.itemsize
  if len(raw) != expected:
    raise CheckpointError(
      f"{where} holds {len(raw)} bytes, expected {expected} "
      f"({numel} x {dtype}); the file is truncated or corrupt"
    )
  array = np.frombuffer(raw, dtype=dtype, count=numel)
  if byteorder != ("little" if np.little_endian else "big") and dtype.itemsize > 1:
    array = array.byteswap()
  array.flags.writeable = False
  return array


# ------------------------------------------------------------------------------------------------
# PyTorch zip format (torch >= 1.6).
# ------------------------------------------------------------------------------------------------


def _load_zip(path: str) -> Any:
  """Unpickles ``<name>/data.pkl`` of a zip checkpoint, reading storages from ``<name>/data/``."""
  with zipfile.ZipFile(path) as archive:
    names = set(archive.namelist())
    pickles = sorted(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
    if len(pickles) != 1:
      raise CheckpointError(
        f"expected exactly one '<name>/data.pkl' entry in the zip, found {pickles}"
      )
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()
      if byteorder not in ("little", "big"):
        raise CheckpointError(f"unknown byteorder {byteorder!r} (expected 'little' or 'big')")
    cache: dict[str, np.ndarray] = {}

    def load_storage(storage_type: _StorageType, key: str, numel: int, view: Any) -> _Storage:
      del view  # Only the legacy format has storage views.
      if key not in cache:
        name = f"{prefix}data/{key}"
        if name not in names:
          raise CheckpointError(f"storage entry '{name}' is missing from the zip")
        size = archive.getinfo(name).file_size
        if size != numel * storage_type.dtype.itemsize:  # Checked before reading: no zip bombs.
          raise CheckpointError(
            f"storage entry '{name}' has {size} bytes, expected {numel} x {storage_type.dtype}"
          )
        cache[key] = _buffer(
          archive.read(name), storage_type.dtype, numel, byteorder, f"storage entry '{name}'"
        )
      if cache[key].dtype != storage_type.dtype:
        raise CheckpointError(
          f"storage '{key}' is used with two dtypes ({cache[key].dtype} and {storage_type.dtype})"
        )
      return _Storage(cache[key])

    data = archive.read(pickles[0])
    return _RestrictedUnpickler(io.BytesIO(data), load_storage).load()


# ------------------------------------------------------------------------------------------------
# Legacy PyTorch format (torch < 1.6).
# ------------------------------------------------------------------------------------------------


def _load_legacy(path: str) -> Any:
  """Parses the pre-1.6 stream: magic, protocol, sys info, object, storage keys, raw storages.

  The raw storages come after the object pickle, so the object is unpickled twice: once to learn
  the storage types and reach the data, once more to build the tensors from the filled buffers.
  """
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    try:
      magic = _RestrictedUnpickler(f, None).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
      raise CheckpointError(
        f"neither a PyTorch zip checkpoint nor a legacy torch.save file ({e})"
      ) from e
    if magic != _LEGACY_MAGIC_NUMBER:
      raise CheckpointError(
        "neither a PyTorch zip checkpoint nor a legacy torch.save file (bad magic number)"
      )
    protocol = _RestrictedUnpickler(f, None).load()
    if protocol != _LEGACY_PROTOCOL_VERSION:
      raise CheckpointError(
        f"unsupported legacy torch.save protocol {protocol!r} (expected {_LEGACY_PROTOCOL_VERSION})"
      )
    sys_info = _RestrictedUnpickler(f, None).load()
    little = not isinstance(sys_info, Mapping) or bool(sys_info.get("little_endian", True))
    byteorder = "little" if little else "big"
    object_start = f.tell()

    storages: dict[str, tuple[np.dtype, int]] = {}

    def record_storage(storage_type: _StorageType, key: str, numel: int, view: Any) -> _Storage:
      del view
      if storages.setdefault(key, (storage_type.dtype, numel)) != (storage_type.dtype, numel):
        raise CheckpointError(f"storage '{key}' is referenced with two dtypes or sizes")
      if numel * storage_type.dtype.itemsize > file_size:
        raise CheckpointError(f"storage '{key}' claims {numel} elements, more than the file holds")
      return _Storage(np.zeros(0, storage_type.dtype))

    _RestrictedUnpickler(f, record_storage, rebuild=lambda *args: None).load()
    keys = _RestrictedUnpickler(f, None).load()
    if not isinstance(keys, list):
      raise CheckpointError(
        f"expected the list of storage keys after the object, found {type(keys).__name__}"
      )
    buffers: dict[str, np.ndarray] = {}
    for key in map(_text, keys):
      if key not in storages:
        raise CheckpointError(f"storage key '{key}' is listed but never referenced")
      dtype, numel = storages[key]
      header = f.read(8)
      if len(header) != 8:
        raise CheckpointError(f"file ends before the data of storage '{key}'")
      (stored,) = struct.unpack("<q" if little else ">q", header)
      if stored != numel:
        raise CheckpointError(f"storage '{key}' has {stored} elements on disk, expected {numel}")
      buffers[key] = _buffer(
        f.read(numel * dtype.itemsize), dtype, numel, byteorder, f"storage '{key}'"
      )
    missing = sorted(set(storages) - set(buffers))
    if missing:
      raise CheckpointError(f"no data for storages {missing}")

    def load_storage(storage_type: _StorageType, key: str, numel: int, view: Any) -> _Storage:
      del storage_type, numel  # Validated in the first pass.
      array = buffers[key]
      if view is not None:
        _, offset, view_size = view
        if offset < 0 or view_size < 0 or offset + view_size > array.size:
          raise CheckpointError(
            f"storage view ({offset}, {view_size}) is outside storage "
            f"'{key}' of {array.size} elements"
          )
        array = array[offset : offset + view_size]
      return _Storage(array)

    f.seek(object_start)
    return _RestrictedUnpickler(f, load_storage).load()


# ------------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------------


def load_torch_state_dict(path: PathLike, key: str | None = None) -> dict[str, np.ndarray]:
  """Reads a ``torch.save``d state dict (zip or legacy format) into numpy arrays.

  Args:
    path: checkpoint file.
    key: for checkpoints whose top level is a dict that holds the state dict under a key (e.g.
      ``"state_dict"``, ``"params"``, ``"params_ema"``), that key. It is never guessed, so a
      checkpoint with several candidates cannot silently load the wrong weights.

  Returns:
    A flat ``{name: array}`` dict; tensors are copied into contiguous, writable arrays.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: checkpoint file not found")
  try:
    if zipfile.is_zipfile(path):
      obj = _load_zip(path)
    elif _starts_like_zip(path):
      raise CheckpointError(
        "starts like a zip archive but has no valid central directory; the "
        "file is probably truncated"
      )
    else:
      obj = _load_legacy(path)
  except CheckpointError as e:
    raise type(e)(f"{path}: {e}") from e
  except (
    pickle.UnpicklingError,
    EOFError,
    struct.error,
    zipfile.BadZipFile,
    zlib.error,
    UnicodeDecodeError,
    TypeError,
    IndexError,
    AttributeError,
    KeyError,
    ValueError,
  ) as e:
    # Low-level symptoms of a truncated or corrupt file, re-raised with the file name.
    raise CheckpointError(
      f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})"
    ) from e
  return _select_state_dict(obj, key, path)


def _starts_like_zip(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"PK\x03\x04"


def _select_state_dict(obj: Any, key: str | None, path: str) -> dict[str, np.ndarray]:
  """Picks ``obj[key]`` when asked and checks that the result is a flat name -> array mapping."""
  if key is not None:
    if not isinstance(obj, Mapping):
      raise KeyError(
        f"{path}: key={key!r} given but the checkpoint's top level is a "
        f"{type(obj).__name__}, not a dict."
      )
    if key not in obj:
      raise KeyError(f"{path}: key {key!r} not in checkpoint; top-level keys: {list(obj)}.")
    obj = obj[key]
  if isinstance(obj, np.ndarray):
    raise ValueError(f"{path}: the checkpoint holds a single tensor, not a state dict.")
  if not isinstance(obj, Mapping):
    raise ValueError(
      f"{path}: expected a state dict (mapping of name -> tensor), found {type(obj).__name__}."
    )
  not_arrays = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if not_arrays:
    nested = [k for k in not_arrays if isinstance(obj[k], Mapping)]
    # Prefer sub-dicts made only of tensors: those are the likely state dicts.
    only_tensors = [k for k in nested if all(isinstance(v, np.ndarray) for v in obj[k].values())]
    nested = only_tensors or nested
    hint = f" It looks like a wrapper dict: pass key= one of {nested}." if nested else ""
    raise ValueError(f"{path}: entries {not_arrays[:8]} are not tensors.{hint}")
  return {str(k): v for k, v in obj.items()}


def load_safetensors(path: PathLike) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` file (bfloat16 comes back as ``ml_dtypes.bfloat16``)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: safetensors file not found.")
  try:
    return dict(safetensors.numpy.load_file(path))
  except Exception as e:  # safetensors raises its own SafetensorError for corrupt files.
    raise ValueError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e}).") from e


def load_state_dict(path: PathLike, key: str | None = None) -> dict[str, np.ndarray]:
  """Reads a weight file, choosing the reader by suffix (torch checkpoint or safetensors)."""
  suffix = os.path.splitext(os.fspath(path))[1].lower()
  if suffix in SAFETENSORS_SUFFIXES:
    if key is not None:
      raise ValueError(f"{path}: key= is not supported for safetensors files (they are flat).")
    return load_safetensors(path)
  if suffix in TORCH_SUFFIXES:
    return load_torch_state_dict(path, key=key)
  raise ValueError(
    f"{path}: unknown weight file suffix {suffix!r}; expected one of "
    f"{TORCH_SUFFIXES + SAFETENSORS_SUFFIXES}."
  )


def lpips_heads_path(net: str = "vgg", version: str = "0.1") -> str:
  """Path of the calibrated LPIPS heads shipped in the ``lpips`` wheel, without importing it.

  ``import lpips`` pulls in torch; the heads file is plain data, so locating the package is enough.
  """
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "The 'lpips' package (which ships the LPIPS linear heads) is not installed. Install it "
      "without its torch dependency: pip install --no-deps lpips==0.1.4"
    )
  package_dir = list(spec.submodule_search_locations)[0]
  path = os.path.join(package_dir, "weights", f"v{version}", f"{net}.pth")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path}: LPIPS heads for net={net!r} version={version!r} not found "
      "in the installed lpips package (expected lpips==0.1.4)."
    )
  return path


def tensor(
  state_dict: Mapping[str, Any],
  key: str,
  shape: Sequence[int],
  source: str,
  dtype: Any = np.float32,
) -> np.ndarray:
  """``state_dict[key]`` as ``dtype``, checked against ``shape``; errors name source, key, shapes.

  The one check every converter (LPIPS, Inception, RRDBNet, ...) applies to each weight it reads.
  """
  if key not in state_dict:
    raise KeyError(f"{source}: missing key '{key}' (expected shape {tuple(shape)}).")
  value = np.asarray(state_dict[key])
  if value.shape != tuple(shape):
    raise ValueError(f"{source}: key '{key}' has shape {value.shape}, expected {tuple(shape)}.")
  return value.astype(dtype)

"""Torch-free weight readers: PyTorch zip and legacy checkpoints, safetensors, error handling."""

import io
import os
import pathlib
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from zipir_jax import weights

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"
TINY_FILES = ["tiny_state_dict.pth", "tiny_state_dict_legacy.pth"]


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN_DIR / "lpips_golden.npz") as data:
    return dict(data)


def _expected_tiny(golden):
  names = [k.split("/", 1)[1] for k in golden if k.startswith("tiny/")]
  return {n: (golden[f"tiny/{n}"], str(golden[f"tiny_dtype/{n}"])) for n in names}


# ------------------------------------------------------------------------------------------------
# Hand-written checkpoints (no torch needed): pickle opcodes for a one-tensor state dict.
# ------------------------------------------------------------------------------------------------


def _str(s: str) -> bytes:
  return b"X" + struct.pack("<I", len(s)) + s.encode()


def _int_tuple(values) -> bytes:
  return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"


def _tensor_pickle(numel, offset, size, stride, storage="FloatStorage", extra=b"") -> bytes:
  """``OrderedDict(w=_rebuild_tensor_v2(storage '0', offset, size, stride, False, None))``."""
  persistent_id = (
    b"("
    + _str("storage")
    + f"ctorch\n{storage}\n".encode()
    + _str("0")
    + _str("cpu")
    + b"J"
    + struct.pack("<i", numel)
    + extra
    + b"tQ"
  )
  return (
    b"\x80\x02ccollections\nOrderedDict\n)R("
    + _str("w")
    + b"ctorch._utils\n_rebuild_tensor_v2\n("
    + persistent_id
    + b"J"
    + struct.pack("<i", offset)
    + _int_tuple(size)
    + _int_tuple(stride)
    + b"\x89Nt"
    + b"Ru."
  )


def _write_zip(path, data_pkl: bytes, storages: dict, byteorder: str | None = "little"):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", data_pkl)
    if byteorder is not None:
      z.writestr("archive/byteorder", byteorder)
    for key, raw in storages.items():
      z.writestr(f"archive/data/{key}", raw)
    z.writestr("archive/version", "3\n")
  return path


def _legacy_prefix() -> bytes:
  info = {
    "protocol_version": 1001,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
  }
  return b"".join(pickle.dumps(x, protocol=2) for x in (weights._LEGACY_MAGIC_NUMBER, 1001, info))


class _RunsShell:
  """Unpickling this would run a shell command (the classic malicious-checkpoint payload)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


# ------------------------------------------------------------------------------------------------
# Tests.
# ------------------------------------------------------------------------------------------------


def test_reads_lpips_heads_shipped_with_the_package(golden):
  path = weights.lpips_heads_path()
  assert path.endswith(os.path.join("lpips", "weights", "v0.1", "vgg.pth"))
  heads = weights.load_torch_state_dict(path)  # Legacy (pre-1.6) torch.save format.
  assert sorted(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
  for k, channels in enumerate((64, 128, 256, 512, 512)):
    value = heads[f"lin{k}.model.1.weight"]
    assert value.shape == (1, channels, 1, 1) and value.dtype == np.float32
    np.testing.assert_array_equal(value, golden[f"heads/lin{k}"])  # As torch.load read them.


@pytest.mark.parametrize("filename", TINY_FILES)
def test_tiny_checkpoint_round_trip(golden, filename):
  loaded = weights.load_state_dict(GOLDEN_DIR / filename)
  expected = _expected_tiny(golden)
  assert list(loaded) == list(expected)  # Order preserved.
  for name, (want, torch_dtype) in expected.items():
    got = loaded[name]
    want_dtype = ml_dtypes.bfloat16 if torch_dtype == "bfloat16" else want.dtype
    assert got.dtype == want_dtype, name
    assert got.shape == want.shape, name
    assert got.flags.c_contiguous and got.flags.writeable, name
    np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=name)
  # Tensors that shared a storage in torch are independent copies here.
  loaded["base"][0, 0] = 99
  assert loaded["transposed"][0, 0] == 0


def test_big_endian_zip_reads_the_same(golden, tmp_path):
  src = GOLDEN_DIR / "tiny_state_dict.pth"
  dst = tmp_path / "big.pth"
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    data_pkl = next(n for n in zin.namelist() if n.endswith("data.pkl"))
    sizes = _storage_item_sizes(zin.read(data_pkl))
    prefix = data_pkl[: -len("data.pkl")]
    for name in zin.namelist():
      raw = zin.read(name)
      if name == prefix + "byteorder":
        raw = b"big"
      elif name.startswith(prefix + "data/"):
        size = sizes[name.rsplit("/", 1)[1]]
        raw = np.frombuffer(raw, f"<V{size}").view(np.uint8).reshape(-1, size)[:, ::-1].tobytes()
      zout.writestr(name, raw)
  loaded = weights.load_torch_state_dict(dst)
  for name, (want, _) in _expected_tiny(golden).items():
    np.testing.assert_array_equal(loaded[name].astype(want.dtype), want, err_msg=name)


def _storage_item_sizes(pickled: bytes) -> dict[str, int]:
  """Storage key -> element size, collected by unpickling without building tensors."""
  sizes = {}

  def record(storage_type, key, numel, view):
    del numel, view
    sizes[key] = storage_type.dtype.itemsize
    return weights._Storage(np.zeros(0))

  weights._RestrictedUnpickler(io.BytesIO(pickled), record, rebuild=lambda *args: None).load()
  return sizes


def test_handmade_zip_with_strides_offset_and_byteorder(tmp_path):
  data = np.arange(10, dtype=np.float32)
  pkl = _tensor_pickle(numel=10, offset=1, size=(2, 3), stride=(1, 2))
  path = _write_zip(tmp_path / "a.pt", pkl, {"0": data.tobytes()})
  np.testing.assert_array_equal(weights.load_torch_state_dict(path)["w"], [[1, 3, 5], [2, 4, 6]])
  path = _write_zip(tmp_path / "b.pt", pkl, {"0": data.astype(">f4").tobytes()}, "big")
  np.testing.assert_array_equal(weights.load_torch_state_dict(path)["w"], [[1, 3, 5], [2, 4, 6]])


def test_handmade_legacy_file_with_storage_view(tmp_path):
  data = np.arange(10, dtype=np.float32)
  view = b"(" + _str("view0") + b"J" + struct.pack("<i", 4) + b"J" + struct.pack("<i", 5) + b"t"
  pkl = _tensor_pickle(numel=10, offset=1, size=(2, 2), stride=(2, 1), extra=view)
  raw = _legacy_prefix() + pkl + pickle.dumps(["0"], protocol=2)
  path = tmp_path / "legacy.pth"
  path.write_bytes(raw + struct.pack("<q", 10) + data.tobytes())
  # Storage view = elements 4..8, tensor offset 1 within it.
  np.testing.assert_array_equal(weights.load_torch_state_dict(path)["w"], [[5, 6], [7, 8]])
  path.write_bytes(raw + struct.pack("<q", 10) + data.tobytes()[:-1])
  with pytest.raises(weights.CheckpointError, match=f"{path}.*storage '0'.*truncated"):
    weights.load_torch_state_dict(path)


def test_out_of_bounds_view_is_refused(tmp_path):
  pkl = _tensor_pickle(numel=4, offset=0, size=(3, 3), stride=(1, 2))
  path = _write_zip(tmp_path / "oob.pt", pkl, {"0": np.zeros(4, np.float32).tobytes()})
  with pytest.raises(weights.CheckpointError, match=f"{path}.*reaches element 6"):
    weights.load_torch_state_dict(path)


def test_short_storage_entry_is_refused(tmp_path):
  pkl = _tensor_pickle(numel=10, offset=0, size=(10,), stride=(1,))
  path = _write_zip(tmp_path / "short.pt", pkl, {"0": np.zeros(9, np.float32).tobytes()})
  with pytest.raises(weights.CheckpointError, match=f"{path}.*archive/data/0.*36 bytes"):
    weights.load_torch_state_dict(path)


def test_wrapped_state_dict_needs_explicit_key():
  path = GOLDEN_DIR / "tiny_wrapped.pth"
  with pytest.raises(ValueError, match=r"tiny_wrapped\.pth.*key= one of \['params_ema'\]"):
    weights.load_torch_state_dict(path)
  loaded = weights.load_state_dict(path, key="params_ema")
  assert list(loaded) == ["w", "b"]
  assert loaded["w"].dtype == np.float32 and loaded["b"].dtype == np.int32
  with pytest.raises(KeyError, match=r"'params'.*top-level keys"):
    weights.load_torch_state_dict(path, key="params")


@pytest.mark.parametrize("filename", TINY_FILES)
def test_truncated_checkpoint_raises_naming_the_file(tmp_path, filename):
  raw = (GOLDEN_DIR / filename).read_bytes()
  for cut in (len(raw) // 2, len(raw) - 3):
    path = tmp_path / f"cut{cut}_{filename}"
    path.write_bytes(raw[:cut])
    with pytest.raises(ValueError, match=str(path)):
      weights.load_torch_state_dict(path)


def test_non_checkpoint_and_missing_files_raise_naming_the_file(tmp_path):
  path = tmp_path / "notes.pth"
  path.write_text("this is not a checkpoint\n" * 10)
  with pytest.raises(ValueError, match=f"{path}.*neither a PyTorch zip checkpoint"):
    weights.load_torch_state_dict(path)
  path = tmp_path / "random.bin"
  path.write_bytes(np.random.default_rng(0).bytes(1000))
  with pytest.raises(ValueError, match=str(path)):
    weights.load_torch_state_dict(path)
  with pytest.raises(FileNotFoundError, match=r"missing.pth"):
    weights.load_torch_state_dict(tmp_path / "missing.pth")
  with pytest.raises(FileNotFoundError, match=r"missing.safetensors"):
    weights.load_state_dict(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_with_forbidden_global_is_refused(tmp_path, legacy):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"w": _RunsShell(f"touch {marker}")}, protocol=2)
  if legacy:
    path = tmp_path / "evil_legacy.pth"
    path.write_bytes(_legacy_prefix() + payload)
  else:
    path = _write_zip(tmp_path / "evil.pth", payload, {})
  with pytest.raises(weights.UnsafeCheckpointError, match=rf"{path}.*'(posix|os|nt)\.system'"):
    weights.load_torch_state_dict(path)
  assert not marker.exists()


def test_safetensors_and_suffix_dispatch(tmp_path):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  tensors = {
    "a": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.array([1.5, -2], ml_dtypes.bfloat16),
    "c": np.array([7], np.int64),
  }
  path = tmp_path / "t.safetensors"
  safetensors.numpy.save_file(tensors, str(path))
  loaded = weights.load_state_dict(path)
  assert sorted(loaded) == ["a", "b", "c"]
  for k, v in tensors.items():
    assert loaded[k].dtype == v.dtype
    np.testing.assert_array_equal(loaded[k], v)
  with pytest.raises(ValueError, match="key= is not supported"):
    weights.load_state_dict(path, key="a")
  with pytest.raises(ValueError, match=r"weights\.npz.*suffix"):
    weights.load_state_dict(tmp_path / "weights.npz")
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
  with pytest.raises(ValueError, match=str(bad)):
    weights.load_safetensors(bad)


def test_lpips_heads_path_explains_how_to_install(monkeypatch):
  real_find_spec = weights.importlib.util.find_spec
  monkeypatch.setattr(
    weights.importlib.util,
    "find_spec",
    lambda name, *a: None if name == "lpips" else real_find_spec(name, *a),
  )
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps lpips==0\.1\.4"):
    weights.lpips_heads_path()

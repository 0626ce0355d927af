"""Writes the torch reference outputs that tests/test_lpips.py and tests/test_weights.py check.

Run from the repository root with a Python that has torch, torchvision and lpips==0.1.4
(lpips may be installed with --no-deps; tqdm, which lpips imports but never uses here, is stubbed):

  /work/refvenv/bin/python tests/golden/make_lpips_golden.py

Outputs, all in tests/golden/:

* ``lpips_golden.npz``: seeded image pairs (NHWC, stored as uint8 so the file stays small; the
  reference ran on ``lpips_reference_weights.decode_images`` of them, float32 in [-1, 1]), the
  distances and per-tap terms of
  ``lpips.LPIPS(net='vgg', version='0.1')`` with the seeded trunk from
  ``lpips_reference_weights.py`` and the heads shipped in the lpips package, the heads as torch
  read them, the expected contents of the tiny checkpoints below, and the library versions.
* ``tiny_state_dict.pth`` (zip format) and ``tiny_state_dict_legacy.pth`` (pre-1.6 format): a few
  tensors of several dtypes, including non-contiguous ones and views with a storage offset, to
  test the torch-free reader in ``zipir_jax/weights.py``.
* ``tiny_wrapped.pth``: a state dict nested under ``"params_ema"`` next to a non-tensor entry.

No network access: ``pnet_rand=True`` stops torchvision from downloading the ImageNet trunk.
"""

from __future__ import annotations

import collections
import importlib.machinery
import os
import sys
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import lpips_reference_weights  # noqa: E402  (needs the sys.path entry above)

# Image-pair cases: name -> (batch, height, width, seed). 37x53 checks floor-mode pooling.
CASES = {
  "sq64": (3, 64, 64, 1),
  "rect48x80": (3, 48, 80, 2),
  "odd37x53": (2, 37, 53, 3),
}
FEATURE_TO_SLICE = {idx: 1 + sum(idx >= s for s in (4, 9, 16, 23)) for idx in range(30)}


def _import_lpips():
  """Imports lpips; stubs tqdm (imported by lpips.trainer, unused here) when it is missing."""
  try:
    import tqdm  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    stub = types.ModuleType("tqdm")
    stub.__spec__ = importlib.machinery.ModuleSpec("tqdm", None)
    stub.tqdm = lambda iterable=None, *args, **kwargs: iterable
    sys.modules["tqdm"] = stub
  import lpips  # pylint: disable=g-import-not-at-top

  return lpips


def image_pairs(batch: int, height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Pairs (x0, x1), NHWC uint8 (see ``encode_images``); distances range from small to large.

  Pair 0 is independent images, pair 1 an image and a slightly noisy copy, pair 2 (if any) an
  image and a contrast-reduced copy. Images are blocky low-frequency noise plus fine noise, so
  every VGG tap sees structure.
  """
  rng = np.random.default_rng(seed)

  def image() -> np.ndarray:
    coarse = rng.uniform(-1, 1, (height // 8 + 1, width // 8 + 1, 3))
    smooth = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:height, :width]
    return np.clip(smooth + 0.3 * rng.standard_normal((height, width, 3)), -1, 1)

  x0, x1 = [], []
  for i in range(batch):
    a = image()
    if i % 3 == 0:
      b = image()
    elif i % 3 == 1:
      b = np.clip(a + 0.05 * rng.standard_normal(a.shape), -1, 1)
    else:
      b = 0.7 * a + 0.1
    x0.append(a)
    x1.append(b)
  encode = lpips_reference_weights.encode_images
  return encode(np.stack(x0)), encode(np.stack(x1))


def tiny_state_dict(torch):
  """Small tensors covering dtypes, strides, offsets and shared storages."""
  g = torch.Generator().manual_seed(0)
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
  return collections.OrderedDict(
    f32=torch.randn(2, 3, generator=g),
    f64=torch.randn(3, generator=g, dtype=torch.float64),
    f16=torch.randn(5, generator=g).half(),
    bf16=torch.randn(3, 2, generator=g).bfloat16(),
    i64=torch.arange(-3, 4, dtype=torch.int64) * 1_000_000_007,
    i32=torch.arange(-2, 2, dtype=torch.int32),
    i8=torch.tensor([-128, 0, 127], dtype=torch.int8),
    u8=torch.tensor([0, 1, 255], dtype=torch.uint8),
    flags=torch.tensor([True, False, True]),
    base=base,
    transposed=base.t(),  # Non-contiguous, shares base's storage.
    offset_view=base.view(-1)[5:11].view(2, 3),  # Storage offset 5.
    strided=base[1:, ::2],  # Offset 6, stride (6, 2).
    scalar=torch.tensor(3.5),
    empty=torch.zeros(0, 3),
    param=torch.nn.Parameter(torch.full((2, 2), 0.25)),
  )


def to_numpy(t) -> np.ndarray:
  t = t.detach()
  return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy().copy()


def main() -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  lpips = _import_lpips()
  torch.manual_seed(0)
  model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, version="0.1", verbose=False)
  model.eval()
  trunk = {
    f"net.slice{FEATURE_TO_SLICE[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": torch.from_numpy(v)
    for k, v in lpips_reference_weights.vgg16_state_dict().items()
  }
  result = model.load_state_dict(trunk, strict=False)
  missing = [k for k in result.missing_keys if k.startswith("net.")]
  if missing or result.unexpected_keys:
    raise RuntimeError(f"trunk mismatch: missing {missing}, unexpected {result.unexpected_keys}")

  out: dict[str, np.ndarray] = {
    "torch_version": np.array(torch.__version__),
    "torchvision_version": np.array(torchvision.__version__),
    "lpips_version": np.array(getattr(lpips, "__version__", "0.1.4")),
    "numpy_version": np.array(np.__version__),
    "seed": np.array(lpips_reference_weights.GOLDEN_SEED),
    "cases": np.array(list(CASES)),
  }
  for k in range(5):
    out[f"heads/lin{k}"] = to_numpy(getattr(model, f"lin{k}").model[1].weight)

  model64 = (
    lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, version="0.1", verbose=False)
    .double()
    .eval()
  )
  model64.load_state_dict({k: v.double() for k, v in trunk.items()}, strict=False)
  with torch.no_grad():
    for name, (batch, height, width, seed) in CASES.items():
      x0, x1 = image_pairs(batch, height, width, seed)
      t0, t1 = (
        torch.from_numpy(lpips_reference_weights.decode_images(x)).permute(0, 3, 1, 2)
        for x in (x0, x1)
      )
      dist, taps = model(t0, t1, retPerLayer=True)
      dist64 = model64(t0.double(), t1.double())
      out[f"{name}/x0"], out[f"{name}/x1"] = x0, x1
      out[f"{name}/distance"] = dist.reshape(batch).numpy()
      out[f"{name}/per_tap"] = torch.stack([t.reshape(batch) for t in taps], 1).numpy()
      print(
        f"{name}: distances {out[f'{name}/distance']}, float32 vs float64 reference "
        f"max diff {float((dist.double() - dist64).abs().max()):.2e}"
      )

  tiny = tiny_state_dict(torch)
  for key, value in tiny.items():
    out[f"tiny/{key}"] = to_numpy(value)
    out[f"tiny_dtype/{key}"] = np.array(str(value.dtype).removeprefix("torch."))
  torch.save(tiny, os.path.join(HERE, "tiny_state_dict.pth"))
  torch.save(
    tiny, os.path.join(HERE, "tiny_state_dict_legacy.pth"), _use_new_zipfile_serialization=False
  )
  wrapped = {"params_ema": collections.OrderedDict(w=tiny["f32"], b=tiny["i32"]), "iter": 7}
  torch.save(wrapped, os.path.join(HERE, "tiny_wrapped.pth"))

  np.savez_compressed(os.path.join(HERE, "lpips_golden.npz"), **out)
  print(
    f"wrote {len(out)} arrays with torch {torch.__version__}, torchvision {torchvision.__version__}"
  )


if __name__ == "__main__":
  main()

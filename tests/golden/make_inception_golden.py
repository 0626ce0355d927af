"""Writes the pytorch-fid reference outputs that tests/test_inception.py checks.

Run from the repository root with a Python that has torch, torchvision and pytorch-fid==0.3.0:

  /work/refvenv/bin/python tests/golden/make_inception_golden.py

The reference is pytorch-fid's own ``InceptionV3(output_blocks=[3])`` (its resize, its [0, 1] ->
[-1, 1] scaling, its block split, its final average pool). Only ``fid_inception_v3``, which would
download the real weights, is replaced: ``build_fid_inception`` makes the same structure exactly
as pytorch-fid does (torchvision ``inception_v3(num_classes=1008, aux_logits=False)`` with the
``FIDInceptionA/C/E_1/E_2`` blocks swapped in) and loads the seeded weights of
``inception_reference_weights.py`` (no missing or unexpected keys, every shape equal). No network
access.

Output, ``tests/golden/inception_golden.npz``:

* ``{case}/features``: (B, 2048) pool3 features of ``inception_reference_weights.images(case)``;
* ``{case}/resized``: the reference's 299x299 bilinear resize, NHWC, every 7th row and column
  (a full copy would be megabytes; the strided sample still covers both borders' neighbourhoods);
* ``{case}/digest``: SHA-256 of the input images, so a change in numpy's RNG is reported as such;
* the seed and the library versions.
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import inception_reference_weights as reference  # noqa: E402  (needs the sys.path entry above)

RESIZED_STRIDE = 7


def build_fid_inception(torch, torchvision, fid_inception):
  """pytorch_fid.inception.fid_inception_v3 without the download: seeded weights instead."""
  model = torchvision.models.inception_v3(
    num_classes=reference.NUM_CLASSES, aux_logits=False, init_weights=False, weights=None
  )
  model.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
  model.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
  model.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
  model.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
  model.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
  model.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
  model.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
  model.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
  model.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
  state = {k: torch.from_numpy(v) for k, v in reference.state_dict().items()}
  # Every key of the torch model must be in the seeded dict, with its shape (a wrong shape raises
  # even with strict=False), and no extra keys; only num_batches_tracked may be absent.
  result = model.load_state_dict(state, strict=False)
  missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
  if missing or result.unexpected_keys:
    raise RuntimeError(
      f"seeded weights do not match the FID Inception: missing {missing}, "
      f"unexpected {result.unexpected_keys}"
    )
  return model


def main() -> None:
  import pytorch_fid  # pylint: disable=g-import-not-at-top
  import pytorch_fid.inception as fid_inception  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  fid_inception.fid_inception_v3 = lambda: build_fid_inception(torch, torchvision, fid_inception)
  model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  model64 = fid_inception.InceptionV3([3]).double().eval()

  out: dict[str, np.ndarray] = {
    "torch_version": np.array(torch.__version__),
    "torchvision_version": np.array(torchvision.__version__),
    "pytorch_fid_version": np.array(pytorch_fid.__version__),
    "numpy_version": np.array(np.__version__),
    "seed": np.array(reference.GOLDEN_SEED),
    "cases": np.array(list(reference.CASES)),
  }
  with torch.no_grad():
    for name in reference.CASES:
      x = reference.images(name)
      t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
      features = model(t)[0].reshape(x.shape[0], 2048)
      features64 = model64(t.double())[0].reshape(x.shape[0], 2048)
      resized = F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False)
      out[f"{name}/digest"] = np.array(reference.images_digest(x))
      out[f"{name}/features"] = features.numpy()
      out[f"{name}/resized"] = resized.permute(0, 2, 3, 1).numpy()[
        :, ::RESIZED_STRIDE, ::RESIZED_STRIDE
      ]
      err = float((features.double() - features64).abs().max())
      print(
        f"{name}: input {x.shape}, features mean {float(features.mean()):.4f} "
        f"std {float(features.std()):.4f} max {float(features.max()):.4f}; "
        f"float32 vs float64 reference max diff {err:.2e}"
      )

  path = os.path.join(HERE, "inception_golden.npz")
  np.savez_compressed(path, **out)
  print(
    f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB) with torch {torch.__version__}, "
    f"torchvision {torchvision.__version__}, pytorch-fid {pytorch_fid.__version__}"
  )


if __name__ == "__main__":
  main()

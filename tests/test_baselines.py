"""Baseline restorers: one interface, exact OpenCV interpolation, Real-ESRGAN to 8x and 16x."""

import cv2
import jax
import numpy as np
import pytest

from zipir_jax import baselines
from zipir_jax.models import rrdbnet

# (LQ H, LQ W) non-square and odd on purpose.
LQ_SIZES = [(7, 11), (16, 9)]


def _lq(shape, dtype=np.uint8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, shape).astype(np.uint8)
  return x if dtype == np.uint8 else x.astype(dtype) / 255.0


@pytest.fixture(scope="module")
def tiny_restorer_parts():
  """A small random x4 RRDBNet whose output mostly stays in [0, 1] (so clipping hides little)."""
  model = rrdbnet.RRDBNet(num_feat=8, num_grow_ch=4, num_block=1)
  # numpy weights of the right shapes: jax.random initialisers compile slowly on CPU.
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
    lambda s: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32),
    shapes,
  )
  last = variables["params"]["conv_last"]
  last["kernel"] = last["kernel"] * 0.1
  last["bias"] = np.full_like(last["bias"], 0.5)
  return model, variables


@pytest.fixture(scope="module")
def tiny_restorer(tiny_restorer_parts):
  model, variables = tiny_restorer_parts
  return baselines.RealESRGANRestorer(model=model, variables=variables)


@pytest.mark.parametrize(
  "name,flag", [("bicubic", cv2.INTER_CUBIC), ("lanczos", cv2.INTER_LANCZOS4)]
)
def test_interpolation_equals_opencv(name, flag):
  lq = _lq((13, 17, 3))
  restorer = baselines.make_restorer(name)
  assert restorer.name == name
  out = restorer(lq, (104, 136))
  expected = np.clip(
    cv2.resize(lq.astype(np.float32) / 255.0, (136, 104), interpolation=flag), 0.0, 1.0
  )
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, expected)
  # Cubic kernels overshoot on random pixels; the output is clipped, not rescaled.
  raw = cv2.resize(lq.astype(np.float32) / 255.0, (136, 104), interpolation=flag)
  assert raw.min() < 0.0 or raw.max() > 1.0


@pytest.mark.parametrize("name", ["bicubic", "lanczos"])
@pytest.mark.parametrize("lq_size", LQ_SIZES)
@pytest.mark.parametrize("factor", [8, 16])
def test_interpolation_shapes_and_range(name, lq_size, factor):
  restorer = baselines.make_restorer(name)
  out_size = (lq_size[0] * factor, lq_size[1] * factor)
  for lq in (_lq((*lq_size, 3)), _lq((2, *lq_size, 3), np.float64)):
    out = restorer(lq, out_size)
    assert out.shape == lq.shape[:-3] + out_size + (3,)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
  # A batch gives the same images as one at a time.
  batch = _lq((2, *lq_size, 3), seed=1)
  np.testing.assert_array_equal(restorer(batch, out_size)[1], restorer(batch[1], out_size))


@pytest.mark.parametrize("lq_size", LQ_SIZES)
@pytest.mark.parametrize("factor", [8, 16])
def test_realesrgan_resizes_the_rest_of_the_way(tiny_restorer, lq_size, factor):
  """The x4 network output, then bicubic to out_size (the packaged net: test_realesrgan.py)."""
  restorer = tiny_restorer
  lq = _lq((2, *lq_size, 3))
  out_size = (lq_size[0] * factor, lq_size[1] * factor)
  out = restorer(lq, out_size)
  assert out.shape == (2, *out_size, 3) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  x4 = np.clip(restorer.network_output(lq.astype(np.float32) / 255.0), 0.0, 1.0)
  assert ((x4 > 0) & (x4 < 1)).mean() > 0.05  # Not saturated: the comparison below means something.
  for i in range(2):
    expected = np.clip(cv2.resize(x4[i], out_size[::-1], interpolation=cv2.INTER_CUBIC), 0, 1)
    np.testing.assert_allclose(out[i], expected, atol=1e-5)
  # HWC in, HWC out; any out_size, including ones that are not multiples and shrink.
  assert restorer(lq[:1], (50, 70)).shape == (1, 50, 70, 3)
  assert restorer(lq[0], (lq_size[0] * 2, lq_size[1] * 2)).shape == (*(2 * s for s in lq_size), 3)


def test_realesrgan_tiles_match_whole_image(tiny_restorer_parts, tiny_restorer):
  model, variables = tiny_restorer_parts
  x = _lq((1, 61, 67, 3), np.float32)
  whole = tiny_restorer.upscale(x)
  # The tiny net sees at most ~19 LQ pixels away, so 19 pixels of context make tiles exact ...
  tiled = baselines.RealESRGANRestorer(model=model, variables=variables, tile=12, tile_pad=19)
  assert tiled.upscale(x).shape == whole.shape == (1, 244, 268, 3)
  np.testing.assert_allclose(tiled.upscale(x), whole, atol=1e-5)
  # ... and 2 pixels do not (so the tiles really were separate calls).
  short = baselines.RealESRGANRestorer(model=model, variables=variables, tile=12, tile_pad=2)
  assert np.abs(short.upscale(x) - whole).max() > 1e-3


def test_tile_windows_cover_each_axis_once():
  for size, tile, pad in [(61, 12, 19), (67, 12, 2), (10, 12, 4), (48, 16, 8)]:
    window, tiles = baselines.tile_windows(size, tile, pad)
    covered = np.zeros(size, int)
    for start, end, window_start in tiles:
      covered[start:end] += 1
      assert 0 <= window_start <= start and end <= window_start + window <= size
    assert (covered == 1).all()


def test_factory_and_input_errors():
  assert isinstance(baselines.make_restorer("lanczos"), baselines.LanczosRestorer)
  with pytest.raises(
    ValueError, match="unknown restorer 'esrgan'; valid names: bicubic, lanczos, realesrgan"
  ):
    baselines.make_restorer("esrgan")
  with pytest.raises(TypeError):
    baselines.make_restorer("bicubic", tile=64)
  model = rrdbnet.RRDBNet()
  with pytest.raises(ValueError, match="model and variables together"):
    baselines.make_restorer("realesrgan", model=model)
  bicubic = baselines.BicubicRestorer()
  with pytest.raises(ValueError, match=r"must be in \[0, 1\].*\(x \+ 1\) / 2"):
    bicubic(np.full((4, 4, 3), -0.5, np.float32), (8, 8))
  with pytest.raises(TypeError, match="uint8 or float"):
    bicubic(np.zeros((4, 4, 3), np.int32), (8, 8))
  with pytest.raises(ValueError, match="HWC image or an NHWC batch"):
    bicubic(np.zeros((4, 4), np.uint8), (8, 8))
  with pytest.raises(ValueError, match="out_size must be"):
    bicubic(np.zeros((4, 4, 3), np.uint8), (8, 0))

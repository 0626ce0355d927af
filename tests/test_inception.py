"""FID Inception port: agreement with pytorch-fid (golden file), resize, converter, feature_fn."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_golden_module

from zipir_jax.models import inception

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"
GOLDEN_FILE = GOLDEN_DIR / "inception_golden.npz"


reference = load_golden_module("inception_reference_weights")


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN_FILE) as data:
    return dict(data)


@pytest.fixture(scope="module")
def state_dict(golden):
  return reference.state_dict(int(golden["seed"]))


@pytest.fixture(scope="module")
def variables(state_dict):
  return jax.tree_util.tree_map(jnp.asarray, inception.convert(state_dict))


def _images(golden, name):
  x = reference.images(name)
  assert reference.images_digest(x) == str(golden[f"{name}/digest"]), (
    "the seeded test images differ from those the golden file was made from (numpy's RNG "
    "changed?); regenerate with tests/golden/make_inception_golden.py"
  )
  return x


_apply = jax.jit(inception.FIDInceptionV3().apply)


@pytest.mark.parametrize("name", list(reference.CASES))
def test_resize_matches_torch_bilinear_without_antialias(golden, name):
  x = _images(golden, name)
  resized = np.asarray(jax.jit(inception.resize_for_inception)(x))
  assert resized.shape == (x.shape[0], 299, 299, 3)
  np.testing.assert_allclose(resized[:, ::7, ::7], golden[f"{name}/resized"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(reference.CASES))
def test_matches_pytorch_fid_reference(golden, variables, name):
  """Whole path: resize (up, none, down) -> [-1, 1] -> network -> pool3, vs pytorch-fid."""
  features = np.asarray(_apply(variables, _images(golden, name)))
  want = golden[f"{name}/features"]
  assert features.shape == want.shape == (reference.CASES[name][0], inception.FEATURE_DIM)
  # Observed: 2e-6 (the torch float32 reference is itself 1.4e-6 from float64).
  np.testing.assert_allclose(features, want, rtol=0, atol=1e-4)
  assert np.std(want) > 0.5  # Features are O(1) and varied, so 1e-4 is a tight check.


def test_feature_fn_pads_batches_and_takes_uint8(golden, variables):
  x = _images(golden, "up64x80")
  feature_fn = inception.make_feature_fn(variables, batch_size=3)
  from_uint8 = feature_fn(np.round(x * 255).astype(np.uint8))  # Padded from 2 to 3 images.
  assert from_uint8.shape == (2, 2048) and from_uint8.dtype == np.float32
  np.testing.assert_allclose(from_uint8, golden["up64x80/features"], rtol=0, atol=1e-4)
  single = feature_fn(x[1:])  # Same padded shape: no recompile of the network.
  np.testing.assert_allclose(single, from_uint8[1:], rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="larger than batch_size=3"):
    feature_fn(np.zeros((4, 64, 80, 3), np.float32))


def test_rejects_non_rgb_input(variables):
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\).*\(1, 64, 64, 1\)"):
    jax.eval_shape(_apply, variables, jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32))


def test_batch_norm_is_folded_into_the_conv(state_dict, variables):
  prefix = "Mixed_6c.branch7x7_2"
  params = variables["params"]["Mixed_6c"]["branch7x7_2"]["conv"]
  w = state_dict[f"{prefix}.conv.weight"].astype(np.float64)
  g, b, m, v = (
    state_dict[f"{prefix}.bn.{k}"].astype(np.float64)
    for k in ("weight", "bias", "running_mean", "running_var")
  )
  scale = g / np.sqrt(v + 1e-3)
  assert params["kernel"].shape == (1, 7, 160, 160)  # HWIO of a (1, 7) conv.
  np.testing.assert_allclose(params["kernel"][0, 4, 11, 5], w[5, 11, 0, 4] * scale[5], rtol=1e-6)
  np.testing.assert_allclose(params["bias"], b - m * scale, rtol=1e-5, atol=1e-7)
  n_convs = len(inception.basic_conv_paths(variables))
  assert n_convs == len(reference.BASIC_CONVS) == 94


def test_converter_errors_name_key_and_shapes(state_dict):
  missing = dict(state_dict)
  del missing["Mixed_7c.branch_pool.bn.running_var"]
  with pytest.raises(KeyError, match=r"Mixed_7c\.branch_pool\.bn\.running_var.*\(192,\)"):
    inception.convert(missing)
  wrong = dict(state_dict, **{"Mixed_5b.branch5x5_2.conv.weight": np.zeros((64, 48, 3, 3))})
  with pytest.raises(
    ValueError,
    match=r"Mixed_5b\.branch5x5_2\.conv\.weight.*\(64, 48, 3, 3\)"
    r".*\(64, 48, 5, 5\)",
  ):
    inception.convert(wrong)
  imagenet = dict(state_dict, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(ValueError, match=r"fc\.weight.*\(1000, 2048\).*\(1008, 2048\)"):
    inception.convert(imagenet)
  aux = dict(state_dict, **{"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1))})
  with pytest.raises(ValueError, match=r"AuxLogits.*torchvision's ImageNet"):
    inception.convert(aux)
  prefixed = {f"module.{k}": v for k, v in state_dict.items()}
  with pytest.raises(KeyError, match=r"missing key 'Conv2d_1a_3x3\.conv\.weight'"):
    inception.convert(prefixed)
  extra = dict(state_dict, **{"Mixed_5b.extra.weight": np.zeros(3)})
  with pytest.raises(ValueError, match=r"unexpected keys \['Mixed_5b\.extra\.weight'\]"):
    inception.convert(extra)


def test_load_reads_a_weight_file(tmp_path, state_dict, variables):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  path = tmp_path / "pt_inception.safetensors"
  tracked = {
    k.replace("running_var", "num_batches_tracked"): np.zeros((), np.int64)
    for k in state_dict
    if k.endswith("running_var")
  }
  safetensors.numpy.save_file(dict(state_dict, **tracked), str(path))
  jax.tree_util.tree_map(np.testing.assert_array_equal, inception.load(path), variables)
  with pytest.raises(FileNotFoundError, match=r"missing.pth"):
    inception.load(tmp_path / "missing.pth")

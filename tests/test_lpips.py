"""LPIPS-VGG port: agreement with the torch reference (golden file), invariants, converters."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_golden_module

from zipir_jax import weights as weights_lib
from zipir_jax.models import lpips

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"


reference = load_golden_module("lpips_reference_weights")


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN_DIR / "lpips_golden.npz") as data:
    return dict(data)


@pytest.fixture(scope="module")
def vgg_state_dict():
  return reference.vgg16_state_dict(int(np.load(GOLDEN_DIR / "lpips_golden.npz")["seed"]))


@pytest.fixture(scope="module")
def heads_state_dict():
  return weights_lib.load_torch_state_dict(weights_lib.lpips_heads_path())


@pytest.fixture(scope="module")
def variables(vgg_state_dict, heads_state_dict):
  return jax.tree_util.tree_map(jnp.asarray, lpips.convert(vgg_state_dict, heads_state_dict))


_apply = jax.jit(lambda v, x0, x1: lpips.LPIPS().apply(v, x0, x1, per_tap=True))


def _case(golden, name):
  return (
    reference.decode_images(golden[f"{name}/x0"]),
    reference.decode_images(golden[f"{name}/x1"]),
  )


@pytest.mark.parametrize("name", ["sq64", "rect48x80", "odd37x53"])
def test_matches_torch_reference(golden, variables, name):
  x0, x1 = _case(golden, name)
  distance, taps = _apply(variables, x0, x1)
  want = golden[f"{name}/distance"]
  assert distance.shape == want.shape == (x0.shape[0],)
  np.testing.assert_allclose(distance, want, rtol=0, atol=1e-5)
  # Distances span 1e-3..0.2, so check relative agreement too (observed: ~3e-7).
  np.testing.assert_allclose(distance, want, rtol=1e-5, atol=0)
  np.testing.assert_allclose(np.stack(taps, axis=1), golden[f"{name}/per_tap"], rtol=0, atol=1e-5)


def test_identical_inputs_give_zero_and_distance_is_symmetric(golden, variables):
  x0, x1 = _case(golden, "odd37x53")  # Same shape as a golden case: no extra compilation.
  same, _ = _apply(variables, x0, x0)
  # Not bit-exact: XLA may round the two halves of the stacked batch differently (~1e-16).
  np.testing.assert_allclose(same, np.zeros(x0.shape[0], np.float32), rtol=0, atol=1e-10)
  swapped, _ = _apply(variables, x1, x0)
  np.testing.assert_allclose(swapped, golden["odd37x53/distance"], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", [(1, 16, 16, 3), (3, 17, 31, 3), (2, 45, 23, 3)])
def test_output_shape_for_odd_sizes(variables, shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  out = jax.eval_shape(lambda v, a, b: lpips.LPIPS().apply(v, a, b), variables, x, x)
  assert out.shape == (shape[0],) and out.dtype == jnp.float32


def test_rejects_too_small_or_mismatched_inputs(variables):
  small = jax.ShapeDtypeStruct((1, 15, 32, 3), jnp.float32)
  with pytest.raises(ValueError, match="at least 16x16"):
    jax.eval_shape(lambda v, a: lpips.LPIPS().apply(v, a, a), variables, small)
  a = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  b = jax.ShapeDtypeStruct((1, 32, 16, 3), jnp.float32)
  with pytest.raises(ValueError, match="equal shape"):
    jax.eval_shape(lambda v, a, b: lpips.LPIPS().apply(v, a, b), variables, a, b)


def test_normalize_channels_matches_lpips_and_has_finite_gradient_at_zero():
  x = jnp.array([[[[3.0, 4.0], [0.0, 0.0]]]])  # One pixel with norm 5, one all-zero pixel.
  np.testing.assert_allclose(lpips.normalize_channels(x)[0, 0, 0], [3 / (5 + 1e-10), 4 / 5])
  np.testing.assert_array_equal(lpips.normalize_channels(x)[0, 0, 1], [0.0, 0.0])
  grad = jax.grad(lambda v: jnp.sum(jnp.square(lpips.normalize_channels(v) - 0.5)))(x)
  assert np.all(np.isfinite(grad))


def test_heads_are_converted_to_dense_kernels(heads_state_dict):
  params = lpips.convert_heads(heads_state_dict)
  for k, channels in enumerate(lpips.TAP_CHANNELS):
    kernel = params[f"lin{k}"]["kernel"]
    assert kernel.shape == (channels, 1)
    np.testing.assert_array_equal(kernel[:, 0], heads_state_dict[f"lin{k}.model.1.weight"].ravel())


def test_vgg_converter_accepts_lpips_slice_naming(vgg_state_dict):
  slices = {idx: 1 + sum(idx >= s for s in (4, 9, 16, 23)) for idx in range(30)}
  renamed = {}
  for key, value in vgg_state_dict.items():
    _, idx, leaf = key.split(".")
    renamed[f"net.slice{slices[int(idx)]}.{idx}.{leaf}"] = value
  want = lpips.convert_vgg16(vgg_state_dict)
  got = lpips.convert_vgg16(renamed)
  assert list(got) == lpips.conv_names()
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  # OIHW -> HWIO.
  np.testing.assert_array_equal(
    got["conv2_1"]["kernel"][1, 2, 5, 7], vgg_state_dict["features.5.weight"][7, 5, 1, 2]
  )


def test_converter_errors_name_the_key_and_shapes(vgg_state_dict, heads_state_dict):
  missing = dict(vgg_state_dict)
  del missing["features.19.bias"]
  with pytest.raises(KeyError, match=r"features\.19\.bias.*\(512,\)"):
    lpips.convert_vgg16(missing)
  wrong = dict(vgg_state_dict)
  wrong["features.7.weight"] = np.zeros((128, 128, 1, 1), np.float32)
  with pytest.raises(
    ValueError, match=r"features\.7\.weight.*\(128, 128, 1, 1\).*\(128, 128, 3, 3\)"
  ):
    lpips.convert_vgg16(wrong)
  heads = dict(heads_state_dict)
  del heads["lin3.model.1.weight"]
  with pytest.raises(KeyError, match=r"lin3\.model\.1\.weight"):
    lpips.convert_heads(heads)
  heads = dict(heads_state_dict, **{"lin0.model.1.weight": np.zeros((1, 32, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"lin0\.model\.1\.weight.*\(1, 32, 1, 1\).*\(1, 64, 1, 1\)"):
    lpips.convert_heads(heads)


def test_load_reads_trunk_file_and_default_heads(tmp_path, vgg_state_dict, variables):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  path = tmp_path / "vgg16.safetensors"
  safetensors.numpy.save_file(
    dict(vgg_state_dict, **{"classifier.0.bias": np.zeros(4096, np.float32)}), str(path)
  )
  loaded = lpips.load(path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)


def test_perceptual_loss_from_config_reads_the_files(tmp_path, golden, vgg_state_dict):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  from zipir_jax import config_lib, errors, losses  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config("configs/tiny.py")
  assert losses.perceptual_from_config(config.loss) is None  # lpips_weight=0: LPIPS term off
  path = tmp_path / "vgg16.safetensors"
  safetensors.numpy.save_file(vgg_state_dict, str(path))
  config_lib.apply_overrides(config, {"loss.lpips_vgg16": str(path), "loss.lpips_weight": 1.0})
  perceptual = losses.perceptual_from_config(config.loss)
  x0, x1 = _case(golden, "odd37x53")
  np.testing.assert_allclose(perceptual(x0, x1), golden["odd37x53/distance"], rtol=0, atol=1e-5)
  config_lib.apply_overrides(config, {"loss.lpips_vgg16": str(tmp_path / "missing.pth")})
  with pytest.raises(errors.ConfigError, match=r"missing\.pth' does not exist"):
    losses.perceptual_from_config(config.loss)

"""D_f* (§3.1): identical to D_f at initialisation, extractor initialised from E_f; training it
improves on D_f."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fast_jit, jitted_apply, perturbed

from zipir_jax import config_lib, demo
from zipir_jax.data import eval_presets
from zipir_jax.models import autoencoder
from zipir_jax.models.pixel_decoder import init_from_autoencoder
from zipir_jax.training import state as state_lib
from zipir_jax.training import steps

SHAPE = (2, 64, 96, 3)

# Shares the session fixture it needs with the other files of this group on one xdist worker.
pytestmark = pytest.mark.xdist_group("tiny_lpvae")


@pytest.fixture(scope="module")
def setup(tiny_config, tiny_lpvae):
  vae, vae_params = tiny_lpvae
  vae_params = perturbed(vae_params, 1)
  hq = jax.random.uniform(jax.random.key(2), SHAPE, minval=-1, maxval=1)
  lq = jax.random.uniform(jax.random.key(3), SHAPE, minval=-1, maxval=1)
  z, _ = jitted_apply(vae, "encode")(vae_params, hq)
  pdec = autoencoder.build_pixel_decoder(tiny_config)
  fresh = flax.linen.meta.unbox(jax.jit(pdec.init)(jax.random.key(4), z, lq))["params"]
  params = init_from_autoencoder(fresh, vae_params["fine_encoder"], vae_params["fine_decoder"])
  return vae, vae_params, pdec, fresh, params, z, lq


@pytest.fixture(scope="module")
def run(setup):
  """D_f (``decode(params, z)``) and D_f* (``pixel_decode(params, z, lq, fusion_weight)``), jitted."""
  vae, _, pdec, *_ = setup
  decode, jitted = jitted_apply(vae, "decode"), jitted_apply(pdec)

  def pixel_decode(p, z, lq, fusion_weight=1.0):
    return jitted(p, z, lq, jnp.float32(fusion_weight))  # traced, as restore passes it

  return decode, pixel_decode


def test_equals_plain_decoder_at_init(setup, run):
  _, vae_params, _, _, params, z, lq = setup
  decode, pixel_decode = run
  np.testing.assert_array_equal(pixel_decode(params, z, lq), decode(vae_params, z))


def test_extractor_params_are_e_f(setup):
  _, vae_params, _, _, params, _, _ = setup
  flat_e = flax.traverse_util.flatten_dict(vae_params["fine_encoder"])
  flat_x = flax.traverse_util.flatten_dict(params["extractor"])
  assert flat_x and set(flat_x) <= set(flat_e)
  for key, value in flat_x.items():
    np.testing.assert_array_equal(value, flat_e[key])
  # The extractor stops at the last level: E_f's middle block and conv_out have no role there.
  assert "conv_out" not in params["extractor"] and "mid_block_1" not in params["extractor"]


def test_fusion_layers_exist_at_every_level_and_act_once_trained(setup, run, tiny_config):
  _, vae_params, _, _, params, z, lq = setup
  decode, pixel_decode = run
  levels = tiny_config.pixel_decoder.fusion_levels
  assert {f"up_{i}_fusion" for i in levels} <= set(params["decoder"])
  # Any non-zero fusion weights must change the output ...
  fusion = {k: v for k, v in params["decoder"].items() if k.endswith("_fusion")}
  trained = {**params, "decoder": {**params["decoder"], **perturbed(fusion, 7, scale=0.005)}}
  out = pixel_decode(trained, z, lq)
  base = pixel_decode(trained, z, lq, 0.0)
  assert np.abs(out - base).max() > 1e-3
  # ... and depend on the LQ image, which the plain decoder never sees.
  out2 = pixel_decode(trained, z, -lq)
  assert np.abs(out - out2).max() > 1e-3
  # fusion_weight = 0 is exactly the decoder without injections.
  np.testing.assert_array_equal(base, decode(vae_params, z))


def test_mismatched_autoencoder_is_refused(setup):
  _, vae_params, _, fresh, _, _, _ = setup
  other = config_lib.load_config("configs/tiny.py")
  with other.unlocked():
    other.vae.ch = 8
  vae = autoencoder.build_autoencoder(other)
  small = jax.eval_shape(lambda: autoencoder.init_autoencoder(vae, jax.random.key(0), SHAPE))
  with pytest.raises(ValueError, match=r"conv_in/(kernel|bias) has shape .* but (E_f|D_f)'s"):
    init_from_autoencoder(fresh, small["fine_encoder"], small["fine_decoder"])
  with pytest.raises(KeyError, match="no counterpart"):
    init_from_autoencoder(fresh, {}, vae_params["fine_decoder"])


def test_requires_matching_lq(setup):
  _, _, pdec, _, params, z, lq = setup
  with pytest.raises(ValueError, match="does not match LQ image"):
    pdec.apply({"params": params}, z, lq[:, :32])
  with pytest.raises(ValueError, match="multiples of 32"):
    pdec.apply({"params": params}, z, jnp.zeros((2, 60, 96, 3)))


def test_bf16_decoder_keeps_bf16_activations(tiny_config, setup):
  """Every block of a bf16 D_f* hands bf16 on, also with a float32 array fusion weight (as
  restore passes it): a float32 full-resolution copy ran an 8192² decode out of memory."""
  *_, params, z, lq = setup
  pdec = autoencoder.build_pixel_decoder(tiny_config).clone(dtype=jnp.bfloat16)
  seen = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    name = context.module.name or ""
    if context.method_name == "__call__" and any(k in name for k in ("block", "sample", "fusion")):
      seen.append((name, jnp.dtype(out.dtype)))
    return out

  with flax.linen.intercept_methods(record):  # dtypes only: tracing is enough
    out = jax.eval_shape(lambda: pdec.apply({"params": params}, z, lq, jnp.float32(0.5)))
  assert out.dtype == jnp.float32  # the image leaves conv_out in float32
  assert any(name.endswith("_fusion") for name, _ in seen)
  assert {dtype for _, dtype in seen} == {jnp.dtype(jnp.bfloat16)}, seen


def _grow_residual_stream(decoder: dict, k: float) -> dict:
  """The same D_f with its residual stream ``k`` times larger: conv_in, each residual branch's last
  conv and the biases added to the stream scale by ``k``; every other layer reads the stream through
  a GroupNorm, so the output does not change. Trained decoders grow their stream like this (the
  demo's tiny D_f after 250 steps: RMS 835 at full resolution); freshly initialised ones do not."""
  flat = flax.traverse_util.flatten_dict(decoder)
  for (*module, leaf), value in flat.items():
    name = "/".join(module)
    to_stream = name == "conv_in" or name.endswith("/conv2")
    stream_bias = leaf == "bias" and name.endswith(("nin_shortcut", "upsample/conv"))
    if to_stream or stream_bias:
      flat[(*module, leaf)] = value * k
  return flax.traverse_util.unflatten_dict(flat)


def _fit_output_layer(vae, decoder: dict, z, target) -> dict:
  """D_f with ``conv_out`` refitted by least squares to decode ``z`` as ``target``: a decoder at an
  optimum for its data, as trained ones are near (a random one has nothing to lose)."""
  _, inner = jax.jit(
    lambda d: vae.apply(
      {"params": {"fine_decoder": d}}, z, method="decode", capture_intermediates=True
    )
  )(decoder)
  (features,) = inner["intermediates"]["fine_decoder"]["norm_out"]["__call__"]
  x = np.asarray(jax.nn.swish(features))
  b, h, w, c = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # conv_out: 3x3, SAME
  windows = [padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)]
  columns = np.concatenate(windows + [np.ones((b, h, w, 1), x.dtype)], axis=-1)
  weights = np.linalg.lstsq(columns.reshape(-1, 9 * c + 1), target.reshape(-1, 3), rcond=None)[0]
  conv_out = {"kernel": weights[:-1].reshape(3, 3, c, 3), "bias": weights[-1]}
  return {**decoder, "conv_out": jax.tree.map(jnp.asarray, conv_out)}


def test_training_improves_on_d_f_from_the_first_update(tiny_lpvae):
  """Stage pixel_decoder on a fixed batch: no update takes the L1 to HQ above D_f's, and a short
  run ends well below it. D_f here fits its data and has a trained decoder's residual stream: when
  the fusion layers read that stream raw, the first updates swung every level's modulation to ±1
  and D_f* fell below D_f (issue #17)."""
  config = config_lib.load_config("configs/tiny.py:pixel_decoder")
  models = state_lib.build_models(config)
  vae, params = tiny_lpvae
  hq = np.stack(
    [demo.center_crop(demo.load_photo("skimage", n), 64) for n in ("astronaut", "coffee")]
  )
  lq_up = np.stack([eval_presets.make_eval_pair(x, "sr8", 0)[1] for x in hq])
  batch = {"hq": hq / 127.5 - 1.0, "lq_up": lq_up / 127.5 - 1.0}
  batch = {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}
  z, _ = jitted_apply(vae, "encode")(params, batch["hq"])
  decoder = _grow_residual_stream(params["fine_decoder"], 500.0)
  np.testing.assert_allclose(
    jitted_apply(vae, "decode")({"fine_decoder": decoder}, z),
    jitted_apply(vae, "decode")(params, z),
    atol=1e-4,
  )
  decoder = _fit_output_layer(vae, decoder, z, np.asarray(batch["hq"]))
  prerequisites = {k: params[k] for k in ("coarse_encoder", "fine_encoder")}
  prerequisites["fine_decoder"] = decoder
  state = fast_jit(lambda rng: state_lib.init_state(models, rng, prerequisites))(jax.random.key(1))
  train_step = fast_jit(functools.partial(steps.train_step, models=models))
  l1 = []  # the step's nll (L1; no LPIPS weights here) is that of the parameters it starts from
  for _ in range(11):
    state, metrics = train_step(state, batch)
    l1.append(float(metrics["nll"]))
  assert max(l1[1:]) <= l1[0], l1  # l1[0]: D_f's own (D_f* == D_f at initialisation)
  assert l1[-1] < 0.8 * l1[0], l1

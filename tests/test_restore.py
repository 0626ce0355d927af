"""Restoration path (restore.py) and the checkpoint bundle: shapes, determinism, colour fixes, errors."""

import gc
import json
import shutil
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zipir_jax import bundle as bundle_lib
from zipir_jax import restore

# Shares the session fixture it needs with the other files of this group on one xdist worker.
pytestmark = pytest.mark.xdist_group("tiny_bundle")


@pytest.fixture(scope="module")
def restorer(tiny_bundle_dir):
  return restore.Restorer(bundle_lib.load_bundle(str(tiny_bundle_dir)))


def _lq(seed, shape=(21, 30, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_bundle_round_trip(tiny_config, tiny_bundle, tiny_bundle_dir):
  loaded = bundle_lib.load_bundle(str(tiny_bundle_dir))
  jax.tree.map(
    np.testing.assert_array_equal, loaded.params, jax.tree.map(np.asarray, tiny_bundle.params)
  )
  jax.tree.map(
    np.testing.assert_array_equal,
    loaded.text_params,
    jax.tree.map(np.asarray, tiny_bundle.text_params),
  )
  assert loaded.config.to_dict() == json.loads(tiny_config.to_json())
  assert loaded.text_config.d_model == tiny_config.dit.text_dim


def test_odd_sizes_batch_and_seed(restorer):
  images = [_lq(0), _lq(1)]
  out = restorer.restore(images, restore.target_size((21, 30), scale=4), ["a cat", "a dog"])
  assert out.shape == (2, 84, 120, 3) and out.dtype == np.float32  # padded to 96x128, cropped back
  assert out.min() >= 0.0 and out.max() <= 1.0
  again = restorer.restore(images, (84, 120), ["a cat", "a dog"])
  np.testing.assert_array_equal(out, again)
  other = restorer.restore(images, (84, 120), ["a cat", "a dog"], restore.RestoreOptions(seed=1))
  assert not np.array_equal(out, other)
  # Non-square explicit size that is not a multiple of 32 either way.
  assert restorer.restore([_lq(2)], (50, 77)).shape == (1, 50, 77, 3)


def test_restorer_holds_one_device_copy_with_the_dit_in_the_compute_dtype(tiny_bundle_dir):
  bundle = bundle_lib.load_bundle(str(tiny_bundle_dir))  # host (numpy) arrays, float32
  with bundle.config.unlocked():
    bundle.config.dit.dtype = "bfloat16"
  kernels = {
    jax.tree_util.keystr(p): weakref.ref(x)
    for p, x in jax.tree_util.tree_leaves_with_path(bundle.params["dit"])
    if p[-1].key == "kernel"
  }
  restorer = restore.Restorer(bundle)
  del bundle
  gc.collect()
  # Nothing keeps the bundle's float32 DiT kernels alive: dropping the bundle frees them.
  assert kernels and not [k for k, ref in kernels.items() if ref() is not None]
  leaves = jax.tree_util.tree_leaves_with_path(restorer.params)
  assert all(isinstance(x, jax.Array) for _, x in leaves)  # on the device, transferred once
  dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in leaves}
  assert {k for k, d in dtypes.items() if d == jnp.bfloat16} == {
    "['dit']" + k for k in kernels
  }  # only the DiT's kernels, all of them
  assert set(dtypes.values()) == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}


def test_dropping_a_restorer_frees_its_device_weights(tiny_bundle_dir):
  """The jitted encode/decode/sampler programs close over networks, not over the Restorer: once
  it is dropped (after it ran, so every cache holds its programs) its weights leave the device."""
  restorer = restore.Restorer(bundle_lib.load_bundle(str(tiny_bundle_dir)))
  restorer.restore([_lq(0)], (84, 120), ["a cat"], restore.RestoreOptions(steps=2))
  weights = jax.tree.leaves(restorer.params)
  refs = [weakref.ref(x) for x in weights]
  held = sum(x.nbytes for x in weights)
  live = lambda: sum(x.nbytes for x in jax.live_arrays())
  before = live()
  del restorer, weights
  gc.collect()
  assert not [r for r in refs if r() is not None]
  assert before - live() >= held


def test_each_prompt_is_encoded_once(restorer, monkeypatch):
  from zipir_jax import text

  want_emb, want_mask = text.encode_prompts(
    ["a cat", "a dog", "a cat"],
    restorer.bundle.tokenizer,
    restorer.text_model,
    restorer.bundle.text_params,
    restorer.config.text.max_length,
  )
  calls = []
  encode = text.encode_prompts
  monkeypatch.setattr(text, "encode_prompts", lambda p, *a: calls.append(list(p)) or encode(p, *a))
  restorer._text_cache.clear()  # pylint: disable=protected-access
  emb, mask = restorer.encode_text(["a cat", "a dog", "a cat"])
  np.testing.assert_allclose(emb, want_emb, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(mask, want_mask)
  assert calls == [["a cat", "a dog", ""]]  # new prompts once each, padded to the batch size
  again, _ = restorer.encode_text(["a dog", "a cat", "a dog"])
  np.testing.assert_array_equal(again, emb[np.array([1, 0, 1])])
  restorer.encode_text(["a bird", "a cat", "a dog"])
  assert calls == [["a cat", "a dog", ""], ["a bird", "", ""]]


def test_refuses_mixed_sizes_tiny_images_and_bad_options(restorer):
  with pytest.raises(ValueError, match="one size"):
    restorer.restore([_lq(0), _lq(1, (20, 30, 3))], (84, 120))
  with pytest.raises(ValueError, match="too small"):
    restorer.restore([_lq(0, (4, 30, 3))], (16, 120))
  with pytest.raises(ValueError, match="unknown colour fix 'sepia'"):
    restorer.restore([_lq(0)], (84, 120), options=restore.RestoreOptions(color_fix="sepia"))
  with pytest.raises(ValueError, match="exactly one of scale"):
    restore.target_size((21, 30))
  with pytest.raises(ValueError, match="HxWx3"):
    restore.to_unit_float(np.zeros((8, 8), np.uint8))


def test_adain_color_fix_matches_reference_statistics():
  image = jax.random.normal(jax.random.key(0), (2, 40, 56, 3)) * 0.3 + 0.2
  reference = jax.random.uniform(jax.random.key(1), (2, 40, 56, 3), minval=-1, maxval=0.5)
  fixed = restore.adain_color_fix(image, reference)
  np.testing.assert_allclose(fixed.mean((1, 2)), reference.mean((1, 2)), atol=1e-5)
  np.testing.assert_allclose(fixed.std((1, 2)), reference.std((1, 2)), rtol=1e-3)


def test_wavelet_color_fix_keeps_detail_and_takes_reference_colour():
  x = jax.random.uniform(jax.random.key(0), (1, 64, 80, 3), minval=-1, maxval=1)
  high, low = restore.wavelet_decomposition(x)
  np.testing.assert_allclose(high + low, x, atol=1e-5)
  # A colour cast (a constant shift) lives entirely in the low band: the fix removes it.
  reference = x
  cast = x + jnp.array([0.3, -0.2, 0.1])
  np.testing.assert_allclose(restore.wavelet_color_fix(cast, reference), x, atol=1e-5)
  # Detail of the restored image survives: its high band is unchanged.
  other = jax.random.uniform(jax.random.key(1), x.shape, minval=-1, maxval=1)
  fixed = restore.wavelet_color_fix(other, reference)
  np.testing.assert_allclose(
    restore.wavelet_decomposition(other)[0] + restore.wavelet_decomposition(reference)[1],
    fixed,
    atol=1e-6,
  )
  assert (
    np.abs(restore.wavelet_decomposition(fixed)[1] - restore.wavelet_decomposition(other)[1]).max()
    > 0.01
  )


@pytest.mark.parametrize("period, bands", [(2, {0}), (32, {3, 4})])
def test_wavelet_bands_sum_to_the_image_and_sort_detail_by_scale(period, bands):
  """Stripes land in the bands of their width: the learning bench's per-band errors rely on it."""
  stripes = jnp.cos(2 * jnp.pi * jnp.arange(128) / period)  # period 2: alternating pixels
  x = jnp.broadcast_to(stripes[None, None, :, None], (1, 64, 128, 3)) + 0.25
  out = restore.wavelet_bands(x)
  assert len(out) == 6
  np.testing.assert_allclose(sum(out), x, atol=1e-5)
  energy = np.array([float(jnp.mean(jnp.square(b[:, :, 40:88]))) for b in out[:-1]])  # no edges
  assert set(np.argsort(energy)[-len(bands) :]) == bands, energy
  assert energy[sorted(bands)].sum() > 0.9 * energy.sum(), energy
  np.testing.assert_allclose(out[-1][:, :, 40:88], 0.25, atol=0.02)  # the low band: the mean


def test_plain_decoder_swap_decodes_with_d_f(
  tiny_bundle, tiny_lpvae, tiny_vae_fine_export, tmp_path
):
  """The "w/o pixel-aware decoder" ablation: the bundle's DiT and latents, decoded by D_f."""
  import orbax.checkpoint as ocp

  plain = bundle_lib.with_plain_decoder(tiny_bundle, str(tiny_vae_fine_export))
  assert tuple(plain.config.pixel_decoder.fusion_levels) == ()
  assert tuple(tiny_bundle.config.pixel_decoder.fusion_levels)  # the original is untouched
  assert set(plain.params["pixel_decoder"]) == {"decoder"}
  restorer = restore.Restorer(plain)
  z = jax.random.normal(jax.random.key(0), (1, 2, 3, 64))
  lq = jax.random.uniform(jax.random.key(1), (1, 64, 96, 3), minval=-1, maxval=1)
  export = ocp.StandardCheckpointer().restore(str(tiny_vae_fine_export / "params"))
  vae = tiny_lpvae[0]
  want = vae.apply({"params": {"fine_decoder": export["fine_decoder"]}}, z, method="decode")
  # (The export's D_f is a perturbed copy, far from the decoder inside the bundle's D_f*.)
  np.testing.assert_allclose(
    restorer.decode(restorer.params, z, lq, jnp.float32(1.0)), want, atol=1e-5
  )

  # Refused: no export there, an export without D_f, D_f from another run (other statistics).
  with pytest.raises(bundle_lib.BundleError, match=r"no training export there.*vae_fine"):
    bundle_lib.with_plain_decoder(tiny_bundle, str(tmp_path / "nope"))
  stats = export["latent_stats"]
  for name, params, match in (
    ("pd", {"pixel_decoder": {"x": np.zeros(1)}, "latent_stats": stats}, "has no fine_decoder"),
    (
      "other",
      {
        "fine_decoder": export["fine_decoder"],
        "latent_stats": {"mean": stats["mean"] + 1, "std": stats["std"]},
      },
      "another training run",
    ),
  ):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(tmp_path / name / "params"), params)
    checkpointer.wait_until_finished()
    with pytest.raises(bundle_lib.BundleError, match=match):
      bundle_lib.with_plain_decoder(tiny_bundle, str(tmp_path / name))


def test_missing_and_mismatched_bundles(tmp_path, tiny_bundle_dir):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    bundle_lib.load_bundle(str(tmp_path / "nowhere"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(bundle_lib.BundleError, match=r"no config.json"):
    bundle_lib.load_bundle(str(empty))

  no_text = tmp_path / "no_text"
  shutil.copytree(tiny_bundle_dir, no_text)
  shutil.rmtree(no_text / "text_encoder")
  with pytest.raises(bundle_lib.BundleError, match="no text encoder"):
    bundle_lib.load_bundle(str(no_text))

  no_params = tmp_path / "no_params"
  shutil.copytree(tiny_bundle_dir, no_params)
  shutil.rmtree(no_params / "params")
  with pytest.raises(bundle_lib.BundleError, match="no params/"):
    bundle_lib.load_bundle(str(no_params))

  wider = tmp_path / "wider"
  shutil.copytree(tiny_bundle_dir, wider)
  config = json.loads((wider / "config.json").read_text())
  config["vae"]["ch"] = 32  # the weights were trained with 16
  (wider / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    bundle_lib.BundleError,
    match=r"wrong shapes, e.g. \S+: \(\d+,?.*\) in the bundle, \(\d+,?.*\) from",
  ):
    bundle_lib.load_bundle(str(wider))


def test_save_refuses_to_overwrite(tiny_bundle_dir, tiny_bundle):
  with pytest.raises(FileExistsError, match="already exists"):
    bundle_lib.save_bundle(str(tiny_bundle_dir), tiny_bundle)

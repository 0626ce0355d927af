"""ZipIRPipeline: mixed inputs in one call, agreement with the method composed by hand and with the
tiled path, progress and the per-step callback, errors that name the input, the shared bundle."""

import copy
import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, subprocess_env
from PIL import Image

from zipir_jax import api, diffusion, errors, latents, restore, text
from zipir_jax import bundle as bundle_lib
from zipir_jax.data import degradations
from zipir_jax.models import autoencoder, t5
from zipir_jax.models import dit as dit_lib

# Shares the session fixture it needs with the other files of this group on one xdist worker.
pytestmark = pytest.mark.xdist_group("tiny_bundle")

STEPS = 2


@pytest.fixture(scope="module")
def pipe(tiny_bundle_dir):
  return api.ZipIRPipeline.from_pretrained(tiny_bundle_dir)


def _lq(seed, shape=(21, 30, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_one_call_takes_paths_pil_images_and_arrays_of_any_size(pipe, tmp_path):
  path = tmp_path / "photo.png"
  Image.fromarray(_lq(0)).save(path)
  images = [str(path), Image.fromarray(_lq(1)), _lq(2, (20, 33, 3)), _lq(3) / 255.0]
  out = pipe(images, scale=2, steps=STEPS, batch_size=2)
  assert [im.size for im in out] == [(60, 42), (60, 42), (66, 40), (60, 42)]
  assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in out)
  # One image in, one image out; arrays as float32 [0, 1] HWC on request.
  one = pipe(path, size=(50, 77), steps=STEPS, output_type="np")
  assert one.shape == (50, 77, 3) and one.dtype == np.float32 and 0 <= one.min() <= one.max() <= 1


def _by_hand(bundle, lq, out_size, prompt, negative, seed, cfg, strength, eta, fix, fusion):
  """resize → pad → encode → DDIM + CFG → decode with D_f* → crop → colour fix, composed here
  from the library's pieces (latents, diffusion, text), as one jitted program."""
  config = bundle.config
  vae = autoencoder.build_autoencoder(config)
  pixel_decoder = autoencoder.build_pixel_decoder(config)
  dit = dit_lib.build_dit(config)
  h, w = out_size
  lq_up = degradations.upsample(lq / 255.0, out_size, config.data.degradation.upsample_mode)
  lq_up = np.clip(lq_up, 0, 1)[None] * 2 - 1
  padded = restore.pad_to_multiple(lq_up, vae.factor)
  encode_text = lambda p: text.encode_prompts(
    [p],
    bundle.tokenizer,
    t5.T5Encoder(bundle.text_config),
    bundle.text_params,
    config.text.max_length,
  )
  params = dict(bundle.params)
  params["dit"] = dit_lib.inference_params(params["dit"], jnp.float32)

  @jax.jit
  def method(params, padded, lq_up, emb, mask, neg_emb, neg_mask):
    stats = params["latent_stats"]
    z_lq = latents.encode(vae, params["vae"], padded, stats)
    z = diffusion.ddim_sample(
      dit_lib.as_denoise_fn(dit),
      params["dit"],
      diffusion.schedule_from_config(config.diffusion),
      z_lq,
      emb,
      mask,
      neg_emb,
      neg_mask,
      jax.random.key(seed),
      num_steps=STEPS,
      cfg_scale=cfg,
      eta=eta,
      strength=strength,
      clip_x0=config.diffusion.clip_x0 or None,
    )
    image = latents.decode(pixel_decoder, params["pixel_decoder"], z, padded, stats, fusion)
    image = restore.color_fix(image[:, :h, :w], lq_up, fix)
    return jnp.clip((image + 1) / 2, 0, 1)

  return np.asarray(method(params, padded, lq_up, *encode_text(prompt), *encode_text(negative)))[0]


def test_pipeline_is_the_method_composed_by_hand(pipe, tiny_bundle):
  lq = _lq(4)
  kwargs = dict(seed=3, cfg=2.0, strength=0.8, eta=0.5, color_fix="wavelet", fusion_weight=0.7)
  got = pipe(
    lq,
    size=(50, 77),
    prompt="a cat",
    negative_prompt="blurry",
    steps=STEPS,
    output_type="np",
    **kwargs,
  )
  want = _by_hand(tiny_bundle, lq, (50, 77), "a cat", "blurry", 3, 2.0, 0.8, 0.5, "wavelet", 0.7)
  # Measured: max |difference| 2.1e-6 on [0, 1] pixels (the pipeline steps the sampler from
  # Python and decodes in its own program: float32 rounding, amplified by CFG through the DiT).
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_tiled_vae_path_restores_what_the_untiled_one_does(pipe, tiny_bundle):
  config = copy.deepcopy(tiny_bundle.config)
  with config.unlocked():
    config.restore.tile_min_pixels = 1  # every size tiled
    config.restore.tile_strip_rows = 32  # 64-row padded image: 2 strips per full-size convolution
  tiled = api.ZipIRPipeline(dataclasses.replace(tiny_bundle, config=config))
  assert tiled.restorer.tiled(64, 64) and not pipe.restorer.tiled(64, 64)
  args = dict(size=(40, 60), prompt="a dog", steps=STEPS, seed=1, output_type="np")
  # Measured: max |difference| 1.6e-6 (strip-wise convolutions sum in another order).
  np.testing.assert_allclose(tiled(_lq(5), **args), pipe(_lq(5), **args), rtol=0, atol=1e-5)


def test_progress_bar_and_step_callback(pipe, capsys, monkeypatch):
  monkeypatch.setattr(api, "PROGRESS_DELAY_S", 0.0)
  seen = []
  args = dict(size=(42, 60), steps=STEPS, seed=2, strength=0.6, output_type="np")
  stepped = pipe(_lq(6), **args, callback=lambda i, t, z: seen.append((i, t, z.shape)))
  want_t = np.asarray(diffusion.ddim_timesteps(1000, STEPS, 0.6)[0]).tolist()
  assert seen == [(i, t, (1, 2, 2, 64)) for i, t in enumerate(want_t)]
  assert f"{STEPS}/{STEPS}" in capsys.readouterr().err  # the DDIM-step bar ran to the end
  quiet = pipe(_lq(6), **args, progress=False)  # no hook: the one-program sampler
  assert not capsys.readouterr().err
  np.testing.assert_allclose(stepped, quiet, rtol=0, atol=1e-6)


def test_errors_name_the_input_and_the_problem(pipe, tmp_path):
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"\xff\xd8 not really a jpeg" * 20)
  with pytest.raises(errors.BadImageError, match=r"broken\.jpg: not an image") as info:
    pipe([_lq(0), broken], scale=2)
  assert " at 0x" not in str(info.value)
  with pytest.raises(errors.BadImageError, match=r"image 1: 4x30 is too small"):
    pipe([_lq(0), _lq(0, (4, 30, 3))], scale=2)
  with pytest.raises(errors.BadImageError, match=r"image 0: expected an HxWx3 RGB image"):
    pipe([np.zeros((8, 8, 2), np.float32)], scale=2)
  # Options are checked before any input is read (the missing file is never opened).
  for kwargs, match in (
    (dict(scale=2, color_fix="sepia"), "unknown colour fix 'sepia'; valid: none, wavelet"),
    (dict(scale=2, strength=1.5), r"strength=1.5: must be in \(0, 1\]"),
    (dict(scale=2, size=(8, 8)), "exactly one of scale"),
    (dict(scale=2, prompt=["a", "b"]), "2 prompts for 1 images"),
    (dict(scale=2, output_type="jpg"), "output_type='jpg'; valid: pil, np"),
  ):
    with pytest.raises(errors.OptionError, match=match):
      pipe([tmp_path / "missing.png"], **kwargs)


def test_shared_safetensors_bundle_restores_the_same(pipe, tiny_bundle_dir, tmp_path, capsys):
  out = tmp_path / "shared"
  assert bundle_lib.main(["export", str(tiny_bundle_dir), str(out)]) == 0
  assert sorted(p.name for p in out.iterdir()) == sorted(
    ["config.json", "text_encoder", *(f"{part}.safetensors" for part in bundle_lib.PARTS)]
  )
  shared = api.ZipIRPipeline.from_pretrained(out)
  args = dict(scale=2, prompt="a cat", steps=STEPS, seed=4, output_type="np")
  np.testing.assert_array_equal(shared(_lq(7), **args), pipe(_lq(7), **args))
  # Refusals in one line: an existing folder; a damaged part names its file.
  assert bundle_lib.main(["export", str(tiny_bundle_dir), str(out)]) == 2
  assert "not empty" in capsys.readouterr().err
  (out / "dit.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
  with pytest.raises(errors.BundleError, match=r"dit\.safetensors: cannot read"):
    bundle_lib.load_bundle(str(out))


def test_package_import_stays_light_until_the_pipeline_is_asked_for():
  code = (
    "import sys, zipir_jax, zipir_jax.config_lib\n"
    "assert 'jax' not in sys.modules and 'zipir_jax.api' not in sys.modules\n"
    "from zipir_jax import ZipIRPipeline\n"
    "assert ZipIRPipeline.__module__ == 'zipir_jax.api'\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=subprocess_env()
  )
  assert result.returncode == 0, result.stderr[-2000:]

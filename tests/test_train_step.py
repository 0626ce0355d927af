"""Small pieces of the training step, in process: accumulation, schedule, mesh helpers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from zipir_jax import config_lib, parallel
from zipir_jax.training import stages, steps
from zipir_jax.training import state as state_lib


def test_gradient_accumulation_equals_full_batch():
  rs = np.random.RandomState(0)
  batch = {
    "x": jnp.asarray(rs.normal(size=(8, 3)), jnp.float32),
    "y": jnp.asarray(rs.normal(size=(8,)), jnp.float32),
  }
  params = {"w": jnp.asarray([0.5, -1.0, 2.0])}

  def loss_fn(p, b, rng):
    del rng
    loss = jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    return loss, {"loss": loss}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (l1, _), g1 = steps.accumulate(grad_fn, params, batch, jax.random.PRNGKey(0), 1)
  (l4, aux4), g4 = jax.jit(lambda p, b: steps.accumulate(grad_fn, p, b, jax.random.PRNGKey(0), 4))(
    params, batch
  )
  np.testing.assert_allclose(l4, l1, rtol=1e-6)
  np.testing.assert_allclose(aux4["loss"], l1, rtol=1e-6)
  np.testing.assert_allclose(g4["w"], g1["w"], rtol=1e-5)
  with pytest.raises(ValueError, match="grad_accum=3"):
    steps.accumulate(grad_fn, params, batch, jax.random.PRNGKey(0), 3)


def test_learning_rate_warms_up_then_decays_to_end_lr():
  optim = config_lib.load_config("configs/zipir_3b.py:dit").optim  # supp. A: 5e-5 -> 5e-6
  lr = state_lib.learning_rate(optim)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(optim.warmup_steps)), 5e-5, rtol=1e-6)
  np.testing.assert_allclose(float(lr(optim.num_steps)), 5e-6, rtol=1e-6)
  assert (optim.b1, optim.b2, optim.weight_decay) == (0.9, 0.95, 0.05)


def test_mesh_and_specs():
  mesh = parallel.create_mesh((-1, 1, 1))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert mesh.devices.size == jax.device_count()
  with pytest.raises(ValueError, match="needs 6 devices"):
    parallel.create_mesh((2, 3, 1))
  # A dimension the mesh axes do not divide stays replicated.
  fake = jax.sharding.Mesh(np.asarray(jax.devices() * 4)[:4].reshape(1, 4, 1), parallel.MESH_AXES)
  assert parallel.fit_spec(P(None, None, None, "fsdp"), (3, 3, 16, 9), fake) == P(
    None, None, None, None
  )
  assert parallel.fit_spec(P("fsdp", "tensor"), (8, 6), fake) == P("fsdp", "tensor")


@pytest.mark.parametrize("path", ["configs/tiny.py", "configs/tiny_sdvae.py"])
def test_stage_partition_names_every_network(path):
  """Every stage of both VAE kinds: trainable and frozen parts are disjoint networks it builds."""
  kind = config_lib.load_config(path).vae.kind
  for stage in stages.experiment(kind).names:
    config = config_lib.load_config(f"{path}:{stage}")
    table = state_lib.check_config(config)
    assert table.name == stage
    trainable, frozen = table.trains, table.freezes
    assert trainable and not set(trainable) & set(frozen)
    boxed = jax.eval_shape(
      lambda c=config: state_lib.boxed_init(state_lib.build_models(c), jax.random.PRNGKey(0))
    )
    assert set(trainable + frozen) <= set(boxed), (path, stage)
    specs = jax.tree.leaves(
      nn.get_partition_spec(boxed[trainable[0]]), is_leaf=lambda x: isinstance(x, P)
    )
    assert any(any(s) for s in specs), (path, stage)  # logical names reach the sharding rules
    if table.discriminator:  # the adaptive GAN weight's layer exists, trainable
      assert table.last_layer[0] in trainable
      assert steps._get(boxed, table.last_layer).value.ndim == 4, (path, stage)
  # The table's encoders are exactly the autoencoder's encoder sub-networks (and z_macro's μ/σ).
  dit = config_lib.load_config(f"{path}:dit")
  vae = jax.eval_shape(lambda: state_lib.boxed_init(state_lib.build_models(dit), jax.random.key(0)))
  encoders = stages.experiment(kind).encoders
  assert {k for k in vae if "encoder" in k or k == "macro"} == set(encoders)
  assert stages.current(dit).freezes == (*encoders, "latent_stats", "null_text")


def test_restoration_decoder_of_the_dit_stage():
  """D_f* from the pixel_decoder export; with no fusion levels the plain decoder, which must be in
  the prerequisite export (the vae_fine export for the LP-VAE, the vae export for the SD-VAE)."""
  from zipir_jax.training import checkpointing, export

  pd, d_f, d = {"extractor": 1, "decoder": 2}, {"w": 3}, {"w": 4}
  config = config_lib.load_config("configs/tiny.py:dit")
  assert export.restoration_decoder(config, {"pixel_decoder": pd, "fine_decoder": d_f}) is pd
  config_lib.apply_overrides(config, {"pixel_decoder.fusion_levels": ()})
  with pytest.raises(
    checkpointing.MissingPrerequisiteError, match=r"init_from.pixel_decoder at the vae_fine export"
  ):
    export.restoration_decoder(config, {"pixel_decoder": pd, "latent_stats": 0})
  assert export.restoration_decoder(config, {"fine_decoder": d_f}) == {"decoder": d_f}
  sdvae = config_lib.load_config("configs/tiny_sdvae.py:dit")
  assert export.restoration_decoder(sdvae, {"decoder": d, "encoder": 5}) == {"decoder": d}
  stage = config_lib.load_config("configs/tiny.py:pixel_decoder")
  config_lib.apply_overrides(stage, {"pixel_decoder.fusion_levels": ()})
  with pytest.raises(ValueError, match="nothing to train"):
    state_lib.check_config(stage)


def test_sdvae_training_refuses_a_pixel_aware_decoder():
  config = config_lib.load_config("configs/tiny_sdvae.py:dit")
  config_lib.apply_overrides(config, {"pixel_decoder.fusion_levels": (0, 1)})
  with pytest.raises(ValueError, match=r"no pixel_decoder stage.*fusion_levels=\(\)"):
    state_lib.check_config(config)
  lpvae = config_lib.load_config("configs/tiny.py:dit")
  config_lib.apply_overrides(lpvae, {"stage": "vae"})
  with pytest.raises(ValueError, match=r"not a stage of the lpvae.*vae_coarse, vae_fine"):
    state_lib.check_config(lpvae)


def _conv_dtypes(fn, *args) -> set[str]:
  """Result element types ("f32", "bf16") of the convolutions in ``fn``'s lowered StableHLO."""
  hlo = jax.jit(fn).lower(*args).as_text()
  return {
    line.split("->")[-1].rsplit("x", 1)[-1].rstrip(">")
    for line in hlo.splitlines()
    if "stablehlo.convolution" in line
  }


def test_frozen_encoders_run_at_frozen_dtype():
  """dit/pixel_decoder run E_c/E_f at vae.frozen_dtype (bf16 halves the dit step's encoder time)."""
  batch = {k: jax.ShapeDtypeStruct((2, 32, 64, 3), jnp.float32) for k in ("hq", "lq_up")}
  for frozen_dtype, short in (("float32", "f32"), ("bfloat16", "bf16")):
    config = config_lib.load_config("configs/tiny.py:pixel_decoder")
    config_lib.apply_overrides(config, {"vae.frozen_dtype": frozen_dtype})
    models = state_lib.build_models(config)
    params = nn.unbox(jax.eval_shape(lambda m=models: state_lib.boxed_init(m, jax.random.key(0))))
    frozen = stages.select(params, stages.current(config).freezes)
    frozen["latent_stats"] = {"mean": jnp.zeros(64), "std": jnp.ones(64)}
    encode = lambda f, b, m=models: steps.encode_latents(m, f, b["hq"])  # the dit stage's
    reconstruct = lambda f, p, b, m=models: steps.reconstruct(  # the pixel_decoder stage's
      m, {"pixel_decoder": p}, f, b, None
    )[1]
    assert _conv_dtypes(encode, frozen, batch) == {short}
    assert _conv_dtypes(reconstruct, frozen, params["pixel_decoder"], batch) == {short, "f32"}


def test_vae_stage_losses_recomputed_by_hand():
  """vae_fine's generator and discriminator losses, written out from LDM's formula (losses.py's
  docstring) with the modules called directly, equal the train step's before and after the
  discriminator starts; LPIPS enters through a stand-in perceptual distance."""
  import dataclasses

  config = config_lib.load_config("configs/tiny.py:vae_fine")
  config_lib.apply_overrides(
    config, {"loss.disc_weight": 0.5, "loss.disc_start_fraction": 0.5, "optim.num_steps": 4}
  )
  models = state_lib.build_models(config)
  config_lib.apply_overrides(config, {"loss.lpips_weight": 0.7, "loss.kl_weight": 0.01})
  perceptual = lambda x, y: jnp.mean(jnp.square(x - y), axis=(1, 2, 3)) + 0.1
  models = dataclasses.replace(models, perceptual=perceptual)
  init = nn.meta.unbox(state_lib.boxed_init(models, jax.random.key(1)))
  params = {k: init[k] for k in ("fine_encoder", "fine_decoder")}
  frozen = {k: init[k] for k in ("macro", "coarse_encoder")}
  disc = init["discriminator"]
  hq = jax.random.uniform(jax.random.key(2), (2, 64, 96, 3), minval=-1, maxval=1)
  batch, rng = {"hq": hq}, jax.random.key(3)
  vae, d_model = models.vae, models.discriminator

  def by_hand(p, step):
    z, post = vae.apply({"params": {**frozen, **p}}, hq, rng, method="encode")
    recon = vae.apply({"params": {**frozen, **p}}, z, method="decode")
    nll = jnp.mean(jnp.abs(hq - recon)) + 0.7 * jnp.mean(perceptual(hq, recon))
    kl = jnp.mean(post["fine"].kl())  # E_c is frozen: only the fine level's posterior trains
    loss = nll + 0.01 * kl / (64 * 96 * 3)
    logits = lambda img, w=None: d_model.apply(disc, img, train=True, mutable=["batch_stats"])[0]
    g = -jnp.mean(logits(recon))
    if step < 2:
      return loss, 0.0
    kernel = p["fine_decoder"]["conv_out"]["kernel"]

    def with_kernel(w):
      q = {
        **p,
        "fine_decoder": {
          **p["fine_decoder"],
          "conv_out": {**p["fine_decoder"]["conv_out"], "kernel": w},
        },
      }
      return vae.apply({"params": {**frozen, **q}}, z, method="decode")

    g_nll = jax.grad(
      lambda w: (
        jnp.mean(jnp.abs(hq - with_kernel(w))) + 0.7 * jnp.mean(perceptual(hq, with_kernel(w)))
      )
    )(kernel)
    g_gan = jax.grad(lambda w: -jnp.mean(logits(with_kernel(w))))(kernel)
    d_weight = 0.5 * jnp.linalg.norm(g_nll) / (jnp.linalg.norm(g_gan) + 1e-4)
    real = logits(hq)
    d_loss = 0.5 * (jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + logits(recon))))
    return loss + d_weight * g, d_loss

  # Jitted (op by op, the tiny VAE's backward passes take minutes on the CPU); values unchanged.
  generator = jax.jit(steps.generator_loss, static_argnums=6)
  discriminator = jax.jit(steps.discriminator_loss, static_argnums=7)
  for step in (0, 3):  # before and after the discriminator's start (step 2 of 4)
    got, _ = generator(params, frozen, disc, batch, rng, jnp.int32(step), models)
    got_d, _ = discriminator(
      disc["params"], disc, params, frozen, batch, rng, jnp.int32(step), models
    )
    want, want_d = jax.jit(by_hand, static_argnums=1)(params, step)
    np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=f"generator, step {step}")
    np.testing.assert_allclose(got_d, want_d, rtol=2e-6, atol=1e-7, err_msg=f"disc, step {step}")

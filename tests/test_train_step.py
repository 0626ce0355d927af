"""Small pieces of the training step, in process: accumulation, schedule, mesh helpers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from zipir_jax import config_lib, parallel
from zipir_jax.training import state as state_lib
from zipir_jax.training import steps


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
  for stage in config_lib.load_config(path).stages:
    config = config_lib.load_config(f"{path}:{stage}")
    assert state_lib.check_stage(config) == stage
    trainable, frozen = state_lib.TRAINABLE[stage], state_lib.frozen_parts(config)
    assert trainable and not set(trainable) & set(frozen)
    boxed = jax.eval_shape(
      lambda c=config: state_lib.boxed_init(state_lib.build_models(c), jax.random.PRNGKey(0))
    )
    assert set(trainable + frozen) <= set(boxed), (path, stage)
    specs = jax.tree.leaves(
      nn.get_partition_spec(boxed[trainable[0]]), is_leaf=lambda x: isinstance(x, P)
    )
    assert any(any(s) for s in specs), (path, stage)  # logical names reach the sharding rules
    if stage in state_lib.GAN_STAGES:  # the adaptive GAN weight's layer exists, trainable
      assert steps.LAST_LAYER[stage][0] in trainable
      assert steps._get(boxed, steps.LAST_LAYER[stage]).value.ndim == 4, (path, stage)
  dit = config_lib.load_config(f"{path}:dit")
  want = ("coarse_encoder", "fine_encoder") if dit.vae.kind == "lpvae" else ("encoder",)
  assert state_lib.frozen_parts(dit) == want + ("latent_stats", "null_text")


def test_restoration_decoder_of_the_dit_stage():
  """D_f* from the pixel_decoder export; with no fusion levels the plain decoder, which must be in
  the prerequisite export (the vae_fine export for the LP-VAE, the vae export for the SD-VAE)."""
  from zipir_jax.training import checkpointing, loop

  pd, d_f, d = {"extractor": 1, "decoder": 2}, {"w": 3}, {"w": 4}
  config = config_lib.load_config("configs/tiny.py:dit")
  assert loop.restoration_decoder(config, {"pixel_decoder": pd, "fine_decoder": d_f}) is pd
  config_lib.apply_overrides(config, {"pixel_decoder.fusion_levels": ()})
  with pytest.raises(
    checkpointing.MissingPrerequisiteError, match=r"init_from.pixel_decoder at the vae_fine export"
  ):
    loop.restoration_decoder(config, {"pixel_decoder": pd, "latent_stats": 0})
  assert loop.restoration_decoder(config, {"fine_decoder": d_f}) == {"decoder": d_f}
  sdvae = config_lib.load_config("configs/tiny_sdvae.py:dit")
  assert loop.restoration_decoder(sdvae, {"decoder": d, "encoder": 5}) == {"decoder": d}
  stage = config_lib.load_config("configs/tiny.py:pixel_decoder")
  config_lib.apply_overrides(stage, {"pixel_decoder.fusion_levels": ()})
  with pytest.raises(ValueError, match="nothing to train"):
    state_lib.check_stage(stage)


def test_sdvae_training_refuses_a_pixel_aware_decoder():
  config = config_lib.load_config("configs/tiny_sdvae.py:dit")
  config_lib.apply_overrides(config, {"pixel_decoder.fusion_levels": (0, 1)})
  with pytest.raises(ValueError, match=r"no pixel_decoder stage.*fusion_levels=\(\)"):
    state_lib.check_stage(config)
  lpvae = config_lib.load_config("configs/tiny.py:dit")
  config_lib.apply_overrides(lpvae, {"stage": "vae"})
  with pytest.raises(ValueError, match=r"not a stage of the lpvae.*vae_coarse, vae_fine"):
    state_lib.check_stage(lpvae)


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
    frozen = {k: params[k] for k in state_lib.frozen_parts(config)}
    frozen["latent_stats"] = {"mean": jnp.zeros(64), "std": jnp.ones(64)}
    encode = lambda f, b, m=models: steps.encode_latents(m, f, b["hq"])  # the dit stage's
    reconstruct = lambda f, p, b, m=models: steps.reconstruct(  # the pixel_decoder stage's
      m, {"pixel_decoder": p}, f, b, None
    )[1]
    assert _conv_dtypes(encode, frozen, batch) == {short}
    assert _conv_dtypes(reconstruct, frozen, params["pixel_decoder"], batch) == {short, "f32"}

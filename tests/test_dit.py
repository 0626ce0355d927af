"""ZipDiT (§3.2, supp. A): adaLN-Zero init, shapes, LQ fusion, text mask, RoPE, scan/remat, counts.

The tiny config's DiT (2 layers, hidden 64, 4 heads) is initialised once; "trained-like" parameters
add noise to every weight so that the zero-initialised gates open. Keys are RBG keys and test data
come from numpy: threefry kernels and eager ops each cost seconds of XLA compile on a 2-core CPU.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import perturbed

from zipir_jax import config_lib, diffusion
from zipir_jax.models import dit

C = 64  # LP-VAE latent channels


def _key(seed):
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _inputs(batch=2, height=3, width=5, length=6, seed=0):
  z, lq = _normal(seed, (batch, height, width, C)), _normal(seed + 1, (batch, height, width, C))
  t = np.array([999, 17, 500, 3][:batch], np.int32)
  text = _normal(seed + 2, (batch, length, 64))
  mask = np.arange(length)[None] < np.array([4, 2, 6, 1][:batch])[:, None]  # right-padded
  return z, t, lq, text, mask


@pytest.fixture(scope="module")
def model(tiny_config):
  return dit.build_dit(tiny_config)


@pytest.fixture(scope="module")
def params(model):
  return dit.init_dit(model, _key(0), C)


@pytest.fixture(scope="module")
def forward(model):
  return jax.jit(dit.as_denoise_fn(model))


def test_output_is_exactly_zero_at_init_and_not_after(params, forward):
  z, t, lq, text, mask = _inputs()
  out = forward(params, z, t, lq, text, mask)
  assert out.shape == z.shape and out.dtype == jnp.float32
  assert np.all(np.asarray(out) == 0.0)
  out = np.asarray(forward(perturbed(params, 0), z, t, lq, text, mask))
  assert np.all(np.isfinite(out)) and np.abs(out).mean() > 1e-3


def test_bfloat16_compute_and_fractional_timesteps(model, params, forward):
  """bf16 compute (the accelerator setting) tracks float32; params stay float32, ε is float32."""
  trained = perturbed(params, 0)
  z, t, lq, text, mask = _inputs()
  reference = np.asarray(forward(trained, z, t, lq, text, mask))
  out = jax.jit(dit.as_denoise_fn(model.clone(dtype=jnp.bfloat16)))(
    trained, z, t.astype(np.float32), lq, text, mask
  )
  assert out.dtype == jnp.float32
  error = np.abs(np.asarray(out) - reference).max() / np.abs(reference).max()
  assert error < 0.05, error
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_every_parameter_has_logical_axis_names(model):
  boxed = jax.eval_shape(lambda: model.init(_key(0), *dit.dummy_inputs(model, C)))["params"]
  specs = nn.get_partition_spec(boxed)
  flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, tuple))
  assert len(flat) > 20
  for path, spec in flat:
    assert all(isinstance(a, str) for a in spec) and len(set(spec)) == len(spec), (path, spec)
    if "blocks" in jax.tree_util.keystr(path):
      assert spec[0] == "layers", path
  blocks = specs["blocks"]
  assert tuple(blocks["self_attn"]["query"]["kernel"]) == ("layers", "embed", "heads", "kv")
  assert tuple(blocks["self_attn"]["out"]["kernel"]) == ("layers", "heads", "kv", "embed")
  assert tuple(blocks["fc1"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(specs["x_embedder"]["proj"]["kernel"]) == ("patch", "embed")
  assert tuple(specs["text_projection_1"]["kernel"]) == ("text_embed", "mlp")


def test_patch_size_two_and_shape_errors(model, params):
  model2 = model.clone(patch_size=2)
  shapes = jax.eval_shape(lambda: dit.init_dit(model2, _key(0), C))
  assert shapes["x_embedder"]["proj"]["kernel"].shape == (4 * C, 64)
  assert shapes["final_layer"]["linear"]["kernel"].shape == (64, 4 * C)
  params2 = jax.tree.map(lambda s: _normal(s.size % 97, s.shape, 0.1), shapes)
  z, t, lq, text, mask = _inputs(height=4, width=6)
  out = jax.jit(dit.as_denoise_fn(model2))(params2, z, t, lq, text, mask)
  assert out.shape == (2, 4, 6, C) and np.all(np.isfinite(out))
  z, t, lq, text, mask = _inputs(height=3, width=5)
  with pytest.raises(ValueError, match=r"shape \(2, 3, 5, 64\).*multiples of patch_size 2"):
    model2.apply({"params": params2}, z, t, lq, text, mask)
  with pytest.raises(ValueError, match=r"lq_latent shape \(2, 3, 4, 64\)"):
    model.apply({"params": params}, z, t, lq[:, :, :4], text, mask)
  with pytest.raises(ValueError, match=r"text_dim=64.*\(2, 6, 32\)"):
    model.apply({"params": params}, z, t, lq, text[..., :32], mask)
  bad_fusion, bad_remat = model.clone(lq_fusion="add"), model.clone(remat_policy="full")
  with pytest.raises(ValueError, match="valid: sum, concat"):
    bad_fusion.apply({"params": params}, z, t, lq, text, mask)
  with pytest.raises(ValueError, match="valid: none, nothing_saveable"):
    bad_remat.apply({"params": params}, z, t, lq, text, mask)


def test_sum_and_concat_fusion(model, params, forward):
  """Same parameters; concat runs twice the tokens and reads ε from the noisy half."""
  trained = perturbed(params, 0)
  z, t, lq, text, mask = _inputs()
  concat = model.clone(lq_fusion="concat")
  forward_concat = jax.jit(dit.as_denoise_fn(concat))
  out_sum = forward(trained, z, t, lq, text, mask)
  out_concat = forward_concat(trained, z, t, lq, text, mask)
  assert out_concat.shape == out_sum.shape == z.shape
  assert np.abs(np.asarray(out_concat) - np.asarray(out_sum)).max() > 1e-3

  def tokens_seen_by_blocks(m):
    m = m.clone(scan_layers=False)
    _, state = jax.eval_shape(
      lambda: m.apply(
        {"params": dit.unstack_layers(trained, 2)}, z, t, lq, text, mask, capture_intermediates=True
      )
    )
    return state["intermediates"]["blocks_0"]["__call__"][0][0].shape[1]

  assert tokens_seen_by_blocks(model) == 3 * 5
  assert tokens_seen_by_blocks(concat) == 2 * 3 * 5
  # The LQ latent matters in both layouts.
  for fn, ref in [(forward, out_sum), (forward_concat, out_concat)]:
    moved = np.asarray(fn(trained, z, t, lq + 1.0, text, mask))
    assert np.abs(moved - np.asarray(ref)).max() > 1e-3


def test_text_padding_mask(params, forward):
  trained = perturbed(params, 0)
  z, t, lq, text, mask = _inputs()
  mask[1] = False  # the second caption is all padding: no text contribution at all
  reference = np.asarray(forward(trained, z, t, lq, text, mask))
  changed = np.where(mask[..., None], text, _normal(9, text.shape, 100.0))
  np.testing.assert_allclose(forward(trained, z, t, lq, changed, mask), reference, atol=1e-6)
  # A valid token does change the output (so the test above can fail).
  changed = text.copy()
  changed[0, 0] += 1.0
  diff = np.abs(np.asarray(forward(trained, z, t, lq, changed, mask)) - reference)
  assert diff[0].max() > 1e-4 and diff[1].max() == 0.0


def test_rope_depends_only_on_relative_positions():
  head_dim, n = 16, 12
  q, k = _normal(0, (1, n, 2, head_dim)), _normal(1, (1, n, 2, head_dim))
  positions = np.random.default_rng(2).integers(0, 50, (n, 2))

  @jax.jit
  def scores(pos):
    cos, sin = dit.rope_2d(pos, head_dim)
    return jnp.einsum("bqhd,bkhd->bhqk", dit.apply_rope(q, cos, sin), dit.apply_rope(k, cos, sin))

  base = scores(positions)
  for shift in [(3, 0), (0, 7), (-20, 41)]:  # a common shift of every position: same scores
    np.testing.assert_allclose(scores(positions + np.array(shift)), base, rtol=1e-4, atol=1e-4)
  # Moving one token changes its scores, along rows and along columns alike.
  for delta in [(1, 0), (0, 1)]:
    moved = positions.copy()
    moved[0] += delta
    assert np.abs(np.asarray(scores(moved))[..., 0, 1:] - np.asarray(base)[..., 0, 1:]).max() > 1e-2
  # Rotation keeps norms; a head dimension not divisible by 4 is refused.
  cos, sin = dit.rope_2d(positions, head_dim)
  np.testing.assert_allclose(
    np.linalg.norm(dit.apply_rope(q, cos, sin), axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5
  )
  with pytest.raises(ValueError, match="divisible by 4"):
    dit.rope_2d(positions, 18)


def test_scan_with_remat_equals_the_unrolled_stack(model, params, forward):
  """The default (scanned, remat of the config) stack against an unrolled one without remat:
  same output for the same weights, and its gradient matches a central finite difference."""
  trained = perturbed(params, 0)
  z, t, lq, text, mask = _inputs()
  assert model.scan_layers and model.remat_policy == "dots_with_no_batch_dims_saveable"
  unrolled = model.clone(scan_layers=False, remat_policy="none")
  reference = forward(trained, z, t, lq, text, mask)
  out = jax.jit(dit.as_denoise_fn(unrolled))(dit.unstack_layers(trained, 2), z, t, lq, text, mask)
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-6)
  roundtrip = jax.eval_shape(lambda p: dit.stack_layers(dit.unstack_layers(p, 2), 2), trained)
  assert jax.tree.map(lambda x: x.shape, roundtrip) == jax.tree.map(np.shape, trained)

  loss = lambda out: np.mean(np.square(np.asarray(out, np.float64) - z))
  grad = jax.jit(
    jax.grad(lambda p: jnp.mean(jnp.square(model.apply({"params": p}, z, t, lq, text, mask) - z)))
  )(trained)
  direction = perturbed(jax.tree.map(np.zeros_like, trained), 5, scale=1.0)
  h = 1e-3
  plus = jax.tree.map(lambda p, d: p + h * d, trained, direction)
  minus = jax.tree.map(lambda p, d: p - h * d, trained, direction)
  finite_difference = (
    loss(forward(plus, z, t, lq, text, mask)) - loss(forward(minus, z, t, lq, text, mask))
  ) / (2 * h)
  analytic = sum(
    np.vdot(np.asarray(g, np.float64), d)
    for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))
  )
  np.testing.assert_allclose(analytic, finite_difference, rtol=2e-2)
  # The other policies trace (shapes only; no compile).
  loss_fn = lambda m: lambda p: jnp.mean(m.apply({"params": p}, z, t, lq, text, mask))
  for policy in sorted(set(dit.REMAT_POLICIES) - {model.remat_policy}):
    jax.eval_shape(jax.grad(loss_fn(model.clone(remat_policy=policy))), trained)


def test_25_step_sampler_compiles_once_with_the_dit(model, params):
  traces = []
  denoise = dit.as_denoise_fn(model)

  def counting(p, *args):
    traces.append(args[0].shape)  # runs only while tracing
    return denoise(p, *args)

  schedule = diffusion.make_schedule()
  sample = diffusion.make_ddim_sampler(counting, schedule, 25)
  trained = perturbed(params, 0)
  for seed in range(2):
    _, _, lq, text, mask = _inputs(batch=1, height=4, width=7, seed=seed)
    out = sample(
      trained,
      lq,
      text,
      mask,
      text[:, :2],
      mask[:, :2],
      _key(seed),
      cfg_scale=3.5 + seed,
      eta=float(seed),
      strength=1.0 - 0.3 * seed,
    )
    assert out.shape == (1, 4, 7, C) and np.all(np.isfinite(out))
  assert traces == [(2, 4, 7, C)] and sample.program._cache_size() == 1


def test_attention_backend_selection(monkeypatch):
  on_gpu = jax.default_backend() == "gpu"
  assert dit.resolve_attention_impl("auto") == ("cudnn" if on_gpu else "xla")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert dit.resolve_attention_impl("auto") == "cudnn"
  with pytest.raises(ValueError, match="auto, xla, cudnn"):
    dit.resolve_attention_impl("flash")
  # The cuDNN branch feeds bf16 and turns the key mask into per-example key lengths.
  seen = {}

  def fake_attention(q, k, v, **kwargs):
    seen.update(dtype=q.dtype, **kwargs)
    return q

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_attention)
  q = np.zeros((2, 3, 4, 16), np.float32)
  mask = np.array([[True, True, False], [True, False, False]])
  out = dit.attention(q, q, q, mask, implementation="cudnn")
  assert seen["implementation"] == "cudnn" and seen["dtype"] == jnp.bfloat16
  np.testing.assert_array_equal(seen["key_value_seq_lengths"], [2, 1])
  assert out.dtype == jnp.float32


def _expected_counts(
  d, heads, depth, text_dim, mlp_ratio=4.0, patch=1, text_projection=True, cross_mod=True, freq=256
):
  """The parameter count of the architecture, written out by hand."""
  hd, m, pc = d // heads, int(d * mlp_ratio), patch * patch * C
  ctx = d if text_projection else text_dim
  linear = lambda i, o: i * o + o
  return {
    "x_embedder (z_t patches)": linear(pc, d),
    "lq_embedder (LQ patches)": linear(pc, d),
    "t_embedder (timestep MLP)": linear(freq, d) + linear(d, d),
    "text_projection (T5 -> hidden)": (linear(text_dim, d) + linear(d, d)) * text_projection,
    "blocks: self-attention": depth * (4 * linear(d, d) + 2 * hd),
    "blocks: cross-attention": depth
    * (2 * linear(d, d) + 2 * linear(ctx, d) + 2 * hd + (0 if cross_mod else 2 * d)),
    "blocks: MLP": depth * (linear(d, m) + linear(m, d)),
    "blocks: adaLN modulation": depth * linear(d, (9 if cross_mod else 6) * d),
    "final_layer": linear(d, 2 * d) + linear(d, pc),
  }


def test_parameter_breakdown(tiny_config, params):
  counts = dit.param_breakdown(tiny_config)
  assert counts["total"] == sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  paper = config_lib.load_config("configs/zipir_3b.py")
  counts = dit.param_breakdown(paper)
  expected = _expected_counts(2048, 16, 24, 4096, mlp_ratio=6.75)
  assert {k: v for k, v in counts.items() if k != "total"} == expected
  assert counts["total"] == sum(expected.values()) == 3_097_559_104
  variant = config_lib.load_config("configs/zipir_2p5b.py")  # DiT's MLP ratio 4
  assert (
    dit.param_breakdown(variant)["total"]
    == sum(_expected_counts(2048, 16, 24, 4096).values())
    == 2_543_775_808
  )
  # The choices that move the count (reported against the paper's "3.1 B", Table 3).
  variant = config_lib.apply_overrides(variant, {"dit.cross_attn_modulation": False})
  assert dit.param_breakdown(variant)["total"] == sum(
    _expected_counts(2048, 16, 24, 4096, cross_mod=False).values()
  )

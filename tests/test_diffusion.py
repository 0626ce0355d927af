"""DDPM objective and DDIM sampler (§3.2, §4, supp. A), checked against exact ε-predictors.

Oracles: for a point mass at x0 the exact predictor is ε*(z, t) = (z − sqrt(ᾱ_t)·x0)/sqrt(1 − ᾱ_t);
for Gaussian data N(μ, σ²) it is ε* = sqrt(1 − ᾱ)·(z − sqrt(ᾱ)·μ)/(ᾱσ² + 1 − ᾱ). x0 or (μ, σ) come
in as the ``params`` of a fixed ``denoise_fn``, so each step count compiles once for the file.
Keys are RBG keys and data come from numpy: on a 2-core CPU a threefry kernel takes seconds to
compile.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from zipir_jax import config_lib, diffusion

T = 1000
SCHEDULE = diffusion.make_schedule(T, 0.00085, 0.012, "scaled_linear")


def _abar_np() -> np.ndarray:
  """LDM's schedule computed independently of the module, in float64."""
  return np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, T) ** 2)


def _abar(t):
  return diffusion._per_example(SCHEDULE.alphas_cumprod[t], 4)


def point_mass_eps(x0, z, t, lq, emb, mask):
  """Exact ε-predictor of the data distribution δ(x − x0); ``x0`` comes in as the params."""
  del lq, emb, mask
  x0 = jnp.tile(x0, (z.shape[0] // x0.shape[0], 1, 1, 1))  # the CFG batch is 2B.
  abar = _abar(t)
  return (z - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


def gaussian_eps(moments, z, t, lq, emb, mask):
  """Exact ε-predictor of N(μ, σ²) data: E[ε | z_t] in closed form; moments = (μ, σ)."""
  del lq, emb, mask
  mu, sigma = moments
  abar = _abar(t)
  return jnp.sqrt(1.0 - abar) * (z - jnp.sqrt(abar) * mu) / (abar * sigma**2 + 1.0 - abar)


@functools.cache
def _sampler(denoise_fn, num_steps, clip_x0=None):
  """One jitted sampler per (predictor, step count), shared by the tests of this file."""
  return diffusion.make_ddim_sampler(denoise_fn, SCHEDULE, num_steps, clip_x0)


def _key(seed):
  """RBG keys: XLA's RngBitGenerator compiles in 0.3 s on CPU where threefry takes seconds."""
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape):
  """Test data from numpy (eager jax.random would compile a kernel per new shape)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _text(batch, length=4, dim=3, seed=0):
  return _normal(seed, (batch, length, dim)), np.ones((batch, length), bool)


# ------------------------------------------------------------------ schedule


def test_schedules_match_ldm_and_linear_definitions():
  scaled = jax.tree.map(np.asarray, diffusion.make_schedule(T, 0.00085, 0.012, "scaled_linear"))
  np.testing.assert_allclose(scaled.betas[[0, -1]], [0.00085, 0.012], rtol=1e-6)
  # LDM's "linear" is linear in sqrt(β), so sqrt(β) has constant increments.
  np.testing.assert_allclose(np.diff(np.sqrt(np.float64(scaled.betas)), 2), 0, atol=1e-7)
  np.testing.assert_allclose(scaled.alphas_cumprod, _abar_np(), rtol=1e-5)
  np.testing.assert_allclose(scaled.alphas_cumprod[-1], 0.004660, rtol=1e-3)  # SD's ᾱ_999.
  linear = jax.tree.map(np.asarray, diffusion.make_schedule(T, 0.00085, 0.012, "linear"))
  np.testing.assert_allclose(np.diff(np.float64(linear.betas), 2), 0, atol=1e-8)
  assert linear.alphas_cumprod[-1] < scaled.alphas_cumprod[-1]
  with pytest.raises(ValueError, match="scaled_linear, linear"):
    diffusion.make_schedule(beta_schedule="cosine")
  config = config_lib.load_config("configs/zipir_3b.py")
  assert config.diffusion.beta_schedule == "scaled_linear"
  from_config = diffusion.schedule_from_config(config.diffusion)
  np.testing.assert_array_equal(from_config.betas, scaled.betas)


def test_q_sample_and_timesteps():
  x0, noise = np.full((2, 1, 1, 1), 2.0, np.float32), np.ones((2, 1, 1, 1), np.float32)
  abar = _abar_np()[[0, 999]]
  z = jax.jit(diffusion.q_sample)(SCHEDULE, x0, np.array([0, 999]), noise)
  np.testing.assert_allclose(z.ravel(), 2 * np.sqrt(abar) + np.sqrt(1 - abar), rtol=1e-5)
  timesteps = jax.jit(diffusion.ddim_timesteps, static_argnums=(0, 1))
  ts, prev = timesteps(T, 25, 1.0)
  reference = np.round(np.arange(T, 0, -T / 25)).astype(int) - 1  # diffusers' "trailing".
  np.testing.assert_array_equal(ts, reference)
  np.testing.assert_array_equal(prev, np.append(reference[1:], -1))
  np.testing.assert_array_equal(timesteps(T, T, 1.0)[0], np.arange(T - 1, -1, -1))
  np.testing.assert_array_equal(timesteps(T, 10, 0.5)[0], np.arange(499, 0, -50))
  with pytest.raises(ValueError, match="num_steps=0"):
    diffusion.ddim_timesteps(T, 0)


# ------------------------------------------------------------------ DDIM oracles


@pytest.mark.parametrize("num_steps,seed", [(1, 0), (7, 1), (25, 2), (50, 3)])
def test_ddim_recovers_a_point_mass_from_any_noise(num_steps, seed):
  x0 = 2.0 * _normal(seed, (3, 4, 5, 8))
  emb, mask = _text(3)
  sample = _sampler(point_mass_eps, num_steps)
  for eta, strength in [(0.0, 1.0), (1.0, 1.0), (0.0, 0.6)]:
    # CFG 3.5 with a text-blind predictor: both branches agree, guidance changes nothing.
    out = sample(
      x0,
      np.zeros_like(x0),
      emb,
      mask,
      emb[:1],
      mask[:1],
      _key(seed),
      cfg_scale=3.5,
      eta=eta,
      strength=strength,
      init_noise=3.0 * _normal(seed + 100, x0.shape),
    )
    np.testing.assert_allclose(out, x0, atol=1e-4, err_msg=f"eta={eta} strength={strength}")


def _gaussian_chain(num_steps, eta, mu, sigma, start_mean=0.0, start_var=1.0):
  """Exact mean and variance after DDIM with the exact Gaussian predictor, propagated in float64.

  With that predictor every step is affine in z plus independent noise: z' = A z + B + σ_η n.
  """
  abar = _abar_np()
  ts = np.round(np.arange(T, 0, -T / num_steps)).astype(int) - 1
  mean, var = start_mean, start_var
  for i, t in enumerate(ts):
    a = abar[t]
    a_prev = abar[ts[i + 1]] if i + 1 < num_steps else 1.0
    s2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    c = np.sqrt(1 - a) / (a * sigma**2 + 1 - a)  # ε̂ = c (z − sqrt(a) μ)
    a_x0 = (1 - np.sqrt(1 - a) * c) / np.sqrt(a)  # x̂0 = a_x0 z + b_x0
    b_x0 = np.sqrt(1 - a) * c * np.sqrt(a) * mu / np.sqrt(a)
    d = np.sqrt(max(1 - a_prev - s2, 0.0))
    A = np.sqrt(a_prev) * a_x0 + d * c
    B = np.sqrt(a_prev) * b_x0 - d * c * np.sqrt(a) * mu
    mean, var = A * mean + B, A * A * var + s2
  return mean, var


MU, SIGMA = 1.0, 0.5


def _gaussian_samples(num_steps, eta, n, seed, init_noise=None):
  lq = np.zeros((1, n // 500, 500, 1), np.float32)
  emb, mask = _text(1)
  sample = _sampler(gaussian_eps, num_steps)
  out = sample(
    (jnp.float32(MU), jnp.float32(SIGMA)),
    lq,
    emb,
    mask,
    emb,
    mask,
    _key(seed),
    cfg_scale=1.0,
    eta=eta,
    init_noise=init_noise,
  )
  return np.asarray(out, np.float64).ravel()


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_gaussian_moments_match_the_exact_chain(num_steps, eta):
  """From pure noise, the sample mean / variance equal the exact discrete-chain values.

  n = 200 000: the standard error of the mean is sqrt(v/n) ≈ 0.001 and of the variance
  v·sqrt(2/n) ≈ 0.0006, so 5 standard errors is a false-alarm rate below 1e-6 — while a wrong
  coefficient (or the continuous-time target σ² = 0.25, which 25 steps miss by 20 %) is far outside.
  """
  n = 200_000
  x = _gaussian_samples(num_steps, eta, n, seed=num_steps + int(10 * eta))
  mean, var = _gaussian_chain(num_steps, eta, MU, SIGMA)
  assert abs(x.mean() - mean) < 5 * np.sqrt(var / n), (x.mean(), mean)
  assert abs(x.var() - var) < 5 * var * np.sqrt(2 / n), (x.var(), var)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_gaussian_samples_match_the_data_distribution(eta):
  """1000 steps from the exact marginal at t = 999: samples follow N(μ, σ²).

  The mean is exact at any step count; the variance of the 1000-step chain differs from σ² by its
  discretisation bias (computed exactly: 0.5 % for η=0, 2 % for η=1), so the bound is that bias plus
  5 standard errors of the sample variance (n = 100 000).
  """
  n = 100_000
  abar = _abar_np()[-1]
  start_var = abar * SIGMA**2 + 1 - abar
  init = np.sqrt(abar) * MU + np.sqrt(start_var) * _normal(7, (1, n // 500, 500, 1))
  x = _gaussian_samples(T, eta, n, seed=11, init_noise=init)
  chain_mean, chain_var = _gaussian_chain(T, eta, MU, SIGMA, np.sqrt(abar) * MU, start_var)
  assert abs(chain_mean - MU) < 1e-9 and abs(chain_var / SIGMA**2 - 1) < 0.025
  assert abs(x.mean() - MU) < 5 * SIGMA / np.sqrt(n), x.mean()
  assert abs(x.var() - SIGMA**2) < abs(chain_var - SIGMA**2) + 5 * SIGMA**2 * np.sqrt(2 / n)


def test_strength_starts_from_the_noised_lq_latent():
  """With ε ≡ 0 every step rescales z by sqrt(ᾱ'/ᾱ), so the output reveals the start exactly."""
  zero_eps = lambda params, z, t, lq, emb, mask: jnp.zeros_like(z)
  sample = _sampler(zero_eps, 5)
  lq, noise = _normal(0, (2, 3, 4, 2)), _normal(1, (2, 3, 4, 2))
  emb, mask = _text(2)
  abar = _abar_np()
  for strength, t0 in [(1.0, 999), (0.5, 499), (0.2, 199)]:
    out = sample(None, lq, emb, mask, emb, mask, _key(2), strength=strength, init_noise=noise)
    start = noise if strength == 1 else np.sqrt(abar[t0]) * lq + np.sqrt(1 - abar[t0]) * noise
    np.testing.assert_allclose(out, start / np.sqrt(abar[t0]), rtol=2e-4, atol=1e-4)


def test_clip_x0_bounds_the_prediction():
  x0 = np.full((3, 4, 5, 8), 3.0, np.float32)  # the shapes of the point-mass test: no new compile
  emb, mask = _text(3)
  args = (
    x0,
    np.zeros_like(x0),
    emb,
    mask,
    emb[:1],
    mask[:1],
    _key(0),
    3.5,
    0.0,
    1.0,
    _normal(0, x0.shape),
  )
  np.testing.assert_allclose(_sampler(point_mass_eps, 7, 1.5)(*args), 1.5, atol=1e-5)
  np.testing.assert_allclose(_sampler(point_mass_eps, 7)(*args), 3.0, atol=1e-4)


# ------------------------------------------------------------------ guidance


def _text_eps(params, z, t, lq, emb, mask):
  """A predictor whose output depends on the prompt: per example Σ(emb·mask) + 0.1 z."""
  del params, t, lq
  per_example = jnp.sum(emb * mask[..., None], axis=(1, 2))
  return 0.1 * z + per_example[:, None, None, None]


def test_cfg_formula_and_scale_one_is_the_conditional_branch():
  z = _normal(0, (2, 2, 3, 1))
  emb, mask = _text(2, seed=1)
  neg, neg_mask = _text(1, length=2, seed=2)
  cond = _text_eps(None, z, None, None, emb, mask)
  uncond = _text_eps(None, z, None, None, *diffusion.pad_text(neg, neg_mask, 4, 2))
  guided = jax.jit(diffusion.guided_eps, static_argnums=0)
  for scale in [0.0, 1.0, 3.5]:
    out = guided(_text_eps, None, z, jnp.int32(5), z, emb, mask, neg, neg_mask, jnp.float32(scale))
    np.testing.assert_allclose(out, uncond + scale * (cond - uncond), rtol=1e-5, atol=1e-5)
  # Traced scale 1 (the 2B batch is still evaluated) returns the conditional branch bit for bit.
  out = guided(_text_eps, None, z, jnp.int32(5), z, emb, mask, neg, neg_mask, jnp.float32(1.0))
  np.testing.assert_array_equal(out, cond)


def test_sampler_is_one_program_whose_unconditional_branch_sees_the_negative_prompt():
  """25 steps trace the predictor once; new inputs, CFG scale, η and strength reuse the program."""
  traces, seen = [], []

  def recording_eps(params, z, t, lq, emb, mask):
    traces.append(z.shape)  # runs only while tracing
    jax.debug.callback(
      lambda e, m, tt: seen.append((np.asarray(e), np.asarray(m), np.asarray(tt))),
      emb,
      mask,
      t,
      ordered=True,
    )
    return _text_eps(params, z, t, lq, emb, mask)

  b = 2
  sample = diffusion.make_ddim_sampler(recording_eps, SCHEDULE, 25)
  neg, neg_mask = _text(1, length=6, seed=4)  # longer than the caption, batch 1: padded, broadcast
  for seed, (cfg, eta, strength) in enumerate([(3.5, 0.0, 1.0), (1.5, 1.0, 0.7)]):
    emb, mask = _text(b, length=4, seed=seed)
    mask[1, 3] = False
    seen.clear()
    sample(
      None,
      _normal(seed, (b, 3, 5, 4)),
      emb,
      mask,
      neg,
      neg_mask,
      _key(seed),
      cfg_scale=cfg,
      eta=eta,
      strength=strength,
    ).block_until_ready()
    assert len(seen) == 25
    expected_t = np.round(strength * T * np.arange(25, 0, -1) / 25).astype(int) - 1
    for (e, m, t), t_expected in zip(seen, expected_t):
      assert e.shape == (2 * b, 6, 3) and m.shape == (2 * b, 6)
      np.testing.assert_array_equal(e[:b, :4], emb)
      np.testing.assert_array_equal(m[:b], np.pad(mask, ((0, 0), (0, 2))))
      np.testing.assert_array_equal(e[b:], np.broadcast_to(neg, (b, 6, 3)))
      np.testing.assert_array_equal(m[b:], np.ones((b, 6), bool))
      np.testing.assert_array_equal(t, np.full(2 * b, t_expected))
  assert traces == [(2 * b, 3, 5, 4)]  # one trace of the loop body, with the CFG batch of 2B
  assert sample.program._cache_size() == 1


def test_step_callback_sees_every_step_and_changes_nothing():
  """``callback=`` (progress, previews) is called on the host from inside the one program after
  every step, with its index, timestep and latents; the chain's result is unchanged."""
  b, steps = 2, 6
  sample = _sampler(_text_eps, steps)
  emb, mask = _text(b, seed=3)
  neg, neg_mask = _text(1, length=6, seed=4)
  args = (None, _normal(5, (b, 3, 5, 4)), emb, mask, neg, neg_mask, _key(6))
  options = dict(cfg_scale=2.5, eta=1.0, strength=0.7)
  seen = []
  hooked = sample(*args, **options, callback=lambda i, t, z: seen.append((i, t, np.asarray(z))))
  plain = sample(*args, **options)
  want_t = np.asarray(diffusion.ddim_timesteps(T, steps, 0.7)[0])
  assert sorted((i, t) for i, t, _ in seen) == list(zip(range(steps), want_t.tolist()))
  assert all(z.shape == (b, 3, 5, 4) for _, _, z in seen)
  np.testing.assert_array_equal(max(seen, key=lambda s: s[0])[2], hooked)
  np.testing.assert_allclose(hooked, plain, rtol=1e-6, atol=1e-6)  # measured: bit-equal
  # Each call reaches its own callback; the hooked program compiles once for any callback.
  other = []
  sample(*args, **options, callback=lambda i, t, z: other.append(i))
  assert sorted(other) == list(range(steps)) and len(seen) == steps
  assert sample.program._cache_size() == 2  # with and without the hook


# ------------------------------------------------------------------ training objective


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.8)])
def test_logit_normal_timesteps_match_the_analytic_distribution(mean, std):
  n = 400_000
  t = np.asarray(diffusion.sample_timesteps(_key(0), n, T, "logit_normal", mean, std))
  assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= T - 1
  # P(t <= k) = P(sigmoid(N(m, s²)) < (k+1)/T); binomial standard error, 5σ.
  for k in [9, 99, 249, 499, 749, 899, 989]:
    p = stats.norm.cdf((special.logit((k + 1) / T) - mean) / std)
    assert abs(np.mean(t <= k) - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-4, (k, np.mean(t <= k), p)
  # Quantiles: floor(T · sigmoid(m + s Φ⁻¹(q))), within one step of the integer grid.
  q = np.array([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
  analytic = np.floor(T * special.expit(mean + std * stats.norm.ppf(q)))
  np.testing.assert_allclose(np.quantile(t, q), analytic, atol=1.5)
  uniform = np.asarray(diffusion.sample_timesteps(_key(1), n, T, "uniform"))
  assert abs(uniform.mean() - (T - 1) / 2) < 5 * T / np.sqrt(12 * n)


def test_loss_is_zero_for_the_exact_predictor():
  x0 = _normal(0, (8, 3, 5, 4))
  emb, mask = _text(8)
  scaled_eps = lambda p, z, *rest: p[1] * point_mass_eps(p[0], z, *rest)
  loss_fn = jax.jit(functools.partial(diffusion.training_loss, scaled_eps))
  args = (SCHEDULE, _key(1), x0, x0, emb, mask, emb[:1, :2], mask[:1, :2])
  loss, aux = loss_fn((x0, 1.0), *args)
  assert float(loss) < 1e-8 and aux["t"].shape == (8,)
  # A predictor that outputs 0 pays E[ε²] = 1.
  loss, _ = loss_fn((x0, 0.0), *args)
  assert 0.8 < float(loss) < 1.2
  assert float(diffusion.epsilon_loss(x0, x0)) == 0.0


def test_text_dropout_rate_and_null_replacement():
  n, length = 40_000, 5
  emb = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32)[:, None, None], (n, length, 2))
  mask = jnp.broadcast_to(jnp.arange(length) < 4, (n, length))
  null_emb, null_mask = jnp.full((1, 2, 2), -7.0), jnp.array([[True, False]])
  drop_text = jax.jit(diffusion.drop_text)
  out, out_mask = drop_text(_key(0), emb, mask, null_emb, null_mask, 0.05)
  out, out_mask = np.asarray(out), np.asarray(out_mask)
  dropped = out[:, 0, 0] == -7.0
  rate = dropped.mean()
  assert abs(rate - 0.05) < 5 * np.sqrt(0.05 * 0.95 / n), rate
  # Dropped rows are the empty prompt (padded with masked zeros); kept rows are untouched.
  np.testing.assert_array_equal(out[dropped][:, :2], -7.0)
  np.testing.assert_array_equal(out[dropped][:, 2:], 0.0)
  np.testing.assert_array_equal(
    out_mask[dropped], np.tile([True, False, False, False, False], (dropped.sum(), 1))
  )
  np.testing.assert_array_equal(out[~dropped], np.asarray(emb)[~dropped])
  np.testing.assert_array_equal(out_mask[~dropped], np.asarray(mask)[~dropped])
  none, _ = drop_text(_key(0), emb, mask, null_emb, null_mask, 0.0)
  np.testing.assert_array_equal(none, emb)

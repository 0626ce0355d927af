"""Model-FLOP counting for MFU: the jaxpr counter and the DiT's analytic formula agree."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from zipir_jax import config_lib, flops
from zipir_jax.models import dit as dit_lib


def test_jaxpr_flops_counts_matmuls_convs_and_scan_lengths():
  a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 11))
  assert (
    flops.jaxpr_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 2 * 3 * 5 * 7 * 11
  )
  conv = nn.Conv(8, (3, 3), strides=(2, 2))
  x = jnp.ones((2, 16, 12, 4))
  variables = conv.init(jax.random.key(0), x)
  # Output 2x8x6x8, each element a 3x3x4 window.
  assert flops.jaxpr_flops(lambda v, x: conv.apply(v, x), variables, x) == 2 * (2 * 8 * 6 * 8) * 36
  w = jnp.ones((9, 6, 6))
  scanned = lambda x, w: jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]
  assert flops.jaxpr_flops(jax.jit(scanned), jnp.ones((4, 6)), w) == 9 * 2 * 4 * 6 * 6


@pytest.mark.parametrize("fusion,hw,text_len", [("sum", (3, 5), 7), ("concat", (4, 2), 5)])
def test_dit_forward_flops_equals_the_traced_count(fusion, hw, text_len):
  """With XLA attention every FLOP is a dot_general, so the jaxpr count is the ground truth."""
  config = config_lib.load_config("configs/tiny.py:dit")
  config_lib.apply_overrides(
    config, {"dit.lq_fusion": fusion, "dit.attention_impl": "xla", "dit.patch_size": 1}
  )
  model = dit_lib.build_dit(config)
  params = dit_lib.init_dit(model, jax.random.key(0), 64)
  batch = 2
  z = jnp.zeros((batch, *hw, 64))
  text = jnp.zeros((batch, text_len, config.dit.text_dim))
  mask = jnp.ones((batch, text_len), jnp.int32)
  traced = flops.jaxpr_flops(
    lambda p: model.apply({"params": p}, z, jnp.full((batch,), 10), z, text, mask), params
  )
  assert flops.dit_forward_flops(config, batch, hw, text_len) == pytest.approx(traced, rel=1e-9)

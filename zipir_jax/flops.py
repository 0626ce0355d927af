"""Model FLOPs for MFU: counted from the jaxpr (platform-independent) or analytically for the DiT.

XLA's ``cost_analysis()`` is no use for MFU here: it counts a scanned layer stack once, not once per
layer, and on GPU it does not see cuDNN convolutions or flash attention at all (custom calls). So:

* :func:`jaxpr_flops` traces a function and counts ``2·MACs`` of every ``dot_general`` and
  ``conv_general_dilated``, multiplying scan bodies by their length (enough for the LP-VAE, whose
  networks are convolutions and matmuls; elementwise work is not counted, as MFU conventionally);
* :func:`dit_forward_flops` is the DiT's forward pass: every token-wise weight times the tokens it
  touches (per-sample weights — the timestep MLP and adaLN modulation — once per sample),
  plus attention's ``QKᵀ`` and ``AV``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from zipir_jax.models import autoencoder
from zipir_jax.models import dit as dit_lib


def _dot_flops(eqn) -> float:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
  contract = math.prod(lhs[d] for d in lc)
  batch = math.prod(lhs[d] for d in lb)
  free_l = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
  free_r = math.prod(
    s for d, s in enumerate(rhs) if d not in rc and d not in eqn.params["dimension_numbers"][1][1]
  )
  return 2.0 * batch * free_l * free_r * contract


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  dn = eqn.params["dimension_numbers"]
  # rhs spec: (out_feature, in_feature, *spatial); each output element costs in_feature x window.
  in_features = rhs[dn.rhs_spec[1]]
  window = math.prod(rhs[d] for d in dn.rhs_spec[2:])
  return 2.0 * math.prod(out) * in_features * window


def _jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * _jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "cond":
      total += max(_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    else:  # pjit, remat, custom_jvp/vjp, while (body once): recurse into any sub-jaxpr
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            total += _jaxpr_flops(inner)
  return total


def jaxpr_flops(fn: Callable[..., Any], *args: Any) -> float:
  """``2·MACs`` of the matmuls and convolutions ``fn(*args)`` performs (traced, not run)."""
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def dit_forward_flops(
  config: ml_collections.ConfigDict,
  batch: int,
  latent_hw: tuple[int, int],
  text_len: int | None = None,
) -> float:
  """Forward FLOPs of the config's ZipDiT on ``batch`` latents of ``latent_hw`` (analytic).

  Each kernel counts ``2 x size`` per row it multiplies: the blocks' per sequence token (twice the
  latent tokens under ``lq_fusion="concat"``), the patch embedders and final linear per latent
  token, the text projection and cross-attention keys/values per text token, the timestep MLP and
  every adaLN modulation once per sample. Attention adds ``4·seq·keys·d`` per layer.
  """
  d, depth, p = config.dit.hidden_size, config.dit.depth, config.dit.patch_size
  tokens = (latent_hw[0] // p) * (latent_hw[1] // p)
  seq = tokens * (2 if config.dit.lq_fusion == "concat" else 1)
  text_len = config.text.max_length if text_len is None else text_len
  model = dit_lib.build_dit(config).clone(scan_layers=True)
  params = jax.eval_shape(
    lambda: dit_lib.init_dit(
      model, jax.random.key(0), autoencoder.build_autoencoder(config).latent_channels
    )
  )
  dense = 0.0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [k.key for k in path]
    if names[-1] != "kernel":
      continue
    if "adaLN_modulation" in names or names[0] == "t_embedder":
      rows = 1
    elif names[0].startswith("text_projection") or (
      names[1:2] == ["cross_attn"] and names[2] in ("key", "value")
    ):
      rows = text_len
    elif names[0] == "blocks":
      rows = seq
    else:  # x_embedder, lq_embedder, final_layer.linear
      rows = tokens
    dense += 2.0 * rows * math.prod(leaf.shape)
  attention = depth * (4.0 * seq * seq * d + 4.0 * seq * text_len * d)
  return batch * (dense + attention)

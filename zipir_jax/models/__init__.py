"""Networks of ZipIR: LP-VAE (§3.1), pixel-aware decoder, SD-VAE baseline, discriminator, LPIPS."""

import math
from typing import Any

import jax


def count_params(tree: Any) -> int:
  """Number of scalars in a tree of arrays or ``jax.ShapeDtypeStruct`` (no values read)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

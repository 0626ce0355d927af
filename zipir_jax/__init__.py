"""zipir_jax: ZipIR (Yu et al. 2025) in JAX/Flax.

Conventions, stated once for the whole package:

* Images are NHWC float arrays with pixel values in [-1, 1] inside every model (the latent-diffusion
  autoencoder convention). Conversion from/to uint8 or [0, 1] happens only at I/O boundaries.
* Latents are NHWC too: the LP-VAE latent is ``z = [z_macro | z_coarse | z_fine]`` with 3 + 9 + 52 = 64
  channels at H/32 x W/32 (§3.1).
* Models are pure-functional linen modules; parameters are pytrees, random keys are passed explicitly.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
  """``from zipir_jax import ZipIRPipeline`` without importing JAX for ``import zipir_jax.X``."""
  if name == "ZipIRPipeline":
    from zipir_jax.api import ZipIRPipeline  # pylint: disable=g-import-not-at-top

    return ZipIRPipeline
  raise AttributeError(f"module 'zipir_jax' has no attribute {name!r}")

r"""The 0.68 B-DiT ablation size (Table 4) on the f32c64 LP-VAE.

The DiT (20 layers x hidden 1152, 18 heads of 64) and why: ``config_lib.ablation_dit``. Exact
parameter count: ``python -m zipir_jax.models.summary --config=configs/zipir_0p7b.py``.
"""

from zipir_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config(arg, "lpvae", "configs/zipir_0p7b.py")
  config.name = "zipir_0p7b"
  config_lib.ablation_dit(config)
  config.lock()
  return config

r"""The 0.68 B-DiT ablation size (Table 4) on the f32c64 LP-VAE.

The paper gives only the parameter count. We keep DiT-XL's width (hidden 1152, 16 heads) and pick
the depth so that our block (self-attention, cross-attention, MLP, 9-vector adaLN) totals 0.68 B:
20 layers give 674,617,024 parameters (`python -m zipir_jax.models.summary`). DiT-XL's own 28 layers
would give 0.94 B with cross-attention.
"""

from zipir_jax import config_lib


def get_config(arg=None):
  stage = config_lib.parse_stage(arg, config_lib.LPVAE_STAGES, "configs/zipir_0p7b.py")
  config = config_lib.base_config(stage, config_lib.LPVAE_STAGES)
  config.name = "zipir_0p7b"
  config.dit.depth = 20
  config.dit.hidden_size = 1152
  config.dit.num_heads = 16
  config.lock()
  return config

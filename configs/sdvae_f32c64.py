r"""Ablation baseline (Table 4): 0.68 B DiT (as configs/zipir_0p7b.py) on an f32c64 SD-VAE.

One LDM encoder/decoder with z_channels=64 and mult [1,2,4,4,4,4] (supp. A), LDM's middle attention
kept; trained "with the same settings as f32c64-LP-VAE". Stages: vae | dit. The ablation's row
("+ f32c64-SDVAE") comes before the pixel-aware decoder, so restorations decode with the SD-VAE's
own decoder (no fusion levels, no extractor).
"""

from zipir_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config(arg, "sdvae", "configs/sdvae_f32c64.py")
  config.name = "sdvae_f32c64"
  config_lib.sdvae(config)
  config_lib.ablation_dit(config)
  config.lock()
  return config

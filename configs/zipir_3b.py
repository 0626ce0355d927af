r"""ZipIR as in the paper: f32c64 LP-VAE + 3.1 B DiT (24 layers, hidden 2048, 16 heads).

  python train.py --config=configs/zipir_3b.py:vae_coarse --workdir=...
  python -m zipir_jax.models.summary --config=configs/zipir_3b.py

The argument picks the training stage: vae_coarse | vae_fine | pixel_decoder | dit (default dit).
"""

from zipir_jax import config_lib


def get_config(arg=None):
  stage = config_lib.parse_stage(arg, config_lib.LPVAE_STAGES, "configs/zipir_3b.py")
  config = config_lib.base_config(stage, config_lib.LPVAE_STAGES)
  config.name = "zipir_3b"
  # §4: coarse LP-VAE batch 512 for 50K iterations; fine LP-VAE batch 160 on 512² for 100K
  # (then a 1K-patch adaptation, batch 32 on 1024², 50K); DiT batch 128 for 250K.
  config.optim.batch_size, config.optim.num_steps = {
    "vae_coarse": (512, 50_000),
    "vae_fine": (160, 100_000),
    "pixel_decoder": (32, 50_000),
    "dit": (128, 250_000),
  }[stage]
  config.lock()
  return config

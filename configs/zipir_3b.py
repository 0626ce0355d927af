r"""ZipIR as in the paper: f32c64 LP-VAE + 3.1 B DiT (24 layers, hidden 2048, 16 heads).

  python train.py --config=configs/zipir_3b.py:vae_coarse --workdir=...
  python -m zipir_jax.models.summary --config=configs/zipir_3b.py --stages

The argument picks the training stage: vae_coarse | vae_fine | pixel_decoder | dit (default dit).
Each stage trains with the paper's recipe (§4, supp. A; zipir_jax/training/stages.py): vae_coarse
512² x 512 for 50K steps, vae_fine 512² x 160 for 100K then 1024² x 32 for 50K, pixel_decoder
1024² x 32 for 50K, dit 512²-4096² buckets x 128 for 250K; L1 + LPIPS + GAN (+ KL) for the VAE
stages (LPIPS needs --config.loss.lpips_vgg16), ε-prediction for the DiT.
"""

from zipir_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config(arg, "lpvae", "configs/zipir_3b.py")
  config.name = "zipir_3b"
  config.lock()
  return config

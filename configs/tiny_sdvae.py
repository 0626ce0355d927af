r"""configs/sdvae_f32c64.py's SD-VAE ablation at configs/tiny.py's toy widths (CPU tests, smoke runs).

python train.py --config=configs/tiny_sdvae.py:vae --workdir=runs/tiny_sdvae
python train.py --config=configs/tiny_sdvae.py:dit --workdir=runs/tiny_sdvae
"""

from zipir_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config(arg, "sdvae", "configs/tiny_sdvae.py")
  config.name = "tiny_sdvae"
  config_lib.sdvae(config)
  config_lib.tiny(config)
  config.lock()
  return config

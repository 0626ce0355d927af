r"""The learning benchmark's model (bench/learning.py): the paper's structure, small enough to
train through all four stages and the SD-VAE ablation on a 2-core CPU in under an hour.

Same compression (32x), latent layout and stages as the paper; widths, depths, crop sizes and
steps shrink. Departures from configs/tiny.py (``config_lib.learning``): 128² crops (at 8x a 64²
crop leaves the pixel decoder an LQ image 8 pixels wide), the fig4 scale (8x), a deeper DiT, lr
3e-4. Like tiny, LPIPS and the GAN are off, and each stage's log says so: no package ships the
VGG16 weights, and a discriminator needs far more than a few hundred steps to help.
"""

from zipir_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config(arg, "lpvae", "configs/learning.py")
  config.name = "learning"
  config_lib.tiny(config)
  config_lib.learning(config)
  config.lock()
  return config

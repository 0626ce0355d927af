r"""configs/learning.py's comparison autoencoder: the f32c64 SD-VAE (Table 4) at comparable
parameters, trained by bench/learning.py for as many steps as the LP-VAE's two autoencoder stages.
"""

from zipir_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config(arg, "sdvae", "configs/learning_sdvae.py")
  config.name = "learning_sdvae"
  config_lib.sdvae(config)
  config_lib.tiny(config)
  config_lib.learning(config)
  config.lock()
  return config

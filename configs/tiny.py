r"""A few-second CPU configuration: the paper's structure (f32c64 LP-VAE, every stage) at toy width.

Same compression (32x), same latent layout [macro 3 | coarse 9 | fine 52], same stages; only widths,
depths and batch sizes shrink. Used by the tests, the demo and the notebook.
"""

from zipir_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config(arg, "lpvae", "configs/tiny.py")
  config.name = "tiny"
  config_lib.tiny(config)
  if config.stage == "pixel_decoder":
    # D_f*'s fusion layers start at zero and modulate every decoder level: the decoder copied from
    # D_f is far more sensitive to them than fresh layers, so this stage trains at a tenth of the
    # tiny lr (StableSR trains its fusion at 5e-5, as the paper's configs do).
    config.optim.lr = 1e-4
    config.optim.end_lr = 1e-5
  config.lock()
  return config

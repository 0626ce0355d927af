r"""A few-second CPU configuration: the paper's structure (f32c64 LP-VAE, every stage) at toy width.

Same compression (32x), same latent layout [macro 3 | coarse 9 | fine 52], same stages; only widths,
depths and batch sizes shrink. Used by the tests, the demo and the notebook.
"""

from zipir_jax import config_lib


def get_config(arg=None):
  stage = config_lib.parse_stage(arg, config_lib.LPVAE_STAGES, "configs/tiny.py")
  config = config_lib.base_config(stage, config_lib.LPVAE_STAGES)
  config.name = "tiny"
  config.vae.ch = 16
  config.vae.num_res_blocks = 1
  config.vae.num_groups = 8
  config.discriminator.ch = 16
  config.discriminator.num_layers = 2
  config.dit.depth = 2
  config.dit.hidden_size = 64
  config.dit.num_heads = 4
  config.dit.text_dim = 64
  config.dit.dtype = "float32"
  config.vae.frozen_dtype = "float32"  # CPU: XLA emulates bf16 convolutions (slower, not faster).
  config.diffusion.sample_steps = 4
  config.text.max_length = 32
  config.text.dtype = "float32"
  config.data.buckets = ((64, 64, 4), (64, 96, 4))  # (height, width, batch size)
  config.data.num_workers = 0
  config.data.size_probe_records = 16
  config.data.eval_size = (64, 64)
  config.data.eval_preset = "sr8"
  config.data.eval_batch_size = 2
  config.optim.lr = 1e-3
  config.optim.end_lr = 1e-4
  config.optim.warmup_steps = 10
  config.optim.batch_size = 4
  config.optim.num_steps = 100
  if stage == "pixel_decoder":
    # D_f*'s fusion layers start at zero and modulate every decoder level: the decoder copied from
    # D_f is far more sensitive to them than fresh layers, so this stage trains at a tenth of the
    # tiny lr (StableSR trains its fusion at 5e-5, as the paper's configs do).
    config.optim.lr = 1e-4
    config.optim.end_lr = 1e-5
  config.lock()
  return config

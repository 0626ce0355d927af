r"""The learning benchmark's model (bench/learning.py): the paper's structure, small enough to
train through all four stages on a CPU in about an hour, wide enough to learn.

Same compression (32x), latent layout and stages as the paper; widths, depths, crop sizes and
steps shrink. Departures from configs/tiny.py, measured in BENCHMARKS.md ("Does it learn?"):
wider and deeper networks, larger crops (at 8-16x down-scaling a 64² crop leaves the pixel decoder
an LQ image 4-8 pixels wide), and the degradations the evaluation presets use.
"""

from zipir_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config(arg, "lpvae", "configs/learning.py")
  config.name = "learning"
  config_lib.tiny(config)
  config_lib.learning(config)
  config.lock()
  return config

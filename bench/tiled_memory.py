r"""Peak live memory of the tiled LP-VAE encode and D_f* decode, measured small, scaled to 8192².

  python bench/tiled_memory.py --config=configs/zipir_3b.py --sizes=256,512 --target=8192

The tiled path (models/tiling.py) runs the networks eagerly, module by module, so its memory is the
set of whole-image arrays alive between calls. This script runs it on the CPU at small sizes with
the paper's widths and the bf16 compute dtype, samples the bytes of every live jax array after each
module call, and reports the peak above what was alive before (parameters, inputs). Activations scale
with the pixel count (compare the scaled values of the two sizes), so the peak at ``--target`` is
the small-size peak times the pixel ratio: how an 8192² decode's memory can be budgeted without a
140 GiB card, and where it goes (the module at the peak). Sampling between module calls misses
what lives only inside one (a padded copy, a float32 intermediate), so it is a lower bound;
``--rss`` measures the true peak instead — the process's peak resident memory during a second run
of the part (the first compiles) minus before it, each part in a fresh process (slower).

  python bench/tiled_memory.py --sizes=1024 --rss --parts=decode
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp

from bench import common
from zipir_jax import config_lib
from zipir_jax.models import autoencoder, tiling
from zipir_jax.models.pixel_decoder import init_from_autoencoder


def live_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


def peak_during(fn) -> tuple[int, str]:
  """(peak live bytes above the bytes alive before ``fn()``, the module call at the peak)."""
  base = live_bytes()
  peak = [0, ""]

  def sample(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    used = live_bytes() - base
    if used > peak[0]:
      peak[:] = [used, f"{type(context.module).__name__} {context.module.name}"]
    return out

  with nn.intercept_methods(sample):
    jax.block_until_ready(fn())
  return peak[0], peak[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/zipir_3b.py")
  parser.add_argument("--sizes", default="256,512")
  parser.add_argument("--target", type=int, default=8192)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--parts", default="encode,decode")
  parser.add_argument(
    "--strip_rows",
    type=int,
    default=0,
    help="strip height at --target (scaled down with the size); 0 = the config's",
  )
  parser.add_argument(
    "--rss",
    action="store_true",
    help="peak resident memory of a fresh process per part (CPU) instead",
  )
  args = parser.parse_args()
  if args.rss and "," in args.sizes + args.parts:
    for size in args.sizes.split(","):
      for part in args.parts.split(","):
        cmd = [
          sys.executable,
          __file__,
          f"--config={args.config}",
          f"--sizes={size}",
          f"--target={args.target}",
          f"--dtype={args.dtype}",
          f"--parts={part}",
          "--rss",
          f"--strip_rows={args.strip_rows}",
        ]
        subprocess.run(cmd, check=True)
    return
  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(config, {"vae.dtype": args.dtype})
  vae = autoencoder.build_autoencoder(config)
  pd = autoencoder.build_pixel_decoder(config)
  f = vae.factor
  vae_params = jax.jit(lambda k: autoencoder.init_autoencoder(vae, k, (1, f, f, 3)))(
    jax.random.key(0)
  )
  fresh = nn.meta.unbox(
    jax.jit(pd.init)(
      jax.random.key(1), jnp.zeros((1, 1, 1, vae.latent_channels)), jnp.zeros((1, f, f, 3))
    )
  )["params"]
  pd_params = init_from_autoencoder(fresh, vae_params["fine_encoder"], vae_params["fine_decoder"])
  # The restorer's strip height, scaled so that a small image has as many strips as the target.
  rows = args.strip_rows or config.restore.tile_strip_rows
  print(
    f"# {args.config} {args.dtype}; live jax arrays sampled after every module call (CPU); "
    f"strips of {rows} rows at {args.target}², scaled with the size"
  )
  print(
    f"| part | size | peak above params+inputs MiB | at module | scaled to {args.target}² GiB |"
  )
  print("|---|---|---|---|---|")
  for size in (int(s) for s in args.sizes.split(",")):
    strip = max(1, rows * size // args.target)
    image = jax.random.uniform(jax.random.key(2), (1, size, size, 3), minval=-1, maxval=1)
    z = jnp.zeros((1, size // f, size // f, vae.latent_channels))
    scale = (args.target / size) ** 2
    with tiling.tiled_convolutions(strip):
      parts = {
        "encode": lambda image=image: vae.apply({"params": vae_params}, image, method="encode")[0],
        "decode": lambda z=z, image=image: pd.apply(
          {"params": pd_params}, z, image, jnp.float32(1.0)
        ),
      }
      for name in args.parts.split(","):
        fn = parts[name]
        if args.rss:
          jax.block_until_ready(fn())  # compiles every strip program: not the image's memory
          before = common.reset_peak_rss()
          jax.block_until_ready(fn())
          peak, where = common.peak_rss() - before, "(peak RSS of the process)"
        else:
          peak, where = peak_during(fn)
        print(
          f"| {name} | {size}² | {peak / 2**20:.1f} | {where} | {peak * scale / 2**30:.1f} |",
          flush=True,
        )


if __name__ == "__main__":
  main()

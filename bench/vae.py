r"""LP-VAE encode + decode speed (random weights), one jitted program each, median of repeats.

  python bench/vae.py                                   # tiny and paper widths, 512² and 1024²
  python bench/vae.py --configs=zipir_3b --sizes=2048 --dtype=bfloat16 --repeats=5   # on a GPU

Prints one Markdown row per (config, size): compile time, median encode / decode time, the FLOPs XLA
counts for each program and the achieved rate. Paste the table into BENCHMARKS.md with the machine,
date and command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax

from zipir_jax import config_lib, flops
from zipir_jax.models import autoencoder


def _time(fn, *args, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def bench_one(config_name: str, size: int, batch: int, dtype: str, repeats: int) -> dict:
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
  config = config_lib.load_config(os.path.join(root, f"{config_name}.py"))
  config_lib.apply_overrides(config, {"vae.dtype": dtype})
  module = autoencoder.build_autoencoder(config)
  shape = (batch, size, size, 3)
  params = jax.jit(lambda k: autoencoder.init_autoencoder(module, k, shape))(jax.random.key(0))
  image = jax.random.uniform(jax.random.key(1), shape, minval=-1, maxval=1)

  start = time.perf_counter()
  encode = (
    jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode")[0])
    .lower(params, image)
    .compile()
  )
  z = encode(params, image)
  decode = (
    jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode")).lower(params, z).compile()
  )
  jax.block_until_ready(decode(params, z))
  compile_s = time.perf_counter() - start

  enc = statistics.median(_time(encode, params, image, repeats=repeats))
  dec = statistics.median(_time(decode, params, z, repeats=repeats))
  enc_flops = flops.jaxpr_flops(
    lambda p, x: module.apply({"params": p}, x, method="encode")[0], params, image
  )
  dec_flops = flops.jaxpr_flops(
    lambda p, z: module.apply({"params": p}, z, method="decode"), params, z
  )
  return dict(
    config=config_name,
    size=size,
    batch=batch,
    dtype=dtype,
    compile_s=compile_s,
    encode_ms=enc * 1e3,
    decode_ms=dec * 1e3,
    encode_gflop=enc_flops / 1e9,
    decode_gflop=dec_flops / 1e9,
    gflops=(enc_flops + dec_flops) / (enc + dec) / 1e9,
    repeats=repeats,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="tiny,zipir_3b")
  parser.add_argument("--sizes", default="512,1024")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  device = jax.devices()[0]
  print(
    f"# {datetime.date.today()}  {device.platform}: {device.device_kind}  "
    f"({os.cpu_count()} host cores, {platform.processor() or platform.machine()})  "
    f"jax {jax.__version__}"
  )
  print(f"# command: python {' '.join(sys.argv)}")
  print(
    "| config | size | batch | dtype | compile s | encode ms | decode ms | encode GFLOP | "
    "decode GFLOP | GFLOP/s | repeats |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for name in args.configs.split(","):
    for size in (int(s) for s in args.sizes.split(",")):
      r = bench_one(name, size, args.batch, args.dtype, args.repeats)
      print(
        f"| {r['config']} | {r['size']}² | {r['batch']} | {r['dtype']} | {r['compile_s']:.1f} | "
        f"{r['encode_ms']:.0f} | {r['decode_ms']:.0f} | {r['encode_gflop']:.0f} | "
        f"{r['decode_gflop']:.0f} | {r['gflops']:.0f} | {r['repeats']} |",
        flush=True,
      )


if __name__ == "__main__":
  main()

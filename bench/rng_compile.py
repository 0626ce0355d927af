r"""Compile time of random initialisation, with and without JAX's threefry GPU kernel lowering.

  python bench/rng_compile.py --draws=24        # exit 0: on this GPU, use JAX_THREEFRY_GPU_KERNEL_LOWERING=1

Random initialisation compiles one threefry hash per parameter. On GPU, JAX lowers each as the fully
unrolled 20-round hash (an out-of-line function per draw); ``jax_threefry_gpu_kernel_lowering`` makes
it one call of a prebuilt CUDA kernel computing the same bits. On this project's 2-core CPU (rolled
loop) one truncated-normal draw costs about 0.6 s of compile, and the paper config's random
LP-VAE, D_f* and DiT (bench/restore.py's bundle: 354 draws) 35 s; the H200 took 165 s to
initialise that bundle cold on 2026-11-26 (then partly op by op), and every training row of the
device suite compiles its own initialisation.

This compiles ``--draws`` conv-kernel-shaped draws (flax's default ``lecun_normal``, as the VAE's
convolutions) both ways, with the persistent compilation cache off, checks the two give the same
bits, and prints one JSON line. Exit status 0 only where the kernel lowering is bit-identical and
compiles faster (so ``bench/device_suite.sh`` enables it for the whole suite); 3 where it does not
apply (not a CUDA or ROCm GPU); 1 otherwise.
"""

import argparse
import json
import sys
import time

import flax.linen as nn
import jax
import numpy as np


def draws_fn(n: int):
  """``n`` truncated-normal conv kernels of distinct shapes, from one key (one program)."""
  shapes = [(3, 3, 32 * (1 + i % 8), 64 * (1 + i // 8)) for i in range(n)]
  init = nn.initializers.lecun_normal()

  def fn(key):
    return [init(k, s) for k, s in zip(jax.random.split(key, n), shapes)]

  return fn


def compile_seconds(fn, key, kernel: bool) -> tuple[float, list[np.ndarray]]:
  """(seconds to lower and compile ``fn``, its outputs) with the kernel lowering on or off."""
  jax.config.update("jax_threefry_gpu_kernel_lowering", kernel)
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(key).compile()
  seconds = time.perf_counter() - start
  return seconds, [np.asarray(x) for x in compiled(key)]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--draws", type=int, default=24, help="parameters drawn in the program")
  args = parser.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)  # cold compiles, both times
  key = jax.random.key(0, impl="threefry2x32")  # JAX's default generator, whatever the env says
  fn = draws_fn(args.draws)
  platform = jax.devices()[0].platform
  result = {
    "device": jax.devices()[0].device_kind,
    "platform": platform,
    "draws": args.draws,
    "jax": jax.__version__,
  }
  try:  # (a jax without the option, or a GPU plugin without the kernel, ends here)
    default_s, default = compile_seconds(fn, key, kernel=False)
    result["default_compile_s"] = round(default_s, 2)
    kernel_s, kernel = compile_seconds(fn, key, kernel=True)
  except Exception as e:  # pylint: disable=broad-except
    result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    print(json.dumps(result), flush=True)
    return 1
  result["kernel_compile_s"] = round(kernel_s, 2)
  result["bit_identical"] = all(np.array_equal(a, b) for a, b in zip(default, kernel))
  print(json.dumps(result), flush=True)
  if platform != "gpu":
    return 3  # the kernel lowering exists for CUDA and ROCm only: nothing changed here
  return 0 if result["bit_identical"] and kernel_s < default_s else 1


if __name__ == "__main__":
  sys.exit(main())

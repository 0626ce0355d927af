r"""DDIM step time with and without the per-step progress bar and callback (ZipIRPipeline's hook).

  PYTHONPATH=. python bench/sampler_progress.py --config=configs/tiny.py --size=2048 --steps=5
  python bench/sampler_progress.py --config=configs/zipir_3b.py --dtype=bfloat16   # GPU (suite)

Side by side in one run, random DiT weights, batch 1, CFG (batch 2B):

* ``one program``: the whole chain as one ``lax.fori_loop`` program (no hook);
* ``one program + host callback``: ZipIRPipeline's path with the progress bar and a
  ``callback(step, t, latents)``: the same program with a ``jax.debug.callback`` after each step;
* ``Python loop + bar + callback``: the alternative the pipeline does not take: one jitted step
  per DDIM step called from Python, the bar updated after each step really ran.

Each variant runs once untimed (compilation), then --repeats rounds time one full chain of every
variant in turn (interleaved, so a change in the machine's load reaches every row); a row is the
median over its rounds, divided by the step count. Paste the output into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from bench import common  # pylint: disable=g-import-not-at-top
from zipir_jax import api, config_lib, diffusion
from zipir_jax.models import autoencoder
from zipir_jax.models import dit as dit_lib


def python_loop_sampler(denoise_fn, schedule, num_steps):
  """The chain as a Python loop over one jitted :func:`diffusion.ddim_guided_step`."""
  start = jax.jit(lambda lq, rng: diffusion.ddim_start(schedule, lq, rng, num_steps))
  step = jax.jit(
    lambda params, i, z, ts, ts_prev, rng_steps, lq, emb, mask: diffusion.ddim_guided_step(
      denoise_fn, params, schedule, i, z, ts, ts_prev, rng_steps, lq, emb, mask, emb, mask
    )
  )

  def sample(params, lq, emb, mask, rng, callback):
    z, ts, ts_prev, rng_steps = start(lq, rng)
    timesteps = np.asarray(ts)
    for i in range(num_steps):
      z = jax.block_until_ready(step(params, i, z, ts, ts_prev, rng_steps, lq, emb, mask))
      callback(i, int(timesteps[i]), z)
    return z

  return sample


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--size", type=int, default=2048, help="output side (latent = size / 32)")
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", help="DiT compute dtype (bfloat16 on a GPU)")
  args = parser.parse_args()
  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(config, {"dit.dtype": args.dtype})
  dit = dit_lib.build_dit(config)
  channels = 64
  params = dit_lib.inference_params(
    dit_lib.init_dit(dit, jax.random.key(0), channels), autoencoder.compute_dtype(args.dtype)
  )
  side = args.size // 32
  lq = jnp.asarray(np.random.default_rng(0).standard_normal((1, side, side, channels)), jnp.float32)
  emb = jnp.zeros((1, config.text.max_length, config.dit.text_dim), jnp.float32)
  mask = jnp.ones((1, config.text.max_length), bool)
  schedule = diffusion.schedule_from_config(config.diffusion)
  denoise = dit_lib.as_denoise_fn(dit)
  sampler = diffusion.make_ddim_sampler(denoise, schedule, args.steps)
  rng = jax.random.key(1)
  sink = io.StringIO()  # the bars draw here: their cost counts, the console stays readable

  def hook():
    bar = tqdm(total=args.steps, file=sink, mininterval=0)
    return bar, api._on_step(bar, lambda step, t, latents: None)  # pylint: disable=protected-access

  def with_host_callback():
    bar, on_step = hook()
    z = sampler(params, lq, emb, mask, emb, mask, rng, callback=on_step)
    bar.close()
    return z

  looped = python_loop_sampler(denoise, schedule, args.steps)

  def with_python_loop():
    bar, on_step = hook()
    z = looped(params, lq, emb, mask, rng, on_step)
    bar.close()
    return z

  rows = {
    "one program (no hook)": lambda: sampler(params, lq, emb, mask, emb, mask, rng),
    "one program + host callback: bar + callback (pipeline)": with_host_callback,
    "Python loop over a jitted step + bar + callback": with_python_loop,
  }
  device = jax.devices()[0]
  print(
    f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {device.platform}: {device.device_kind}  "
    f"{os.cpu_count()} cores  jax {jax.__version__}"
  )
  print(f"# command: python {' '.join(sys.argv)}")
  print(
    f"# {os.path.basename(args.config)} DiT ({args.dtype}), {args.size}² output "
    f"({side}x{side} latent), "
    f"{args.steps} steps, batch 1 (CFG 2B), {args.repeats} interleaved rounds"
  )
  for fn in rows.values():  # compile every variant first
    jax.block_until_ready(fn())
  times = {name: [] for name in rows}
  for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits all rows
    for name, fn in rows.items():
      times[name].append(common.median_time(fn, 1, warmup=0) / args.steps)
  print("| sampler | ms / step (median) | all runs, ms / step | vs one program |")
  print("|---|---|---|---|")
  base = statistics.median(next(iter(times.values())))
  for name, values in times.items():
    median = statistics.median(values)
    runs = ", ".join(f"{v * 1e3:.0f}" for v in values)
    print(f"| {name} | {median * 1e3:.1f} | {runs} | {median / base:.3f}x |", flush=True)


if __name__ == "__main__":
  main()

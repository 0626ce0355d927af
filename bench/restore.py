r"""Full restoration with random weights: encode, DDIM step (CFG batch 2B), decode, total, memory, MFU.

  python bench/restore.py --config=configs/zipir_3b.py --sizes=2048,4096 --dtype=bfloat16
  python bench/restore.py --config=configs/tiny.py --sizes=256 --dtype=float32   # CPU smoke run

Side by side in the same run: a plain JAX DiT layer stack of the same depth, width and token count
(self-attention + MLP per layer, no adaLN/cross-attention/RoPE) — the floor ZipDiT's step is compared
with. MFU = the analytic FLOPs of one guided step (``zipir_jax.flops``: XLA's cost analysis counts a
scanned stack once and misses cuDNN attention) / step time / the bf16 (or --dtype) matmul rate
measured at the start of the same run (``bench/common.py``). Every time is a median over --repeats
after one untimed warm-up call. ``--parts`` picks what runs (e.g. ``encode,decode`` for the memory
at 8192²; parts not run print as nan).
Paste the output into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench import common  # pylint: disable=g-import-not-at-top
from zipir_jax import bundle as bundle_lib
from zipir_jax import config_lib, diffusion, restore
from zipir_jax import flops as flops_lib
from zipir_jax.models import autoencoder
from zipir_jax.models import dit as dit_lib

PARTS = ("encode", "decode", "step", "plain", "total")


def plain_stack_flops(depth: int, hidden: int, tokens: int, batch: int) -> float:
  """Forward FLOPs of :func:`plain_stack_step`: 12·d² weights per token and attention per layer."""
  return batch * depth * (2.0 * 12 * hidden * hidden * tokens + 4.0 * tokens * tokens * hidden)


def plain_stack_step(
  depth: int, hidden: int, heads: int, tokens: int, batch: int, dtype, implementation: str | None
):
  """A plain pre-norm transformer stack (attention + 4x MLP), scanned: (compiled fn, args)."""
  keys = jax.random.split(jax.random.key(0), 4)
  scale = hidden**-0.5
  w = {
    "qkv": jax.random.normal(keys[0], (depth, hidden, 3 * hidden), dtype) * scale,
    "out": jax.random.normal(keys[1], (depth, hidden, hidden), dtype) * scale,
    "up": jax.random.normal(keys[2], (depth, hidden, 4 * hidden), dtype) * scale,
    "down": jax.random.normal(keys[3], (depth, 4 * hidden, hidden), dtype) * scale,
  }
  x = jnp.ones((batch, tokens, hidden), dtype)

  def layer(x, p):
    h = x * jax.lax.rsqrt(
      jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-6
    ).astype(dtype)
    q, k, v = jnp.split(h @ p["qkv"], 3, axis=-1)
    q, k, v = (t.reshape(batch, tokens, heads, hidden // heads) for t in (q, k, v))
    a = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    x = x + a.reshape(batch, tokens, hidden) @ p["out"]
    return x + jax.nn.gelu(x @ p["up"]) @ p["down"], None

  fn = jax.jit(lambda x, w: jax.lax.scan(layer, x, w)[0]).lower(x, w).compile()
  return fn, (x, w)


def _progress(message: str) -> None:
  """Phase marks on stderr, so a run cut off by a time limit still shows how far it got."""
  print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def bench(
  config_name: str,
  size: int,
  dtype: str,
  repeats: int,
  total_repeats: int,
  peak_tflops: float,
  parts: frozenset[str] = frozenset(PARTS),
) -> dict:
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
  config = config_lib.load_config(os.path.join(root, f"{config_name}.py"))
  config_lib.apply_overrides(config, {"vae.dtype": dtype, "dit.dtype": dtype, "text.dtype": dtype})
  _progress(f"{config_name} {size}²: initialising random weights")
  bundle = bundle_lib.random_bundle(config, jax.random.key(0))
  _progress("random weights ready; the Restorer casts the DiT")
  restorer = restore.Restorer(bundle)
  del bundle  # the Restorer keeps the DiT only in the compute dtype: the device holds what
  # sample.py holds, without the bundle's float32 copy.
  params = restorer.params
  _progress(f"restorer ready; {_live_gib():.1f} GiB of arrays on the device")
  factor = restorer.factor
  lq = np.random.default_rng(0).integers(0, 256, (size // 8, size // 8, 3), np.uint8)

  # Encode / decode as the restorer runs them (tiled from config.restore.tile_min_pixels on).
  lq_up = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, size, size, 3)), jnp.float32)
  failures: dict[str, str] = {}

  def phase(name: str, part: str, fn, *, repeats: int = repeats) -> float:
    """Median seconds of ``fn`` (nan if it fails: e.g. out of memory at 8192², reported by name;
    nan without running if ``part`` is not in ``parts``)."""
    if part not in parts:
      return float("nan")
    _progress(f"{name}: start")
    try:
      seconds = common.median_time(fn, repeats)
    except Exception as e:  # pylint: disable=broad-except
      failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      _progress(f"{name}: FAILED {failures[name]}")
      return float("nan")
    _progress(f"{name}: {seconds * 1e3:.1f} ms; peak so far {_peak_gib():.1f} GiB")
    return seconds

  encode_s = phase("encode", "encode", lambda: restorer.encode(params, lq_up))
  # The decoder's input: the latent of the right shape (zeros if the encoder failed).
  latent = jnp.zeros(
    (1, size // factor, size // factor, params["latent_stats"]["mean"].shape[-1]), jnp.float32
  )
  decode_s = phase(
    "decode", "decode", lambda: restorer.decode(params, latent, lq_up, jnp.float32(1.0))
  )

  # One guided DDIM step: the DiT on the CFG batch 2B, with the sampler's parameters.
  text_emb, text_mask = restorer.encode_text([""])
  denoise = dit_lib.as_denoise_fn(restorer.dit)
  step = jax.jit(
    lambda p, z, t: diffusion.guided_eps(
      denoise, p, z, t, latent, text_emb, text_mask, text_emb, text_mask, 3.5
    )
  )
  t = jnp.full((1,), 500)
  step_s = phase("DiT step", "step", lambda: step(restorer.dit_params, latent, t))
  step_flops = flops_lib.dit_forward_flops(config, 2 * latent.shape[0], latent.shape[1:3])

  tokens = (size // factor // config.dit.patch_size) ** 2
  tokens *= 2 if config.dit.lq_fusion == "concat" else 1
  plain_s = phase("plain stack", "plain", lambda: _plain_call(config, tokens, dtype))
  plain_flops = plain_stack_flops(config.dit.depth, config.dit.hidden_size, tokens, 2)

  total_s = phase(
    "full restore", "total", lambda: restorer.restore([lq], (size, size)), repeats=total_repeats
  )
  return dict(
    config=config_name,
    size=size,
    tokens=tokens,
    dtype=dtype,
    tiled=restorer.tiled(size, size),
    encode_ms=encode_s * 1e3,
    decode_ms=decode_s * 1e3,
    step_ms=step_s * 1e3,
    steps=config.diffusion.sample_steps,
    total_s=total_s,
    mfu=step_flops / step_s / (peak_tflops * 1e12),
    plain_ms=plain_s * 1e3,
    plain_mfu=plain_flops / plain_s / (peak_tflops * 1e12),
    peak_gib=_peak_gib(),
    failures=failures,
  )


def _plain_call(config, tokens: int, dtype: str):
  """One call of the side-by-side plain stack (compiled on first use, inside the timed warm-up)."""
  fn, args = _plain_stack(
    config.dit.depth, config.dit.hidden_size, config.dit.num_heads, tokens, dtype
  )
  return fn(*args)


@functools.cache
def _plain_stack(depth: int, hidden: int, heads: int, tokens: int, dtype: str):
  return plain_stack_step(
    depth,
    hidden,
    heads,
    tokens,
    2,
    autoencoder.compute_dtype(dtype),
    "cudnn" if jax.default_backend() == "gpu" else None,
  )


def _live_gib() -> float:
  return sum(x.nbytes for x in jax.live_arrays()) / 2**30


def _peak_gib() -> float:
  return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", float("nan")) / 2**30


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/zipir_3b.py")
  parser.add_argument("--sizes", default="2048")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per part")
  parser.add_argument("--total_repeats", type=int, default=3, help="timed full restores")
  parser.add_argument(
    "--peak_tflops",
    type=float,
    default=0.0,
    help="MFU denominator; 0 = the matmul rate measured now",
  )
  parser.add_argument(
    "--parts",
    default=",".join(PARTS),
    help=f"comma-separated subset of {','.join(PARTS)} (total: the full restore)",
  )
  args = parser.parse_args()
  parts = frozenset(args.parts.split(","))
  if not parts or not parts <= set(PARTS):
    parser.error(f"--parts={args.parts}: choose from {','.join(PARTS)}")
  name = os.path.splitext(os.path.basename(args.config))[0]
  device = jax.devices()[0]
  peak = args.peak_tflops or common.matmul_tflops(
    8192 if device.platform == "gpu" else 1024, autoencoder.compute_dtype(args.dtype)
  )
  print(
    f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {device.platform}: {device.device_kind}  "
    f"jax {jax.__version__}  MFU denominator {peak:.0f} TFLOP/s "
    f"({'given' if args.peak_tflops else 'measured matmul rate'})"
  )
  print(f"# command: python {' '.join(sys.argv)}")
  print(
    "| config | size | tokens | dtype | tiled | encode ms | DiT step ms (CFG 2B) | MFU | "
    "plain stack ms | plain MFU | decode ms | total s (steps) | peak GiB |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for size in (int(s) for s in args.sizes.split(",")):
    r = bench(name, size, args.dtype, args.repeats, args.total_repeats, peak, parts)
    print(
      f"| {r['config']} | {r['size']}² | {r['tokens']} | {r['dtype']} | {r['tiled']} | "
      f"{r['encode_ms']:.1f} | {r['step_ms']:.1f} | {r['mfu']:.0%} | {r['plain_ms']:.1f} | "
      f"{r['plain_mfu']:.0%} | {r['decode_ms']:.1f} | {r['total_s']:.2f} ({r['steps']}) | "
      f"{r['peak_gib']:.1f} |",
      flush=True,
    )
    for name, error in r["failures"].items():
      print(f"# {r['config']} {r['size']}²: {name} failed: {error}", flush=True)


if __name__ == "__main__":
  main()

r"""DiT training-step throughput and MFU (the jitted ``train_step`` of stage ``dit``, random weights).

  python bench/train_step.py --config=configs/zipir_3b.py:dit --resolution=1024 --batch=8
  python bench/train_step.py --config=configs/tiny.py:dit --resolution=64 --batch=4   # CPU smoke

The step is the one train.py runs: frozen LP-VAE encoding of HQ and LQ↑, ε-prediction loss with text
dropout, AdamW, EMA, on the mesh ``config.train.mesh``; the frozen encoders run at
``config.vae.frozen_dtype`` and are also timed alone (and at float32: --compare_f32_encoders).
Text embeddings are random (the T5 encoder runs outside the step). Model FLOPs
(``zipir_jax.training.steps.model_flops``): 3x the DiT's analytic forward (``zipir_jax.flops.dit_forward_flops``) plus the frozen encoders' forward on HQ and LQ↑,
counted from their jaxpr; remat recomputation is not counted, as MFU conventionally.

MFU = model FLOPs per second / (peak FLOP/s per device x devices), reported twice: against the
datasheet peak (``--peak_tflops`` or the device kind, zipir_jax.training.reporting.PEAK_TFLOPS) and
against the dense matmul rate measured at the start of this run (``bench/common.py``).
"""

import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from zipir_jax import config_lib  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
# No default: ml_collections parses a default config, and its --config.KEY overrides, while the flag
# is being defined, before any error can be reported as a usage error.
config_flags.DEFINE_config_file("config", None, "experiment config[:dit]: configs/zipir_3b.py:dit")
flags.DEFINE_integer("resolution", 1024, "HQ image side in pixels (latent side = resolution / 32)")
flags.DEFINE_integer("batch", 8, "global batch size")
flags.DEFINE_integer("steps", 10, "timed steps after one warm-up step (median reported)")
flags.DEFINE_float(
  "peak_tflops", 0.0, "per-device datasheet peak TFLOP/s; 0 = from the device kind"
)
flags.DEFINE_string("out", "", "also write the result as JSON here")
flags.DEFINE_string("profile_dir", "", "also record a jax.profiler trace of 3 steps here")
flags.DEFINE_bool(
  "compare_f32_encoders", False, "also time the frozen encoders at float32 (one more compile)"
)
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from bench import common  # pylint: disable=g-import-not-at-top
  from zipir_jax import parallel  # pylint: disable=g-import-not-at-top
  from zipir_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
  from zipir_jax.training import reporting, stages, steps  # pylint: disable=g-import-not-at-top
  from zipir_jax.training import state as state_lib

  config = FLAGS.config
  if stages.current(config).objective != "diffusion":
    raise SystemExit(f"bench/train_step.py measures the dit stage; got stage {config.stage!r}")
  if FLAGS.resolution % 32:
    raise SystemExit(f"--resolution={FLAGS.resolution} must be a multiple of 32")
  mesh = parallel.create_mesh(config.train.mesh, dcn_shape=config.train.dcn_mesh)
  models = state_lib.build_models(config)
  state, shardings = state_lib.create_train_state(models, mesh, jax.random.PRNGKey(0), {})
  step = steps.jit_train_step(models, mesh, shardings)
  rs = np.random.RandomState(0)
  b, r, length = FLAGS.batch, FLAGS.resolution, config.text.max_length
  host = {
    "hq": rs.uniform(-1, 1, (b, r, r, 3)).astype(np.float32),
    "lq_up": rs.uniform(-1, 1, (b, r, r, 3)).astype(np.float32),
    "text_emb": rs.normal(size=(b, length, config.dit.text_dim)).astype(np.float32),
    "text_mask": np.ones((b, length), np.int32),
  }
  batch = parallel.global_batch(host, mesh)

  gpu = jax.devices()[0].platform == "gpu"
  measured = (
    common.matmul_tflops(8192 if gpu else 1024, autoencoder.compute_dtype(config.dit.dtype)) * 1e12
  )
  peak = (
    FLAGS.peak_tflops * 1e12 if FLAGS.peak_tflops else reporting.peak_flops_per_device(config.train)
  )

  t0 = time.perf_counter()
  model_flops = step.flops(state, batch)
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  # One line now, so a run cut off while timing the encoders alone still reports the step.
  early = {
    "step_ms": round(step_s * 1e3, 2),
    "compile_and_first_step_s": round(compile_s, 2),
    "mfu": model_flops / step_s / (peak * jax.device_count()) if peak else None,
    "mfu_vs_measured": model_flops / step_s / (measured * jax.device_count()),
  }
  print(json.dumps(early), flush=True)
  # The frozen encoders alone (HQ and LQ↑), as the step runs them: how much of the step they take;
  # side by side, the same encoders at float32 (what the step ran before vae.frozen_dtype).
  encode_ms = {}
  dtypes = [config.vae.frozen_dtype]
  if FLAGS.compare_f32_encoders and dtypes[0] != "float32":
    dtypes.append("float32")
  for dtype in dtypes:
    vae = autoencoder.build_autoencoder(config, dtype)
    m = dataclasses.replace(models, frozen_vae=vae)
    with parallel.use_mesh(mesh, config.train.logical_axis_rules):
      encode = jax.jit(
        lambda frozen, x, y, m=m: (
          steps.encode_latents(m, frozen, x),
          steps.encode_latents(m, frozen, y),
        )
      )
      encode_ms[dtype] = 1e3 * common.median_time(
        lambda encode=encode: encode(state.frozen, batch["hq"], batch["lq_up"]), FLAGS.steps
      )
  if FLAGS.profile_dir:
    with jax.profiler.trace(FLAGS.profile_dir):
      for _ in range(3):
        state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))

  result = {
    "config": config.name,
    "device": jax.devices()[0].device_kind,
    "devices": jax.device_count(),
    "mesh": dict(mesh.shape),
    "resolution": r,
    "batch": b,
    "dtype": config.dit.dtype,
    "dit": f"{config.dit.depth} x {config.dit.hidden_size}, {config.dit.num_heads} heads of "
    f"{config.dit.hidden_size // config.dit.num_heads}",
    "remat_policy": config.dit.remat_policy,
    "frozen_dtype": config.vae.frozen_dtype,
    "compile_and_first_step_s": round(compile_s, 2),
    "step_ms": round(step_s * 1e3, 2),
    "examples_per_sec": round(b / step_s, 3),
    "frozen_encoders_ms": {k: round(v, 2) for k, v in encode_ms.items()},
    "peak_gib": round(
      (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", float("nan")) / 2**30, 1
    ),
    "model_tflops_per_step": model_flops / 1e12,
    "loss": float(metrics["loss"]),
  }
  result["matmul_tflops_measured"] = round(measured / 1e12, 1)
  result["mfu_vs_measured"] = model_flops / step_s / (measured * jax.device_count())
  if peak:
    result["peak_tflops_datasheet"] = peak / 1e12
    result["mfu"] = model_flops / step_s / (peak * jax.device_count())
  print(json.dumps(result, indent=2))
  if FLAGS.out:
    with open(FLAGS.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.flags_parser)

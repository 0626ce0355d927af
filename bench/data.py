"""Host input-pipeline throughput: training crops per second per core, and where the time goes.

  JAX_PLATFORMS=cpu .venv/bin/python bench/data.py [--configs=512@1920x2560,...] [--workers=1,2]

Each config is ``BUCKET@PHOTO_HxW``: square bucket crops from a temporary folder of JPEG photos
(q=92) of that size, made from scikit-image's bundled public-domain photos (plus grain-like noise so
JPEG sizes resemble real photos). Decoding is a large share of the time, so the photo size matters
as much as the bucket. Three measurements, each the median over ``--repeats``:

1. one process, one OpenCV thread: decode (+ JPEG draft) → bucket down-scale/crop/flip → full
   Real-ESRGAN second-order degradation → LQ↑, per crop (the per-core rate); and the degradation
   alone (``degradations.degrade`` on ready crops), which does not depend on the source;
2. a cProfile breakdown of the same work by stage;
3. the grain pipeline (``create_train_iterator``) with 1 and 2 worker processes, steady state
   (the first batch, which includes worker start-up, is not timed).
"""

from __future__ import annotations

import cProfile
import os
import platform
import pstats
import statistics
import tempfile
import time
from collections.abc import Sequence

import cv2
import numpy as np
from absl import app, flags
from PIL import Image

from zipir_jax.data import buckets as buckets_lib
from zipir_jax.data import decode, defaults, degradations, pipeline, sources, testing

_CONFIGS = flags.DEFINE_list(
  "configs",
  ["512@1920x2560", "512@960x1280", "2048@3072x4096"],
  "BUCKET@PHOTO_HxW: square bucket side and source photo size.",
)
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "grain worker counts to measure.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Repeats per measurement (median reported).")
_NUM_PHOTOS = flags.DEFINE_integer("num_photos", 8, "Photos in each temporary source folder.")

# cProfile functions whose cumulative time makes up each stage.
_STAGES = (
  ("decode (OpenCV JPEG, DCT-scaled)", "decode.py", "decode_image"),
  ("bucket crop + area resize + flip", "pipeline.py", "_crop"),
  ("blur kernels (make)", "degradations.py", "random_blur_kernel"),
  ("final sinc kernel (make)", "degradations.py", "random_final_sinc_kernel"),
  ("blur (filter2d)", "degradations.py", "filter2d"),
  ("random resize", "degradations.py", "_random_resize"),
  ("Gaussian noise", "degradations.py", "add_gaussian_noise"),
  ("Poisson noise", "degradations.py", "add_poisson_noise"),
  ("JPEG", "degradations.py", "jpeg_compress_uint8"),
  ("LQ↑ (bicubic up)", "degradations.py", "upsample"),
  ("total per crop", "pipeline.py", "random_map"),
)


def _write_photos(root: str, height: int, width: int, count: int) -> None:
  rng = np.random.default_rng(0)
  for i in range(count):
    img = testing.natural_image(height, width, i).astype(np.float32)
    # Film-grain-like texture so JPEG sizes and decode costs resemble real photos.
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
      os.path.join(root, f"photo{i:03d}.jpg"), quality=92
    )


def _maker(size: int, config) -> pipeline.TrainingExampleMaker:
  bucket = buckets_lib.Bucket(size, size, 1)
  return pipeline.TrainingExampleMaker(
    bucket=bucket,
    all_buckets=(bucket,),
    policy=config.bucket_policy,
    random_flip=config.random_flip,
    degradation=degradations.DegradationParams.from_config(config.degradation),
    alpha_background=config.alpha_background,
    emit_lq=False,
    skip_log=decode.SkipLog(),
  )


def _crops_per_second(maker, source, count: int, repeats: int, seed: int = 0) -> list[float]:
  rates = []
  for r in range(repeats):
    start = time.perf_counter()
    for i in range(count):
      rng = np.random.default_rng([seed, r, i])
      maker.random_map(source[(r * count + i) % len(source)], rng)
    rates.append(count / (time.perf_counter() - start))
  return rates


def _degrade_per_second(size: int, config, count: int, repeats: int) -> list[float]:
  params = degradations.DegradationParams.from_config(config.degradation)
  crops = [testing.natural_image(size, size, i) for i in range(4)]
  rates = []
  for r in range(repeats):
    start = time.perf_counter()
    for i in range(count):
      degradations.degrade(crops[i % len(crops)], np.random.default_rng([r, i]), params)
    rates.append(count / (time.perf_counter() - start))
  return rates


def _profile(maker, source, count: int) -> dict[str, float]:
  profiler = cProfile.Profile()
  profiler.enable()
  for i in range(count):
    maker.random_map(source[i % len(source)], np.random.default_rng([99, i]))
  profiler.disable()
  stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
  out = {}
  for label, filename, function in _STAGES:
    total = sum(v[3] for k, v in stats.items() if k[0].endswith(filename) and k[2] == function)
    out[label] = 1e3 * total / count
  return out


def _pipeline_rate(
  root: str, size: int, workers: int, batch: int, batches: int, repeats: int
) -> list[float]:
  config = defaults.get_data_config()
  config.path = root
  config.buckets = ((size, size, batch),)
  config.num_workers = workers
  config.worker_buffer_size = 2
  rates = []
  for r in range(repeats):
    it = pipeline.create_train_iterator(config, seed=r)
    try:
      next(it)  # worker start-up + first batch, not timed
      start = time.perf_counter()
      for _ in range(batches):
        next(it)
      rates.append(batches * batch / (time.perf_counter() - start))
    finally:
      it.close()
  return rates


def _fmt(rates: Sequence[float]) -> str:
  return f"{statistics.median(rates):6.2f} (min {min(rates):.2f}, max {max(rates):.2f})"


def _parse_config(text: str) -> tuple[int, int, int]:
  bucket, photo = text.split("@")
  height, width = photo.split("x")
  return int(bucket), int(height), int(width)


def main(argv: Sequence[str]) -> None:
  del argv
  cv2.setNumThreads(1)
  config = defaults.get_data_config()
  repeats = _REPEATS.value
  print(
    f"# bench/data.py — {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} logical cores, "
    f"load average {os.getloadavg()[0]:.2f} at start, Python {platform.python_version()}, "
    f"OpenCV {cv2.__version__} (1 thread per process)"
  )
  print(
    f"bucket policy '{config.bucket_policy}'; degradation: Real-ESRGAN x4plus defaults, scale "
    f"{tuple(config.degradation.scale_range)}; output float32 [-1, 1]; medians of {repeats} "
    "repeats (pipeline: of max(1, repeats // 2))"
  )
  for text in _CONFIGS.value:
    size, height, width = _parse_config(text)
    with tempfile.TemporaryDirectory() as root:
      _write_photos(root, height, width, _NUM_PHOTOS.value)
      source = sources.ImageFolderSource(root)
      maker = _maker(size, config)
      count = max(2, int(24 * (512 / size) ** 2))
      _crops_per_second(maker, source, 1, 1)  # warm caches (file reads, imports)
      rates = _crops_per_second(maker, source, count, repeats)
      print(f"\n## {size}x{size} crops from {height}x{width} JPEG photos, full degradation\n")
      print(f"one process, one core: {_fmt(rates)} crops/s  ({count} crops per repeat)")
      rates = _degrade_per_second(size, config, count, repeats)
      print(f"degradation alone (degrade() on ready {size}² crops): {_fmt(rates)} crops/s")
      profile = _profile(maker, source, count)
      print("\n| stage | ms per crop |\n|---|---:|")
      for label, ms in profile.items():
        print(f"| {label} | {ms:.1f} |")
      print()
      for workers in (int(w) for w in _WORKERS.value):
        batch = max(1, int(8 * (512 / size) ** 2))
        batches = max(3, int(48 * (512 / size) ** 2) // batch)
        rates = _pipeline_rate(root, size, workers, batch, batches, max(1, repeats // 2))
        per_core = [r / min(workers, os.cpu_count() or 1) for r in rates]
        print(
          f"grain, {workers} worker(s), batch {batch}: {_fmt(rates)} crops/s = "
          f"{statistics.median(per_core):.2f} crops/s/core"
        )
  print(f"\nload average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
  app.run(main)

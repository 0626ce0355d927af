"""grain input pipelines: multi-resolution training batches and fixed-preset evaluation batches.

Training (:func:`create_train_iterator`), per bucket::

  source ─ shuffle (per epoch) ─ repeat ─ [process_index::process_count] ─ random_map(decode, fit
  check, random down-scale, crop, flip, Real-ESRGAN degrade) ─ drop skipped ─ batch

then the per-bucket streams are interleaved by ``grain.IterDataset.mix`` with fixed proportions, the
batches converted to the model's pixel range, and the whole graph run in ``num_workers`` grain
processes (``mp_prefetch``).

Why a per-bucket mixture rather than grouping examples by bucket after the fact: every batch has one
shape by construction, the bucket schedule is the same deterministic sequence on every process (so
all hosts feed the same shapes to a multi-host ``jit`` step), and the iterator state is grain's own
(source positions + mix index): restoring it gives exactly the batches that would have followed,
with no buffered examples to save. Every example's randomness comes from grain's per-index RNG, so
an example is a pure function of (seed, bucket, position).

Consequences worth knowing: each bucket walks its own shuffled pass over the source, so an image
can appear in several buckets (as different crops) and "epoch" is per bucket; a bucket that few
images cover reads ~1/coverage records per example (headers only, except TFDS, which decodes every
record it returns); the start-up probe logs each bucket's coverage and rejects buckets no image
covers. Determinism holds for a fixed ``num_workers`` (grain slices the stream per worker);
changing the worker count changes the order, not the distribution.

Bad files never stop the run: the example is dropped (``None``, filtered by grain), and the file
logged once per process with its reason (:class:`~zipir_jax.data.decode.SkipLog`; counts per
process, or across workers and hosts via ``config.data.skip_log_dir`` and
:func:`~zipir_jax.data.decode.summarize_skips`). A source with no usable image fails at start.

Output batches: ``hq`` and ``lq_up`` (B, H, W, 3), optional ``lq`` (B, H/s, W/s, 3), all float32
in [-1, 1] (or uint8 in [0, 255] with ``output="uint8"``); ``caption`` (B,) str; ``scale`` (B,)
float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import cv2
import grain
import numpy as np
from absl import flags, logging

from zipir_jax import errors
from zipir_jax.data import buckets as buckets_lib
from zipir_jax.data import decode, degradations, eval_presets, sources

IMAGE_KEYS = ("hq", "lq_up", "lq")
# uint8 level -> model pixel value in [-1, 1] (a constant table, applied with cv2.LUT).
_UINT8_TO_MODEL_RANGE = np.arange(256, dtype=np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def derive_seed(seed: int, *path: int) -> int:
  """A 32-bit seed for one pipeline component, independent across ``path``."""
  return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *path]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------
# Per-example transform.


@dataclasses.dataclass
class TrainingExampleMaker(grain.transforms.RandomMap):
  """Record → training example for one bucket, or None (skipped or not covering the bucket)."""

  bucket: buckets_lib.Bucket
  all_buckets: tuple[buckets_lib.Bucket, ...]
  policy: str
  random_flip: bool
  degradation: degradations.DegradationParams
  alpha_background: int
  emit_lq: bool
  skip_log: decode.SkipLog
  degrade: bool = True  # False: HQ crops only (the autoencoder stages need no LQ)
  negative_rate: float = 0.0  # share of examples turned into (LQ↑ as target, negative prompt)
  negative_prompts: tuple[str, ...] = ()

  def random_map(self, record: sources.Record, rng: np.random.Generator) -> dict[str, Any] | None:
    name = record["name"]
    if record["error"]:
      self.skip_log.record(name, "unreadable", record["error"])
      return None
    try:
      size = decode.image_size(record["image"])
    except decode.BadImageError as e:
      self.skip_log.record(name, e.kind, str(e))
      return None
    if not buckets_lib.covers_any(self.all_buckets, size):
      smallest = min(self.all_buckets, key=lambda b: b.height * b.width)
      self.skip_log.record(
        name,
        "too_small",
        f"{size[0]}x{size[1]} is smaller than every bucket "
        f"(e.g. {smallest.name}); images are never up-sampled",
      )
      return None
    if not self.bucket.fits(size):
      return None  # Another bucket's stream will use it.
    scale = buckets_lib.sample_resize_scale(rng, size, self.bucket, self.policy)
    try:
      image = decode.decode_image(
        record["image"], alpha_background=self.alpha_background, min_scale=scale
      )
    except decode.BadImageError as e:
      self.skip_log.record(name, e.kind, str(e))
      return None
    crop = self._crop(image, size, scale, rng)
    if crop is None:
      self.skip_log.record(
        name,
        "corrupt",
        f"header says {size[0]}x{size[1]} but decodes to {image.shape[0]}x{image.shape[1]}",
      )
      return None
    if not self.degrade:
      return {"hq": crop, "caption": record["caption"], "scale": np.float32(1.0)}
    pair = degradations.degrade(crop, rng, self.degradation)
    example = {
      "hq": pair.hq,
      "lq_up": pair.lq_up,
      "caption": record["caption"],
      "scale": np.float32(pair.scale),
    }
    if self.emit_lq:
      example["lq"] = pair.lq
    if self.negative_rate and rng.uniform() < self.negative_rate:
      # §3.2's negative prompts: the example's own LQ↑ is the target and a negative prompt its
      # caption, so CFG with that prompt as the unconditional branch steers away from LQ looks.
      example["hq"] = pair.lq_up.copy()
      example["caption"] = self.negative_prompts[int(rng.integers(len(self.negative_prompts)))]
    return example

  def _crop(
    self, image: np.ndarray, header_hw: tuple[int, int], scale: float, rng: np.random.Generator
  ) -> np.ndarray | None:
    """A random bucket crop of the image shrunk by ``scale`` (area), then a random flip.

    The crop window is drawn in the coordinates of the shrunk image but only that window is
    resampled (crop, then resize): the same distribution as shrinking the whole image first, at a
    fraction of the cost (window sides differ by < 1 source pixel from the exact ratio). A JPEG
    draft decode is never below the requested size, so nothing is enlarged; a decode smaller than
    its header promised is a corrupt file (None).
    """
    bh, bw = self.bucket.height, self.bucket.width
    target = buckets_lib.resized_size(header_hw, scale, self.bucket)
    if image.shape[0] < target[0] or image.shape[1] < target[1]:
      return None
    top, left = buckets_lib.random_crop_origin(rng, target, self.bucket)
    fy, fx = image.shape[0] / target[0], image.shape[1] / target[1]
    y0, y1 = int(round(top * fy)), int(round((top + bh) * fy))
    x0, x1 = int(round(left * fx)), int(round((left + bw) * fx))
    crop = image[y0:y1, x0:x1]
    if crop.shape[:2] != (bh, bw):
      crop = cv2.resize(crop, (bw, bh), interpolation=cv2.INTER_AREA)
    if self.random_flip and rng.uniform() < 0.5:
      crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def to_model_range(batch: dict[str, Any]) -> dict[str, Any]:
  """uint8 [0, 255] image arrays (..., C) → float32 [-1, 1] (the package's model convention).

  x·2/255 − 1 through a 256-entry table (cv2.LUT): bit-identical to the arithmetic, ~2x faster.
  """
  out = dict(batch)
  for key in IMAGE_KEYS:
    if key in out:
      x = np.ascontiguousarray(out[key])
      flat = x.reshape(-1, x.shape[-2], x.shape[-1])
      out[key] = cv2.LUT(flat, _UINT8_TO_MODEL_RANGE).reshape(x.shape)
  return out


def _init_worker(cv2_threads: int, worker_index: int = 0, worker_count: int = 1) -> None:
  """Runs in each grain worker: one OpenCV thread per worker process avoids oversubscription."""
  del worker_index, worker_count
  cv2.setNumThreads(cv2_threads)


# ------------------------------------------------------------------------------------------------
# Start-up probe.


@dataclasses.dataclass(frozen=True)
class ProbeReport:
  """What the start-up probe saw: records examined, per-bucket cover counts, skip reasons."""

  records: int
  usable: int
  bucket_covers: tuple[int, ...]
  skipped: dict[str, int]


def probe_source(
  source: Any,
  buckets: tuple[buckets_lib.Bucket, ...],
  *,
  max_records: int,
  seed: int,
  alpha_background: int = 255,
  skip_log: decode.SkipLog | None = None,
) -> ProbeReport:
  """Reads image headers of up to ``max_records`` records (shuffled) and fails early.

  Raises ValueError when the source has no usable image at all (every record is scanned before
  concluding that; one full decode proves an image usable), or when no probed image covers some
  bucket: that bucket's stream would otherwise search forever.
  """
  n = len(source)
  if n == 0:
    raise ValueError(f"{source!r}: the data source is empty")
  order = np.random.default_rng(seed).permutation(n)
  covers = np.zeros(len(buckets), np.int64)
  skipped: dict[str, int] = {}
  examined = usable = 0
  verified = False

  def skip(name: str, kind: str, message: str) -> None:
    skipped[kind] = skipped.get(kind, 0) + 1
    if skip_log is not None:
      skip_log.record(name, kind, message)

  for index in order:
    if examined >= max_records and verified:
      break
    examined += 1
    record = source[int(index)]
    if record["error"]:
      skip(record["name"], "unreadable", record["error"])
      continue
    try:
      size = decode.image_size(record["image"])
      fits = np.array([b.fits(size) for b in buckets])
      if not fits.any():
        skip(record["name"], "too_small", f"{size[0]}x{size[1]} is smaller than every bucket")
        continue
      if not verified:
        decode.decode_image(record["image"], alpha_background=alpha_background)
        verified = True
    except decode.BadImageError as e:
      skip(record["name"], e.kind, str(e))
      continue
    usable += 1
    covers += fits
  if not verified:
    reasons = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))
    raise ValueError(
      f"{source!r}: no usable image in {n} records ({reasons}); buckets are "
      f"{', '.join(b.name for b in buckets)} and images are never up-sampled"
    )
  empty = [b.name for b, c in zip(buckets, covers) if c == 0]
  if empty:
    scope = (
      "any" if examined == n else f"any of the {examined} probed (config.data.size_probe_records)"
    )
    raise ValueError(
      f"{source!r}: no image in {scope} records covers bucket(s) "
      f"{', '.join(empty)}; remove them from config.data.buckets (images are never "
      "up-sampled into a larger bucket)"
    )
  for b, c in zip(buckets, covers):
    logging.info("bucket %s: %d of %d probed usable images cover it", b.name, c, usable)
  return ProbeReport(
    records=examined, usable=usable, bucket_covers=tuple(int(c) for c in covers), skipped=skipped
  )


# ------------------------------------------------------------------------------------------------
# Training pipeline.


def _ensure_absl_flags_parsed() -> None:
  """grain workers read absl flags; outside ``absl.app.run`` (tests, notebooks) mark them parsed."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def create_train_dataset(
  config_data: Mapping[str, Any],
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  source: Any = None,
  degrade: bool = True,
  negative_rate: float = 0.0,
  negative_prompts: tuple[str, ...] = (),
) -> grain.IterDataset:
  """The training ``grain.IterDataset`` described in the module docstring.

  ``source`` overrides ``config.data.source`` (any object with ``__len__``/``__getitem__``
  returning :mod:`sources` records). ``degrade=False`` emits HQ crops only (no ``lq_up``);
  ``negative_rate`` of the examples become (LQ↑ as ``hq``, a caption from ``negative_prompts``).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"create_train_dataset: process_index {process_index} not in [0, {process_count})"
    )
  if config_data["output"] not in ("float", "uint8"):
    raise ValueError(
      f"config.data.output: expected 'float' or 'uint8', got {config_data['output']!r}"
    )
  if not 0.0 <= negative_rate <= 1.0 or (negative_rate and not negative_prompts):
    raise errors.ConfigError(
      f"negative prompts: rate {negative_rate} must be in [0, 1] with a non-empty list of prompts "
      f"(config.dit.negative_rate, config.dit.negative_prompts), got {tuple(negative_prompts)}"
    )
  if not degrade and config_data["emit_lq"]:
    raise errors.ConfigError("config.data.emit_lq needs degraded examples (a stage with LQ↑)")
  source = sources.create_source(config_data) if source is None else source
  bucket_list = buckets_lib.parse_buckets(config_data["buckets"], process_count)
  weights = buckets_lib.bucket_weights(config_data["bucket_weights"], len(bucket_list))
  if config_data["bucket_policy"] not in buckets_lib.POLICIES:
    raise ValueError(
      f"config.data.bucket_policy: unknown policy "
      f"{config_data['bucket_policy']!r}; expected {buckets_lib.POLICIES}"
    )
  degradation = degradations.DegradationParams.from_config(config_data["degradation"])
  if config_data["emit_lq"] and degradation.scale_range[0] != degradation.scale_range[1]:
    raise ValueError(
      "config.data.emit_lq needs a fixed scale (degradation.scale_range lo == hi): "
      f"LQ sizes would differ within a batch, got {degradation.scale_range}"
    )
  skip_log = decode.SkipLog(config_data["skip_log_dir"])
  probe_source(
    source,
    bucket_list,
    max_records=int(config_data["size_probe_records"]),
    seed=derive_seed(seed, 0xB0B),
    alpha_background=int(config_data["alpha_background"]),
    skip_log=skip_log,
  )

  read_options = grain.ReadOptions(
    num_threads=int(config_data["read_threads"]),
    prefetch_buffer_size=int(config_data["read_buffer_size"]),
  )
  streams = []
  for k, bucket in enumerate(bucket_list):
    maker = TrainingExampleMaker(
      bucket=bucket,
      all_buckets=bucket_list,
      policy=config_data["bucket_policy"],
      random_flip=bool(config_data["random_flip"]),
      degradation=degradation,
      alpha_background=int(config_data["alpha_background"]),
      emit_lq=bool(config_data["emit_lq"]),
      skip_log=skip_log,
      degrade=degrade,
      negative_rate=float(negative_rate),
      negative_prompts=tuple(negative_prompts),
    )
    ds = grain.MapDataset.source(source)
    if config_data["shuffle"]:
      ds = ds.shuffle(seed=derive_seed(seed, k, 0))
    ds = ds.repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.random_map(maker, seed=derive_seed(seed, k, 1))
    ds = ds.to_iter_dataset(read_options)
    streams.append(ds.batch(bucket.batch_size, drop_remainder=True))
  ds = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, weights)
  if config_data["output"] == "float":
    ds = ds.map(to_model_range)
  # Buckets that few images cover legitimately filter most records; the probe already logged
  # each bucket's cover rate, so grain's generic "filtered > 90%" warning is only noise.
  ds = grain.experimental.WithOptionsIterDataset(
    ds, grain.experimental.DatasetOptions(filter_warn_threshold_ratio=None)
  )
  num_workers = int(config_data["num_workers"])
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=int(config_data["worker_buffer_size"])
      ),
      worker_init_fn=functools.partial(_init_worker, int(config_data["cv2_threads"])),
    )
  return ds


def create_train_iterator(
  config_data: Mapping[str, Any],
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  source: Any = None,
  **example_options: Any,
) -> grain.DatasetIterator:
  """Checkpointable iterator of training batches (``get_state``/``set_state``, Orbax-compatible).

  On a multi-host run pass ``jax.process_index()`` / ``jax.process_count()``; each process then
  yields its share (batch // process_count) of every global batch, with the same bucket schedule.
  ``example_options``: :func:`create_train_dataset`'s ``degrade``, ``negative_*``.
  """
  return iter(
    create_train_dataset(
      config_data,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      source=source,
      **example_options,
    )
  )


# ------------------------------------------------------------------------------------------------
# Evaluation pipeline.


@dataclasses.dataclass
class EvalExampleMaker(grain.transforms.MapWithIndex):
  """Record → fixed-preset evaluation example (shrink to cover ``size``, centre crop, degrade)."""

  size: tuple[int, int]
  preset: eval_presets.EvalPreset
  seed: int
  alpha_background: int
  skip_log: decode.SkipLog

  def map_with_index(self, index: int, record: sources.Record) -> dict[str, Any] | None:
    name = record["name"]
    if record["error"]:
      self.skip_log.record(name, "unreadable", record["error"])
      return None
    try:
      image = decode.decode_image(record["image"], alpha_background=self.alpha_background)
    except decode.BadImageError as e:
      self.skip_log.record(name, e.kind, str(e))
      return None
    h, w = image.shape[:2]
    th, tw = self.size
    if h < th or w < tw:
      self.skip_log.record(name, "too_small", f"{h}x{w} is smaller than the eval size {th}x{tw}")
      return None
    s = max(th / h, tw / w)
    if s < 1.0:
      rh, rw = max(th, int(round(h * s))), max(tw, int(round(w * s)))
      image = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA)
      h, w = rh, rw
    top, left = (h - th) // 2, (w - tw) // 2
    hq = np.ascontiguousarray(image[top : top + th, left : left + tw])
    lq, lq_up = eval_presets.make_eval_pair(hq, self.preset, derive_seed(self.seed, index))
    return {"hq": hq, "lq": lq, "lq_up": lq_up, "caption": record["caption"], "index": index}


def create_eval_dataset(
  config_data: Mapping[str, Any],
  preset: str | None = None,
  *,
  seed: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  source: Any = None,
) -> grain.IterDataset:
  """One pass over the source, degraded by a fixed preset: deterministic for (seed, preset).

  Image ``i`` gets noise seed ``derive_seed(seed, i)`` whatever the sharding. Skipped images are
  logged like training ones. Pixel range as the training batches (``config.data.output``).
  """
  source = sources.create_source(config_data) if source is None else source
  preset_name = preset or config_data["eval_preset"]
  resolved = eval_presets.get_preset(preset_name, config_data["eval_presets"])
  size = (int(config_data["eval_size"][0]), int(config_data["eval_size"][1]))
  if size[0] % resolved.scale or size[1] % resolved.scale:
    raise ValueError(
      f"config.data.eval_size {size} is not divisible by preset {preset_name!r}'s "
      f"scale {resolved.scale}"
    )
  maker = EvalExampleMaker(
    size=size,
    preset=resolved,
    seed=seed,
    alpha_background=int(config_data["alpha_background"]),
    skip_log=decode.SkipLog(config_data["skip_log_dir"]),
  )
  ds = grain.MapDataset.source(source).map_with_index(maker)[process_index::process_count]
  ds = ds.to_iter_dataset().batch(int(config_data["eval_batch_size"]))
  if config_data["output"] == "float":
    ds = ds.map(to_model_range)
  return ds

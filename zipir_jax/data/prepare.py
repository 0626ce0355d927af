"""Packs an image folder into ArrayRecord shards of (encoded image bytes, caption).

  python -m zipir_jax.data.prepare --input DIR --output DIR [--num_shards N] [--num_workers N]

Images are stored as their original encoded bytes (no re-encoding: no quality loss, smallest size);
``x.txt`` beside ``x.jpg`` becomes the caption. Every image is first decoded in full by a pool of
worker processes, so a truncated or corrupt file is named with its reason and left out here rather
than failing at training time (``--noverify`` reads only the headers: faster, catches less). A
progress bar shows on a terminal; the last line sums up what was written and what was skipped, by
reason. The exit status is 0 when anything was written, 1 when nothing was. Read the shards with
``config.data.source = "array_record"`` and ``config.data.path = DIR``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence

from absl import app, flags, logging

from zipir_jax import errors
from zipir_jax.data import decode, sources

_SHARD_BYTES = 1 << 30  # --num_shards=0: one shard per ~1 GiB of image bytes.


@dataclasses.dataclass
class Summary:
  """What one run wrote and skipped (``skipped``: reason -> count)."""

  written: int
  num_shards: int
  output_dir: str
  skipped: collections.Counter[str]

  def __str__(self) -> str:
    reasons = ", ".join(f"{kind} {n}" for kind, n in sorted(self.skipped.items()))
    return (
      f"prepare: wrote {self.written} images to {self.num_shards} shards in {self.output_dir}; "
      f"skipped {sum(self.skipped.values())}" + (f" ({reasons})" if reasons else "")
    )


def shard_paths(output_dir: str, num_shards: int) -> list[str]:
  return [
    os.path.join(output_dir, f"images-{i:05d}-of-{num_shards:05d}.array_record")
    for i in range(num_shards)
  ]


def pack_image(path: str, input_dir: str, verify: bool = True) -> tuple[bytes | None, str, str]:
  """(shard record, "", "") of one image file, or (None, skip kind, reason): a worker's job.

  ``verify`` decodes the whole image (``decode.decode_image``, as training will); otherwise only
  the header is read.
  """
  record = sources.read_image_file(path)
  if record["error"]:
    return None, "unreadable", record["error"]
  try:
    if verify:
      height, width = decode.decode_image(record["image"]).shape[:2]
    else:
      height, width = decode.image_size(record["image"])
  except errors.BadImageError as e:
    return None, e.kind, str(e)
  name = os.path.relpath(path, input_dir)
  payload = sources.encode_record(
    record["image"], record["caption"], name, height=int(height), width=int(width)
  )
  return payload, "", ""


def _packed(
  paths: Sequence[str], input_dir: str, verify: bool, num_workers: int
) -> Iterator[tuple[bytes | None, str, str]]:
  """``pack_image`` of every path, in order; in ``num_workers`` processes when more than one."""
  job = functools.partial(pack_image, input_dir=input_dir, verify=verify)
  if num_workers <= 1:
    yield from map(job, paths)
    return
  # spawn, not fork: the caller may hold threads (JAX, OpenCV) that a forked child would inherit.
  with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
    yield from pool.imap(job, paths, chunksize=max(1, min(64, len(paths) // (8 * num_workers))))


def prepare_array_record(
  input_dir: str,
  output_dir: str,
  num_shards: int = 0,
  verify: bool = True,
  num_workers: int = 0,
  extensions: Sequence[str] = sources.DEFAULT_EXTENSIONS,
) -> Summary:
  """Writes the shards and returns the :class:`Summary`; each skipped file is logged by name.

  Images are assigned to shards round-robin in sorted path order, so the result is deterministic
  for any ``num_workers`` (0: one per CPU). Raises ``DataError`` when nothing could be written.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(input_dir):
    raise errors.DataError(f"prepare: --input {input_dir!r} is not a directory")
  paths = sources.scan_image_folder(input_dir, extensions)
  if not paths:
    raise errors.DataError(
      f"prepare: no files with extensions {tuple(extensions)} under {input_dir!r}"
    )
  if num_shards <= 0:
    total = sum(os.path.getsize(p) for p in paths)
    num_shards = max(1, min(len(paths), math.ceil(total / _SHARD_BYTES)))
  num_workers = num_workers or os.cpu_count() or 1
  os.makedirs(output_dir, exist_ok=True)
  writers = [
    array_record_module.ArrayRecordWriter(p, "group_size:1")
    for p in shard_paths(output_dir, num_shards)
  ]
  skip_log = decode.SkipLog()
  written = 0
  try:
    packed = _packed(paths, input_dir, verify, num_workers)
    # disable=None: a bar on a terminal, none in a log file.
    for path, (payload, kind, message) in zip(
      paths, tqdm(packed, total=len(paths), unit="img", desc="prepare", disable=None)
    ):
      if payload is None:
        skip_log.record(path, kind, message)
        continue
      writers[written % num_shards].write(payload)
      written += 1
  finally:
    for w in writers:
      w.close()
  summary = Summary(written, num_shards, output_dir, skip_log.counts)
  logging.info("%s", summary)
  if written == 0:
    raise errors.DataError(f"{summary}: no usable image under {input_dir!r}")
  return summary


def main(argv: Sequence[str]) -> None:
  del argv
  try:
    summary = prepare_array_record(
      flags.FLAGS.input,
      flags.FLAGS.output,
      flags.FLAGS.num_shards,
      flags.FLAGS.verify,
      flags.FLAGS.num_workers,
    )
  except errors.ZipIRError as e:  # nothing written, or no input: one line, exit status 1
    print(e, file=sys.stderr)
    sys.exit(1)
  print(summary)


if __name__ == "__main__":
  flags.DEFINE_string("input", None, "Image folder (recursive).", required=True)
  flags.DEFINE_string("output", None, "Output directory for *.array_record shards.", required=True)
  flags.DEFINE_integer("num_shards", 0, "Number of shards; 0 = one per ~1 GiB of images.")
  flags.DEFINE_bool(
    "verify", True, "Decode every image in full (--noverify: read headers only, faster)."
  )
  flags.DEFINE_integer("num_workers", 0, "Worker processes that read and decode; 0 = one per CPU.")
  app.run(main)

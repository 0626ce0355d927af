"""Packs an image folder into ArrayRecord shards of (encoded image bytes, caption).

  python -m zipir_jax.data.prepare --input DIR --output DIR [--num_shards N] [--verify]

Images are stored as their original encoded bytes (no re-encoding: no quality loss, smallest size);
``x.txt`` beside ``x.jpg`` becomes the caption. Files whose header cannot be read are skipped and
reported (``--verify`` fully decodes each image instead, catching truncated files too). Read the
shards with ``config.data.source = "array_record"`` and ``config.data.path = DIR``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from absl import app, flags, logging

from zipir_jax.data import decode, sources

_SHARD_BYTES = 1 << 30  # --num_shards=0: one shard per ~1 GiB of image bytes.


def shard_paths(output_dir: str, num_shards: int) -> list[str]:
  return [
    os.path.join(output_dir, f"images-{i:05d}-of-{num_shards:05d}.array_record")
    for i in range(num_shards)
  ]


def prepare_array_record(
  input_dir: str,
  output_dir: str,
  num_shards: int = 0,
  verify: bool = False,
  extensions: Sequence[str] = sources.DEFAULT_EXTENSIONS,
) -> dict[str, int]:
  """Writes the shards; returns counts {"written": n, "skipped": m}.

  Images are assigned to shards round-robin in sorted path order, so the result is deterministic.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  paths = sources.scan_image_folder(input_dir, extensions)
  if not paths:
    raise ValueError(f"prepare: no files with extensions {tuple(extensions)} under {input_dir!r}")
  if num_shards <= 0:
    total = sum(os.path.getsize(p) for p in paths)
    num_shards = max(1, min(len(paths), math.ceil(total / _SHARD_BYTES)))
  os.makedirs(output_dir, exist_ok=True)
  writers = [
    array_record_module.ArrayRecordWriter(p, "group_size:1")
    for p in shard_paths(output_dir, num_shards)
  ]
  source = sources.ImageFolderSource(input_dir, extensions)
  skip_log = decode.SkipLog()
  written = 0
  try:
    for i in range(len(source)):
      record = source[i]
      name = os.path.relpath(record["name"], input_dir)
      if record["error"]:
        skip_log.record(record["name"], "unreadable", record["error"])
        continue
      try:
        height, width = decode.image_size(record["image"])
        if verify:
          decode.decode_image(record["image"])
      except decode.BadImageError as e:
        skip_log.record(record["name"], e.kind, str(e))
        continue
      payload = sources.encode_record(
        record["image"], record["caption"], name, height=height, width=width
      )
      writers[written % num_shards].write(payload)
      written += 1
  finally:
    for w in writers:
      w.close()
  skipped = sum(skip_log.counts.values())
  logging.info(
    "prepare: wrote %d images to %d shards in %s; skipped %d (%s)",
    written,
    num_shards,
    output_dir,
    skipped,
    dict(skip_log.counts),
  )
  if written == 0:
    raise ValueError(f"prepare: no usable image under {input_dir!r} ({dict(skip_log.counts)})")
  return {"written": written, "skipped": skipped}


def main(argv: Sequence[str]) -> None:
  del argv
  counts = prepare_array_record(
    flags.FLAGS.input, flags.FLAGS.output, flags.FLAGS.num_shards, flags.FLAGS.verify
  )
  print(f"wrote {counts['written']} images, skipped {counts['skipped']}")


if __name__ == "__main__":
  flags.DEFINE_string("input", None, "Image folder (recursive).", required=True)
  flags.DEFINE_string("output", None, "Output directory for *.array_record shards.", required=True)
  flags.DEFINE_integer("num_shards", 0, "Number of shards; 0 = one per ~1 GiB of images.")
  flags.DEFINE_bool("verify", False, "Fully decode every image (slower) instead of its header.")
  app.run(main)

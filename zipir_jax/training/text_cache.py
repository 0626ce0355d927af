r"""The dit stage's caption embeddings: from T5 on every batch, or from a cache built once.

The cache runs T5 once per distinct caption instead of on every dit batch.

  python -m zipir_jax.training.text_cache --config=configs/zipir_3b.py:dit --output=DIR \
      [--config.data.path=...] [--overwrite] [--batch_size=64]

Reads every record of the training source (``config.data``), encodes each distinct caption, the
empty one (the classifier-free-guidance null condition) and the negative prompts the stage trains
with (``config.dit.negative_prompts``), with exactly the encoder the dit stage builds
(:func:`dit_text_encoder`: ``config.text.encoder_path``, else the tiny random encoder drawn from the
run's seed), and writes DIR. Train with
``--config.text.embedding_cache=DIR``: the loop looks captions up instead of running T5, and refuses
a cache built for another encoder, tokenizer, ``max_length`` or width, naming what differs.

Format (readable with numpy alone; the arrays are memory-mapped when read):

  DIR/cache.json       format version and the encoder identity (:func:`encoder_identity`); written
                       last, so a folder without it is an interrupted build
  DIR/captions.json    the N captions; row i of both arrays belongs to captions[i]
  DIR/embeddings.npy   (N, max_length, d_model) in the encoder's output dtype, padding positions
                       included: bit-identical to what T5 gives the dit stage (bfloat16, which .npy
                       cannot name, is stored as its uint16 bit pattern)
  DIR/masks.npy        (N, max_length) int32 attention masks

Size: N x max_length x d_model x 2 bytes in bfloat16, i.e. 1 MiB per caption for T5-XXL at 128
tokens.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from zipir_jax import config_lib, errors
from zipir_jax import text as text_lib
from zipir_jax.data import sources
from zipir_jax.errors import CaptionCacheError, MissingCaptionError
from zipir_jax.models import t5
from zipir_jax.training import stages

FORMAT = "zipir-caption-cache"
VERSION = 1
_META, _CAPTIONS, _EMBEDDINGS, _MASKS = "cache.json", "captions.json", "embeddings.npy", "masks.npy"
COMMAND = "python -m zipir_jax.training.text_cache --config=configs/<model>.py:dit --output=DIR"
# Dtypes .npy cannot name are stored as their bit pattern.
_BIT_PATTERN = {"bfloat16": np.uint16}
# Fixed probes tokenized at a fixed length: a different vocabulary or normalisation changes the ids.
_TOKENIZER_PROBES = (
  "",
  "A photo of a cat on a red sofa, 35mm, f/1.8, ISO 400.",
  "Ünïcödé — 東京の夜景 🙂 <pad> </s> 0123456789 https://example.com/a_b",
)
_TOKENIZER_PROBE_LENGTH = 64
# Weights are fingerprinted from this many evenly strided values per array (and every shape):
# cheap for T5-XXL, and any retrained or different checkpoint differs in them.
_FINGERPRINT_SAMPLES = 1 << 16


# ------------------------------------------------------------------------------------------------
# Encoder identity.


def params_fingerprint(params: Any) -> str:
  """Hash of every parameter's name, shape, dtype and a strided sample of its values."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    digest.update(f"{jax.tree_util.keystr(path)}|{tuple(leaf.shape)}|{leaf.dtype}|".encode())
    stride = max(1, leaf.size // _FINGERPRINT_SAMPLES)
    digest.update(np.asarray(jax.device_get(leaf.reshape(-1)[::stride])).tobytes())
  return digest.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
  """Hash of the tokenizer's class, size and ids for fixed probe prompts."""
  ids, mask = text_lib.tokenize(_TOKENIZER_PROBES, tokenizer, _TOKENIZER_PROBE_LENGTH)
  digest = hashlib.sha256(f"{type(tokenizer).__name__}|{len(tokenizer)}|".encode())
  digest.update(ids.tobytes())
  digest.update(mask.tobytes())
  return digest.hexdigest()[:32]


def encoder_identity(
  config, text_config: t5.T5Config, params: Any, tokenizer: Any
) -> dict[str, Any]:
  """Everything a cache must share with a run to hold that run's embeddings.

  ``encoder`` says where the weights came from (for messages; a moved folder still matches: the
  folder path itself is not compared), the fingerprints what they are.
  """
  if config.text.encoder_path:
    source = {"kind": "t5_folder", "path": os.path.abspath(config.text.encoder_path)}
  else:
    source = {
      "kind": "tiny-random",
      "seed": int(config.seed),
      "prng_impl": str(jax.config.jax_default_prng_impl),
    }
  return {
    "encoder": source,
    "t5_config": dataclasses.asdict(text_config),
    "max_length": int(config.text.max_length),
    "text_dim": int(text_config.d_model),
    "dtype": jnp.dtype(text_config.dtype).name,
    "weights_fingerprint": params_fingerprint(params),
    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
  }


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _describe(source: dict[str, Any]) -> str:
  if source.get("kind") == "tiny-random":
    return f"the tiny random encoder (seed {source.get('seed')}, {source.get('prng_impl')} PRNG)"
  return f"the T5 folder {source.get('path')}"


def check_identity(folder: str, cached: dict[str, Any], expected: dict[str, Any]) -> None:
  """Raises CaptionCacheError listing each field where the cache and this run differ."""
  have, want = _flatten(cached), _flatten(expected)
  differ = [
    k for k in sorted(set(have) | set(want)) if k != "encoder.path" and have.get(k) != want.get(k)
  ]
  if differ:
    lines = "\n".join(f"  {k}: cache {have.get(k)!r}, this run {want.get(k)!r}" for k in differ)
    if any(k.startswith("encoder.") or k == "weights_fingerprint" for k in differ):
      lines += (
        f"\n  (cache built from {_describe(cached.get('encoder', {}))}; this run uses "
        f"{_describe(expected['encoder'])})"
      )
    raise CaptionCacheError(
      f"caption cache {folder} does not match this run's text encoder:\n{lines}\nRebuild it "
      f"with {COMMAND} --overwrite, using this run's config and overrides."
    )


# ------------------------------------------------------------------------------------------------
# Reading.


class CaptionCache:
  """A cache folder, memory-mapped: ``lookup(captions)`` -> (embeddings, masks) like T5's."""

  def __init__(self, folder: str):
    self.folder = folder
    meta_path = os.path.join(folder, _META)
    if not os.path.isfile(meta_path):
      why = (
        f"has no {_META} (an interrupted build?)" if os.path.exists(folder) else "does not exist"
      )
      raise CaptionCacheError(f"caption cache {folder} {why}; build it with {COMMAND}")
    with open(meta_path, encoding="utf-8") as f:
      self.meta = json.load(f)
    if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
      raise CaptionCacheError(
        f"caption cache {folder}: {_META} is format "
        f"{self.meta.get('format')!r} v{self.meta.get('version')}; expected "
        f"{FORMAT!r} v{VERSION}: rebuild it with {COMMAND} --overwrite"
      )
    with open(os.path.join(folder, _CAPTIONS), encoding="utf-8") as f:
      self.captions: list[str] = json.load(f)
    dtype = self.meta["identity"]["dtype"]
    embeddings = np.load(os.path.join(folder, _EMBEDDINGS), mmap_mode="r")
    self.embeddings = embeddings.view(ml_dtypes.bfloat16) if dtype in _BIT_PATTERN else embeddings
    self.masks = np.load(os.path.join(folder, _MASKS), mmap_mode="r")
    n, length, width = (
      len(self.captions),
      self.meta["identity"]["max_length"],
      (self.meta["identity"]["text_dim"]),
    )
    if (
      self.embeddings.shape != (n, length, width)
      or self.masks.shape != (n, length)
      or self.embeddings.dtype.name != dtype
    ):
      raise CaptionCacheError(
        f"caption cache {folder} is inconsistent: {n} captions, embeddings "
        f"{self.embeddings.shape} {self.embeddings.dtype}, masks {self.masks.shape}; expected "
        f"({n}, {length}, {width}) {dtype}: rebuild it with {COMMAND} --overwrite"
      )
    self._index = {c: i for i, c in enumerate(self.captions)}

  @property
  def identity(self) -> dict[str, Any]:
    return self.meta["identity"]

  def __len__(self) -> int:
    return len(self.captions)

  def __contains__(self, caption: str) -> bool:
    return caption in self._index

  def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(B, max_length, d_model) embeddings (the encoder's dtype), (B, max_length) int32 masks."""
    if isinstance(captions, str):
      raise TypeError("captions must be a sequence of strings, not a single string")
    missing = [c for c in captions if c not in self._index]
    if missing:
      shown = ", ".join(repr(c if len(c) <= 200 else c[:200] + "...") for c in missing[:3])
      raise MissingCaptionError(
        f"caption {shown} is not in the caption cache {self.folder} ({len(missing)} of this "
        f"batch's {len(captions)} captions missing; the cache holds {len(self)}): it was built "
        f"from other data. Rebuild it for this run's config.data with {COMMAND} --overwrite, or "
        "unset config.text.embedding_cache to run T5 on every batch."
      )
    rows = np.asarray([self._index[c] for c in captions], np.int64)
    return np.asarray(self.embeddings[rows]), np.asarray(self.masks[rows], np.int32)


def dit_text_encoder(config) -> tuple[t5.T5Config, Any, Any]:
  """The dit stage's (T5 config, params, tokenizer); a cache is built with the same encoder.

  The tiny random encoder is drawn from ``split(PRNGKey(config.seed))[1]`` (the train state takes
  ``[0]``), so the cache and the run agree without sharing anything else.
  """
  return text_lib.build_text_encoder(config, jax.random.split(jax.random.PRNGKey(config.seed))[1])


def caption_encoder(
  config, text_config: t5.T5Config, params: Any, tokenizer: Any
) -> Callable[[Sequence[str]], tuple[Any, Any]]:
  """captions -> (embeddings, masks): ``config.text.embedding_cache``'s lookup, else T5 itself."""
  if config.text.embedding_cache:
    return load(config.text.embedding_cache, config, text_config, params, tokenizer).lookup
  model = t5.T5Encoder(text_config)
  length = int(config.text.max_length)
  return lambda captions: text_lib.encode_prompts(captions, tokenizer, model, params, length)


def load(
  folder: str, config, text_config: t5.T5Config, params: Any, tokenizer: Any
) -> CaptionCache:
  """Opens ``folder`` and checks that it was built with this run's encoder and settings."""
  cache = CaptionCache(folder)
  check_identity(folder, cache.identity, encoder_identity(config, text_config, params, tokenizer))
  return cache


# ------------------------------------------------------------------------------------------------
# Writing.


def collect_captions(source: Any, read_threads: int = 16, progress: bool = True) -> list[str]:
  """The distinct captions of ``source``'s readable records: "" first, then sorted."""
  found = {""}
  chunk = 1024  # records read at once: bounds the image bytes held in memory.
  with (
    concurrent.futures.ThreadPoolExecutor(max(1, read_threads)) as pool,
    tqdm(total=len(source), unit="rec", desc="reading captions", disable=not progress) as bar,
  ):
    for start in range(0, len(source), chunk):
      indices = range(start, min(start + chunk, len(source)))
      for record in pool.map(source.__getitem__, indices):
        if not record["error"]:  # the pipeline skips these records
          found.add(str(record["caption"]))
      bar.update(len(indices))
  return [""] + sorted(found - {""})


def _check_output(output: str, overwrite: bool) -> None:
  if not os.path.exists(output) or (os.path.isdir(output) and not os.listdir(output)):
    return
  if not overwrite:
    raise CaptionCacheError(f"{output} already exists; pass --overwrite to replace it")
  if not os.path.isfile(os.path.join(output, _META)):
    raise CaptionCacheError(
      f"{output} exists and is not a caption cache (no {_META}); refusing "
      "to delete it even with --overwrite"
    )


def build(
  output: str,
  captions: Sequence[str],
  config,
  text_config: t5.T5Config,
  params: Any,
  tokenizer: Any,
  *,
  batch_size: int = 64,
  overwrite: bool = False,
  progress: bool = True,
) -> CaptionCache:
  """Encodes ``captions`` (plus "" and the negative prompts) and writes the cache folder ``output``;
  returns it opened.

  Written into ``output.partial`` and renamed at the end: an interrupted build leaves no folder
  that looks complete, and with ``overwrite`` the old cache stays until the new one is whole.
  """
  output = os.path.normpath(output)
  _check_output(output, overwrite)
  extra = set(config.dit.negative_prompts) if config.dit.negative_rate else set()
  captions = ["", *sorted((set(map(str, captions)) | extra) - {""})]
  identity = encoder_identity(config, text_config, params, tokenizer)
  length, width, dtype = identity["max_length"], identity["text_dim"], identity["dtype"]
  partial = output + ".partial"
  if os.path.exists(partial):
    shutil.rmtree(partial)
  os.makedirs(partial)
  n = len(captions)
  embeddings = np.lib.format.open_memmap(
    os.path.join(partial, _EMBEDDINGS),
    mode="w+",
    dtype=_BIT_PATTERN.get(dtype, dtype),
    shape=(n, length, width),
  )
  masks = np.lib.format.open_memmap(
    os.path.join(partial, _MASKS), mode="w+", dtype=np.int32, shape=(n, length)
  )
  model = t5.T5Encoder(text_config)
  batch_size = max(1, min(batch_size, n))  # one shape: the jitted encoder compiles once
  with tqdm(total=n, unit="caption", desc="encoding captions", disable=not progress) as bar:
    for start in range(0, n, batch_size):
      chunk = captions[start : start + batch_size]
      emb, mask = text_lib.encode_prompts(
        chunk + [""] * (batch_size - len(chunk)), tokenizer, model, params, length
      )
      emb = np.asarray(emb)[: len(chunk)]
      embeddings[start : start + len(chunk)] = emb.view(embeddings.dtype)
      masks[start : start + len(chunk)] = np.asarray(mask)[: len(chunk)]
      bar.update(len(chunk))
  embeddings.flush()
  masks.flush()
  del embeddings, masks
  with open(os.path.join(partial, _CAPTIONS), "w", encoding="utf-8") as f:
    json.dump(captions, f)
  with open(os.path.join(partial, _META), "w", encoding="utf-8") as f:
    json.dump(
      {"format": FORMAT, "version": VERSION, "num_captions": n, "identity": identity}, f, indent=2
    )
  old = output + ".old"
  if os.path.exists(output):
    if os.path.exists(old):
      shutil.rmtree(old)
    os.rename(output, old)
  os.rename(partial, output)
  if os.path.exists(old):
    shutil.rmtree(old)
  return CaptionCache(output)


def build_for_config(
  config,
  output: str,
  *,
  overwrite: bool = False,
  batch_size: int = 64,
  read_threads: int = 16,
  progress: bool = True,
  text_encoder: Callable[[Any], tuple[t5.T5Config, Any, Any]] | None = None,
) -> CaptionCache:
  """The command: every caption of ``config.data``'s source, encoded as the dit stage would."""
  text_encoder = text_encoder or dit_text_encoder
  _check_output(os.path.normpath(output), overwrite)  # before the slow part
  captions = collect_captions(sources.create_source(config.data), read_threads, progress)
  text_config, params, tokenizer = text_encoder(config)
  return build(
    output,
    captions,
    config,
    text_config,
    params,
    tokenizer,
    batch_size=batch_size,
    overwrite=overwrite,
    progress=progress,
  )


def main(argv: Sequence[str]) -> int:
  del argv
  config = flags.FLAGS.config
  if "text_emb" not in stages.current(config).batch_keys:
    logging.warning(
      "config stage is %r; the cache is for the dit stage (same data and text settings)",
      config.stage,
    )
  try:
    cache = build_for_config(
      config,
      flags.FLAGS.output,
      overwrite=flags.FLAGS.overwrite,
      batch_size=flags.FLAGS.batch_size,
      read_threads=flags.FLAGS.read_threads,
    )
  except errors.ZipIRError as e:
    print(f"text_cache: {e}", file=sys.stderr)
    return 2
  print(
    f"wrote {len(cache)} caption embeddings to {cache.folder}; train with "
    f"--config.text.embedding_cache={cache.folder}"
  )
  return 0


if __name__ == "__main__":
  # Flags only here: loop.py (and so train.py, which has its own --config) imports this module.
  config_flags.DEFINE_config_file(
    "config", None, "experiment config file[:stage] (dit)", lock_config=True
  )
  flags.DEFINE_string("output", None, "cache folder to write", required=True)
  flags.DEFINE_bool("overwrite", False, "replace an existing cache at --output")
  flags.DEFINE_integer("batch_size", 64, "captions per encoder call")
  flags.DEFINE_integer("read_threads", 16, "threads reading source records")
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=config_lib.flags_parser)

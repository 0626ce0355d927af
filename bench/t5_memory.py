r"""Host memory of loading a T5 encoder from a Hugging Face folder, against the encoder's bytes.

  python bench/t5_memory.py [--d_model=1536 --d_ff=4096 --layers=24 --decoder_layers=8]

Writes a synthetic T5 v1.1 checkpoint to a temporary folder (deleted after) twice, stored in
bfloat16 and in float32: encoder, decoder and LM head as sharded safetensors with an index, in
``T5ForConditionalGeneration``'s key order, so one shard holds both encoder and decoder tensors as
in real checkpoints. Each case loads it in a fresh process and reports the peak resident memory
during the load minus the resident memory before it (imports and tokenizer already loaded), next
to the bytes of the loaded encoder parameters. Cases:

* ``load_t5_encoder``: :func:`zipir_jax.models.t5.load_t5_encoder` (tensors read one at a time and
  cast to the parameter dtype as read; decoder tensors not read);
* ``whole shards, f32 params``: every shard holding encoder tensors read whole
  (``weights.load_state_dict``), then converted to float32 parameters — the loader before, and
  still how ``pytorch_model.bin`` files are read.

The T5-XXL encoder (4.76 B parameters) holds 9.5 GB in bfloat16; the target is a peak of at most
1.3x the encoder's bytes in the parameter dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes
import numpy as np

CASES = (  # (stored dtype, loader, parameter dtype)
  ("bfloat16", "load_t5_encoder", "bfloat16"),
  ("float32", "load_t5_encoder", "bfloat16"),
  ("float32", "load_t5_encoder", "float32"),
  ("bfloat16", "whole shards, f32 params", "float32"),
  ("float32", "whole shards, f32 params", "float32"),
)


def hf_config(args) -> dict:
  return {
    "model_type": "t5",
    "architectures": ["T5ForConditionalGeneration"],
    "is_encoder_decoder": True,
    "vocab_size": args.vocab,
    "d_model": args.d_model,
    "d_kv": 64,
    "d_ff": args.d_ff,
    "num_layers": args.layers,
    "num_decoder_layers": args.decoder_layers,
    "num_heads": args.d_model // 64,
    "feed_forward_proj": "gated-gelu",
  }


def checkpoint_shapes(config, decoder_layers: int) -> dict[str, tuple[int, ...]]:
  """Every tensor of a T5ForConditionalGeneration in its state-dict order."""
  from zipir_jax.models import t5  # pylint: disable=g-import-not-at-top

  encoder = t5.expected_hf_shapes(config)
  shapes = {"shared.weight": encoder.pop("shared.weight"), **encoder}
  d, inner, f = config.d_model, config.num_heads * config.d_kv, config.d_ff
  for i in range(decoder_layers):
    b = f"decoder.block.{i}.layer"
    for attn in ("0.SelfAttention", "1.EncDecAttention"):
      shapes.update({f"{b}.{attn}.{n}.weight": (inner, d) for n in "qkv"})
      shapes[f"{b}.{attn}.o.weight"] = (d, inner)
    shapes.update({f"{b}.{j}.layer_norm.weight": (d,) for j in range(3)})
    shapes.update({f"{b}.2.DenseReluDense.{n}.weight": (f, d) for n in ("wi_0", "wi_1")})
    shapes[f"{b}.2.DenseReluDense.wo.weight"] = (d, f)
  shapes["decoder.final_layer_norm.weight"] = (d,)
  shapes["lm_head.weight"] = (config.vocab_size, d)
  return shapes


def write_checkpoint(folder: str, args, dtype: str) -> int:
  """Writes the folder; returns the bytes of its weight files."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from zipir_jax.models import t5  # pylint: disable=g-import-not-at-top

  os.makedirs(folder)
  hf = hf_config(args)
  with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf, f)
  transformers.ByT5Tokenizer().save_pretrained(folder)
  shapes = checkpoint_shapes(t5.T5Config.from_hf_dict(hf), args.decoder_layers)
  store = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
  rng = np.random.default_rng(0)
  shards, current, size = [], [], 0
  for key, shape in shapes.items():
    nbytes = int(np.prod(shape)) * store.itemsize
    if current and size + nbytes > args.shard_gb * 2**30:
      shards.append(current)
      current, size = [], 0
    current.append(key)
    size += nbytes
  shards.append(current)
  weight_map, total = {}, 0
  for i, keys in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {k: (0.02 * rng.standard_normal(shapes[k], np.float32)).astype(store) for k in keys}
    safetensors.numpy.save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
    total += sum(t.nbytes for t in tensors.values())
    weight_map.update(dict.fromkeys(keys, name))
  with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  return total


def child(folder: str, loader: str, param_dtype: str) -> None:
  """One load in this (fresh) process; prints its JSON result."""
  import jax  # pylint: disable=g-import-not-at-top

  from bench import common  # pylint: disable=g-import-not-at-top
  from zipir_jax import weights  # pylint: disable=g-import-not-at-top
  from zipir_jax.models import t5  # pylint: disable=g-import-not-at-top

  t5.load_tokenizer(folder)  # imports transformers: not the weights' memory
  before = common.reset_peak_rss()
  start = time.perf_counter()
  if loader == "load_t5_encoder":
    _, params, _ = t5.load_t5_encoder(folder, dtype=param_dtype)
  else:
    config = t5.T5Config.from_json(os.path.join(folder, "config.json"), param_dtype=param_dtype)
    state = {}
    for path in t5._weight_files(folder):  # pylint: disable=protected-access
      state.update((k, v) for k, v in weights.load_state_dict(path).items() if t5.is_encoder_key(k))
    params = t5.convert_hf_state_dict(state, config, source=folder)
  seconds = time.perf_counter() - start
  peak = common.peak_rss() - before
  leaves = jax.tree.leaves(params)
  encoder, count = sum(x.nbytes for x in leaves), sum(x.size for x in leaves)
  print(json.dumps({"peak": peak, "encoder": encoder, "params": count, "seconds": seconds}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--d_model", type=int, default=1536)
  parser.add_argument("--d_ff", type=int, default=4096)
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--decoder_layers", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32128)
  parser.add_argument("--shard_gb", type=float, default=1.0)
  parser.add_argument("--child", nargs=3, metavar=("FOLDER", "LOADER", "DTYPE"))
  args = parser.parse_args()
  if args.child:
    child(*args.child)
    return
  print(
    f"T5 v1.1 encoder d_model={args.d_model} d_ff={args.d_ff} layers={args.layers} "
    f"(+ {args.decoder_layers} decoder layers, LM head), shards <= {args.shard_gb} GiB"
  )
  print(
    "| stored | loader | params | files GB | encoder GB | peak RSS GB | peak / encoder "
    "| peak / bf16 encoder | s |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory(prefix="t5_memory_") as tmp:
    folders = {}
    for stored, loader, param_dtype in CASES:
      if stored not in folders:
        folder = os.path.join(tmp, stored)
        folders[stored] = (folder, write_checkpoint(folder, args, stored))
      folder, files = folders[stored]
      out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", folder, loader, param_dtype],
        capture_output=True,
        text=True,
        check=True,
      ).stdout
      r = json.loads(out.strip().splitlines()[-1])
      print(
        f"| {stored} | {loader} | {param_dtype} | {files / 1e9:.2f} | {r['encoder'] / 1e9:.2f} "
        f"| {r['peak'] / 1e9:.2f} | {r['peak'] / r['encoder']:.2f} "
        f"| {r['peak'] / (2 * r['params']):.2f} | {r['seconds']:.1f} |",
        flush=True,
      )


if __name__ == "__main__":
  main()

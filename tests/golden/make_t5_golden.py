"""Writes the Hugging Face reference outputs that tests/test_t5.py checks the Flax T5 encoder against.

Run from the repository root with a Python that has torch and transformers 5.x (no network needed;
nothing is downloaded, the tokenizer is ByT5's, which needs no vocabulary file):

  /work/refvenv/bin/pip install -q transformers==5.24.0 tokenizers safetensors sentencepiece
  /work/refvenv/bin/python tests/golden/make_t5_golden.py

Output: ``tests/golden/t5_golden.npz`` holding, for each case below, a tiny seeded
``transformers.T5EncoderModel`` (its state dict under ``<case>/sd/<torch key>``, its ``T5Config``
as JSON under ``<case>/config``), the input ids and attention masks (some rows padded, one row longer
than ``relative_attention_max_distance`` so the logarithmic far buckets are used) and the reference
``last_hidden_state`` (eager attention, float32, eval mode). It also stores torch's relative-position
bucket tables for relative positions -1000..1000 under several (num_buckets, max_distance) settings,
and the torch / transformers versions.

Cases:

* ``v11``: T5 v1.1 / Flan-T5 / ByT5 architecture (``feed_forward_proj="gated-gelu"``, i.e. a
  ``gelu_new`` gate times a linear branch), vocabulary 384 so that ByT5 token ids are valid;
  ``num_heads * d_kv != d_model`` to pin the attention projection layouts.
* ``v10``: original T5 (``feed_forward_proj="relu"``, one ``wi``).

The weights are redrawn after HF's initialisation (layer-norm scales around 1 instead of exactly 1,
a relative-position bias of unit scale) so that a swapped or ignored parameter changes the output.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "t5_golden.npz")

CASES = {
  "v11": dict(
    vocab_size=384,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=3,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=16,
    relative_attention_max_distance=20,
    layer_norm_epsilon=1e-6,
  ),
  "v10": dict(
    vocab_size=128,
    d_model=32,
    d_kv=16,
    d_ff=48,
    num_layers=2,
    num_heads=2,
    feed_forward_proj="relu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=32,
    layer_norm_epsilon=1e-6,
  ),
}
SEQ_LEN = 40
VALID_LENGTHS = (40, 17, 5)  # Row 0 spans 40 > max_distance; rows 1, 2 are padded.
PROMPTS = ("A photo of a red fox sitting in the snow at dusk, 8k, sharp.", "a cat", "")
BUCKET_SETTINGS = ((32, 128), (16, 20), (32, 32), (64, 256), (8, 16))


def _tiny_model(name: str, kwargs: dict, seed: int) -> T5EncoderModel:
  torch.manual_seed(seed)
  config = T5Config(**kwargs, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
  model = T5EncoderModel(config).eval()
  model.config._attn_implementation = "eager"  # The textbook path; sdpa is checked against it.
  with torch.no_grad():
    for key, param in model.named_parameters():
      if key.endswith("layer_norm.weight"):
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      elif key.endswith("relative_attention_bias.weight") or key == "shared.weight":
        param.copy_(torch.randn_like(param))
      else:  # Linear layers: unit-variance outputs for unit-variance inputs.
        param.copy_(torch.randn_like(param) / param.shape[1] ** 0.5)
  print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters")
  return model


def _inputs(vocab_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, vocab_size, size=(len(VALID_LENGTHS), SEQ_LEN)).astype(np.int64)
  mask = np.zeros_like(ids)
  for row, n in enumerate(VALID_LENGTHS):
    mask[row, :n] = 1
    ids[row, n - 1] = 1  # EOS, as the tokenizer would put it.
    ids[row, n:] = 0  # Pad id.
  return ids, mask


def main() -> None:
  torch.set_num_threads(1)
  out: dict[str, np.ndarray] = {
    "torch_version": np.array(torch.__version__),
    "transformers_version": np.array(transformers.__version__),
    "seq_len": np.array(SEQ_LEN),
  }
  tokenizer = ByT5Tokenizer()
  tok = tokenizer(
    list(PROMPTS), padding="max_length", max_length=SEQ_LEN, truncation=True, return_tensors="np"
  )
  out["byt5/prompts"] = np.array(PROMPTS)
  out["byt5/input_ids"] = tok["input_ids"].astype(np.int32)
  out["byt5/attention_mask"] = tok["attention_mask"].astype(np.int32)

  for seed, (name, kwargs) in enumerate(CASES.items()):
    model = _tiny_model(name, kwargs, seed)
    ids, mask = _inputs(kwargs["vocab_size"], seed + 100)
    with torch.no_grad():
      hidden = model(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
      ).last_hidden_state.numpy()
      # Self-checks of the reference: sdpa agrees, and padding does not touch valid tokens.
      model.config._attn_implementation = "sdpa"
      sdpa = model(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
      ).last_hidden_state.numpy()
      model.config._attn_implementation = "eager"
      valid = mask.astype(bool)
      np.testing.assert_allclose(sdpa[valid], hidden[valid], atol=1e-5)
      n = VALID_LENGTHS[1]
      alone = model(input_ids=torch.from_numpy(ids[1:2, :n])).last_hidden_state.numpy()
      np.testing.assert_allclose(alone[0], hidden[1, :n], atol=1e-5)
    for key, value in model.state_dict().items():
      if key == "encoder.embed_tokens.weight":
        continue  # Tied to shared.weight; save_pretrained writes only shared.weight too.
      out[f"{name}/sd/{key}"] = value.numpy().astype(np.float32)
    out[f"{name}/config"] = np.array(json.dumps({**kwargs, "model_type": "t5"}))
    out[f"{name}/input_ids"] = ids.astype(np.int32)
    out[f"{name}/attention_mask"] = mask.astype(np.int32)
    out[f"{name}/last_hidden_state"] = hidden.astype(np.float32)
    if kwargs["vocab_size"] >= 384:
      with torch.no_grad():
        byt5 = model(
          input_ids=torch.from_numpy(out["byt5/input_ids"]).long(),
          attention_mask=torch.from_numpy(out["byt5/attention_mask"]).long(),
        )
      out[f"{name}/byt5_last_hidden_state"] = byt5.last_hidden_state.numpy().astype(np.float32)

  relative = torch.arange(-1000, 1001)
  out["buckets/relative_position"] = relative.numpy().astype(np.int32)
  for num_buckets, max_distance in BUCKET_SETTINGS:
    buckets = T5Attention._relative_position_bucket(
      relative, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance
    )
    out[f"buckets/{num_buckets}_{max_distance}"] = buckets.numpy().astype(np.int16)

  np.savez_compressed(OUT, **out)
  print(f"wrote {OUT} ({os.path.getsize(OUT) / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()

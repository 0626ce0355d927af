"""Prompts -> T5 token embeddings for ZipDiT's cross-attention (§3.2).

Prompts are padded to a fixed ``max_length`` so that the jitted encoder, and the DiT that consumes
its output, compile once. The classifier-free-guidance "null" condition is the encoding of the
empty prompt (text is replaced by it with p=0.05 in training), not a zero tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zipir_jax.models import t5

Array = jax.Array


def tokenize(
  prompts: Sequence[str], tokenizer: Any, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and mask, both int32 (B, max_length); long prompts are cut (EOS is kept)."""
  if isinstance(prompts, str):
    raise TypeError("prompts must be a sequence of strings, not a single string")
  tokens = tokenizer(
    list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
  )
  return tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _encode(model: t5.T5Encoder, params: Any, input_ids: Array, mask: Array) -> Array:
  return model.apply({"params": params}, input_ids, mask)


def encode_prompts(
  prompts: Sequence[str], tokenizer: Any, model: t5.T5Encoder, params: Any, max_length: int
) -> tuple[Array, Array]:
  """Encodes prompts to ``(embeddings (B, max_length, d_model), mask (B, max_length))``.

  Embeddings at padded positions are whatever the encoder computes there (as in HF); use the mask.
  """
  input_ids, mask = tokenize(prompts, tokenizer, max_length)
  vocab_size = model.config.vocab_size
  if input_ids.size and int(input_ids.max()) >= vocab_size:
    raise ValueError(
      f"tokenizer produced id {int(input_ids.max())} but the encoder's vocabulary "
      f"has {vocab_size} entries: tokenizer and weights do not belong together"
    )
  return _encode(model, params, jnp.asarray(input_ids), jnp.asarray(mask)), jnp.asarray(mask)


def tiny_text_encoder(rng: Array, **overrides: Any) -> tuple[t5.T5Config, Any, Any]:
  """``(config, params, tokenizer)`` of a tiny random ByT5-style encoder (tests, demo; no files)."""
  import transformers  # pylint: disable=g-import-not-at-top

  config = t5.tiny_byt5_config(**overrides)
  return config, t5.init_t5_encoder(config, rng), transformers.ByT5Tokenizer()


def build_text_encoder(config: Any, rng: Array) -> tuple[t5.T5Config, Any, Any]:
  """``(config, params, tokenizer)`` of an experiment's T5: the local Hugging Face folder
  ``config.text.encoder_path``, else the tiny random ByT5-style one (``rng``) of tests and demo."""
  if config.text.encoder_path:
    return t5.load_t5_encoder(config.text.encoder_path, dtype=config.text.dtype)
  return tiny_text_encoder(rng, d_model=config.dit.text_dim, dtype=config.text.dtype)

"""T5 encoder (Raffel et al. 2020) in Flax: the text conditioning of ZipDiT (§3.2).

Reproduces Hugging Face's ``T5EncoderModel`` for the three checkpoint families in use:

* T5 v1.0 (``feed_forward_proj="relu"``): ``wi -> ReLU -> wo``.
* T5 v1.1 / Flan-T5 / mT5 (``"gated-gelu"``): ``gelu_new(wi_0 x) * wi_1 x -> wo`` (tanh GELU, as HF
  maps "gated-gelu" to ``gelu_new`` for backwards compatibility).
* ByT5: the v1.1 architecture with a 384-entry byte vocabulary.

T5 conventions kept here: pre-norm residual blocks with RMS layer norm (no mean subtraction, no
bias, statistics in float32); attention logits *not* scaled by 1/sqrt(d_kv) (mesh-tf folds the
scale into the initialisation); a learned relative-position bias over bidirectional log buckets
that only the first block owns and every block adds; no scaling of the input embedding (HF's tied
``d_model**-0.5`` factor applies to the decoder's LM head only, which an encoder never runs).

Numerics: matmuls run in ``config.dtype`` (bfloat16 for the 4.7 B T5-XXL encoder), and checkpoints
load with parameters in that dtype too; the residual stream, layer norms, attention logits and
softmax stay in float32, which costs little at prompt lengths and keeps bfloat16 outputs close to
the float32 reference.

Hugging Face checkpoints load with ``load_t5_encoder(folder)``; the key-name conversion
(``convert_hf_state_dict``) is the one the equivalence test exercises.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zipir_jax import parallel, weights
from zipir_jax.errors import T5CheckpointError

Array = jax.Array
PathLike = str | os.PathLike[str]

# Logical axes of activations (parameters use 'vocab', 'embed', 'heads', 'kv', 'mlp',
# 'relpos_buckets', 'norm'); the sharding rules map both onto the mesh.
ACTIVATION_AXES = ("batch", "length", "activation_embed")
MLP_ACTIVATION_AXES = ("batch", "length", "activation_mlp")

# Activations of HF's ACT2FN that T5 checkpoints use. "gelu" is the exact (erf) GELU,
# "gelu_new" the tanh approximation.
_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  "relu": nn.relu,
  "gelu": lambda x: nn.gelu(x, approximate=False),
  "gelu_new": lambda x: nn.gelu(x, approximate=True),
  "silu": nn.silu,
  "swish": nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Encoder hyper-parameters, named as in HF's ``config.json``; dtypes are ours."""

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = "relu"
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"  # Matmul compute dtype.
  param_dtype: str = "float32"

  def __post_init__(self):
    _ = self.activation  # Raises now, not at trace time, on an unsupported feed_forward_proj.
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"T5Config.{name}={getattr(self, name)!r} is not a dtype name") from e

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> str:
    """HF's ``dense_act_fn``: the part after ``gated-``, with "gated-gelu" meaning ``gelu_new``."""
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in _ACTIVATIONS:
      raise ValueError(
        f"feed_forward_proj={self.feed_forward_proj!r}: expected '<act>' or "
        f"'gated-<act>' with <act> one of {sorted(_ACTIVATIONS)}"
      )
    return "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], **overrides: Any) -> T5Config:
    """Reads the fields of a HF ``T5Config`` dict (``config.json``); extra keys are ignored."""
    model_type = hf.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
      # UMT5 gives every block its own relative-position bias; that is not this architecture.
      raise ValueError(
        f"model_type={model_type!r}: expected 't5' or 'mt5' (T5, T5 v1.1, Flan-T5, mT5, ByT5)"
      )
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
    required = {"vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"}
    missing = sorted(required - set(hf))
    if missing:
      raise ValueError(f"T5 config lacks {missing}")
    return cls(**{**{k: hf[k] for k in fields if k in hf}, **overrides})

  @classmethod
  def from_json(cls, path: PathLike, **overrides: Any) -> T5Config:
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: T5 config.json not found")
    with open(path, encoding="utf-8") as f:
      try:
        hf = json.load(f)
      except json.JSONDecodeError as e:
        raise T5CheckpointError(f"{path}: not valid JSON ({e})") from e
    try:
      return cls.from_hf_dict(hf, **overrides)
    except ValueError as e:
      raise T5CheckpointError(f"{path}: {e}") from e


def tiny_byt5_config(**overrides: Any) -> T5Config:
  """A tiny ByT5-shaped (gated-GELU, byte vocabulary) encoder for tests and the demo."""
  fields = dict(
    vocab_size=384,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
  )
  return T5Config(**{**fields, **overrides})


# ------------------------------------------------------------------------------------------------
# Relative position buckets.
# ------------------------------------------------------------------------------------------------


def relative_position_buckets(
  relative_position: np.ndarray, num_buckets: int, max_distance: int
) -> np.ndarray:
  """Bidirectional T5 buckets of ``memory_position - query_position`` (HF/mesh-tf).

  Half the buckets for each sign; of those, half are exact offsets and half logarithmic bins up to
  ``max_distance``. Computed on the host in float32 exactly as HF's torch code does, so the bins
  match at their boundaries (a bucket index is discrete: a rounding difference is not small).
  """
  relative_position = np.asarray(relative_position, np.int64)
  num_buckets //= 2
  buckets = (relative_position > 0).astype(np.int64) * num_buckets
  distance = np.abs(relative_position)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):  # log(0) for distance 0; that branch is not selected.
    log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
  scaled = (
    log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
  )
  if_large = max_exact + np.nan_to_num(scaled, neginf=0.0).astype(np.int64)
  if_large = np.minimum(if_large, num_buckets - 1)
  return (buckets + np.where(distance < max_exact, distance, if_large)).astype(np.int32)


def _bucket_table(query_length: int, key_length: int, config: T5Config) -> np.ndarray:
  relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  return relative_position_buckets(
    relative, config.relative_attention_num_buckets, config.relative_attention_max_distance
  )


# ------------------------------------------------------------------------------------------------
# Layers.
# ------------------------------------------------------------------------------------------------


def _normal(stddev: float, axes: tuple[str, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


class T5LayerNorm(nn.Module):
  """RMS norm: ``x / rms(x) * scale`` with no mean subtraction and no bias, in float32."""

  epsilon: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
    scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return x * scale.astype(jnp.float32)


class T5Attention(nn.Module):
  """Multi-head self-attention with additive position bias and mask, and no logit scaling."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, bias: Array) -> Array:
    """``x``: (B, L, D) normed input; ``bias``: float32, broadcastable to (B, heads, L, L)."""
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    inner = cfg.num_heads * cfg.d_kv

    def projection(name: str, stddev: float) -> nn.DenseGeneral:
      return nn.DenseGeneral(
        (cfg.num_heads, cfg.d_kv),
        axis=-1,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        kernel_init=parallel.with_dense_general_partitioning(
          nn.initializers.normal(stddev), ("embed", "heads", "kv")
        ),
      )

    # Mesh-tf initialisation: the 1/sqrt(d_kv) that T5 leaves out of the logits lives in q's std.
    q = projection("q", (cfg.d_model * cfg.d_kv) ** -0.5)(x)
    k = projection("k", cfg.d_model**-0.5)(x)
    v = projection("v", cfg.d_model**-0.5)(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return nn.DenseGeneral(
      cfg.d_model,
      axis=(-2, -1),
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      name="o",
      kernel_init=parallel.with_dense_general_partitioning(
        nn.initializers.normal(inner**-0.5), ("heads", "kv", "embed")
      ),
    )(out)


class T5FeedForward(nn.Module):
  """``wo(act(wi x))`` (v1.0) or ``wo(act(wi_0 x) * wi_1 x)`` (v1.1, gated)."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def dense(features: int, name: str, axes: tuple[str, str], fan_in: int) -> nn.Dense:
      return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        kernel_init=_normal(fan_in**-0.5, axes),
      )

    act = _ACTIVATIONS[cfg.activation]
    if cfg.is_gated:
      h = act(dense(cfg.d_ff, "wi_0", ("embed", "mlp"), cfg.d_model)(x)) * dense(
        cfg.d_ff, "wi_1", ("embed", "mlp"), cfg.d_model
      )(x)
    else:
      h = act(dense(cfg.d_ff, "wi", ("embed", "mlp"), cfg.d_model)(x))
    h = nn.with_logical_constraint(h, MLP_ACTIVATION_AXES)
    return dense(cfg.d_model, "wo", ("mlp", "embed"), cfg.d_ff)(h)


class T5Block(nn.Module):
  """Pre-norm self-attention then pre-norm feed-forward, each added to the float32 residual."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, bias: Array) -> Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    norm = lambda name: T5LayerNorm(cfg.layer_norm_epsilon, jnp.dtype(cfg.param_dtype), name=name)
    h = norm("attention_norm")(x).astype(dtype)
    x = x + T5Attention(cfg, name="attention")(h, bias).astype(jnp.float32)
    h = norm("mlp_norm")(x).astype(dtype)
    x = x + T5FeedForward(cfg, name="mlp")(h).astype(jnp.float32)
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


class T5Encoder(nn.Module):
  """Token ids (B, L) and padding mask (B, L) -> final-layer-normed states (B, L, d_model).

  Outputs at padded positions are computed (as in HF) but meaningless: consumers must mask them.
  The output dtype is ``config.dtype``.
  """

  config: T5Config

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    param_dtype = jnp.dtype(cfg.param_dtype)
    length = input_ids.shape[1]
    embedding = self.param(
      "token_embedding",
      _normal(1.0, ("vocab", "embed")),
      (cfg.vocab_size, cfg.d_model),
      param_dtype,
    )
    x = jnp.take(embedding, input_ids, axis=0).astype(jnp.float32)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)

    # HF keeps this table in block 0's attention and passes its bias on to the other blocks.
    relative_bias = self.param(
      "relative_attention_bias",
      _normal(cfg.d_model**-0.5, ("relpos_buckets", "heads")),
      (cfg.relative_attention_num_buckets, cfg.num_heads),
      param_dtype,
    )
    buckets = _bucket_table(length, length, cfg)  # Static: L is known at trace time.
    bias = jnp.take(relative_bias.astype(jnp.float32), buckets, axis=0)  # (L, L, heads)
    bias = jnp.transpose(bias, (2, 0, 1))[None]  # (1, heads, L, L)
    if attention_mask is not None:
      if attention_mask.shape != input_ids.shape:
        raise ValueError(
          f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}"
        )
      # HF adds the dtype's most negative value on padded keys; float32 here.
      bias = bias + jnp.where(
        attention_mask[:, None, None, :].astype(bool), 0.0, jnp.finfo(jnp.float32).min
      )

    for i in range(cfg.num_layers):
      x = T5Block(cfg, name=f"block_{i}")(x, bias)
    x = T5LayerNorm(cfg.layer_norm_epsilon, param_dtype, name="final_layer_norm")(x)
    return nn.with_logical_constraint(x.astype(jnp.dtype(cfg.dtype)), ACTIVATION_AXES)


def init_t5_encoder(config: T5Config, rng: Array, length: int = 8) -> dict[str, Any]:
  """Random (mesh-tf-style) parameters, unboxed; the tiny test encoder's weights."""
  init = jax.jit(T5Encoder(config).init)  # One compiled program instead of many eager ops.
  return nn.unbox(init(rng, jnp.ones((1, length), jnp.int32))["params"])


# ------------------------------------------------------------------------------------------------
# Hugging Face checkpoints.
# ------------------------------------------------------------------------------------------------

_HF_PREFIX = "encoder."


def expected_hf_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
  """torch key -> shape of every encoder tensor a ``T5EncoderModel`` with ``config`` holds."""
  d, inner, f = config.d_model, config.num_heads * config.d_kv, config.d_ff
  shapes = {"shared.weight": (config.vocab_size, d), "encoder.final_layer_norm.weight": (d,)}
  for i in range(config.num_layers):
    block = f"encoder.block.{i}.layer"
    shapes.update(
      {
        f"{block}.0.SelfAttention.q.weight": (inner, d),
        f"{block}.0.SelfAttention.k.weight": (inner, d),
        f"{block}.0.SelfAttention.v.weight": (inner, d),
        f"{block}.0.SelfAttention.o.weight": (d, inner),
        f"{block}.0.layer_norm.weight": (d,),
        f"{block}.1.DenseReluDense.wo.weight": (d, f),
        f"{block}.1.layer_norm.weight": (d,),
      }
    )
    for wi in ("wi_0", "wi_1") if config.is_gated else ("wi",):
      shapes[f"{block}.1.DenseReluDense.{wi}.weight"] = (f, d)
  shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
    config.relative_attention_num_buckets,
    config.num_heads,
  )
  return shapes


def is_encoder_key(key: str) -> bool:
  """Whether a T5 checkpoint key belongs to the encoder (decoder and LM head are skipped)."""
  return key.startswith(_HF_PREFIX) or key == "shared.weight"


def convert_hf_state_dict(
  state_dict: Mapping[str, np.ndarray], config: T5Config, source: str = "state dict"
) -> dict[str, Any]:
  """Maps a HF T5 (encoder or encoder-decoder) state dict onto ``T5Encoder`` parameters.

  torch ``Linear`` weights are (out, in); Flax kernels are (in, out), with the attention's
  ``heads * d_kv`` axis split into ``(heads, kv)``. Decoder and LM-head keys are ignored; a
  missing, misshapen or unknown encoder key is an error naming ``source``, the key and shapes.
  Tensors already in ``config.param_dtype`` are not copied: the parameters are views of them.
  """
  shapes = expected_hf_shapes(config)
  state = dict(state_dict)
  if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
    state["shared.weight"] = state["encoder.embed_tokens.weight"]  # Encoder-only export.
  state.pop("encoder.embed_tokens.weight", None)  # Tied to shared.weight in T5.
  unknown = sorted(k for k in state if is_encoder_key(k) and k not in shapes)
  if unknown:
    raise T5CheckpointError(
      f"{source}: unexpected encoder keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''} "
      f"for a {config.num_layers}-layer T5 encoder with feed_forward_proj="
      f"{config.feed_forward_proj!r}; is config.json from the same checkpoint?"
    )
  param_dtype = np.dtype(jnp.dtype(config.param_dtype))

  def get(key: str) -> np.ndarray:
    if key not in state:
      raise T5CheckpointError(f"{source}: missing key '{key}' (expected shape {shapes[key]})")
    value = np.asarray(state[key])
    if value.shape != shapes[key]:
      raise T5CheckpointError(
        f"{source}: key '{key}' has shape {value.shape}, expected {shapes[key]} from the config"
      )
    return value.astype(param_dtype, copy=False)

  h, k = config.num_heads, config.d_kv
  params: dict[str, Any] = {
    "token_embedding": get("shared.weight"),
    "relative_attention_bias": get(
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    ),
    "final_layer_norm": {"scale": get("encoder.final_layer_norm.weight")},
  }
  for i in range(config.num_layers):
    attn = f"encoder.block.{i}.layer.0.SelfAttention"
    ff = f"encoder.block.{i}.layer.1.DenseReluDense"
    mlp = {
      name: {"kernel": get(f"{ff}.{name}.weight").T}
      for name in (("wi_0", "wi_1") if config.is_gated else ("wi",))
    }
    mlp["wo"] = {"kernel": get(f"{ff}.wo.weight").T}
    params[f"block_{i}"] = {
      "attention_norm": {"scale": get(f"encoder.block.{i}.layer.0.layer_norm.weight")},
      "attention": {
        **{
          n: {"kernel": get(f"{attn}.{n}.weight").T.reshape(config.d_model, h, k)}
          for n in ("q", "k", "v")
        },
        "o": {"kernel": get(f"{attn}.o.weight").T.reshape(h, k, config.d_model)},
      },
      "mlp_norm": {"scale": get(f"encoder.block.{i}.layer.1.layer_norm.weight")},
      "mlp": mlp,
    }
  return params


# Weight files of a HF folder, in order of preference: (single file, shard index).
_WEIGHT_LAYOUTS = (
  ("model.safetensors", "model.safetensors.index.json"),
  ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def _weight_files(folder: str) -> list[str]:
  """The weight file(s) of a HF folder: one file, or the shards its index lists."""
  for single, index in _WEIGHT_LAYOUTS:
    if os.path.isfile(os.path.join(folder, single)):
      return [os.path.join(folder, single)]
    index_path = os.path.join(folder, index)
    if os.path.isfile(index_path):
      with open(index_path, encoding="utf-8") as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise T5CheckpointError(f"{index_path}: expected JSON with a 'weight_map' ({e})") from e
      # Only the shards that hold encoder tensors are read.
      shards = sorted({v for k, v in weight_map.items() if is_encoder_key(k)})
      if not shards:
        raise T5CheckpointError(f"{index_path}: the weight_map lists no encoder tensors")
      return [os.path.join(folder, s) for s in shards]
  wanted = [name for layout in _WEIGHT_LAYOUTS for name in layout]
  raise FileNotFoundError(f"{folder}: no T5 weights found; expected one of {wanted}")


def _safetensors_keys(path: str) -> list[str]:
  import safetensors  # pylint: disable=g-import-not-at-top

  try:
    with safetensors.safe_open(path, framework="numpy", backend="pread") as f:
      return list(f.keys())
  except Exception as e:  # safetensors raises its own SafetensorError for corrupt files.
    raise T5CheckpointError(
      f"{path}: cannot read safetensors file ({type(e).__name__}: {e})"
    ) from e


def read_hf_encoder_state_dict(folder: PathLike, dtype: str | None = None) -> dict[str, np.ndarray]:
  """The encoder tensors of a HF T5 folder, each cast to ``dtype`` (None: as stored) as it is read.

  Safetensors files are read one tensor at a time with ``pread`` (no mapping of the file stays
  resident) and decoder tensors not at all, so the host peak is the encoder in ``dtype`` plus one
  tensor as stored: 9.5 GB for T5-XXL's encoder in bfloat16, not 19 GB of float32.
  ``pytorch_model.bin`` files are read whole (:mod:`zipir_jax.weights`): peak about the file's size
  plus the encoder in ``dtype``.
  """
  import safetensors  # pylint: disable=g-import-not-at-top

  target = None if dtype is None else np.dtype(jnp.dtype(dtype))
  cast = (lambda x: x) if target is None else (lambda x: x.astype(target, copy=False))
  files = _weight_files(os.fspath(folder))
  tensors = [p for p in files if p.endswith(weights.SAFETENSORS_SUFFIXES)]
  keys = {p: _safetensors_keys(p) for p in tensors}
  # encoder.embed_tokens is tied to shared in T5: read it only when shared is absent.
  tied = any("shared.weight" in k for k in keys.values())
  state: dict[str, np.ndarray] = {}
  for path in files:
    if path not in keys:  # pytorch_model.bin: one pickle, read whole.
      loaded = weights.load_state_dict(path)
      state.update((k, cast(loaded.pop(k))) for k in list(loaded) if is_encoder_key(k))
      continue
    wanted = [
      k
      for k in keys[path]
      if is_encoder_key(k) and not (tied and k == "encoder.embed_tokens.weight")
    ]
    try:
      with safetensors.safe_open(path, framework="numpy", backend="pread") as f:
        for k in wanted:
          state[k] = cast(f.get_tensor(k))
    except Exception as e:  # SafetensorError: a truncated or corrupt file.
      raise T5CheckpointError(
        f"{path}: cannot read safetensors file ({type(e).__name__}: {e})"
      ) from e
  return state


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
# Plain lowercase ASCII: every T5 SentencePiece vocabulary and ByT5 encode it without <unk>.
_TOKENIZER_PROBE = "a photo of a cat"


def load_tokenizer(folder: PathLike, vocab_size: int | None = None) -> Any:
  """The ``transformers`` tokenizer saved in ``folder`` (local files only: nothing downloads).

  Checked, because transformers 5 quietly builds an empty T5 tokenizer (every word ``<unk>``)
  from a folder without vocabulary files, and a tokenizer larger than the embedding table
  means tokenizer and weights come from different models.
  """
  import transformers  # pylint: disable=g-import-not-at-top

  folder = os.fspath(folder)
  if not any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
    raise FileNotFoundError(f"{folder}: no tokenizer files; expected one of {_TOKENIZER_FILES}")
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
  except (OSError, ValueError, ImportError) as e:
    hint = ""
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
      hint = (
        " A folder with only spiece.model needs the sentencepiece and protobuf packages "
        "once; tokenizer.save_pretrained(folder) then writes a tokenizer.json that does not."
      )
    raise T5CheckpointError(f"{folder}: cannot load the tokenizer ({e}).{hint}") from e
  unk = getattr(tokenizer, "unk_token_id", None)
  if unk is not None and unk in tokenizer(_TOKENIZER_PROBE)["input_ids"]:
    raise T5CheckpointError(
      f"{folder}: the tokenizer maps {_TOKENIZER_PROBE!r} to <unk> tokens; "
      "its vocabulary did not load"
    )
  if vocab_size is not None and len(tokenizer) > vocab_size:
    raise T5CheckpointError(
      f"{folder}: the tokenizer has {len(tokenizer)} tokens but the "
      f"encoder's embedding table only {vocab_size} (vocab_size)"
    )
  return tokenizer


def load_t5_encoder(
  folder: PathLike, dtype: str = "float32", param_dtype: str | None = None
) -> tuple[T5Config, dict[str, Any], Any]:
  """Loads ``(config, params, tokenizer)`` from a local HF T5 / T5 v1.1 / Flan-T5 / ByT5 folder.

  The folder holds ``config.json``, the weights (``model.safetensors``, sharded safetensors with
  ``model.safetensors.index.json``, or ``pytorch_model.bin``; full encoder-decoder checkpoints
  work, their decoder is skipped) and the tokenizer files. ``param_dtype`` (None: ``dtype``) is
  the parameters' dtype; each tensor is cast to it as it is read (:func:`read_hf_encoder_state_dict`).
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: T5 checkpoint folder not found")
  config = T5Config.from_json(
    os.path.join(folder, "config.json"), dtype=dtype, param_dtype=param_dtype or dtype
  )
  tokenizer = load_tokenizer(folder, config.vocab_size)  # Cheap checks before reading GBs.
  state = read_hf_encoder_state_dict(folder, config.param_dtype)
  params = convert_hf_state_dict(state, config, source=folder)
  return config, params, tokenizer


def hf_config_dict(config: T5Config) -> dict[str, Any]:
  """The ``config.json`` fields HF needs to rebuild ``config`` (to write test/demo folders)."""
  fields = {
    f.name: getattr(config, f.name)
    for f in dataclasses.fields(config)
    if f.name not in ("dtype", "param_dtype")
  }
  return {
    "model_type": "t5",
    "architectures": ["T5EncoderModel"],
    "is_encoder_decoder": False,
    **fields,
  }


def params_to_hf_state_dict(params: Mapping[str, Any], config: T5Config) -> dict[str, np.ndarray]:
  """Inverse of ``convert_hf_state_dict`` (for writing tiny HF-layout folders)."""
  p = jax.tree.map(np.asarray, dict(params))
  inner = config.num_heads * config.d_kv
  state = {
    "shared.weight": p["token_embedding"],
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": p[
      "relative_attention_bias"
    ],
    "encoder.final_layer_norm.weight": p["final_layer_norm"]["scale"],
  }
  for i in range(config.num_layers):
    block = p[f"block_{i}"]
    attn = f"encoder.block.{i}.layer.0.SelfAttention"
    for n in ("q", "k", "v"):
      state[f"{attn}.{n}.weight"] = block["attention"][n]["kernel"].reshape(config.d_model, inner).T
    state[f"{attn}.o.weight"] = block["attention"]["o"]["kernel"].reshape(inner, config.d_model).T
    state[f"encoder.block.{i}.layer.0.layer_norm.weight"] = block["attention_norm"]["scale"]
    state[f"encoder.block.{i}.layer.1.layer_norm.weight"] = block["mlp_norm"]["scale"]
    for name, value in block["mlp"].items():
      state[f"encoder.block.{i}.layer.1.DenseReluDense.{name}.weight"] = value["kernel"].T
  return {k: np.ascontiguousarray(v) for k, v in state.items()}


def save_hf_encoder(
  folder: PathLike, config: T5Config, params: Mapping[str, Any], tokenizer: Any | None = None
) -> None:
  """Writes a HF-layout folder (config.json, model.safetensors, tokenizer) that
  ``load_t5_encoder`` and ``transformers.T5EncoderModel.from_pretrained`` both read."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config_dict(config), f, indent=2)
  state = {k: v.astype(np.float32) for k, v in params_to_hf_state_dict(params, config).items()}
  safetensors.numpy.save_file(
    state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"}
  )
  if tokenizer is not None:
    tokenizer.save_pretrained(folder)

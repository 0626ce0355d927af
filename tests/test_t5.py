"""The Flax T5 encoder against Hugging Face's torch ``T5EncoderModel`` (golden file, no torch here).

tests/golden/t5_golden.npz comes from tests/golden/make_t5_golden.py (see its docstring).
"""

import functools
import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import sentencepiece
import transformers

from zipir_jax import text
from zipir_jax.models import t5

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "t5_golden.npz"
# A T5 SentencePiece tokenizer folder (spiece.model + tokenizer_config.json, no tokenizer.json):
# tests/golden/make_t5_spiece.py.
SPIECE = GOLDEN.parent / "t5_spiece"
CASES = ("v11", "v10")


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _case(golden, case, **overrides):
  """(config, HF state dict, HF config dict) of a golden case."""
  hf_config = json.loads(str(golden[f"{case}/config"]))
  prefix = f"{case}/sd/"
  state = {k[len(prefix) :]: v for k, v in golden.items() if k.startswith(prefix)}
  return t5.T5Config.from_hf_dict(hf_config, **overrides), state, hf_config


@functools.partial(jax.jit, static_argnums=0)
def _jit_apply(config, params, ids, mask):
  return t5.T5Encoder(config).apply({"params": params}, ids, mask)


def _apply(config, params, ids, mask=None):
  return np.asarray(
    _jit_apply(config, params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
  )


@pytest.mark.parametrize("case", CASES)
def test_matches_hugging_face_reference(golden, case):
  config, state, _ = _case(golden, case)
  params = t5.convert_hf_state_dict(state, config)
  out = _apply(config, params, golden[f"{case}/input_ids"], golden[f"{case}/attention_mask"])
  valid = golden[f"{case}/attention_mask"].astype(bool)
  np.testing.assert_allclose(out[valid], golden[f"{case}/last_hidden_state"][valid], atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_padding_does_not_change_valid_tokens(golden, case):
  config, state, _ = _case(golden, case)
  params = t5.convert_hf_state_dict(state, config)
  ids, mask = golden[f"{case}/input_ids"][1:2], golden[f"{case}/attention_mask"][1:2]
  n = int(mask.sum())
  assert n < ids.shape[1]
  padded = _apply(config, params, ids, mask)[0, :n]
  alone = _apply(config, params, ids[:, :n])[0]
  np.testing.assert_allclose(padded, alone, atol=1e-5)
  # Without the mask the pads leak into the valid tokens: the test above can fail.
  unmasked = _apply(config, params, ids)[0, :n]
  assert np.abs(unmasked - alone).max() > 1e-3


@pytest.mark.parametrize("setting", ["32_128", "16_20", "32_32", "64_256", "8_16"])
def test_relative_position_buckets_match_torch(golden, setting):
  num_buckets, max_distance = map(int, setting.split("_"))
  buckets = t5.relative_position_buckets(
    golden["buckets/relative_position"], num_buckets, max_distance
  )
  np.testing.assert_array_equal(buckets, golden[f"buckets/{setting}"])


def test_byt5_prompts_match_hugging_face(golden):
  """Tokenisation and ``encode_prompts`` end to end, against HF's tokenizer and model."""
  config, state, _ = _case(golden, "v11")
  params = t5.convert_hf_state_dict(state, config)
  tokenizer = transformers.ByT5Tokenizer()
  prompts = [str(p) for p in golden["byt5/prompts"]]
  length = int(golden["seq_len"])
  embeddings, mask = text.encode_prompts(prompts, tokenizer, t5.T5Encoder(config), params, length)
  np.testing.assert_array_equal(mask, golden["byt5/attention_mask"])
  valid = golden["byt5/attention_mask"].astype(bool)
  np.testing.assert_allclose(
    np.asarray(embeddings)[valid], golden["v11/byt5_last_hidden_state"][valid], atol=1e-5
  )


def test_tokenize_pads_to_max_length():
  tokenizer = transformers.ByT5Tokenizer()
  ids, mask = text.tokenize(["hello", "", "x" * 50], tokenizer, max_length=12)
  assert ids.shape == mask.shape == (3, 12) and ids.dtype == mask.dtype == np.int32
  np.testing.assert_array_equal(mask.sum(1), [6, 1, 12])  # bytes + EOS; long prompt cut.
  assert (ids[mask == 0] == tokenizer.pad_token_id).all()
  assert ids[0, 5] == ids[1, 0] == ids[2, 11] == tokenizer.eos_token_id
  with pytest.raises(TypeError, match="sequence of strings"):
    text.tokenize("hello", tokenizer, 12)


# ------------------------------------------------------------------------------------------------
# A SentencePiece T5 tokenizer (T5 / T5 v1.1 / Flan-T5), against sentencepiece itself.
# ------------------------------------------------------------------------------------------------

# Seen words, capitals and symbols it never saw (<unk>), the normaliser's full-width letters, ligature
# and odd spaces, extra whitespace, the empty prompt, and one far longer than max_length.
SPIECE_PROMPTS = [
  "a photo of a cat",
  "A Dog running ON the beach, at sunset!",
  "ｃａｔ ﬁeld\u00a0and\u3000sky",
  "  two   spaces  ",
  "café 42 €",
  "",
  "a dog running across a sandy beach",  # exactly max_length - 1 pieces: no pad, EOS last
  "the night sky full of stars above a dark forest " * 4,
]


def sentencepiece_batch(prompts, max_length):
  """(ids, mask) the way T5 feeds prompts, from sentencepiece alone: pieces cut to leave room for
  EOS, then EOS, then <pad> to ``max_length``."""
  sp = sentencepiece.SentencePieceProcessor(model_file=str(SPIECE / "spiece.model"))
  ids = np.full((len(prompts), max_length), sp.pad_id(), np.int32)
  mask = np.zeros((len(prompts), max_length), np.int32)
  for row, prompt in enumerate(prompts):
    tokens = sp.encode(prompt)[: max_length - 1] + [sp.eos_id()]
    ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
  return ids, mask


@pytest.fixture(scope="module")
def spiece_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("t5_spiece")
  for name in ("spiece.model", "tokenizer_config.json"):
    shutil.copy(SPIECE / name, folder / name)
  return folder


def test_sentencepiece_tokenizer_matches_sentencepiece(spiece_folder):
  sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece_folder / "spiece.model"))
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.vocab_size()) == (0, 1, 2, 200)
  tokenizer = t5.load_tokenizer(spiece_folder, vocab_size=384)
  assert isinstance(tokenizer, transformers.T5Tokenizer)
  assert not (spiece_folder / "tokenizer.json").exists()  # converted from spiece.model
  # T5's 100 sentinels follow the SentencePiece vocabulary, <extra_id_0> last.
  assert len(tokenizer) == 300
  assert tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [299, 200]
  for prompt in SPIECE_PROMPTS:
    assert tokenizer(prompt)["input_ids"] == sp.encode(prompt) + [1], prompt
  max_length = len(sp.encode(SPIECE_PROMPTS[6])) + 1
  ids, mask = text.tokenize(SPIECE_PROMPTS, tokenizer, max_length)
  want_ids, want_mask = sentencepiece_batch(SPIECE_PROMPTS, max_length)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  # The cases the prompts are there for: <unk>, padding, an exact fit and a cut.
  assert (ids == sp.unk_id()).any() and mask[6].all() and mask[7].all()
  assert len(sp.encode(SPIECE_PROMPTS[7])) > max_length and ids[7, -1] == sp.eos_id()
  with pytest.raises(t5.T5CheckpointError, match="300 tokens but the encoder's embedding table"):
    t5.load_tokenizer(spiece_folder, vocab_size=256)


def test_encode_prompts_with_a_sentencepiece_t5_folder(spiece_folder, tmp_path):
  """A T5 v1.1-style folder (config, weights, spiece.model) through load_t5_encoder and
  encode_prompts: the encoder sees sentencepiece's ids and mask."""
  config, params, _ = text.tiny_text_encoder(jax.random.key(3))
  t5.save_hf_encoder(tmp_path, config, params)
  for name in ("spiece.model", "tokenizer_config.json"):
    shutil.copy(spiece_folder / name, tmp_path / name)
  loaded_config, loaded_params, tokenizer = t5.load_t5_encoder(tmp_path)
  assert isinstance(tokenizer, transformers.T5Tokenizer)
  model = t5.T5Encoder(loaded_config)
  embeddings, mask = text.encode_prompts(SPIECE_PROMPTS, tokenizer, model, loaded_params, 16)
  want_ids, want_mask = sentencepiece_batch(SPIECE_PROMPTS, 16)
  np.testing.assert_array_equal(mask, want_mask)
  want = _apply(config, params, want_ids, want_mask)
  assert embeddings.shape == (len(SPIECE_PROMPTS), 16, config.d_model)
  np.testing.assert_allclose(embeddings, want, atol=1e-6, rtol=0)  # measured 0.0
  # Different prompts give different embeddings (the ids reach the encoder).
  assert np.abs(want[0, 0] - want[1, 0]).max() > 1e-3


@pytest.fixture(scope="module")
def tiny():
  config, params, tokenizer = text.tiny_text_encoder(jax.random.key(0))
  return config, params, tokenizer


def test_null_condition_is_the_empty_prompt(tiny):
  """The CFG null condition (training's dropped captions, the default negative prompt) is the
  encoded empty prompt: EOS only, the same inside a batch as alone, not a zero tensor."""
  config, params, tokenizer = tiny
  model = t5.T5Encoder(config)
  null, null_mask = text.encode_prompts([""], tokenizer, model, params, max_length=16)
  assert null.shape == (1, 16, config.d_model) and null_mask.shape == (1, 16)
  np.testing.assert_array_equal(null_mask[0], [1] + [0] * 15)  # Only EOS.
  batch, mask = text.encode_prompts(["a cat", ""], tokenizer, model, params, max_length=16)
  np.testing.assert_allclose(batch[1], null[0], atol=1e-6)
  np.testing.assert_array_equal(mask[1], null_mask[0])
  assert np.abs(np.asarray(batch[0, 0] - null[0, 0])).max() > 1e-3  # Prompts do matter.
  assert np.abs(np.asarray(null)).max() > 1e-3
  again, _ = text.encode_prompts([""], tokenizer, model, params, max_length=16)
  np.testing.assert_array_equal(again, null)


def test_bfloat16_compute_is_close_to_float32(golden):
  config, state, _ = _case(golden, "v11")
  params = t5.convert_hf_state_dict(state, config)
  ids, mask = golden["v11/input_ids"], golden["v11/attention_mask"]
  ref = _apply(config, params, ids, mask)
  bf16_config = t5.T5Config.from_hf_dict(json.loads(str(golden["v11/config"])), dtype="bfloat16")
  out = t5.T5Encoder(bf16_config).apply({"params": params}, ids, mask)
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out, np.float32)
  valid = mask.astype(bool)
  rel = np.linalg.norm(out[valid] - ref[valid]) / np.linalg.norm(ref[valid])
  assert 1e-4 < rel < 5e-2, rel  # Really bf16 (not identical), yet close.


def _write_hf_folder(folder, golden, state=None):
  _, golden_state, hf_config = _case(golden, "v11")
  folder.mkdir(exist_ok=True)
  (folder / "config.json").write_text(json.dumps(hf_config))
  safetensors.numpy.save_file(
    golden_state if state is None else state, str(folder / "model.safetensors")
  )
  transformers.ByT5Tokenizer().save_pretrained(str(folder))
  return golden_state


def test_load_folder_end_to_end(golden, tmp_path):
  _write_hf_folder(tmp_path, golden)
  config, params, tokenizer = t5.load_t5_encoder(tmp_path)
  assert config == _case(golden, "v11")[0] and config.activation == "gelu_new"
  assert isinstance(tokenizer, transformers.ByT5Tokenizer)
  out = _apply(config, params, golden["v11/input_ids"], golden["v11/attention_mask"])
  valid = golden["v11/attention_mask"].astype(bool)
  np.testing.assert_allclose(out[valid], golden["v11/last_hidden_state"][valid], atol=1e-5)
  bf16_config, bf16_params, _ = t5.load_t5_encoder(
    tmp_path, dtype="bfloat16", param_dtype="bfloat16"
  )
  assert bf16_config.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.bfloat16)}


def test_load_reads_encoder_tensors_one_by_one_into_the_compute_dtype(
  golden, tmp_path, monkeypatch
):
  """T5-XXL's float32 encoder would take 19 GB of host memory: each tensor is cast as it is read,
  decoder tensors and the tied encoder.embed_tokens copy are never read."""
  _, state, _ = _case(golden, "v11")
  decoder = {"decoder.block.0.layer.0.SelfAttention.q.weight": np.ones((24, 32), np.float32)}
  tied = {"encoder.embed_tokens.weight": state["shared.weight"]}
  _write_hf_folder(tmp_path, golden, {**state, **decoder, **tied})
  real_open, read = safetensors.safe_open, []

  class Recording:
    def __init__(self, *args, **kwargs):
      self._file = real_open(*args, **kwargs)

    def __enter__(self):
      self._file.__enter__()
      return self

    def __exit__(self, *exc):
      return self._file.__exit__(*exc)

    def keys(self):
      return self._file.keys()

    def get_tensor(self, key):
      read.append(key)
      return self._file.get_tensor(key)

  monkeypatch.setattr(safetensors, "safe_open", Recording)
  config, params, _ = t5.load_t5_encoder(tmp_path, dtype="bfloat16")
  assert config.dtype == config.param_dtype == "bfloat16"
  assert sorted(read) == sorted(state)  # the encoder, once each; nothing else
  expected = t5.convert_hf_state_dict(state, config)  # float32 tensors cast by the conversion
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_load_sharded_encoder_decoder_checkpoint(golden, tmp_path):
  """Full T5ForConditionalGeneration layout: shards, an index, decoder tensors to skip."""
  config, state, hf_config = _case(golden, "v11")
  (tmp_path / "config.json").write_text(json.dumps({**hf_config, "is_encoder_decoder": True}))
  state = dict(state)
  state["encoder.embed_tokens.weight"] = state.pop("shared.weight")  # Encoder-only name.
  keys = sorted(state)
  shards = {
    "model-00001-of-00003.safetensors": keys[: len(keys) // 2],
    "model-00002-of-00003.safetensors": keys[len(keys) // 2 :],
  }
  for name, names in shards.items():
    safetensors.numpy.save_file({k: state[k] for k in names}, str(tmp_path / name))
  # The decoder-only shard is garbage: reading it would fail, so the test proves it is skipped.
  (tmp_path / "model-00003-of-00003.safetensors").write_bytes(b"not a safetensors file")
  weight_map = {k: n for n, names in shards.items() for k in names}
  weight_map["decoder.block.0.layer.0.SelfAttention.q.weight"] = "model-00003-of-00003.safetensors"
  weight_map["lm_head.weight"] = "model-00003-of-00003.safetensors"
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  transformers.ByT5Tokenizer().save_pretrained(str(tmp_path))
  loaded_config, params, _ = t5.load_t5_encoder(tmp_path)
  assert loaded_config == config
  expected = t5.convert_hf_state_dict(_case(golden, "v11")[1], config)
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_decoder_keys_in_a_state_dict_are_ignored(golden):
  config, state, _ = _case(golden, "v11")
  extra = {
    "decoder.final_layer_norm.weight": np.ones(3, np.float32),
    "lm_head.weight": np.ones((2, 2), np.float32),
  }
  params = t5.convert_hf_state_dict({**state, **extra}, config)
  jax.tree.map(np.testing.assert_array_equal, params, t5.convert_hf_state_dict(state, config))


def test_missing_key_is_named(golden, tmp_path):
  _, state, _ = _case(golden, "v11")
  key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
  del state[key]
  _write_hf_folder(tmp_path, golden, state)
  with pytest.raises(
    t5.T5CheckpointError, match=rf"{tmp_path}: missing key '{key}' \(expected shape \(64, 32\)\)"
  ):
    t5.load_t5_encoder(tmp_path)


def test_wrong_shape_is_named(golden):
  config, state, _ = _case(golden, "v11")
  key = "encoder.block.0.layer.0.SelfAttention.o.weight"
  state[key] = state[key].T
  with pytest.raises(
    t5.T5CheckpointError, match=rf"key '{key}' has shape \(24, 32\), expected \(32, 24\)"
  ):
    t5.convert_hf_state_dict(state, config)


def test_architecture_mismatch_is_named(golden):
  """v1.0 (relu) config with v1.1 (gated) weights: wi_0/wi_1 are unexpected."""
  config, state, _ = _case(golden, "v11")
  relu = t5.T5Config(**{**vars(config), "feed_forward_proj": "relu"})
  with pytest.raises(t5.T5CheckpointError, match=r"unexpected encoder keys \['encoder.block.0"):
    t5.convert_hf_state_dict(state, relu)


def test_missing_folder_and_files_are_named(golden, tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match=f"{missing}: T5 checkpoint folder not found"):
    t5.load_t5_encoder(missing)
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/config.json"):
    t5.load_t5_encoder(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(_case(golden, "v11")[2]))
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no tokenizer files"):
    t5.load_t5_encoder(tmp_path)
  transformers.ByT5Tokenizer().save_pretrained(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no T5 weights.*model.safetensors"):
    t5.load_t5_encoder(tmp_path)


def test_broken_or_mismatched_tokenizer_is_refused(golden, tmp_path):
  # transformers 5 builds an empty T5 tokenizer (all <unk>) when the vocabulary file is missing.
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
  with pytest.raises(t5.T5CheckpointError, match="to <unk> tokens"):
    t5.load_tokenizer(tmp_path)
  byt5 = tmp_path / "byt5"
  transformers.ByT5Tokenizer().save_pretrained(str(byt5))
  assert isinstance(t5.load_tokenizer(byt5, vocab_size=384), transformers.ByT5Tokenizer)
  with pytest.raises(t5.T5CheckpointError, match="384 tokens but the encoder's embedding table"):
    t5.load_tokenizer(byt5, vocab_size=128)


def test_config_validation():
  assert t5.tiny_byt5_config().activation == "gelu_new"
  relu = t5.T5Config(**{**vars(t5.tiny_byt5_config()), "feed_forward_proj": "relu"})
  assert not relu.is_gated and relu.activation == "relu"
  with pytest.raises(ValueError, match="feed_forward_proj='gated-tanh'"):
    t5.tiny_byt5_config(feed_forward_proj="gated-tanh")
  umt5 = {**t5.hf_config_dict(t5.tiny_byt5_config()), "model_type": "umt5"}
  with pytest.raises(ValueError, match="model_type='umt5'"):
    t5.T5Config.from_hf_dict(umt5)


def test_hf_round_trip_and_logical_axes(tiny, tmp_path):
  config, params, tokenizer = tiny
  t5.save_hf_encoder(tmp_path, config, params, tokenizer)
  loaded_config, loaded, loaded_tokenizer = t5.load_t5_encoder(tmp_path)
  assert loaded_config == config and isinstance(loaded_tokenizer, transformers.ByT5Tokenizer)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)

  boxed = jax.eval_shape(
    lambda: t5.T5Encoder(config).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  )
  specs = nn.get_partition_spec(boxed["params"])
  for path, spec in jax.tree_util.tree_leaves_with_path(
    specs, is_leaf=lambda x: isinstance(x, tuple)
  ):
    assert spec and all(isinstance(a, str) for a in spec), path
  assert tuple(specs["block_0"]["attention"]["q"]["kernel"]) == ("embed", "heads", "kv")
  assert tuple(specs["relative_attention_bias"]) == ("relpos_buckets", "heads")
  assert tuple(specs["token_embedding"]) == ("vocab", "embed")

"""Caption-embedding cache: same embeddings and dit batches as running T5, clear refusals."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, subprocess_env

from zipir_jax import config_lib
from zipir_jax import text as text_lib
from zipir_jax.data import testing
from zipir_jax.models import t5
from zipir_jax.training import loop, stages, text_cache

# Captions of the image folder: duplicates, unicode, one image without a caption file ("").
CAPTIONS = [
  "a red fox in snow",
  "a red fox in snow",
  "東京の夜景 🙂, long exposure",
  "",
  "an astronaut",
]


def dit_config(**overrides):
  return config_lib.apply_overrides(
    config_lib.load_config(str(ROOT / "configs/tiny.py:dit")), overrides
  )


@pytest.fixture(name="setup", scope="module")
def fixture_setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("text_cache")
  data = root / "data"
  paths = testing.write_image_folder(str(data), [(64, 64)] * len(CAPTIONS))
  for path, caption in zip(paths, CAPTIONS):
    txt = os.path.splitext(path)[0] + ".txt"
    if caption:
      with open(txt, "w", encoding="utf-8") as f:
        f.write(caption)
    else:
      os.remove(txt)
  config = dit_config(**{"data.path": str(data)})
  cache = text_cache.build_for_config(config, str(root / "cache"), progress=False)
  return {
    "root": root,
    "data": str(data),
    "config": config,
    "cache": cache,
    "encoder": text_cache.dit_text_encoder(config),
  }


def test_cached_embeddings_equal_the_encoder(setup):
  cache = setup["cache"]
  # The data's captions, the CFG null "" first, and the negative prompts the dit stage trains with.
  negatives = set(setup["config"].dit.negative_prompts)
  data = ["a red fox in snow", "an astronaut", "東京の夜景 🙂, long exposure"]
  assert cache.captions == ["", *sorted(set(data) | negatives)]
  text_config, params, tokenizer = setup["encoder"]
  for caption in cache.captions:  # one at a time: another batch shape than the cache's
    want, want_mask = text_lib.encode_prompts(
      [caption], tokenizer, t5.T5Encoder(text_config), params, 32
    )
    got, got_mask = cache.lookup([caption])
    assert got.shape == (1, 32, 64) and got.dtype == np.float32  # tiny config: float32 encoder
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=caption)
    np.testing.assert_array_equal(got_mask, want_mask)


# XLA's encoder output depends on the batch shape at the last bit (bfloat16 on CPU: up to ~0.02 at
# magnitudes ~3), so cache and per-batch T5 agree to the storage dtype's rounding, not bitwise.
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 2**-5)])
def test_dit_batch_from_cache_equals_t5_batch(setup, tmp_path, dtype, tol):
  config = dit_config(**{"text.dtype": dtype})
  encoder = text_cache.dit_text_encoder(config)
  # Batches of 16 while the dit batch is 4, as a real cache (64) against a real host batch.
  fillers = [f"filler caption {i}" for i in range(12)]
  cache = text_cache.build(
    str(tmp_path / "cache"),
    setup["cache"].captions + fillers,
    config,
    *encoder,
    batch_size=16,
    progress=False,
  )
  assert cache.embeddings.dtype.name == dtype
  assert np.load(tmp_path / "cache" / "embeddings.npy").dtype == (
    np.uint16 if dtype == "bfloat16" else np.float32
  )  # .npy has no bfloat16: bit pattern
  cached = text_cache.caption_encoder(
    dit_config(**{"text.dtype": dtype, "text.embedding_cache": cache.folder}), *encoder
  )
  example = {
    "hq": np.zeros((4, 64, 64, 3), np.float32),
    "lq_up": np.ones((4, 64, 64, 3)),
    "caption": np.asarray(["an astronaut", "", "a red fox in snow", "an astronaut"]),
  }
  dit = stages.current(config)
  from_t5 = loop._local_batch(example, dit, False, text_cache.caption_encoder(config, *encoder))
  from_cache = loop._local_batch(example, dit, False, cached)
  assert from_cache.keys() == from_t5.keys() == {"hq", "lq_up", "text_emb", "text_mask"}
  for key in from_t5:
    assert from_cache[key].dtype == from_t5[key].dtype, key
    np.testing.assert_allclose(from_cache[key], from_t5[key], rtol=tol, atol=tol, err_msg=key)
  np.testing.assert_array_equal(from_cache["text_mask"], from_t5["text_mask"])
  null, null_mask = cached([""])  # the CFG null condition the loop freezes into the state
  want, want_mask = text_cache.caption_encoder(config, *encoder)([""])
  np.testing.assert_allclose(
    np.asarray(null, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
  )
  np.testing.assert_array_equal(null_mask, want_mask)


@pytest.mark.parametrize(
  "overrides, differ",
  [
    ({"text.max_length": 16}, "max_length: cache 32, this run 16"),
    ({"dit.text_dim": 32}, "text_dim: cache 64, this run 32"),
    ({"seed": 1}, "encoder.seed: cache 0, this run 1"),
    ({"text.dtype": "bfloat16"}, "dtype: cache 'float32', this run 'bfloat16'"),
  ],
)
def test_mismatched_cache_is_refused(setup, overrides, differ):
  config = dit_config(**{"text.embedding_cache": setup["cache"].folder, **overrides})
  encoder = text_cache.dit_text_encoder(config)
  with pytest.raises(text_cache.CaptionCacheError) as e:
    text_cache.caption_encoder(config, *encoder)
  assert differ in str(e.value) and setup["cache"].folder in str(e.value)
  assert "--overwrite" in str(e.value)
  if "seed" in overrides:  # other weights: named as such, with where each set came from
    assert "weights_fingerprint" in str(e.value) and "seed 1" in str(e.value)


def test_missing_caption_is_an_error(setup):
  cache = setup["cache"]
  with pytest.raises(
    text_cache.MissingCaptionError,
    match=r"'a caption from other data' is not in the caption cache .*" + "1 of this batch's 2",
  ) as e:
    cache.lookup(["an astronaut", "a caption from other data"])
  assert cache.folder in str(e.value)
  example = {
    "hq": np.zeros((1, 64, 64, 3)),
    "lq_up": np.zeros((1, 64, 64, 3)),
    "caption": np.asarray(["unseen"]),
  }
  with pytest.raises(KeyError, match="'unseen'"):
    loop._local_batch(example, stages.current(setup["config"]), False, cache.lookup)
  with pytest.raises(text_cache.CaptionCacheError, match="does not exist"):
    text_cache.CaptionCache(str(setup["root"] / "nowhere"))


def test_existing_output_is_not_overwritten(setup, tmp_path):
  config, cache = setup["config"], setup["cache"]
  with pytest.raises(text_cache.CaptionCacheError, match="already exists; pass --overwrite"):
    text_cache.build_for_config(config, cache.folder, progress=False)
  other = tmp_path / "not_a_cache"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  with pytest.raises(text_cache.CaptionCacheError, match="not a caption cache"):
    text_cache.build(str(other), ["x"], config, *setup["encoder"], overwrite=True, progress=False)
  assert (other / "notes.txt").read_text() == "keep me"
  rebuilt = text_cache.build(str(tmp_path / "c"), ["x"], config, *setup["encoder"], progress=False)
  rebuilt = text_cache.build(
    rebuilt.folder, ["y", "x"], config, *setup["encoder"], overwrite=True, progress=False
  )
  negatives = sorted(config.dit.negative_prompts)  # the dit stage's negative examples' captions
  assert rebuilt.captions == ["", *sorted(["x", "y", *negatives])]
  assert sorted(os.listdir(tmp_path)) == ["c", "not_a_cache"]  # no .partial / .old left behind


def test_command_line(setup, tmp_path):
  out = tmp_path / "cli_cache"
  cmd = [
    sys.executable,
    "-m",
    "zipir_jax.training.text_cache",
    "--config=configs/tiny.py:dit",
    f"--config.data.path={setup['data']}",
    f"--output={out}",
    "--batch_size=3",
  ]
  result = subprocess.run(
    cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-4000:]
  assert f"--config.text.embedding_cache={out}" in result.stdout
  # Built in another process with the same weights as this run's encoder: accepted, same values.
  cli = text_cache.load(str(out), setup["config"], *setup["encoder"])
  assert cli.captions == setup["cache"].captions
  np.testing.assert_allclose(
    cli.lookup(cli.captions)[0], setup["cache"].lookup(cli.captions)[0], rtol=1e-5, atol=1e-5
  )

"""Training/eval pipelines: bucket shapes, sources (folder, TFDS, ArrayRecord), determinism,
checkpointing, sharding and grain worker processes."""

import json
import os
import subprocess
import sys

import cv2
import jax
import ml_collections
import numpy as np
import pytest

from zipir_jax import errors
from zipir_jax.data import buckets as buckets_lib
from zipir_jax.data import decode, defaults, pipeline, prepare, sources, testing

# Small CPU buckets: square, landscape and portrait.
BUCKETS = ((64, 64, 4), (64, 96, 2), (96, 64, 2))
SIZES = [(96, 128), (64, 64), (200, 150), (128, 96), (70, 300), (100, 100), (64, 80), (150, 110)]


@pytest.fixture(name="folder", scope="module")
def fixture_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("images"))
  testing.write_image_folder(root, SIZES)
  return root


def _config(path, **overrides):
  config = defaults.get_data_config()
  config.path = path
  config.buckets = BUCKETS
  config.num_workers = 0
  config.update(overrides)
  return config


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_every_bucket_yields_hq_and_lq_up_of_its_shape(folder):
  it = pipeline.create_train_iterator(_config(folder), seed=0)
  shapes = []
  for batch in _take(it, 6):
    hq, lq_up = batch["hq"], batch["lq_up"]
    assert hq.dtype == lq_up.dtype == np.float32
    assert hq.shape == lq_up.shape and hq.ndim == 4 and hq.shape[-1] == 3
    assert hq.min() >= -1.0 and hq.max() <= 1.0 and lq_up.min() >= -1.0 and lq_up.max() <= 1.0
    assert batch["caption"].shape == (hq.shape[0],)
    assert all(c.startswith("image ") for c in batch["caption"])
    assert ((batch["scale"] >= 8) & (batch["scale"] <= 16)).all()
    shapes.append(hq.shape)
  # Equal weights: the mix cycles through the buckets, each with its own batch size.
  assert shapes == [(4, 64, 64, 3), (2, 64, 96, 3), (2, 96, 64, 3)] * 2


def test_model_range_conversion_is_exact():
  x = np.arange(256, dtype=np.uint8).reshape(1, 4, 64, 1).repeat(3, axis=-1)
  out = pipeline.to_model_range({"hq": x, "caption": np.array(["a"])})
  np.testing.assert_array_equal(out["hq"], x.astype(np.float32) * np.float32(2 / 255) - 1)
  assert out["hq"][0, 0, 0, 0] == -1.0 and out["hq"][0, -1, -1, 0] == 1.0
  assert out["caption"][0] == "a"


def test_uint8_output_and_fixed_scale_lq(folder):
  config = _config(folder, output="uint8", emit_lq=True)
  config.degradation.scale_range = (8.0, 8.0)
  batch = next(pipeline.create_train_iterator(config, seed=0))
  assert batch["hq"].dtype == batch["lq"].dtype == np.uint8
  assert batch["lq"].shape == (4, 8, 8, 3) and batch["lq_up"].shape == (4, 64, 64, 3)
  random_scale = _config(folder, emit_lq=True)
  with pytest.raises(ValueError, match="emit_lq needs a fixed scale"):
    pipeline.create_train_dataset(random_scale, seed=0)


@pytest.mark.parametrize("policy", ["crop", "downscale"])
def test_images_never_land_in_a_larger_bucket(folder, policy):
  """Captions name the source image: a bucket only ever sees images that cover it."""
  it = pipeline.create_train_iterator(_config(folder, bucket_policy=policy), seed=1)
  for batch in _take(it, 9):
    h, w = batch["hq"].shape[1:3]
    for caption in batch["caption"]:
      ih, iw = SIZES[int(caption.split()[1])]
      assert ih >= h and iw >= w, (caption, (ih, iw), (h, w))


def test_default_buckets_and_presets_follow_the_paper():
  config = defaults.get_data_config()
  buckets = buckets_lib.parse_buckets(config.buckets, process_count=8)
  sides = [s for b in buckets for s in (b.height, b.width)]
  assert min(sides) == 512 and max(sides) == 4096 and all(s % 32 == 0 for s in sides)
  assert any(b.height != b.width for b in buckets)
  assert tuple(config.degradation.scale_range) == (8.0, 16.0)
  mix = config.eval_presets.mix
  assert (mix.scale, mix.blur_sigma, mix.noise_sigma, mix.jpeg_quality) == (8, 2.0, 40.0, 50)
  fig4 = config.eval_presets.fig4
  assert (fig4.scale, fig4.blur_sigma, fig4.noise_sigma, fig4.jpeg_quality) == (8, 1.0, 15.0, 65)


def test_downscale_policy_samples_between_cover_and_native():
  rng = np.random.default_rng(0)
  bucket = buckets_lib.Bucket(512, 512, 1)
  scales = [
    buckets_lib.sample_resize_scale(rng, (4000, 3000), bucket, "downscale") for _ in range(2000)
  ]
  assert min(scales) >= 512 / 3000 and max(scales) <= 1.0
  assert min(scales) < 0.2 and max(scales) > 0.9  # whole-view and native crops both happen
  assert all(min(buckets_lib.resized_size((4000, 3000), s, bucket)) >= 512 for s in scales)
  assert buckets_lib.sample_resize_scale(rng, (4000, 3000), bucket, "crop") == 1.0
  with pytest.raises(ValueError, match="not divisible by the process count"):
    buckets_lib.parse_buckets(((64, 64, 3),), process_count=2)


def test_same_seed_same_batches_other_seed_differs(folder):
  config = _config(folder)
  a = _take(pipeline.create_train_iterator(config, seed=3), 3)
  b = _take(pipeline.create_train_iterator(config, seed=3), 3)
  c = _take(pipeline.create_train_iterator(config, seed=4), 3)
  _assert_same(a, b)
  assert not np.array_equal(a[0]["lq_up"], c[0]["lq_up"])


def test_iterator_state_restore_gives_identical_next_batches(folder):
  config = _config(folder)
  it = pipeline.create_train_iterator(config, seed=0)
  _take(it, 4)
  state = json.loads(json.dumps(it.get_state()))  # what Orbax stores
  expected = _take(it, 5)
  restored = pipeline.create_train_iterator(config, seed=0)
  restored.set_state(state)
  _assert_same(_take(restored, 5), expected)


def test_resume_with_other_buckets_or_process_count_is_a_plain_error(folder, tmp_path):
  """A checkpoint's iterator state must fit the run resuming it; grain alone fails with a bare
  KeyError deep in set_state (two buckets saved, one bucket resumed)."""
  from zipir_jax.training import checkpointing

  two = pipeline.create_train_iterator(_config(folder), seed=0)
  _take(two, 2)
  train = ml_collections.ConfigDict(
    {"keep_checkpoints": 2, "checkpoint_every": 1, "async_checkpointing": False}
  )
  manager = checkpointing.create_manager(str(tmp_path / "ckpt"), train)
  checkpointing.save(manager, 2, {"w": np.zeros(2, np.float32)}, two, force=True)
  manager.wait_until_finished()
  data = str(tmp_path / "ckpt" / "2" / "data")
  checkpointing.check_data_state(data, pipeline.create_train_iterator(_config(folder), seed=0))

  one = pipeline.create_train_iterator(_config(folder, buckets=((64, 64, 4),)), seed=0)
  with pytest.raises(ValueError, match=r"ckpt/2 cannot resume.*data.buckets"):
    checkpointing.check_data_state(data, one)
  abstract = {"w": jax.ShapeDtypeStruct((2,), np.float32)}
  with pytest.raises(ValueError, match="does not fit this run's data pipeline"):
    checkpointing.restore(manager, abstract, one)
  os.rename(os.path.join(data, "process_0-of-1.json"), os.path.join(data, "process_0-of-2.json"))
  with pytest.raises(ValueError, match=r"process_0-of-2.json, and this run is process 0 of 1"):
    checkpointing.check_data_state(data, two)


def test_processes_get_disjoint_shares_with_the_same_bucket_schedule(folder):
  config = _config(folder, buckets=((64, 64, 4), (64, 96, 2)))
  p0 = _take(pipeline.create_train_iterator(config, seed=0, process_index=0, process_count=2), 4)
  p1 = _take(pipeline.create_train_iterator(config, seed=0, process_index=1, process_count=2), 4)
  assert (
    [b["hq"].shape for b in p0]
    == [b["hq"].shape for b in p1]
    == [(2, 64, 64, 3), (1, 64, 96, 3)] * 2
  )
  first_epoch_0 = set(p0[0]["caption"]) | set(p0[2]["caption"])
  first_epoch_1 = set(p1[0]["caption"]) | set(p1[2]["caption"])
  assert first_epoch_0.isdisjoint(first_epoch_1)


def _jpeg(image: np.ndarray) -> bytes:
  ok, data = cv2.imencode(".jpg", image[..., ::-1])
  assert ok
  return data.tobytes()


def test_tfds_source_reads_encoded_bytes_through_the_shared_decode_path():
  """TFDS stores images encoded; with SkipDecoding the records carry those bytes, so the pipeline
  probes headers and decodes at DCT scale as for folders, and skips a truncated one the same way."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  images = [testing.natural_image(80 + 8 * i, 100, i) for i in range(5)]
  encoded = [_jpeg(x) for x in images]
  encoded.append(encoded[0][: len(encoded[0]) // 2])  # truncated: skipped, not fatal
  requested = []

  def as_data_source(builder, split, decoders=None, **kwargs):
    """What TFDS returns: encoded bytes where SkipDecoding is asked for, else decoded arrays."""
    del builder, kwargs
    requested.append((split, decoders))
    skip = isinstance((decoders or {}).get("image"), tfds.decode.SkipDecoding)
    return [
      {
        "image": data if skip else cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
        "file_name": f"flower {i}".encode(),
      }
      for i, data in enumerate(encoded)
    ]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    source = sources.TfdsSource("oxford_flowers102", "train", caption_key="file_name")
    config = _config(
      "",
      source="tfds",
      tfds_name="oxford_flowers102",
      tfds_split="train",
      image_key="image",
      caption_key="file_name",
      buckets=((64, 64, 2),),
    )
    batches = _take(pipeline.create_train_iterator(config, seed=0), 4)
  assert requested and all(  # every data source opened (test's and pipeline's) skips decoding
    split == "train" and isinstance(d["image"], tfds.decode.SkipDecoding) for split, d in requested
  )
  record = source[1]
  assert record["image"] == encoded[1] and record["caption"] == "flower 1"
  assert decode.image_size(record["image"]) == (88, 100)  # the header alone gives the size
  captions = {c for b in batches for c in b["caption"]}
  assert captions <= {f"flower {i}" for i in range(5)} and len(captions) >= 3
  assert all(b["hq"].shape == (2, 64, 64, 3) for b in batches)


def test_tfds_source_never_downloads_and_names_the_build_command(tmp_path):
  with pytest.raises(errors.ConfigError) as info:
    sources.TfdsSource("oxford_flowers102", "train", data_dir=str(tmp_path))
  message = str(info.value)
  assert (
    "config.data.tfds_name='oxford_flowers102': no ArrayRecord copy in " + str(tmp_path) in message
  )
  assert f"tfds build oxford_flowers102 --data_dir={tmp_path} --file_format=array_record" in message
  assert os.listdir(tmp_path) == []  # nothing downloaded or prepared
  with pytest.raises(errors.ConfigError, match="'no_such_dataset': Dataset no_such_dataset not"):
    sources.TfdsSource("no_such_dataset", "train", data_dir=str(tmp_path))


def _prepare_folder(root):
  """Two good photos (JPEG, PNG) and three files that must not enter the shards."""
  good = testing.write_image_folder(root, [(64, 80), (72, 64)])
  png = testing.write_image_folder(os.path.join(root, "png"), [(70, 90)], fmt="png")[0]
  jpeg = open(good[0], "rb").read()
  data = open(png, "rb").read()
  bad = {
    "truncated.jpg": jpeg[: len(jpeg) // 2],  # header intact: a header probe accepts it
    "truncated.png": data[: len(data) * 9 // 10],
    "notes.png": b"shopping list: eggs",
  }
  for name, content in bad.items():
    with open(os.path.join(root, name), "wb") as f:
      f.write(content)
  return good + [png]


def test_prepare_decodes_every_image_and_skips_truncated_ones_by_name(tmp_path, caplog):
  root, out = str(tmp_path / "in"), str(tmp_path / "out")
  good = _prepare_folder(root)
  summary = prepare.prepare_array_record(root, out, num_shards=2, num_workers=2)
  assert summary.written == 3 and summary.skipped == {"truncated": 2, "not_an_image": 1}
  assert str(summary) == (
    f"prepare: wrote 3 images to 2 shards in {out}; skipped 3 (not_an_image 1, truncated 2)"
  )
  for name in ("truncated.jpg", "truncated.png", "notes.png"):
    assert any(name in r.getMessage() for r in caplog.records), name
  source = sources.ArrayRecordSource(out)
  records = {source[i]["name"]: source[i] for i in range(len(source))}
  assert sorted(records) == sorted(os.path.relpath(p, root) for p in good)
  for path in good:  # the original bytes, in the worker pool's deterministic order
    assert records[os.path.relpath(path, root)]["image"] == open(path, "rb").read()


def test_prepare_cli_exit_status_and_summary_line(tmp_path):
  root = str(tmp_path / "in")
  _prepare_folder(root)
  command = [sys.executable, "-m", "zipir_jax.data.prepare"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  ok = subprocess.run(
    [*command, "--num_workers=2", f"--input={root}", f"--output={tmp_path / 'out'}"],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.splitlines()[-1].startswith("prepare: wrote 3 images to 1 shards")
  assert "Skipping " in ok.stderr and "truncated.jpg" in ok.stderr
  bad = str(tmp_path / "bad")
  os.makedirs(bad)
  with open(os.path.join(bad, "broken.jpg"), "wb") as f:
    f.write(b"\xff\xd8 not really")
  failed = subprocess.run(
    [*command, "--num_workers=1", f"--input={bad}", f"--output={tmp_path / 'none'}"],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
  assert failed.stderr.splitlines()[-1] == (
    f"prepare: wrote 0 images to 1 shards in {tmp_path / 'none'}; skipped 1 (not_an_image 1): "
    f"no usable image under {bad!r}"
  )


def test_array_record_source_end_to_end(folder, tmp_path):
  out = str(tmp_path / "shards")
  bad_root = str(tmp_path / "with_bad")
  testing.write_image_folder(bad_root, SIZES[:4])
  with open(os.path.join(bad_root, "broken.jpg"), "wb") as f:
    f.write(b"not a jpeg")
  summary = prepare.prepare_array_record(bad_root, out, num_shards=2, num_workers=1)
  assert summary.written == 4 and summary.skipped == {"not_an_image": 1}
  assert sorted(os.listdir(out)) == [
    "images-00000-of-00002.array_record",
    "images-00001-of-00002.array_record",
  ]
  source = sources.ArrayRecordSource(out)
  assert len(source) == 4 and source[0]["caption"].startswith("image ")
  config = _config(out, source="array_record", buckets=((64, 64, 2), (64, 96, 2)))
  batches = _take(pipeline.create_train_iterator(config, seed=0), 4)
  assert [b["hq"].shape[1:3] for b in batches] == [(64, 64), (64, 96)] * 2
  # The same images as the folder they came from.
  folder_batch = next(
    pipeline.create_train_iterator(_config(bad_root, buckets=config.buckets), seed=0)
  )
  assert set(folder_batch["caption"]) <= {f"image {i}" for i in range(4)}


def test_eval_dataset_is_deterministic(folder):
  config = _config(folder, eval_size=(64, 64), eval_batch_size=2)
  a = list(pipeline.create_eval_dataset(config, "mix", seed=0))
  b = list(pipeline.create_eval_dataset(config, "mix", seed=0))
  _assert_same(a, b)
  assert sum(len(x["caption"]) for x in a) == len(SIZES)
  assert a[0]["lq"].shape == (2, 8, 8, 3) and a[0]["lq_up"].shape == (2, 64, 64, 3)
  c = list(pipeline.create_eval_dataset(config, "mix", seed=1))
  assert not np.array_equal(a[0]["lq"], c[0]["lq"])


def test_grain_worker_processes_restore_exactly_and_log_skips(tmp_path):
  """Two worker processes: exact restore, and bad files are skipped inside the workers."""
  root = str(tmp_path / "images")
  expected = testing.write_bad_files(root)
  log_dir = str(tmp_path / "skips")
  config = _config(
    root,
    buckets=((64, 64, 2), (64, 96, 2)),
    num_workers=2,
    skip_log_dir=log_dir,
    size_probe_records=1,
  )
  it = pipeline.create_train_iterator(config, seed=0)
  try:
    _take(it, 6)
    state = json.loads(json.dumps(it.get_state()))  # what Orbax stores
    following = _take(it, 6)
    it.set_state(state)
    _assert_same(_take(it, 6), following)
  finally:
    it.close()
  summary = decode.summarize_skips(log_dir)
  skipped = {name for files in summary.values() for name in files}
  assert skipped == {p for p, k in expected.items() if k != "ok"}
  writers = {f for f in os.listdir(log_dir) if not f.endswith(f"-{os.getpid()}.tsv")}
  assert writers, "no skip was logged by a worker process"

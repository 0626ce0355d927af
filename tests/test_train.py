"""train.py end to end on the tiny config: every stage from the command line, prerequisites, frozen
parts, image grids and TensorBoard events, fault handling, resume after SIGKILL and after SIGTERM.

Each run is a fresh ``python train.py`` process; they share a persistent XLA compilation cache so a
stage's step compiles once per test session.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE, read_events, train_command

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("vae_coarse", "vae_fine", "pixel_decoder", "dit")
# Every vae_coarse run here compiles the same step (6 steps, discriminator from step 2: GAN
# alternation covered), so the persistent compilation cache serves all but the first.
COARSE = ("--config.loss.disc_weight=0.5", "--config.loss.disc_start_fraction=0.34")
# A second data phase from step index 3 (vae_fine's 1K-patch adaptation in miniature).
PHASES = ("--config.data.phases=((3,((64,96,4),)),)",)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  from zipir_jax.data import testing

  root = tmp_path_factory.mktemp("train")
  data = root / "data"
  testing.write_image_folder(str(data), [(80, 80), (96, 128), (72, 100), (128, 96), (100, 100)])
  # A persistent XLA cache shared by test sessions (keys include the jax version and the program).
  cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
  environ = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
  )
  environ["XLA_FLAGS"] = FAST_COMPILE  # no fake device count from the caller
  return {"root": root, "data": str(data), "environ": environ}


def run_train(env, stage, workdir, *overrides, num_steps=2, config="configs/tiny.py"):
  return subprocess.run(
    train_command(env["data"], stage, workdir, *overrides, num_steps=num_steps, config=config),
    cwd=ROOT,
    env=env["environ"],
    capture_output=True,
    text=True,
    timeout=600,
  )


def ok(result):
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def read_metrics(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def restore_raw(path):
  import orbax.checkpoint as ocp

  return ocp.StandardCheckpointer().restore(str(path))


def flat(tree, prefix=""):
  """{'a/b/0/c': leaf} of nested dicts and lists (Orbax restores tuples as lists)."""
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  else:
    return {prefix: tree}
  out = {}
  for k, v in items:
    out.update(flat(v, f"{prefix}/{k}" if prefix else str(k)))
  return out


def test_stages_chain_from_command_line_then_make_demo(env, tmp_path, capsys):
  workdir = env["root"] / "chain"
  refused = run_train(env, "vae_fine", workdir)
  assert refused.returncode == 2
  assert str(workdir / "vae_coarse" / "export") in refused.stderr
  assert "train.py --config=configs/tiny.py:vae_coarse" in refused.stderr

  for stage in STAGES:
    n = 6 if stage == "vae_coarse" else 2
    extra = {
      "vae_coarse": COARSE,
      "pixel_decoder": ("--config.train.image_every=2",),
      "dit": ("--config.train.image_every=1",),
    }
    log = ok(run_train(env, stage, workdir, *extra.get(stage, ()), num_steps=n)).stderr
    # Each stage prints its resolved recipe first: active loss terms with their weights.
    if stage == "dit":
      assert re.search(r"loss epsilon MSE +1 \(t: logit_normal", log), log[-3000:]
    else:
      gan = "0.5 x adaptive weight from step 2 of 6" if stage == "vae_coarse" else "off \\(disc"
      assert re.search(r"loss L1 +1\.0", log) and re.search(f"loss GAN +{gan}", log), log[-3000:]
      assert re.search(r"loss LPIPS +off \(lpips_weight=0\)", log), log[-3000:]
    assert (workdir / stage / "checkpoints" / str(n) / "state").is_dir(), stage
    metrics = read_metrics(workdir / stage / "metrics.jsonl")
    assert len(metrics) == n and all(np.isfinite([m["loss"] for m in metrics])), (stage, metrics)
  grids = list((workdir / "pixel_decoder" / "images").glob("*.png"))
  assert len(grids) == 1  # HQ | LQ↑ | output
  # dit: HQ | LQ↑ | restoration (short DDIM from the EMA DiT, decoded by D_f*) after every step,
  # as PNG and as a TensorBoard image; 4 examples of 64x64 stacked, 3 panels wide.
  from PIL import Image

  grids = sorted((workdir / "dit" / "images").glob("*.png"))
  assert [p.name for p in grids] == ["00000001_hq_lq_output.png", "00000002_hq_lq_output.png"]
  for path in grids:
    grid = np.asarray(Image.open(path))
    assert grid.shape == (4 * 64, 3 * 64, 3), grid.shape
    assert grid[:, 128:].std() > 0  # the restoration panels hold an image, not a constant
  events = read_events(workdir / "dit")
  images = events.Images("hq_lq_output")
  assert [(e.step, e.width, e.height) for e in images] == [(1, 192, 256), (2, 192, 256)]
  loss = [m["loss"] for m in read_metrics(workdir / "dit" / "metrics.jsonl")]
  scalars = events.Scalars("loss")
  assert [e.step for e in scalars] == [1, 2]
  assert [e.value for e in scalars] == pytest.approx(loss, rel=1e-6)  # float32 in the event file
  d_losses = [m["d_loss"] for m in read_metrics(workdir / "vae_coarse" / "metrics.jsonl")]
  assert d_losses[:2] == [0.0, 0.0] and all(d > 0 for d in d_losses[2:])  # delayed start

  # Frozen parts are bit-identical to what the earlier stage exported; the optimizer state covers
  # exactly the trainable networks.
  coarse = restore_raw(workdir / "vae_coarse" / "export" / "params")
  fine = restore_raw(workdir / "vae_fine" / "export" / "params")
  assert set(coarse) == {"macro", "coarse_encoder"}  # D_c is discarded (§3.1)
  check_macro_statistics_are_the_datas(env, coarse["macro"])
  for stage, frozen_from, names in (
    ("vae_fine", coarse, ("macro", "coarse_encoder")),
    ("pixel_decoder", fine, ("macro", "coarse_encoder", "fine_encoder")),
    ("dit", fine, ("macro", "coarse_encoder", "fine_encoder")),
  ):
    state = restore_raw(workdir / stage / "checkpoints" / "2" / "state")
    for name in names:
      got, want = flat(state["frozen"][name]), flat(frozen_from[name])
      assert got.keys() == want.keys()
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{stage}: {name}/{k}")
    optimised = {
      k.split("/")[k.split("/").index("mu") + 1]
      for k in flat(state["opt_state"])
      if "/mu/" in f"/{k}/"
    }
    assert optimised == set(state["params"]), (stage, optimised)
    assert not optimised & set(state["frozen"])
  assert set(fine["latent_stats"]) == {"mean", "std"} and fine["latent_stats"]["std"].shape == (64,)

  from zipir_jax import bundle

  restored = bundle.load_bundle(str(workdir / "dit" / "bundle"))
  np.testing.assert_array_equal(restored.params["latent_stats"]["std"], fine["latent_stats"]["std"])

  # `make demo` on these trained stages (its train.py commands are the ones run above).
  check_make_demo_reuses_finished_stages(workdir, tmp_path, capsys)
  check_learning_bench_measures_the_finished_stages(workdir, tmp_path)


def check_macro_statistics_are_the_datas(env, macro):
  """vae_coarse measured z_macro's μ/σ on its own HQ crops (§3.1), not ImageNet's defaults: the
  same batches drawn again in-process give the same per-channel moments."""
  from zipir_jax import config_lib
  from zipir_jax.models.lpvae import IMAGENET_MEAN
  from zipir_jax.training import loop

  config = config_lib.load_config("configs/tiny.py:vae_coarse")
  config_lib.apply_overrides(config, {"data.path": env["data"], "data.buckets": ((64, 64, 4),)})
  batches = loop.data_iterator(config, 0)
  pixels = np.concatenate(
    [
      np.asarray(next(batches)["hq"], np.float64).reshape(-1, 3)
      for _ in range(config.train.macro_stats_batches)
    ]
  )
  np.testing.assert_allclose(macro["mean"], pixels.mean(0), rtol=1e-5)
  np.testing.assert_allclose(macro["std"], pixels.std(0), rtol=1e-5)
  assert not np.allclose(macro["mean"], IMAGENET_MEAN, atol=1e-3)


def check_make_demo_reuses_finished_stages(chain, tmp_path, capsys):
  """`make demo` after training: stages reused, sample.py + evaluate run, panels and table written."""
  from PIL import Image

  from zipir_jax import demo

  out = tmp_path / "demo_out"
  shutil.copytree(chain, out / "work")
  assert demo.main(["--output", str(out)]) == 0
  printed = capsys.readouterr().out
  assert printed.count("finished earlier, reusing") == len(STAGES)
  assert "NOT the paper's model" in printed and "not the paper's model" in printed
  names = sorted(name for _, name in demo.HELDOUT_PHOTOS)
  for name in names:
    with Image.open(out / "side_by_side" / f"{name}.png") as panel:
      assert panel.size == (5 * demo.SIZE, demo.SIZE + 16)  # LQ | bicubic | ESRGAN | ZipIR | HQ
    with Image.open(out / "restored" / f"{name}.png") as restored:
      assert restored.size == (demo.SIZE, demo.SIZE)
  table = (out / "metrics.md").read_text()
  for method in ("bicubic", "realesrgan", "zipir"):
    assert f"| {method} |" in table
  results = json.loads((out / "eval" / "metrics.json").read_text())
  assert sorted(results["images"]) == names and results["preset"] == "fig4"
  assert list((out / "work" / "dit").glob("events.out.tfevents.*"))  # TensorBoard logs


def test_sdvae_ablation_trains_vae_then_dit_into_a_bundle(env):
  """Table 4's f32c64 SD-VAE baseline: stage vae (one encoder + decoder), then dit on its frozen
  latent; the bundle restores with the SD-VAE's own decoder. (The GAN terms and the dit preview
  run the LP-VAE stages' code, tested above; test_train_step checks the vae stage's last layer.)"""
  from zipir_jax import config_lib
  from zipir_jax.training import checkpointing

  config = "configs/tiny_sdvae.py"
  workdir = env["root"] / "sdvae"
  dit_config = config_lib.load_config(f"{config}:dit")
  with pytest.raises(
    checkpointing.MissingPrerequisiteError,
    match=f"train.py --config={config}:vae --workdir={workdir}",
  ):
    checkpointing.load_prerequisites(dit_config, str(workdir), config)

  ok(run_train(env, "vae", workdir, "--config.train.device_memory_gib=64", config=config))
  ok(run_train(env, "dit", workdir, "--config.train.profile_steps=(2,1)", config=config))
  check_profile_of_step_2(workdir / "dit" / "profile")
  vae_metrics = read_metrics(workdir / "vae" / "metrics.jsonl")
  assert all(m["kl"] > 0 and np.isfinite(m["loss"]) for m in vae_metrics) and len(vae_metrics) == 2
  assert np.isfinite([m["loss"] for m in read_metrics(workdir / "dit" / "metrics.jsonl")]).all()

  export = restore_raw(workdir / "vae" / "export" / "params")
  assert set(export) == {"encoder", "decoder", "latent_stats"}
  assert export["latent_stats"]["std"].shape == (64,) and (export["latent_stats"]["std"] > 0).all()
  state = restore_raw(workdir / "dit" / "checkpoints" / "2" / "state")
  assert set(state["params"]) == {"dit"}
  assert set(state["frozen"]) == {"encoder", "latent_stats", "null_text"}
  for k, v in flat(export["encoder"]).items():  # the frozen encoder is bit-identical
    np.testing.assert_array_equal(flat(state["frozen"]["encoder"])[k], v, err_msg=k)
  assert {
    k.split("/")[k.split("/").index("mu") + 1]
    for k in flat(state["opt_state"])
    if "/mu/" in f"/{k}/"
  } == {"dit"}

  import jax
  import jax.numpy as jnp

  from zipir_jax import bundle, restore
  from zipir_jax.models import autoencoder

  loaded = bundle.load_bundle(str(workdir / "dit" / "bundle"))
  assert set(loaded.params["vae"]) == {"encoder"}
  restorer = restore.Restorer(loaded)
  # The bundle decodes as the trained SD-VAE does: un-normalise with the measured statistics, then
  # its decoder (nothing else, the LQ image is not used).
  stats = export["latent_stats"]
  z = jax.random.normal(jax.random.key(0), (1, 2, 3, 64))
  lq = jnp.zeros((1, 64, 96, 3))
  sdvae = autoencoder.build_autoencoder(loaded.config)
  want = sdvae.apply(
    {"params": {"decoder": export["decoder"]}}, z * stats["std"] + stats["mean"], method="decode"
  )
  np.testing.assert_allclose(
    restorer.decode(restorer.params, z, lq, jnp.float32(1.0)), want, atol=1e-5
  )


def check_profile_of_step_2(folder):
  """config.train.profile_steps=(2,1): a jax.profiler trace where TensorBoard's profile plugin
  looks (plugins/profile/<run>/<host>.xplane.pb), holding step 2 of the train step and no other."""
  import jax

  (path,) = folder.glob("plugins/profile/*/*.xplane.pb")
  events = [
    e
    for plane in jax.profiler.ProfileData.from_file(str(path)).planes
    for line in plane.lines
    for e in line.events
  ]
  assert {dict(e.stats).get("step_num") for e in events if e.name == "train"} == {2}
  assert any("train_step" in e.name for e in events)


def test_nonfinite_batches_are_skipped_then_stop(env):
  workdir = env["root"] / "nan"
  # Step indices 1, 3, 4 get NaN images: 1 is skipped alone, 3+4 make two in a row -> stop.
  result = run_train(
    env,
    "vae_coarse",
    workdir,
    *COARSE,
    "--config.debug.nan_steps=(1,3,4)",
    "--config.train.max_nonfinite=2",
    "--config.train.checkpoint_every=1",
    "--config.train.keep_checkpoints=10",
    num_steps=6,
  )
  assert result.returncode == 2, result.stderr[-3000:]
  assert "2 non-finite updates in a row" in result.stderr
  metrics = read_metrics(workdir / "vae_coarse" / "metrics.jsonl")
  assert [m["finite"] for m in metrics] == [1.0, 0.0, 1.0, 0.0]
  assert [m["skipped"] for m in metrics] == [0.0, 1.0, 1.0, 2.0]
  checkpoints = sorted(
    int(p.name) for p in (workdir / "vae_coarse" / "checkpoints").iterdir() if p.name.isdigit()
  )
  assert checkpoints[-1] == 4  # nothing written for the step that stopped the run
  s2 = restore_raw(workdir / "vae_coarse" / "checkpoints" / "2" / "state")
  s1 = restore_raw(workdir / "vae_coarse" / "checkpoints" / "1" / "state")
  for k, v in flat(s1["params"]).items():  # the NaN step changed no weight
    np.testing.assert_array_equal(flat(s2["params"])[k], v)


def test_step_that_cannot_fit_the_device_is_refused_before_step_1(env, tmp_path):
  """XLA's memory analysis of the compiled step against config.train.device_memory_gib (0: the
  device's own limit, which the CPU does not report): a step that cannot fit is refused before
  anything trains, naming what it needs and the remedies, not by the allocator minutes later."""
  from zipir_jax import config_lib
  from zipir_jax.errors import ConfigError
  from zipir_jax.training import loop

  config = config_lib.load_config("configs/tiny.py:vae_coarse")
  overrides = {  # the step of the 6-step vae_coarse runs above: compiled once for all
    "data.path": env["data"],
    "data.buckets": ((64, 64, 4),),
    "optim.num_steps": 6,
    "optim.warmup_steps": 1,
    "loss.disc_weight": 0.5,
    "loss.disc_start_fraction": 0.34,
    "train.device_memory_gib": 0.001,
  }
  config_lib.apply_overrides(config, overrides)
  with pytest.raises(ConfigError) as refused:
    loop.train_and_evaluate(config, str(tmp_path))
  message = str(refused.value)
  assert re.search(
    r"stage vae_coarse, batch 64x64 x 4: the train step needs [\d.]+ MiB per device \(weights "
    r"[\d.]+ MiB, optimizer [\d.]+ MiB, batch [\d.]+ MiB, activations [\d.]+ MiB; peak [\d.]+ "
    r"MiB\), more than the 1.02 MiB available \(config.train.device_memory_gib=0.001\)",
    message,
  ), message
  assert "--config.train.mesh" in message and "config.data.buckets" in message
  assert not list((tmp_path / "vae_coarse" / "checkpoints").iterdir())  # nothing trained


def run_until_sigterm(env, cmd, ready, log_path):
  """Runs ``cmd``, sends SIGTERM once its output shows ``ready``; (exit status, output)."""
  with open(log_path, "w", encoding="utf-8") as log:
    process = subprocess.Popen(
      cmd, cwd=ROOT, env=env["environ"], stdout=log, stderr=subprocess.STDOUT
    )
    try:
      deadline = time.monotonic() + 300
      while ready not in log_path.read_text():
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {ready!r} in 300 s"
        time.sleep(0.02)
      process.send_signal(signal.SIGTERM)
      returncode = process.wait(timeout=120)
    finally:
      if process.poll() is None:
        process.kill()
  return returncode, log_path.read_text()


def test_resume_after_sigkill_and_sigterm_matches_straight_run(env):
  """Killed after step 3 (the last of data phase 1), preempted in phase 2, resumed each time: the
  same metrics and bit-identical weights as one straight run through both phases."""
  straight, resumed = env["root"] / "straight", env["root"] / "resumed"
  common = ("--config.train.checkpoint_every=1", *COARSE, *PHASES)
  ok(run_train(env, "vae_coarse", straight, *common, num_steps=6))
  killed = run_train(
    env, "vae_coarse", resumed, *common, "--config.debug.kill_after_step=3", num_steps=6
  )
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert not (resumed / "vae_coarse" / "export").exists()

  # Preemption: SIGTERM as soon as the resumed run's loop is set up (its first step then takes
  # seconds: no race with the run's end). Checkpoints now only every 1000 steps, asynchronous: a
  # checkpoint of the step in flight can only be the SIGTERM handler's.
  cmd = train_command(
    env["data"],
    "vae_coarse",
    resumed,
    *COARSE,
    *PHASES,
    "--config.train.async_checkpointing=True",
    num_steps=6,
  )
  returncode, output = run_until_sigterm(
    env, cmd, "training vae_coarse: steps 4..6", env["root"] / "sigterm.log"
  )
  assert returncode == 75, output[-3000:]  # preempted, resumable (train.py's EXIT_PREEMPTED)
  match = re.search(r"preempted: checkpoint of step (\d+) written", output)
  assert match, output[-3000:]
  step = int(match.group(1))
  assert 3 < step < 6
  checkpoints = resumed / "vae_coarse" / "checkpoints"
  names = [p.name for p in checkpoints.iterdir()]
  assert all(n.isdigit() for n in names), names  # no half-written *.orbax-checkpoint-tmp
  assert max(map(int, names)) == step, names
  assert {p.name for p in (checkpoints / str(step)).iterdir()} >= {"state", "data"}
  assert not (resumed / "vae_coarse" / "export").exists()

  # The same command again: resumes from the SIGTERM checkpoint and finishes.
  again = ok(
    subprocess.run(cmd, cwd=ROOT, env=env["environ"], capture_output=True, text=True, timeout=600)
  )
  assert f"resumed vae_coarse from step {step} " in again.stderr
  assert (resumed / "vae_coarse" / "export" / "params").is_dir()
  a = read_metrics(straight / "vae_coarse" / "metrics.jsonl")
  b = read_metrics(resumed / "vae_coarse" / "metrics.jsonl")
  assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
  for key in ("loss", "d_loss", "grad_norm"):
    assert [m[key] for m in a] == [m[key] for m in b], key
  sa = flat(restore_raw(straight / "vae_coarse" / "checkpoints" / "6" / "state"))
  sb = flat(restore_raw(resumed / "vae_coarse" / "checkpoints" / "6" / "state"))
  assert sa.keys() == sb.keys()
  for k in sa:
    np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
  # TensorBoard: the three processes' event files read as one run, one value per step.
  loss = read_events(resumed / "vae_coarse").Scalars("loss")
  assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]


def check_learning_bench_measures_the_finished_stages(chain, tmp_path):
  """bench/learning.py's smoke run, evaluation only (the chain's stages are reused as a re-run
  reuses them): every checkpoint scored on the held-out photos, the table with its targets, one
  curve per stage."""
  import sys

  from zipir_jax import demo

  sys.path.insert(0, str(ROOT / "bench"))
  import learning

  out = tmp_path / "learning_out"
  shutil.copytree(chain, out / "work" / "lpvae")
  argv = ["--budget=smoke", "--config=configs/tiny.py", "--sdvae_config=", f"--output={out}"]
  assert learning.main(argv) == 0
  result = json.loads((out / "results.json").read_text())
  assert result["images"] == sorted(name for _, name in demo.HELDOUT_PHOTOS)  # never trained on
  for stage, last in {"vae_coarse": 6, "vae_fine": 2, "pixel_decoder": 2, "dit": 2}.items():
    kept = sorted(int(p.name) for p in (chain / stage / "checkpoints").iterdir())
    assert [row["step"] for row in result["curves"][stage]] == kept and kept[-1] == last, stage
    assert all(np.isfinite(row["psnr"]) for row in result["curves"][stage]), stage
    assert (out / "curves" / f"{stage}.png").stat().st_size > 0
  zipir = {"ZipIR, strength 1", "ZipIR, strength 0.5", "ZipIR, strength 0.5, wavelet colour fix"}
  zipir |= {learning.NO_DIT, f"{learning.NO_DIT}, wavelet colour fix"}
  assert {p: set(rows) for p, rows in result["restoration"].items()} == {
    "fig4": zipir | {"bicubic", "Real-ESRGAN", learning.PERFECT_DIT},
    "sr8": zipir | {"bicubic", "Real-ESRGAN", learning.PERFECT_DIT},
  }
  for rows in result["restoration"].values():  # the latent error of every restoration of ours
    assert all(np.isfinite(rows[m]["z_mse"]) and rows[m]["z_mse"] > 0 for m in zipir)
    assert rows[learning.PERFECT_DIT]["z_mse"] == 0.0  # E(HQ) itself
    for row in rows.values():  # one error per wavelet band, none of them zero
      assert len(row["band_rmse"]) == len(learning.BAND_NAMES) and min(row["band_rmse"]) > 0
  assert all(np.isfinite(r["z_mse_strength_1"]) for r in result["curves"]["dit"])
  table = (out / "table.md").read_text()
  for name, got, needed in learning.targets(result):
    assert f"| {name} | {got:.2f} | {needed:.2f} | {got - needed:+.2f} dB |" in table
  assert "not trained (--sdvae_config='')" in table
  references = result["vae"]["references"]
  assert set(references) == {learning.Z_MACRO, learning.BLOCK_PCA}
  for label, row in references.items():  # closed-form codes at the LP-VAE's compression
    assert f"| {label} |" in table and np.isfinite([row["psnr"], row["psnr_crop"]]).all()

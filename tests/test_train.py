"""train.py end to end on the tiny config: every stage from the command line, prerequisites, frozen
parts, fault handling and resume after SIGKILL.

Each run is a fresh ``python train.py`` process; they share a persistent XLA compilation cache so a
stage's step compiles once per test session.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("vae_coarse", "vae_fine", "pixel_decoder", "dit")
# Every vae_coarse run here compiles the same step (6 steps, discriminator from step 2: GAN
# alternation covered), so the persistent compilation cache serves all but the first.
COARSE = ("--config.loss.disc_start=2",)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  from zipir_jax.data import testing
  root = tmp_path_factory.mktemp("train")
  data = root / "data"
  testing.write_image_folder(str(data), [(80, 80), (96, 128), (72, 100), (128, 96), (100, 100)])
  # A persistent XLA cache shared by test sessions (keys include the jax version and the program).
  cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
  environ = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  environ.pop("XLA_FLAGS", None)
  return {"root": root, "data": str(data), "environ": environ}


def run_train(env, stage, workdir, *overrides, num_steps=2):
  cmd = [sys.executable, "train.py", f"--config=configs/tiny.py:{stage}", f"--workdir={workdir}",
         f"--config.data.path={env['data']}", "--config.data.buckets=((64,64,4),)",
         f"--config.optim.num_steps={num_steps}", "--config.train.log_every=1",
         "--config.train.image_every=0", "--config.train.latent_stats_batches=2",
         "--config.train.async_checkpointing=False", *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=env["environ"], capture_output=True, text=True,
                        timeout=600)


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


def test_stages_chain_from_command_line(env):
  workdir = env["root"] / "chain"
  refused = run_train(env, "vae_fine", workdir)
  assert refused.returncode == 2
  assert str(workdir / "vae_coarse" / "export") in refused.stderr
  assert "train.py --config=configs/tiny.py:vae_coarse" in refused.stderr

  for stage in STAGES:
    n = 6 if stage == "vae_coarse" else 2
    extra = {"vae_coarse": COARSE, "pixel_decoder": ("--config.train.image_every=2",)}
    ok(run_train(env, stage, workdir, *extra.get(stage, ()), num_steps=n))
    assert (workdir / stage / "checkpoints" / str(n) / "state").is_dir(), stage
    metrics = read_metrics(workdir / stage / "metrics.jsonl")
    assert len(metrics) == n and all(np.isfinite([m["loss"] for m in metrics])), (stage, metrics)
  grids = list((workdir / "pixel_decoder" / "images").glob("*.png"))
  assert len(grids) == 1  # HQ | LQ↑ | output
  d_losses = [m["d_loss"] for m in read_metrics(workdir / "vae_coarse" / "metrics.jsonl")]
  assert d_losses[:2] == [0.0, 0.0] and all(d > 0 for d in d_losses[2:])  # delayed start

  # Frozen parts are bit-identical to what the earlier stage exported; the optimizer state covers
  # exactly the trainable networks.
  coarse = restore_raw(workdir / "vae_coarse" / "export" / "params")
  fine = restore_raw(workdir / "vae_fine" / "export" / "params")
  for stage, frozen_from, names in (("vae_fine", coarse, ("coarse_encoder",)),
                                    ("pixel_decoder", fine, ("coarse_encoder", "fine_encoder")),
                                    ("dit", fine, ("coarse_encoder", "fine_encoder"))):
    state = restore_raw(workdir / stage / "checkpoints" / "2" / "state")
    for name in names:
      got, want = flat(state["frozen"][name]), flat(frozen_from[name])
      assert got.keys() == want.keys()
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{stage}: {name}/{k}")
    optimised = {k.split("/")[k.split("/").index("mu") + 1] for k in flat(state["opt_state"])
                 if "/mu/" in f"/{k}/"}
    assert optimised == set(state["params"]), (stage, optimised)
    assert not optimised & set(state["frozen"])
  assert set(fine["latent_stats"]) == {"mean", "std"} and fine["latent_stats"]["std"].shape == (64,)

  from zipir_jax import bundle
  restored = bundle.load_bundle(str(workdir / "dit" / "bundle"))
  np.testing.assert_array_equal(restored.params["latent_stats"]["std"], fine["latent_stats"]["std"])


def test_nonfinite_batches_are_skipped_then_stop(env):
  workdir = env["root"] / "nan"
  # Step indices 1, 3, 4 get NaN images: 1 is skipped alone, 3+4 make two in a row -> stop.
  result = run_train(env, "vae_coarse", workdir, *COARSE, "--config.train.nan_steps=(1,3,4)",
                     "--config.train.max_nonfinite=2", "--config.train.checkpoint_every=1",
                     "--config.train.keep_checkpoints=10",
                     num_steps=6)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "2 non-finite updates in a row" in result.stderr
  metrics = read_metrics(workdir / "vae_coarse" / "metrics.jsonl")
  assert [m["finite"] for m in metrics] == [1.0, 0.0, 1.0, 0.0]
  assert [m["skipped"] for m in metrics] == [0.0, 1.0, 1.0, 2.0]
  checkpoints = sorted(int(p.name) for p in (workdir / "vae_coarse" / "checkpoints").iterdir()
                       if p.name.isdigit())
  assert checkpoints[-1] == 4  # nothing written for the step that stopped the run
  s2 = restore_raw(workdir / "vae_coarse" / "checkpoints" / "2" / "state")
  s1 = restore_raw(workdir / "vae_coarse" / "checkpoints" / "1" / "state")
  for k, v in flat(s1["params"]).items():  # the NaN step changed no weight
    np.testing.assert_array_equal(flat(s2["params"])[k], v)


def test_resume_after_sigkill_matches_straight_run(env):
  straight, resumed = env["root"] / "straight", env["root"] / "resumed"
  common = ("--config.train.checkpoint_every=1", *COARSE)
  ok(run_train(env, "vae_coarse", straight, *common, num_steps=6))
  killed = run_train(env, "vae_coarse", resumed, *common, "--config.train.kill_after_step=3",
                     num_steps=6)
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert not (resumed / "vae_coarse" / "export").exists()
  ok(run_train(env, "vae_coarse", resumed, *common, num_steps=6))
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

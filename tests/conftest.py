"""Shared test fixtures: configs and small initialised networks (CPU)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# RBG keys compile several times faster than threefry on XLA:CPU, and parameter initialisation (a
# random draw per weight) dominates the suite's compile time; no test depends on the generator.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
# One persistent compilation cache for the xdist workers and the CLI subprocesses of a run: the same
# tiny programs are otherwise compiled again in every process (ignored by git; fresh in CI).
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_jax_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Two xdist workers share CI's 2 cores: numpy's multithreaded OpenBLAS spin-waits against the other
# worker's XLA threads (the D=2048 FID check, both cores otherwise busy: 20.6 s with 2 BLAS threads,
# 6.6 s with one). Set before numpy is first imported (no plugin imports it before this file).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import importlib.util
import pathlib

import pytest

from zipir_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# LLVM at -O0 for the train.py and fake-device subprocesses: each compiles a whole train step and
# runs it for a few steps (the stage chain: 232 -> 179 s alone). Not for the suite's own processes:
# run-bound tests slow down (the 1000-step DDIM chains: < 28 s -> 100 s), and with it everywhere
# the text cache's CLI test failed its weight-fingerprint check (not investigated further).
FAST_COMPILE = "--xla_backend_optimization_level=0"
GOLDEN_DIR = ROOT / "tests" / "golden"


def fast_jit(fn, **kwargs):
  """``jax.jit`` at LLVM -O0 (FAST_COMPILE for one program): for a whole train step or init a test
  runs a handful of times, where compiling costs more than running (init 18 -> 8 s, step 33 -> 20 s
  on the tiny pixel_decoder stage). Not for tests that compare values at tight tolerances."""
  import jax

  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


def read_events(folder):
  """TensorBoard's own reader over a stage folder's event files."""
  from tensorboard.backend.event_processing import event_accumulator

  accumulator = event_accumulator.EventAccumulator(
    str(folder), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
  )
  accumulator.Reload()
  return accumulator


def train_command(data, stage, workdir, *overrides, num_steps=2, config="configs/tiny.py"):
  """`make demo`'s own train.py command (so its flags are checked here) with the tests' settings,
  then ``overrides``; each replaces the flags of its name (a tuple flag given twice would be
  concatenated)."""
  from zipir_jax import demo

  tests = (
    "--config.data.buckets=((64,64,4),)",  # the demo trains on 96² and 128² crops
    "--config.train.log_every=1",
    "--config.train.image_every=0",
    "--config.train.latent_stats_batches=2",
    "--config.train.async_checkpointing=False",
  )
  command = demo.stage_command(stage, str(workdir), str(data), num_steps, config)
  for flags in (tests, overrides):
    names = {f.partition("=")[0] for f in flags}
    command = [a for a in command if a.partition("=")[0] not in names] + list(flags)
  return command


def perturbed(params, seed: int, scale: float = 0.05):
  """``params`` + Gaussian noise (numpy arrays): opens what initialisation leaves at exactly 0 or 1
  (biases, norm shifts, zero-initialised gates and output layers). In numpy, because eager jax ops
  compile one small program per leaf shape: seconds for a network's few hundred leaves."""
  import jax
  import numpy as np

  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: (np.asarray(x) + scale * rng.standard_normal(np.shape(x))).astype(x.dtype), params
  )


def jitted_apply(module, method: str | None = None):
  """``module.apply`` of ``method`` as ``fn(params, *args)``, jitted: op by op, one pass of a VAE
  dispatches a few hundred small programs, each compiled on the CPU."""
  import jax

  return jax.jit(lambda params, *args: module.apply({"params": params}, *args, method=method))


def load_golden_module(name: str):
  """A numpy-only helper of tests/golden/ (shared by a golden script and its test) as a module."""
  spec = importlib.util.spec_from_file_location(name, GOLDEN_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# The end-to-end tests that take minutes go first (longest-processing-time-first scheduling): xdist
# deals tests out in collection order, one work unit at a time, so these start on both workers at
# once and the short ones fill in after, instead of one worker running a multi-minute test alone at
# the end. Measured cold on the 2-core box: 565 s, both workers busy 550 s; the same code in
# alphabetical order took 695 s.
SLOW_FIRST = (  # longest first, by cold CI durations (2026-11-26: 276, 243, 124-142, 113-131, 76-109 s)
  "tests/test_train.py::test_stages_chain_from_command_line_then_make_demo",
  "tests/test_parallel.py::",
  "tests/test_train.py::test_resume_after_sigkill_and_sigterm_matches_straight_run",
  "tests/test_train.py::test_sdvae_ablation_trains_vae_then_dit_into_a_bundle",
  "tests/test_bench.py::test_restore_and_train_step_benchmarks_report_every_part",
)


def pytest_collection_modifyitems(items):
  def rank(item):
    return next((i for i, p in enumerate(SLOW_FIRST) if item.nodeid.startswith(p)), len(SLOW_FIRST))

  items.sort(key=rank)  # stable: everything else keeps its order


def subprocess_env() -> dict[str, str]:
  """Environment for CLI subprocesses: CPU, this run's RNG, compilation-cache and BLAS settings."""
  keep = (
    "PATH",
    "JAX_PLATFORMS",
    "JAX_DEFAULT_PRNG_IMPL",
    "JAX_COMPILATION_CACHE_DIR",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
    "OPENBLAS_NUM_THREADS",
  )
  return {k: os.environ[k] for k in keep if k in os.environ}


CONFIG_FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.py"))


@pytest.fixture(scope="session")
def tiny_config():
  return config_lib.load_config(str(ROOT / "configs" / "tiny.py"))


@pytest.fixture(scope="session")
def tiny_lpvae(tiny_config):
  """The tiny LP-VAE and its initial parameters (parameters do not depend on the image size)."""
  import jax

  from zipir_jax.models import autoencoder

  module = autoencoder.build_autoencoder(tiny_config)
  return module, autoencoder.init_autoencoder(module, jax.random.key(0), (1, 64, 64, 3))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_config):
  """A restoration bundle of the tiny config with random weights."""
  import jax

  from zipir_jax import bundle

  return bundle.random_bundle(tiny_config, jax.random.key(0))


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory, tiny_bundle):
  """``tiny_bundle`` saved to a folder."""
  from zipir_jax import bundle

  path = tmp_path_factory.mktemp("bundle") / "tiny"
  bundle.save_bundle(str(path), tiny_bundle)
  return path


@pytest.fixture(scope="session")
def tiny_vae_fine_export(tmp_path_factory, tiny_bundle, tiny_lpvae):
  """A vae_fine-style export for ``tiny_bundle``: its latent statistics and a D_f (``fine_decoder``)
  that differs from the decoder inside the bundle's D_f*."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  decoder = perturbed(tiny_lpvae[1]["fine_decoder"], 7)
  stats = jax.tree.map(np.asarray, tiny_bundle.params["latent_stats"])
  path = tmp_path_factory.mktemp("export") / "vae_fine_export"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(path / "params"), {"fine_decoder": decoder, "latent_stats": stats})
  checkpointer.wait_until_finished()
  return path


@pytest.fixture(autouse=True)
def _run_from_root(monkeypatch):
  monkeypatch.chdir(ROOT)

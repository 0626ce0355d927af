"""Shared test fixtures: configs and small initialised networks (CPU)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

from zipir_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
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


@pytest.fixture(autouse=True)
def _run_from_root(monkeypatch):
  monkeypatch.chdir(ROOT)

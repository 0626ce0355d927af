"""Timing helpers shared by the benchmarks: warmed-up medians and the measured bf16 matmul rate."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
  """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls (compilation)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_tflops(n: int = 8192, dtype=jnp.bfloat16, repeats: int = 50) -> float:
  """The device's dense matmul rate measured now (n³ product on random data), in TFLOP/s.

  MFU targets are stated against this number, measured in the same run, rather than the
  datasheet: clocks, power caps and the card's memory differ from machine to machine.
  """
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  mm = jax.jit(lambda a, b: a @ b)
  return 2 * n**3 / median_time(lambda: mm(a, b), repeats, warmup=5) / 1e12

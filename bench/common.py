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


def _status_bytes(field: str) -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    return 1024 * next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
  """Resets the process's peak RSS (Linux: clear_refs 5) and returns the current RSS in bytes."""
  with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
    f.write("5")
  return _status_bytes("VmRSS")


def peak_rss() -> int:
  """The process's peak RSS in bytes since start or the last :func:`reset_peak_rss`."""
  return _status_bytes("VmHWM")

"""Wall-clock timing of jitted JAX calls: warm up, then the median of repeats."""

import time

import jax
import numpy as np


def median_ms(f, *args, reps: int = 20) -> float:
  """Median milliseconds of f(*args) over `reps` runs after one warm-up call."""
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))

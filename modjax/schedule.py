"""Static per-step schedules, computed in numpy before the scan.

Two things are known before sampling starts and never depend on traced data:
the flow-matching noise levels of each step and the kind of each step (dense
warm-up, map step, sparse step, refresh). Both become scan inputs.
"""

from __future__ import annotations

import enum

import numpy as np


class StepKind(enum.IntEnum):
  DENSE = 0      # full attention, nothing recorded
  MAP = 1        # full attention plus the sparsity map (end of warm-up)
  SPARSE = 2     # block-sparse attention with the current mask
  REFRESH = 3    # measure the map again, merge history, predict the next mask


def flow_sigmas(num_steps: int, shift: float = 5.0) -> np.ndarray:
  """Noise levels sigma_0 = 1 > ... > sigma_num_steps = 0 (num_steps + 1 values).

  Wan's flow-matching schedule: uniform in t, then sigma = shift t / (1 + (shift - 1) t).
  x_sigma = (1 - sigma) x0 + sigma noise; the model predicts v = noise - x0 at
  timestep 1000 sigma, and Euler steps x <- x + (sigma_next - sigma) v.
  """
  if num_steps < 1:
    raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
  if shift <= 0:
    raise ValueError(f"shift must be > 0, got {shift}")
  t = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)
  sigmas = shift * t / (1.0 + (shift - 1.0) * t)
  return sigmas.astype(np.float32)


def mod_step_kinds(num_steps: int, warmup_steps: int, interval: int,
                   refresh: bool = True) -> np.ndarray:
  """docs/algorithm.md section 4: steps s < W-2 dense; W-2, W-1 map; then sparse,
  with a refresh at the last step of each interval ((s - W) % T == T - 1)."""
  kinds = np.full((num_steps,), StepKind.SPARSE, dtype=np.int32)
  w = warmup_steps
  kinds[: max(w - 2, 0)] = StepKind.DENSE
  kinds[max(w - 2, 0): w] = StepKind.MAP
  if refresh:
    s = np.arange(num_steps)
    kinds[(s >= w) & ((s - w) % interval == interval - 1)] = StepKind.REFRESH
  return kinds


def warmup_step_kinds(num_steps: int, warmup_steps: int) -> np.ndarray:
  """Dense for the warm-up, sparse after (static window and oracle baselines)."""
  kinds = np.full((num_steps,), StepKind.SPARSE, dtype=np.int32)
  kinds[: min(warmup_steps, num_steps)] = StepKind.DENSE
  return kinds

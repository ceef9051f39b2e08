"""Device-memory estimates made before compiling, so a run that cannot fit is refused
with one line naming the sizes instead of an out-of-memory traceback minutes later.

The estimate is analytic, from shapes alone: the bytes of every resident weight,
plus the largest working set of the stages that run one after the other (text
encoding, denoising, VAE decode). It aims to be within a small factor of what
XLA allocates (checked in tests against XLA's own memory analysis of compiled
programs), erring high; `check_fits` refuses only when the estimate exceeds the
memory the device reports.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Optional

import jax
import numpy as np

GiB = 2**30


def tree_bytes(tree) -> int:
  """Bytes of every array leaf (concrete arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """weights: resident bytes by component; stages: peak working bytes by stage."""
  weights: Mapping[str, int]
  stages: Mapping[str, int]

  @property
  def total(self) -> int:
    return sum(self.weights.values()) + max(self.stages.values(), default=0)

  def describe(self) -> str:
    parts = [f"{k} {v / GiB:.2f}" for k, v in self.weights.items()]
    peak = max(self.stages, key=self.stages.get) if self.stages else None
    stage = f"; largest stage {peak} {self.stages[peak] / GiB:.2f}" if peak else ""
    return f"weights {' + '.join(parts)} GiB{stage} GiB"


def denoise_bytes(*, rows: int, seq_len: int, dim: int, ffn_dim: int, heads: int,
                  num_layers: int, text_len: int, latent_elements: int, dtype,
                  dense_attention: str, mod_blocks: Optional[int] = None,
                  mod_width: Optional[int] = None, block_size: int = 128) -> int:
  """Peak working bytes of one denoising forward (CFG rows) plus the scan carry.

  dense_attention: "flash" (cuDNN or our kernels: no S x S buffer) or "xla"
    (XLA's dense attention materialises the float32 scores and probabilities of
    every row and head: 2 x rows x heads x S^2 x 4 bytes).
  mod_blocks / mod_width: n and the table width when MOD-DiT runs; its state
    ([L, rows, heads] x (bf16 history, bool mask, int32 table)) and the float32
    map of a map step stacked over layers are added.
  """
  b = np.dtype(dtype).itemsize
  # Residual stream (float32 in the gated adds), q/k/v/out, the FFN hidden layer and
  # its activation, each for the whole sequence of every row.
  hidden = rows * seq_len * (4 * dim * 4 + 5 * dim * b + 2 * ffn_dim * b)
  cross = rows * (seq_len + text_len) * dim * b * 2
  scores = 2 * rows * heads * seq_len * seq_len * 4 if dense_attention == "xla" else 0
  carry = 4 * latent_elements * 4  # latents, velocity, scheduler history (float32)
  mod = 0
  if mod_blocks:
    lead = num_layers * rows * heads
    n = mod_blocks
    mod = lead * n * (n * (2 + 1 + 4) + (mod_width or n) * 4 + 4) + lead * n * n * 4
  return int(hidden + cross + scores + carry + mod)


def text_encode_bytes(*, batch: int, seq_len: int, d_model: int, d_ff: int, heads: int,
                      dtype) -> int:
  """Peak working bytes of one T5 encoder forward (scores per layer are float32)."""
  b = np.dtype(dtype).itemsize
  return int(batch * seq_len * (6 * d_model * b + 3 * d_ff * b)
             + 3 * batch * heads * seq_len * seq_len * 4)


def device_memory_bytes(device=None) -> Optional[int]:
  """Memory the device can give: the allocator's limit on GPU/TPU; on CPU, the
  host's available memory. None when neither is known."""
  device = device or jax.devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # some backends do not implement it
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if device.platform == "cpu":
    try:
      with open("/proc/meminfo") as f:
        for line in f:
          if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    except OSError:
      pass
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      return None
  return None


class InsufficientMemoryError(ValueError):
  """The estimate exceeds the device's memory (a ValueError: the CLI prints one line)."""


def check_fits(estimate: MemoryEstimate, what: str, available: Optional[int] = None,
               device=None) -> None:
  """Raise InsufficientMemoryError naming the sizes when the estimate does not fit."""
  device = device or jax.devices()[0]
  available = device_memory_bytes(device) if available is None else available
  if available is None:
    return
  if estimate.total > available:
    raise InsufficientMemoryError(
        f"{what} needs about {estimate.total / GiB:.1f} GiB ({estimate.describe()}) but "
        f"{device.platform} device {device.id} has {available / GiB:.1f} GiB free; use smaller "
        f"sizes, fewer frames, bfloat16, or a device with more memory")

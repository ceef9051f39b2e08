"""Frozen, validated configs for every attention policy the sampler can run.

`MODConfig` holds each hyperparameter of ALGORITHM.md section 6; the baselines
share its schedule fields so comparisons differ only in how the mask is chosen.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

BLOCK_SIZES = (64, 128)
REFRESH_MODES = ("dense", "sparse", "none")
SPARSE_IMPLEMENTATIONS = (None, "xla", "triton", "tpu", "mosaic_gpu")


def _check(cond: bool, msg: str):
  if not cond:
    raise ValueError(msg)


def _check_common(cfg, min_warmup: int = 2):
  _check(cfg.block_size in BLOCK_SIZES,
         f"block_size must be one of {BLOCK_SIZES}, got {cfg.block_size!r}")
  _check(isinstance(cfg.warmup_steps, int) and cfg.warmup_steps >= min_warmup,
         f"warmup_steps must be an int >= {min_warmup}, got {cfg.warmup_steps!r}")
  _check(cfg.implementation in SPARSE_IMPLEMENTATIONS,
         f"implementation must be one of {SPARSE_IMPLEMENTATIONS}, got {cfg.implementation!r}")
  _check(cfg.dense_layers >= 0, f"dense_layers must be >= 0, got {cfg.dense_layers!r}")


@dataclasses.dataclass(frozen=True)
class DenseConfig:
  """Full attention every step (the quality and speed reference)."""
  implementation: Optional[str] = None  # dense backend: None (auto), "xla", "cudnn"

  def __post_init__(self):
    _check(self.implementation in (None, "xla", "cudnn"),
           f"DenseConfig.implementation must be None, 'xla' or 'cudnn', got {self.implementation!r}")


@dataclasses.dataclass(frozen=True)
class MODConfig:
  """MOD-DiT: fit the attention map as a mixture of lines, predict, mask.

  top_k: lines kept per head, an int, or a float in (0, 1] meaning a fraction
    of the 3n - 1 candidate lines.
  refresh: "dense" (reference: full attention + map at refresh steps),
    "sparse" (map measured on active blocks only), or "none" (the first mask
    is kept forever: the warm-up-reuse baseline).
  """
  block_size: int = 128
  warmup_steps: int = 12
  interval: int = 10
  top_k: Union[int, float] = 350
  threshold: float = 1e-4
  ridge: float = 1.0
  e_max: float = 1.0
  dense_layers: int = 0
  refresh: str = "dense"
  implementation: Optional[str] = None
  dense_implementation: Optional[str] = None

  def __post_init__(self):
    _check_common(self)
    _check(isinstance(self.interval, int) and self.interval >= 1,
           f"interval must be an int >= 1, got {self.interval!r}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, float)):
      raise ValueError(f"top_k must be an int >= 1 or a float in (0, 1], got {self.top_k!r}")
    if isinstance(self.top_k, float):
      _check(0.0 < self.top_k <= 1.0, f"top_k as a fraction must be in (0, 1], got {self.top_k!r}")
    else:
      _check(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k!r}")
    _check(0.0 < self.threshold < 1.0, f"threshold must be in (0, 1), got {self.threshold!r}")
    _check(self.ridge > 0.0, f"ridge must be > 0, got {self.ridge!r}")
    _check(self.refresh in REFRESH_MODES,
           f"refresh must be one of {REFRESH_MODES}, got {self.refresh!r}")


def warmup_reuse(**kwargs) -> MODConfig:
  """Baseline: the first MOD mask, kept for every later step (no refresh, no history)."""
  return MODConfig(refresh="none", **kwargs)


STATIC_PATTERNS = ("window", "lines")


@dataclasses.dataclass(frozen=True)
class StaticMaskConfig:
  """One fixed block mask for every step after the warm-up, layer and head.

  pattern "window": the Radial/STA-like local spatio-temporal band with a
    first-frame sink (the static-window baseline);
  pattern "lines": a MOD-shaped mask (frame blocks, temporal diagonals, sink
    columns) -- with warmup_steps=0 a probe of system speed at a given density.
  """
  density: float = 0.2
  pattern: str = "window"
  block_size: int = 128
  warmup_steps: int = 12
  dense_layers: int = 0
  implementation: Optional[str] = None
  dense_implementation: Optional[str] = None

  def __post_init__(self):
    _check_common(self, min_warmup=0)
    _check(0.0 < self.density <= 1.0, f"density must be in (0, 1], got {self.density!r}")
    _check(self.pattern in STATIC_PATTERNS,
           f"pattern must be one of {STATIC_PATTERNS}, got {self.pattern!r}")


def StaticWindowConfig(**kwargs) -> StaticMaskConfig:  # noqa: N802 (reads as a config class)
  """Baseline: the static local window (Radial/STA-like), dense during the warm-up."""
  return StaticMaskConfig(pattern="window", **kwargs)


@dataclasses.dataclass(frozen=True)
class OracleConfig:
  """Upper bound: each step, each layer keeps the blocks with the lowest exact
  sparsity S of that very step (measured by a dense map pass), at `density`."""
  density: float = 0.2
  block_size: int = 128
  warmup_steps: int = 12
  threshold: float = 1e-4
  dense_layers: int = 0
  implementation: Optional[str] = None
  dense_implementation: Optional[str] = None

  def __post_init__(self):
    _check_common(self)
    _check(0.0 < self.density <= 1.0, f"density must be in (0, 1], got {self.density!r}")
    _check(0.0 < self.threshold < 1.0, f"threshold must be in (0, 1), got {self.threshold!r}")


AttentionConfig = Union[DenseConfig, MODConfig, StaticMaskConfig, OracleConfig]

"""Frozen, validated configs for every attention policy the sampler can run.

`MODConfig` holds each hyperparameter of ALGORITHM.md section 6; the baselines
share its schedule fields so comparisons differ only in how the mask is chosen.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from pallas_kernels.quantize import PRECISIONS

BLOCK_SIZES = (64, 128)
REFRESH_MODES = ("dense", "sparse", "none")
FIRST_MASKS = ("extrapolate", "last_map")
HISTORY_DTYPES = ("float16", "bfloat16", "float32")
# run_wan.sh of the authors (on top of `MODConfig.reference()`), with the layer-0-dense
# default of their Wan utilities: `MODConfig.reference(**RUN_WAN_SH)`.
RUN_WAN_SH = dict(top_k=80, warmup_steps=10, interval=15, dense_layers=1)
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
  _check_precisions(cfg)


def _check_precisions(cfg):
  """precision (block-sparse steps) and dense_precision (dense warm-up, map and
  dense-refresh steps): PRECISIONS of pallas_kernels.quantize. A quantized dense
  step runs our kernel in dense mode (cuDNN and XLA attention are 16-bit), so it
  cannot also name a dense_implementation."""
  for name in ("precision", "dense_precision"):
    _check(getattr(cfg, name) in PRECISIONS,
           f"{name} must be one of {PRECISIONS}, got {getattr(cfg, name)!r}")
  _check(cfg.dense_precision == "bf16" or cfg.dense_implementation is None,
         f"dense_precision={cfg.dense_precision!r} runs dense steps on our kernel; "
         f"dense_implementation must be None, got {cfg.dense_implementation!r}")


@dataclasses.dataclass(frozen=True)
class DenseConfig:
  """Full attention every step (the quality and speed reference). precision other
  than "bf16" runs every step on our kernel in dense mode, quantized."""
  implementation: Optional[str] = None  # dense backend: None (auto), "xla", "cudnn"
  precision: str = "bf16"

  def __post_init__(self):
    _check(self.implementation in (None, "xla", "cudnn"),
           f"DenseConfig.implementation must be None, 'xla' or 'cudnn', got {self.implementation!r}")
    _check(self.precision in PRECISIONS,
           f"DenseConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
    _check(self.precision == "bf16" or self.implementation is None,
           f"DenseConfig.precision={self.precision!r} runs our kernel; implementation must "
           f"be None, got {self.implementation!r}")


@dataclasses.dataclass(frozen=True)
class MODConfig:
  """MOD-DiT: fit the attention map as a mixture of lines, predict, mask.

  top_k: lines kept per head, an int, or a float in (0, 1] meaning a fraction
    of the 3n - 1 candidate lines.
  refresh: "dense" (reference: full attention + map at refresh steps),
    "sparse" (map measured on active blocks only), or "none" (the first mask
    is kept forever: the warm-up-reuse baseline).

  Three choices where the authors' code (pkumelon/MOD-DiT) and the paper's text
  differ (docs/fidelity.md); `MODConfig.reference()` sets all three their way:
  first_mask: "extrapolate" (the paper: the first mask extrapolates the fits of
    steps W-2 and W-1) or "last_map" (their code: the fit of step W-2 is zero,
    so the first mask ranks the fit of step W-1 alone, X(W-1) (1 + 1/T); the
    map of step W-2 is then never used, so that step runs plain dense).
  history_dtype: storage of the [L, B, H, n, n] map history prev_map and of the
    map the fit reads: "float16" (theirs, and ours: 2 bytes an entry, 420 MB
    at Wan2.1-1.3B 720p), "bfloat16" (flips masks against theirs) or "float32"
    (exact map fractions, twice the memory).
  tail_block_diagonal: when n is not a multiple of blocks_per_frame, also give
    block-diagonal heads the trailing partial frame group (their mask does;
    their fit, like ours, leaves the group out of the basis E).
  The diagonal guard (block (i, i) always kept) is ours and applies in every mode.
  precision / dense_precision: the kernel precision of sparse steps and, apart, of
    the dense warm-up, map and dense-refresh steps (PRECISIONS; the authors run
    SageAttention-style INT8 Q K^T with FP8 P V in both): "bf16" is unquantized.
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
  first_mask: str = "extrapolate"
  history_dtype: str = "float16"
  tail_block_diagonal: bool = False
  implementation: Optional[str] = None
  dense_implementation: Optional[str] = None
  precision: str = "bf16"
  dense_precision: str = "bf16"

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
    _check(self.first_mask in FIRST_MASKS,
           f"first_mask must be one of {FIRST_MASKS}, got {self.first_mask!r}")
    _check(self.history_dtype in HISTORY_DTYPES,
           f"history_dtype must be one of {HISTORY_DTYPES}, got {self.history_dtype!r}")
    _check(isinstance(self.tail_block_diagonal, bool),
           f"tail_block_diagonal must be a bool, got {self.tail_block_diagonal!r}")

  @classmethod
  def reference(cls, **overrides) -> "MODConfig":
    """The authors' code as published (README defaults, Wan): top_k 350, warm-up 12,
    interval 10, threshold 1e-4, ridge 1, e_max 1, dense refresh, and their first
    mask, float16 history and partial-frame block diagonal. Their Wan utilities
    also run layer 0 dense and run_wan.sh uses top_k 80, warm-up 10, interval 15:
    `MODConfig.reference(**RUN_WAN_SH)`."""
    fields = dict(block_size=128, warmup_steps=12, interval=10, top_k=350, threshold=1e-4,
                  ridge=1.0, e_max=1.0, dense_layers=0, refresh="dense", first_mask="last_map",
                  history_dtype="float16", tail_block_diagonal=True)
    fields.update(overrides)
    return cls(**fields)


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
  precision: str = "bf16"
  dense_precision: str = "bf16"

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
  """Upper bound: at every step after the warm-up, each query-block row of each
  head and layer keeps the key blocks holding the most softmax mass of that very
  step (measured by a dense mass-map pass: lse, then a QK replay that sums
  exp(s - lse) per block), `density` x n blocks per row (the diagonal block is
  always one of them)."""
  density: float = 0.2
  block_size: int = 128
  warmup_steps: int = 12
  dense_layers: int = 0
  implementation: Optional[str] = None
  dense_implementation: Optional[str] = None
  precision: str = "bf16"
  dense_precision: str = "bf16"

  def __post_init__(self):
    _check_common(self, min_warmup=0)
    _check(0.0 < self.density <= 1.0, f"density must be in (0, 1], got {self.density!r}")


AttentionConfig = Union[DenseConfig, MODConfig, StaticMaskConfig, OracleConfig]

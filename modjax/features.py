"""Stage 1 of MOD-DiT: fit an attention sparsity map as a mixture of lines.

A block sparsity map S (n x n, ALGORITHM.md section 1) is modelled as

    S ~= sum_o d_o D_o + sum_j c_j C_j + e E

with 0/1 basis matrices
  * D_o: the diagonal with offset o = j - i, o in [-(n-1), n-1]  (2n - 1 of them);
  * C_j: column j, every row                                     (n of them);
  * E:   every (i, j) in the same frame block, frame blocks being
         [k*bpf, (k+1)*bpf) for k < n // bpf; blocks past the last full frame
         block belong to no frame block                          (1 of them).

The features X = (d, c, e) are the ridge solution of
(M^T M + ridge I) X = M^T vec(S), M the n^2 x 3n design matrix whose columns
are the flattened bases in the order (diagonals by increasing offset, columns,
E). M^T M depends only on (n, bpf, ridge): it is assembled from overlap counts
in numpy at trace time, Cholesky-factored in float64 and baked in as a
constant. M^T vec(S) is the diagonal sums, column sums and frame-block sum of
S, computed by reductions without ever building M. All leading dims (batch,
layer, head) are solved together as right-hand sides of one triangular solve.

NaN: the solve mixes every entry of S into every feature, so a NaN anywhere in
one head's S turns all of that head's features into NaN (other heads are
untouched: heads are independent right-hand sides). Nothing here masks or
replaces NaN -- a NaN map is a bug upstream (the state merges a NaN-bearing
sparse map with `where(mask, S_new, prev_map)`, so the map fed here must be
finite); `has_nan` is a cheap per-head check for tests and debugging.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class PatternFeatures:
  """Fitted (or predicted) line intensities of a sparsity map.

  diag:  [..., 2n-1] intensity of the diagonal with offset o = j - i at index
         o + n - 1 (offsets -(n-1) .. n-1).
  col:   [..., n] intensity of column j (the raw ridge solution; NOT halved --
         the halving of ALGORITHM.md section 3 happens in `predict.line_scores`).
  block: [...] intensity e of the frame-block-diagonal pattern.
  """

  diag: jax.Array
  col: jax.Array
  block: jax.Array

  @property
  def n(self) -> int:
    return self.col.shape[-1]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return self.col.shape[:-1]

  def to_vector(self) -> jax.Array:
    """[..., 3n] in the design-matrix order (diag, col, block)."""
    return jnp.concatenate([self.diag, self.col, self.block[..., None]], axis=-1)

  @classmethod
  def from_vector(cls, x: jax.Array) -> "PatternFeatures":
    """Inverse of `to_vector`; x [..., 3n]."""
    size = x.shape[-1]
    if size % 3 != 0 or size < 3:
      raise ValueError(f"PatternFeatures.from_vector needs a last dim 3n (n >= 1), got {size}")
    n = size // 3
    return cls(diag=x[..., :2 * n - 1], col=x[..., 2 * n - 1:3 * n - 1], block=x[..., 3 * n - 1])


def _check_n_bpf(n: int, blocks_per_frame: int):
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n (number of blocks) must be an int >= 1, got {n!r}")
  if (isinstance(blocks_per_frame, bool) or not isinstance(blocks_per_frame, (int, np.integer))
      or blocks_per_frame < 1):
    raise ValueError(f"blocks_per_frame must be an int >= 1, got {blocks_per_frame!r}")


def frame_index(n: int, blocks_per_frame: int) -> np.ndarray:
  """int [n]: the frame block of each block, -1 past the last full frame block."""
  _check_n_bpf(n, blocks_per_frame)
  idx = np.arange(n) // blocks_per_frame
  idx[idx >= n // blocks_per_frame] = -1
  return idx


def frame_block_mask(n: int, blocks_per_frame: int, include_tail: bool = False) -> np.ndarray:
  """bool [n, n] constant: (i, j) in the same (full) frame block, i.e. the basis E.

  include_tail: also the trailing partial group [(n // bpf) * bpf, n) when n is
  not a multiple of bpf (the authors' block-diagonal *mask*; never the basis E,
  which their fit and ours leave it out of).
  """
  f = frame_index(n, blocks_per_frame)
  if include_tail:
    f = np.arange(n) // blocks_per_frame
  return (f[:, None] == f[None, :]) & (f[:, None] >= 0)


def diagonal_index(n: int) -> np.ndarray:
  """int [n, n] constant: the diag-feature index j - i + n - 1 of each entry."""
  ar = np.arange(n)
  return ar[None, :] - ar[:, None] + (n - 1)


def design_matrix(n: int, blocks_per_frame: int) -> np.ndarray:
  """The explicit n^2 x 3n design matrix M (float64), rows = row-major vec(S).

  Columns: 2n-1 diagonals (offset -(n-1)..n-1), n columns, E. For tests and
  documentation only -- the fit never builds it.
  """
  _check_n_bpf(n, blocks_per_frame)
  m = np.zeros((n, n, 3 * n), np.float64)
  rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  m[rows, cols, diagonal_index(n)] = 1.0
  m[rows, cols, 2 * n - 1 + cols] = 1.0
  m[..., 3 * n - 1] = frame_block_mask(n, blocks_per_frame)
  return m.reshape(n * n, 3 * n)


def gram_matrix(n: int, blocks_per_frame: int, ridge: float = 1.0) -> np.ndarray:
  """M^T M + ridge I (float64 [3n, 3n]) from overlap counts, without M."""
  _check_n_bpf(n, blocks_per_frame)
  nd = 2 * n - 1
  nf = n // blocks_per_frame
  offsets = np.arange(-(n - 1), n)
  cols = np.arange(n)
  g = np.zeros((3 * n, 3 * n), np.float64)
  # diag-diag: disjoint supports; each diagonal has n - |o| entries.
  g[np.arange(nd), np.arange(nd)] = n - np.abs(offsets)
  # col-col: disjoint; n rows each.
  g[nd + cols, nd + cols] = n
  # diag-col: diagonal o crosses column j once iff row i = j - o is in range.
  i = cols[None, :] - offsets[:, None]
  dc = ((i >= 0) & (i < n)).astype(np.float64)
  g[:nd, nd:nd + n] = dc
  g[nd:nd + n, :nd] = dc.T
  # diag-E: inside each full frame block, diagonal o has bpf - |o| entries.
  de = nf * np.maximum(blocks_per_frame - np.abs(offsets), 0).astype(np.float64)
  g[:nd, -1] = de
  g[-1, :nd] = de
  # col-E: a column inside a full frame block meets bpf rows of E.
  ce = np.where(cols < nf * blocks_per_frame, blocks_per_frame, 0).astype(np.float64)
  g[nd:nd + n, -1] = ce
  g[-1, nd:nd + n] = ce
  g[-1, -1] = nf * blocks_per_frame ** 2
  g += ridge * np.eye(3 * n)
  return g


@functools.lru_cache(maxsize=64)
def _cholesky_factor(n: int, blocks_per_frame: int, ridge: float) -> np.ndarray:
  """Lower Cholesky factor of M^T M + ridge I, float64, read-only."""
  factor = np.linalg.cholesky(gram_matrix(n, blocks_per_frame, ridge))
  factor.setflags(write=False)
  return factor


def diagonal_sums(s: jax.Array) -> jax.Array:
  """[..., n, n] -> [..., 2n-1]: sum of S[i, i + o] at index o + n - 1.

  Pad-reshape skew: flip the rows, pad each row with n zeros, flatten, drop
  the last n (zero) entries and reshape to rows of 2n - 1. Entry (i', j) of
  the flipped map lands in column i' + j = (j - i) + n - 1, so a sum over rows
  gives every diagonal sum in one pass of O(n^2) work.
  """
  n = s.shape[-1]
  lead = s.shape[:-2]
  flipped = s[..., ::-1, :]
  padded = jnp.pad(flipped, [(0, 0)] * len(lead) + [(0, 0), (0, n)])
  flat = padded.reshape(lead + (2 * n * n,))[..., :n * (2 * n - 1)]
  return flat.reshape(lead + (n, 2 * n - 1)).sum(axis=-2)


def moment_vector(s: jax.Array, blocks_per_frame: int) -> jax.Array:
  """M^T vec(S) [..., 3n] (f32) from structured reductions of S [..., n, n]."""
  n = s.shape[-1]
  s = s.astype(jnp.float32)
  fb = frame_block_mask(n, blocks_per_frame)
  nc = (n // blocks_per_frame) * blocks_per_frame
  if nc:
    inside = s[..., :nc, :nc] * jnp.asarray(fb[:nc, :nc], jnp.float32)
    e_sum = inside.sum(axis=(-2, -1))
  else:
    e_sum = jnp.zeros(s.shape[:-2], jnp.float32)
  return jnp.concatenate([diagonal_sums(s), s.sum(axis=-2), e_sum[..., None]], axis=-1)


def fit_pattern_features(s: jax.Array, blocks_per_frame: int, ridge: float = 1.0) -> PatternFeatures:
  """Ridge fit of the line mixture to S [..., n, n] (bf16/f16/f32; solved in f32).

  blocks_per_frame and ridge are static (they pick the constant factor).
  Returns PatternFeatures with diag [..., 2n-1], col [..., n], block [...].
  """
  s = jnp.asarray(s)
  if s.ndim < 2 or s.shape[-1] != s.shape[-2]:
    raise ValueError(f"S must be [..., n, n], got shape {s.shape}")
  if not jnp.issubdtype(s.dtype, jnp.floating):
    raise ValueError(f"S must be a float array, got dtype {s.dtype}")
  n = s.shape[-1]
  _check_n_bpf(n, blocks_per_frame)
  if not ridge > 0:
    raise ValueError(f"ridge must be > 0 (M^T M alone is singular), got {ridge!r}")
  return _fit(s, int(blocks_per_frame), float(ridge))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fit(s, blocks_per_frame, ridge):
  n = s.shape[-1]
  lead = s.shape[:-2]
  rhs = moment_vector(s, blocks_per_frame).reshape(-1, 3 * n).T  # [3n, batch]
  chol = jnp.asarray(_cholesky_factor(n, blocks_per_frame, ridge), jnp.float32)
  # Full f32 for any matmul the triangular solve is expanded into (e.g. on TPU).
  with jax.default_matmul_precision("highest"):
    y = jax.scipy.linalg.solve_triangular(chol, rhs, lower=True)
    x = jax.scipy.linalg.solve_triangular(chol, y, lower=True, trans="T")
  return PatternFeatures.from_vector(x.T.reshape(lead + (3 * n,)))


def reconstruct_map(features: PatternFeatures, n: int, blocks_per_frame: int) -> jax.Array:
  """S_hat [..., n, n] = sum of the bases weighted by the (raw) features."""
  _check_n_bpf(n, blocks_per_frame)
  if features.col.shape[-1] != n or features.diag.shape[-1] != 2 * n - 1:
    raise ValueError(
        f"features do not match n={n}: col {features.col.shape}, diag {features.diag.shape}")
  return _reconstruct(features, int(blocks_per_frame))


@functools.partial(jax.jit, static_argnums=(1,))
def _reconstruct(features, blocks_per_frame):
  n = features.n
  diag = jnp.take(features.diag, jnp.asarray(diagonal_index(n)), axis=-1)  # [..., n, n]
  col = features.col[..., None, :]
  fb = jnp.asarray(frame_block_mask(n, blocks_per_frame), features.block.dtype)
  return diag + col + features.block[..., None, None] * fb


def has_nan(features: PatternFeatures) -> jax.Array:
  """bool [...]: True for heads whose features contain a NaN."""
  return (jnp.isnan(features.diag).any(-1) | jnp.isnan(features.col).any(-1)
          | jnp.isnan(features.block))

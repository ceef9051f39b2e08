"""Prediction and mask construction of MOD-DiT (ALGORITHM.md section 3).

Candidate lines, in this fixed order (it defines the tie-break and the
indices of `line_scores`):
    index j          for j in [0, n):      column j, value col_j / 2;
    index n + o+n-1  for o in [-(n-1), n-1]: diagonal with offset o = j - i,
                                            value diag_o.
i.e. columns first, then diagonals by increasing offset -- the same order as
the reference (which concatenates halved columns and diagonals). The top_k
lines with the smallest value are kept; equal values keep the lower index
(so a column beats a diagonal of equal value); NaN values rank last.

Everything is jit-able with static top_k / blocks_per_frame and batched over
arbitrary leading dims (batch, layer, head).
"""

from __future__ import annotations

import functools
import math
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from modjax.features import PatternFeatures, diagonal_index, frame_block_mask

__all__ = [
    "PatternFeatures", "predict_features", "line_scores", "select_lines",
    "lines_to_mask", "frame_block_mask", "predict_mask", "resolve_top_k",
    "max_row_width", "block_diagonal_mode", "num_candidate_lines", "smallest_k_mask",
]

TopK = Union[int, float]


def num_candidate_lines(n: int) -> int:
  """3n - 1: n columns plus 2n - 1 diagonals."""
  return 3 * n - 1


def resolve_top_k(top_k: TopK, n: int) -> int:
  """The static number of lines kept for an n x n block map.

  top_k: an int >= 1 (a count; clamped to the 3n - 1 candidates, so a preset
    such as 350 also works on a small model), or a float in (0, 1] (a fraction
    of the 3n - 1 candidates, rounded half up, at least 1).
  """
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n (number of blocks) must be an int >= 1, got {n!r}")
  return resolve_count(top_k, num_candidate_lines(n), name="top_k", share="fraction")


def resolve_count(value, total: int, *, name: str, share: str) -> int:
  """A static count out of `total`: an int >= 1 (clamped to total), or a float
  in (0, 1] meaning that share of total (rounded half up, at least 1).
  `name` and `share` ("fraction", "density") word the errors."""
  float_kind = "a float in (0, 1]" if share == "fraction" else f"a float {share} in (0, 1]"
  bad = f"{name} must be an int >= 1 or {float_kind}, got {value!r}"
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(bad)
  if isinstance(value, (int, np.integer)):
    if value < 1:
      raise ValueError(bad)
    return int(min(value, total))
  if isinstance(value, (float, np.floating)):
    if not 0.0 < value <= 1.0:
      raise ValueError(f"{name} as a {share} must be a float in (0, 1], got {value!r}")
    return int(min(total, max(1, math.floor(value * total + 0.5))))
  raise ValueError(bad)


def predict_features(prev: PatternFeatures, cur: PatternFeatures, interval) -> PatternFeatures:
  """Linear extrapolation X_pred = X_cur + (X_cur - X_prev) / T, T = interval."""
  if isinstance(interval, (int, float, np.integer, np.floating)) and not interval > 0:
    raise ValueError(f"interval must be > 0, got {interval!r}")
  return _extrapolate(prev, cur, interval)


@jax.jit
def _extrapolate(prev, cur, interval):
  return jax.tree.map(lambda p, c: c + (c - p) / interval, prev, cur)


def line_scores(pred: PatternFeatures) -> jax.Array:
  """[..., 3n-1] candidate values (columns halved, then diagonals); see module doc."""
  return jnp.concatenate([pred.col / 2, pred.diag], axis=-1)


def smallest_k_mask(values: jax.Array, k: int) -> jax.Array:
  """bool, shape of values: True at the k smallest entries of the last axis.

  Ties keep the lower index; NaN ranks after every number; -0.0 == 0.0.
  Uses lax.top_k on negated values (documented to return the lower index first
  among equal values).
  """
  size = values.shape[-1]
  if not isinstance(k, (int, np.integer)) or not 0 <= k <= size:
    raise ValueError(f"k must be a static int in [0, {size}], got {k!r}")
  if k == 0:
    return jnp.zeros(values.shape, bool)
  if k == size:
    return jnp.ones(values.shape, bool)
  v = values.astype(jnp.promote_types(values.dtype, jnp.float32))
  v = jnp.where(jnp.isnan(v), jnp.inf, v)
  v = jnp.where(v == 0, 0.0, v)  # -0.0 -> +0.0 so both negate to one value
  _, idx = jax.lax.top_k(-v, k)
  return jnp.put_along_axis(jnp.zeros(values.shape, bool), idx, True, axis=-1, inplace=False)


def select_lines(pred: PatternFeatures, top_k: TopK) -> tuple[jax.Array, jax.Array]:
  """Keep the top_k lines with the smallest value.

  Returns (keep_cols bool [..., n], keep_diags bool [..., 2n-1]).
  """
  return _select_lines(pred, resolve_top_k(top_k, pred.n))


@functools.partial(jax.jit, static_argnums=1)
def _select_lines(pred, k):
  keep = smallest_k_mask(line_scores(pred), k)
  return keep[..., :pred.n], keep[..., pred.n:]


def lines_to_mask(keep_cols: jax.Array, keep_diags: jax.Array, n: int) -> jax.Array:
  """bool [..., n, n]: (i, j) is on a kept column j or a kept diagonal j - i."""
  if keep_cols.shape[-1] != n or keep_diags.shape[-1] != 2 * n - 1:
    raise ValueError(
        f"keep_cols must be [..., {n}] and keep_diags [..., {2 * n - 1}], "
        f"got {keep_cols.shape} and {keep_diags.shape}")
  diag = jnp.take(keep_diags, jnp.asarray(diagonal_index(n)), axis=-1)
  return diag | keep_cols[..., None, :]


def predict_mask(prev: PatternFeatures, cur: PatternFeatures, *, interval, top_k: TopK,
                 blocks_per_frame: int, block_diagonal,
                 tail_block_diagonal: bool = False) -> jax.Array:
  """The next block mask, bool [..., n, n] (ALGORITHM.md sections 3 and 8).

  Union of the kept columns and diagonals of the predicted features, every
  (full) frame block for heads with block_diagonal True (bool [...],
  broadcast against the features' leading dims), and the diagonal (i, i).
  tail_block_diagonal: those heads also get the trailing partial frame group
  (the authors' mask). top_k, blocks_per_frame and tail_block_diagonal are
  static; interval may be traced.
  """
  n = cur.n
  if isinstance(interval, (int, float, np.integer, np.floating)) and not interval > 0:
    raise ValueError(f"interval must be > 0, got {interval!r}")
  if not isinstance(tail_block_diagonal, (bool, np.bool_)):
    raise ValueError(f"tail_block_diagonal must be a bool, got {tail_block_diagonal!r}")
  frame_block_mask(n, blocks_per_frame)  # validates blocks_per_frame
  return _predict_mask(prev, cur, interval, jnp.asarray(block_diagonal, bool),
                       resolve_top_k(top_k, n), int(blocks_per_frame), bool(tail_block_diagonal))


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _predict_mask(prev, cur, interval, block_diagonal, k, blocks_per_frame, tail=False):
  n = cur.n
  pred = _extrapolate(prev, cur, interval)
  keep_cols, keep_diags = _select_lines(pred, k)
  mask = lines_to_mask(keep_cols, keep_diags, n)
  fb = jnp.asarray(frame_block_mask(n, blocks_per_frame, include_tail=tail))
  mask = mask | (block_diagonal[..., None, None] & fb)
  return mask | jnp.eye(n, dtype=bool)


def max_row_width(top_k: TopK, n: int, blocks_per_frame: int) -> int:
  """Static bound on the active key blocks of any row of `predict_mask`:
  min(n, top_k + blocks_per_frame) -- the width of the kernel's compacted table.

  Each kept line (column or diagonal) meets a row at most once: <= top_k. On
  top of that a row gets either its frame block (block-diagonal head, row inside
  a frame block: at most bpf blocks -- the trailing partial group of
  tail_block_diagonal has fewer -- which already contain the guard (i, i)) or
  just the guard (any other row): at most max(bpf, 1) = bpf more. This is
  ALGORITHM.md's min(n, top_k + bpf); the guard needs no extra slot.
  """
  if (isinstance(blocks_per_frame, bool) or not isinstance(blocks_per_frame, (int, np.integer))
      or blocks_per_frame < 1):
    raise ValueError(f"blocks_per_frame must be an int >= 1, got {blocks_per_frame!r}")
  return int(min(n, resolve_top_k(top_k, n) + blocks_per_frame))


def block_diagonal_mode(features: PatternFeatures, e_max: float = 1.0) -> jax.Array:
  """bool [...]: heads whose fitted block intensity e <= e_max (NaN -> False)."""
  return features.block <= e_max

"""Pure-jnp reference for the MOD-DiT sparsity map (docs/algorithm.md sections 1, 8)
and for the block mass map (the oracle's statistic).

For one (batch, head), with p = softmax(sm_scale * q k^T) over the valid row
(restricted to the block mask when one is given), the sparsity map is

    S[i, j] = #{(r, c) : r valid in query block i, c valid in key block j,
                p[r, c] < threshold} / (valid rows of i * valid cols of j)

with n = ceil(seq_len / block_size) blocks; padded tokens never count. The
block mass map is the same two-pass measurement summing instead of counting:

    M[i, j] = sum_{r valid in i, c valid in j} p[r, c] / (valid rows of i)

the mean over the rows of query block i of the softmax mass that falls in key
block j, so each row of M sums to 1 over the active blocks. Blocks outside the
mask are NaN in both maps. Everything here is float32 and materialises the full
[B, H, S, S] score matrix: it is the ground truth for the kernels, not a fast
path (see `map_xla` for the memory-frugal XLA version).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "sparsity_map_reference",
    "sparsity_map_from_lse",
    "resolve_sm_scale",
    "block_token_counts",
    "table_to_block_mask",
    "check_map_args",
    "block_mass_map_reference",
    "block_mass_from_lse",
]


def resolve_sm_scale(sm_scale: Optional[float], head_dim: int) -> float:
  """`sm_scale` or the default 1/sqrt(head_dim)."""
  return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def block_token_counts(seq_len: int, block_size: int) -> np.ndarray:
  """Number of valid (non-padded) tokens of each block, float32 [n]."""
  n = -(-seq_len // block_size)
  starts = np.arange(n) * block_size
  return np.clip(seq_len - starts, 0, block_size).astype(np.float32)


def check_map_args(q, k, lse, table, *, block_size: int, threshold: float):
  """Shape/argument checks shared by the map backends. Returns (B, S, H, D, n)."""
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(
        f"q and k must both have shape [B, S, H, D]; got q {q.shape}, k {k.shape}")
  b_, s_, h_, d_ = q.shape
  if not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if not (isinstance(threshold, (int, float, np.floating)) and threshold > 0):
    raise ValueError(
        f"threshold must be a positive Python float (static), got {threshold!r}")
  n = -(-s_ // block_size)
  if lse is not None and tuple(lse.shape) != (b_, h_, s_):
    raise ValueError(f"lse must have shape [B, H, S] = {(b_, h_, s_)}, got {lse.shape}")
  if table is not None:
    idx, cnt = table.indices, table.counts
    if idx.ndim < 2 or idx.shape[-2] != n or cnt.shape != idx.shape[:-1]:
      raise ValueError(
          f"table.indices must be [B, H, n={n}, w] and table.counts "
          f"[B, H, n]; got {idx.shape} and {cnt.shape}")
    if idx.shape[-1] < 1 or idx.shape[-1] > n:
      raise ValueError(f"table width must be in [1, n={n}], got {idx.shape[-1]}")
  return b_, s_, h_, d_, n


def table_to_block_mask(table: Any, n: int) -> jax.Array:
  """bool [..., n, n] from a duck-typed table (`.indices` [..., n, w], `.counts`)."""
  idx = jnp.asarray(table.indices)
  w = idx.shape[-1]
  valid = jnp.arange(w, dtype=jnp.int32) < jnp.asarray(table.counts)[..., None]
  onehot = idx[..., None] == jnp.arange(n, dtype=idx.dtype)      # [..., n, w, n]
  return jnp.any(onehot & valid[..., None], axis=-2)


def _token_mask(block_mask: jax.Array, block_size: int, seq_len: int) -> jax.Array:
  tok = jnp.repeat(jnp.repeat(block_mask, block_size, axis=-2), block_size, axis=-1)
  return tok[..., :seq_len, :seq_len]


def _scores(q, k, sm_scale):
  qf = q.astype(jnp.float32)
  kf = k.astype(jnp.float32)
  s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=jax.lax.Precision.HIGHEST)
  return s * sm_scale


def _block_mass(p, block_mask, *, block_size, seq_len):
  """p: float32 [B, H, S, S] (0 outside the mask) -> float32 [B, H, n, n]
  (mean over each query block's valid rows of the mass in each key block; NaN
  where not in the mask)."""
  b_, h_ = p.shape[:2]
  n = -(-seq_len // block_size)
  pad = n * block_size - seq_len
  p = jnp.pad(p, ((0, 0), (0, 0), (0, pad), (0, pad)))
  mass = p.reshape(b_, h_, n, block_size, n, block_size).sum(axis=(3, 5))
  nv = block_token_counts(seq_len, block_size)
  mass = mass / jnp.asarray(nv[:, None])
  if block_mask is not None:
    mass = jnp.where(block_mask, mass, jnp.nan)
  return mass


def _block_fraction(below, block_mask, *, block_size, seq_len):
  """below: bool [B, H, S, S] -> float32 [B, H, n, n] (NaN where not in mask)."""
  b_, h_ = below.shape[:2]
  n = -(-seq_len // block_size)
  pad = n * block_size - seq_len
  below = jnp.pad(below, ((0, 0), (0, 0), (0, pad), (0, pad)))
  counts = below.reshape(b_, h_, n, block_size, n, block_size).sum(
      axis=(3, 5), dtype=jnp.float32)
  nv = block_token_counts(seq_len, block_size)
  frac = counts / jnp.asarray(nv[:, None] * nv[None, :])
  if block_mask is not None:
    frac = jnp.where(block_mask, frac, jnp.nan)
  return frac


@functools.partial(
    jax.jit, static_argnames=("block_size", "threshold", "sm_scale"))
def sparsity_map_reference(q: jax.Array, k: jax.Array, *, block_size: int,
                           threshold: float, sm_scale: Optional[float] = None,
                           block_mask: Optional[jax.Array] = None) -> jax.Array:
  """The sparsity map from scratch: full (masked) softmax in float32.

  Args:
    q, k: [B, S, H, D] (any float dtype; upcast to float32).
    block_size: tokens per block b; n = ceil(S / b).
    threshold: probability threshold (entries with p < threshold count).
    sm_scale: softmax scale, default 1/sqrt(D).
    block_mask: optional bool [B, H, n, n] (broadcastable). With it, the softmax
      is restricted to the active blocks and inactive blocks come back NaN.
  Returns:
    float32 [B, H, n, n].
  """
  b_, s_, h_, d_, n = check_map_args(q, k, None, None, block_size=block_size,
                                     threshold=threshold)
  scale = resolve_sm_scale(sm_scale, d_)
  s = _scores(q, k, scale)
  tok = None
  if block_mask is not None:
    block_mask = jnp.broadcast_to(jnp.asarray(block_mask, jnp.bool_), (b_, h_, n, n))
    tok = _token_mask(block_mask, block_size, s_)
    s = jnp.where(tok, s, -jnp.inf)
  row_max = jnp.max(s, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  e = jnp.exp(s - row_max)
  p = e / jnp.sum(e, axis=-1, keepdims=True)
  below = p < threshold
  if tok is not None:
    below = below & tok
  return _block_fraction(below, block_mask, block_size=block_size, seq_len=s_)


@functools.partial(
    jax.jit, static_argnames=("block_size", "threshold", "sm_scale", "interpret"))
def sparsity_map_from_lse(q: jax.Array, k: jax.Array, lse: jax.Array,
                          table: Any = None, *, block_size: int,
                          threshold: float, sm_scale: Optional[float] = None,
                          interpret: bool = False) -> jax.Array:
  """The map from a given row log-sum-exp, in the log domain (no exp).

  p[r, c] < threshold  <=>  sm_scale * q_r.k_c - lse_r < log(threshold).

  Args:
    q, k: [B, S, H, D].
    lse: float32 [B, H, S], natural-log row log-sum-exp of the (masked) scores.
    table: None (dense) or a block table (`.indices` int32 [B, H, n, w],
      `.counts` int32 [B, H, n]); only active blocks are measured, the others
      are NaN.
    interpret: ignored (same signature as the kernel backends).
  Returns:
    float32 [B, H, n, n].
  """
  del interpret
  b_, s_, h_, d_, n = check_map_args(q, k, lse, table, block_size=block_size,
                                     threshold=threshold)
  scale = resolve_sm_scale(sm_scale, d_)
  s = _scores(q, k, scale)
  below = (s - lse.astype(jnp.float32)[..., None]) < math.log(threshold)
  block_mask = None
  if table is not None:
    block_mask = jnp.broadcast_to(table_to_block_mask(table, n), (b_, h_, n, n))
    below = below & _token_mask(block_mask, block_size, s_)
  return _block_fraction(below, block_mask, block_size=block_size, seq_len=s_)


def check_mass_args(q, k, lse, table, *, block_size: int):
  """`check_map_args` without a threshold. Returns (B, S, H, D, n)."""
  return check_map_args(q, k, lse, table, block_size=block_size, threshold=1.0)


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale"))
def block_mass_map_reference(q: jax.Array, k: jax.Array, *, block_size: int,
                             sm_scale: Optional[float] = None,
                             block_mask: Optional[jax.Array] = None) -> jax.Array:
  """The block mass map from scratch: full (masked) softmax in float32.

  Args as in `sparsity_map_reference` (no threshold). Returns float32
  [B, H, n, n]; M[i, j] = mean over the valid rows r of query block i of
  sum_{c valid in key block j} p[r, c]; each row sums to 1 over its active
  blocks (0 for a row whose mask is empty), inactive blocks are NaN.
  """
  b_, s_, h_, d_, n = check_mass_args(q, k, None, None, block_size=block_size)
  scale = resolve_sm_scale(sm_scale, d_)
  s = _scores(q, k, scale)
  if block_mask is not None:
    block_mask = jnp.broadcast_to(jnp.asarray(block_mask, jnp.bool_), (b_, h_, n, n))
    s = jnp.where(_token_mask(block_mask, block_size, s_), s, -jnp.inf)
  row_max = jnp.max(s, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  e = jnp.exp(s - row_max)
  total = jnp.sum(e, axis=-1, keepdims=True)
  p = e / jnp.where(total > 0, total, 1.0)
  return _block_mass(p, block_mask, block_size=block_size, seq_len=s_)


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "interpret"))
def block_mass_from_lse(q: jax.Array, k: jax.Array, lse: jax.Array, table: Any = None, *,
                        block_size: int, sm_scale: Optional[float] = None,
                        interpret: bool = False) -> jax.Array:
  """The block mass map from a given row log-sum-exp: p = exp(sm_scale q.k - lse).

  Args as in `sparsity_map_from_lse` (no threshold); a row with lse = -inf (an
  empty mask row) has no mass. Returns float32 [B, H, n, n], NaN off the table.
  """
  del interpret
  b_, s_, h_, d_, n = check_mass_args(q, k, lse, table, block_size=block_size)
  scale = resolve_sm_scale(sm_scale, d_)
  s = _scores(q, k, scale)
  lse = lse.astype(jnp.float32)[..., None]
  p = jnp.where(jnp.isfinite(lse), jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
  block_mask = None
  if table is not None:
    block_mask = jnp.broadcast_to(table_to_block_mask(table, n), (b_, h_, n, n))
    p = jnp.where(_token_mask(block_mask, block_size, s_), p, 0.0)
  return _block_mass(p, block_mask, block_size=block_size, seq_len=s_)

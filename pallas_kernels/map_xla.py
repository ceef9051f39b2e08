"""Sparsity map from a given row log-sum-exp, in plain XLA (any backend).

Memory-frugal: a `lax.map` over query blocks, so at most one query block row of
scores ([B, H, b, S] dense, [B, H, b, w, b] with a table) lives at a time and
the [S, S] matrix is never materialised. With a block table, only the row's
listed key blocks are gathered and measured; the others come back NaN.

The compare is done in the log domain (no exp):
    p < threshold  <=>  sm_scale * q.k < lse + log(threshold).
The block mass map (`block_mass_from_lse`) runs the same loop and sums
p = exp(sm_scale * q.k - lse) per block instead, divided by the block's valid rows.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.map_reference import (block_token_counts, check_map_args,
                                          check_mass_args, resolve_sm_scale)

__all__ = ["sparsity_map_from_lse", "block_mass_from_lse"]


def _precision(dtype):
  # f32 inputs: full precision (no TF32 on GPU); bf16/f16 products are exact in
  # the f32 accumulator anyway.
  return (jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32
          else jax.lax.Precision.DEFAULT)


@functools.partial(
    jax.jit, static_argnames=("block_size", "threshold", "sm_scale", "interpret"))
def sparsity_map_from_lse(q: jax.Array, k: jax.Array, lse: jax.Array,
                          table: Any = None, *, block_size: int,
                          threshold: float, sm_scale: Optional[float] = None,
                          interpret: bool = False) -> jax.Array:
  """Sparsity map S float32 [B, H, n, n] from q, k [B, S, H, D] and lse [B, H, S].

  Args:
    q, k: [B, S, H, D], same dtype.
    lse: float32 [B, H, S], natural-log row log-sum-exp of sm_scale * q k^T
      (over the mask, when a table is given).
    table: None (dense: every block) or a block table with `.indices` int32
      [B, H, n, w] (ascending active key-block ids) and `.counts` int32 [B, H, n].
    block_size: tokens per block b; n = ceil(S / b).
    threshold: static probability threshold.
    sm_scale: softmax scale, default 1/sqrt(D).
    interpret: ignored (same signature as the Pallas backends).
  Returns:
    float32 [B, H, n, n]; NaN for blocks not in the table.
  """
  del interpret
  check_map_args(q, k, lse, table, block_size=block_size, threshold=threshold)
  return _map(q, k, lse, table, block_size=block_size, sm_scale=sm_scale,
              threshold=threshold)


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "interpret"))
def block_mass_from_lse(q: jax.Array, k: jax.Array, lse: jax.Array,
                        table: Any = None, *, block_size: int,
                        sm_scale: Optional[float] = None,
                        interpret: bool = False) -> jax.Array:
  """Block mass map M float32 [B, H, n, n]: M[i, j] = sum of p = exp(sm_scale q.k
  - lse) over block (i, j), divided by the valid rows of query block i (rows sum
  to 1 over the active blocks). Args as `sparsity_map_from_lse` without the
  threshold; NaN for blocks not in the table."""
  del interpret
  check_mass_args(q, k, lse, table, block_size=block_size)
  return _map(q, k, lse, table, block_size=block_size, sm_scale=sm_scale, threshold=None)


def _map(q, k, lse, table, *, block_size, sm_scale, threshold):
  """The shared query-block loop; threshold None = the mass map."""
  b_, s_, h_, d_ = q.shape
  n = -(-s_ // block_size)
  mass = threshold is None
  if q.dtype != k.dtype:
    raise ValueError(f"q and k must have the same dtype, got {q.dtype}, {k.dtype}")
  bs = block_size
  sp = n * bs
  pad = sp - s_
  scale = resolve_sm_scale(sm_scale, d_)
  prec = _precision(q.dtype)

  # [B, H, Sp, D]: one transpose up front, then contiguous per-head tiles.
  qt = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  kt = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  tok_valid = jnp.arange(sp) < s_
  lse = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, pad)))
  if mass:
    # Per-row offset of the scaled score; padded and empty rows get +inf (no mass).
    bound = jnp.where(tok_valid & jnp.isfinite(lse), lse, jnp.inf)
  else:
    # Per-row bound on the scaled score; padded rows get -inf (never below).
    bound = jnp.where(tok_valid, lse + math.log(threshold), -jnp.inf)
  nv = jnp.asarray(block_token_counts(s_, bs))                       # [n]

  def stat(s, ti):
    """Per-entry statistic of scaled scores s against the row values ti."""
    if mass:
      return jnp.exp(s - ti)
    return (s < ti).astype(jnp.float32)

  def query_block(i):
    qi = jax.lax.dynamic_slice_in_dim(qt, i * bs, bs, axis=2)         # [B,H,b,D]
    ti = jax.lax.dynamic_slice_in_dim(bound, i * bs, bs, axis=2)      # [B,H,b]
    if table is None:
      s = jnp.einsum("bhqd,bhkd->bhqk", qi, kt, precision=prec,
                     preferred_element_type=jnp.float32) * scale      # [B,H,b,Sp]
      x = stat(s, ti[..., None])
      if pad:
        x = jnp.where(tok_valid, x, 0.0)
      tot = x.reshape(b_, h_, bs, n, bs).sum(axis=(2, 4))
      return tot / (nv[i] if mass else nv[i] * nv)                    # [B,H,n]

    idx = jax.lax.dynamic_index_in_dim(table_idx, i, axis=2, keepdims=False)
    cnt_i = jax.lax.dynamic_index_in_dim(table_cnt, i, axis=2, keepdims=False)
    kg = jnp.take_along_axis(kb, idx[..., None, None], axis=2,
                             mode="clip")                             # [B,H,w,b,D]
    s = jnp.einsum("bhqd,bhwkd->bhqwk", qi, kg, precision=prec,
                   preferred_element_type=jnp.float32) * scale        # [B,H,b,w,b]
    x = stat(s, ti[..., None, None])
    if pad:
      colv = jnp.take(tok_valid.reshape(n, bs), idx, axis=0, mode="clip")
      x = jnp.where(colv[:, :, None], x, 0.0)                         # [B,H,w,b]
    tot = x.sum(axis=(2, 4))                                          # [B,H,w]
    frac = tot / (nv[i] if mass else nv[i] * jnp.take(nv, idx, mode="clip"))
    active = jnp.arange(w, dtype=jnp.int32) < cnt_i[..., None]
    dest = jnp.where(active, idx, n)                                  # n: dropped
    row = jnp.full((b_, h_, n), jnp.nan, jnp.float32)
    bi = jnp.arange(b_)[:, None, None]
    hi = jnp.arange(h_)[None, :, None]
    return row.at[bi, hi, dest].set(frac, mode="drop")

  if table is not None:
    table_idx = jnp.broadcast_to(jnp.asarray(table.indices, jnp.int32),
                                 (b_, h_, n, table.indices.shape[-1]))
    table_cnt = jnp.broadcast_to(jnp.asarray(table.counts, jnp.int32), (b_, h_, n))
    w = table_idx.shape[-1]
    kb = kt.reshape(b_, h_, n, bs, d_)

  rows = jax.lax.map(query_block, jnp.arange(n))                      # [n,B,H,n]
  return rows.transpose(1, 2, 0, 3)

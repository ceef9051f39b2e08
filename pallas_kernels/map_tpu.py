"""Sparsity map from a given row log-sum-exp: Pallas Mosaic TPU kernel.

Splash-attention style: the grid is (B*H, query block i, table slot t). With
a block table, its indices and counts are scalar-prefetched into SMEM and drive
the K BlockSpec's index_map, so the pipeline DMAs exactly the active key
blocks; slots past a row's count clamp to its last valid entry (no new DMA,
no compute). Without a table the last grid axis walks all n key blocks.

Each step computes one [b, b] score tile in float32 on the MXU, compares it
with the per-row bound (lse + log(threshold)) / sm_scale (the log domain, no
exp), reduces it to one count and writes it into its column of the output row,
which stays resident in VMEM across the (arbitrary) slot axis: initialised to
NaN (sparse) or 0 (dense) at t == 0, updated by a one-hot select.

Layouts: q, k are transposed to [B*H, S, D] so a tile is (b, D) (lane dim =
D, the full head dim); lse is passed as [B*H, S, 1] so the bound is a column
vector; the output is [B*H, n, 1, n] (a (1, n) row per step, full dims).

The block mass map (`block_mass_from_lse`) is the same grid with each tile
reduced to sum(exp(sm_scale * q.k - lse)) (padded and empty rows: no mass),
divided by the valid rows of the query block.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.map_reference import check_map_args, resolve_sm_scale

__all__ = ["sparsity_map_from_lse", "block_mass_from_lse", "SMEM_TABLE_BUDGET_BYTES"]

# Scalar-prefetch budget for the block table. Past it, the (batch, head) pairs
# are split over several pallas_calls (a lax.map over groups), each of which
# prefetches only its own rows. Unverified on hardware: tune per TPU generation.
SMEM_TABLE_BUDGET_BYTES = 512 * 1024


def _map_kernel(*refs, block_size: int, seq_len: int, num_blocks: int,
                width: int, log_threshold: float, inv_scale: float,
                sparse: bool, mass: bool = False):
  if sparse:
    idx_ref, cnt_ref, q_ref, k_ref, lse_ref, o_ref = refs
  else:
    q_ref, k_ref, lse_ref, o_ref = refs
  bs = block_size
  g, i, t = (pl.program_id(a) for a in range(3))

  if sparse:
    row = g * num_blocks + i
    count = cnt_ref[row]
    slot = jnp.maximum(jnp.minimum(t, count - 1), 0)
    j = idx_ref[row * width + slot]
    active = t < count
  else:
    j = t
    active = True

  @pl.when(t == 0)
  def _init():
    fill = jnp.nan if sparse else 0.0
    o_ref[...] = jnp.full(o_ref.shape, fill, jnp.float32)

  @pl.when(active)
  def _count():
    q = q_ref[...]                                               # [bs, D]
    k = k_ref[...]                                               # [bs, D]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)  # [bs, bs]
    row_ids = i * bs + jax.lax.broadcasted_iota(jnp.int32, (bs, 1), 0)
    lse = lse_ref[...]
    if mass:
      # p = exp(s / inv_scale - lse); padded and empty (lse = -inf) rows: none.
      offset = jnp.where((row_ids < seq_len) & (lse > -jnp.inf), lse, jnp.inf)
      x = jnp.exp(s * (1.0 / inv_scale) - offset)
    else:
      bound = jnp.where(row_ids < seq_len, (lse + log_threshold) * inv_scale, -jnp.inf)
      x = (s < bound).astype(jnp.float32)
    if seq_len % bs:
      col_ids = j * bs + jax.lax.broadcasted_iota(jnp.int32, (1, bs), 1)
      x = jnp.where(col_ids < seq_len, x, 0.0)
    c = jnp.sum(x, axis=0, keepdims=True)                          # [1, bs]
    c = jnp.sum(c, axis=1, keepdims=True)                          # [1, 1]
    rows_valid = jnp.clip(seq_len - i * bs, 0, bs)
    cols_valid = jnp.clip(seq_len - j * bs, 0, bs)
    denom = jnp.full((1, 1), rows_valid if mass else rows_valid * cols_valid, jnp.int32)
    val = c / denom.astype(jnp.float32)
    cols = jax.lax.broadcasted_iota(jnp.int32, o_ref.shape, 1)      # [1, n]
    o_ref[...] = jnp.where(cols == j, val, o_ref[...])


def _map_call(qt, kt, lse3, indices, counts, *, block_size, seq_len,
              log_threshold, inv_scale, interpret, mass=False):
  """One pallas_call over G flattened (batch, head) pairs.

  qt, kt [G, Sp, D]; lse3 [G, Sp, 1]; indices [G * n * w] and counts [G * n]
  (flat, scalar-prefetched) or both None (dense). Returns [G, n, 1, n].
  """
  g_, sp, d_ = qt.shape
  bs = block_size
  n = sp // bs
  sparse = indices is not None
  if sparse:
    w = indices.shape[0] // (g_ * n)

    def k_map(g, i, t, idx_ref, cnt_ref):
      row = g * n + i
      slot = jnp.maximum(jnp.minimum(t, cnt_ref[row] - 1), 0)
      return g, idx_ref[row * w + slot], 0

    prefetch = (indices, counts)
  else:
    w = n

    def k_map(g, i, t):
      return g, t, 0

    prefetch = ()

  def fixed(g, i, t, *_):
    # q / lse / out: the same block for every slot t (the row stays resident).
    return g, i, 0

  kernel = functools.partial(
      _map_kernel, block_size=bs, seq_len=seq_len, num_blocks=n, width=w,
      log_threshold=log_threshold, inv_scale=inv_scale, sparse=sparse, mass=mass)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=(g_, n, w),
          in_specs=[
              pl.BlockSpec((None, bs, d_), fixed),
              pl.BlockSpec((None, bs, d_), k_map),
              pl.BlockSpec((None, bs, 1), fixed),
          ],
          out_specs=pl.BlockSpec((None, None, 1, n),
                                 lambda g, i, t, *_: (g, i, 0, 0)),
      ),
      out_shape=jax.ShapeDtypeStruct((g_, n, 1, n), jnp.float32),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="mod_sparsity_map_tpu",
  )(*prefetch, qt, kt, lse3)


def _heads_per_call(num_pairs: int, n: int, w: int, budget: int) -> int:
  """Largest divisor g of num_pairs whose table (4 * g * n * (w + 1) bytes) fits."""
  per_pair = 4 * n * (w + 1)
  best = 1
  for g in range(1, num_pairs + 1):
    if num_pairs % g == 0 and g * per_pair <= budget:
      best = g
  return best


def _resolve_interpret(interpret):
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret


def block_mass_from_lse(q: jax.Array, k: jax.Array, lse: jax.Array,
                        table: Any = None, *, block_size: int,
                        sm_scale: Optional[float] = None,
                        interpret: Any = False) -> jax.Array:
  """Block mass map M float32 [B, H, n, n] (Pallas Mosaic TPU kernel): M[i, j] =
  sum of exp(sm_scale q.k - lse) over block (i, j) / valid rows of query block i.
  Args as `sparsity_map_from_lse` without the threshold; NaN off the table."""
  return _map_from_lse(q, k, lse, table, block_size=block_size, threshold=0.5,
                       sm_scale=sm_scale, interpret=interpret, mass=True)


def sparsity_map_from_lse(q: jax.Array, k: jax.Array, lse: jax.Array,
                          table: Any = None, *, block_size: int,
                          threshold: float, sm_scale: Optional[float] = None,
                          interpret: Any = False) -> jax.Array:
  """Sparsity map S float32 [B, H, n, n] (Pallas Mosaic TPU kernel).

  Args:
    q, k: [B, S, H, D] (bfloat16 for the MXU; float32 works).
    lse: float32 [B, H, S], natural-log row log-sum-exp of sm_scale * q k^T
      over the (masked) row.
    table: None (dense) or a block table (`.indices` int32 [B, H, n, w],
      `.counts` int32 [B, H, n]); only active blocks are measured, the
      others are NaN. The table is scalar-prefetched into SMEM
      (4 * n * (w + 1) bytes per (batch, head); split over several calls past
      SMEM_TABLE_BUDGET_BYTES).
    block_size: b, a multiple of 8 (64 or 128; 128 fills the MXU).
    threshold: static probability threshold.
    sm_scale: softmax scale, default 1/sqrt(D).
    interpret: False, True (TPU interpret mode, `pltpu.InterpretParams()`,
      runs on CPU) or a `pltpu.InterpretParams`.
  Returns:
    float32 [B, H, n, n].
  """
  return _map_from_lse(q, k, lse, table, block_size=block_size, threshold=threshold,
                       sm_scale=sm_scale, interpret=interpret, mass=False)


@functools.partial(
    jax.jit, static_argnames=("block_size", "threshold", "sm_scale", "interpret", "mass"))
def _map_from_lse(q, k, lse, table, *, block_size, threshold, sm_scale, interpret, mass):
  b_, s_, h_, d_, n = check_map_args(q, k, lse, table, block_size=block_size,
                                     threshold=threshold)
  bs = block_size
  if bs % 8:
    raise ValueError(f"block_size must be a multiple of 8 for the TPU map "
                     f"kernel (64 or 128 in practice), got {bs}")
  if q.dtype != k.dtype:
    raise ValueError(f"q and k must have the same dtype, got {q.dtype}, {k.dtype}")
  scale = resolve_sm_scale(sm_scale, d_)
  if scale <= 0:
    raise ValueError(f"sm_scale must be positive, got {scale}")

  sp = n * bs
  gtot = b_ * h_
  pads = ((0, 0), (0, sp - s_), (0, 0), (0, 0))
  # [B*H, Sp, D]: a tile is (b, D) with the full head dim on lanes.
  qt = jnp.pad(q, pads).transpose(0, 2, 1, 3).reshape(gtot, sp, d_)
  kt = jnp.pad(k, pads).transpose(0, 2, 1, 3).reshape(gtot, sp, d_)
  lse3 = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, sp - s_)))
  lse3 = lse3.reshape(gtot, sp, 1)
  call = functools.partial(
      _map_call, block_size=bs, seq_len=s_, log_threshold=math.log(threshold),
      inv_scale=1.0 / scale, interpret=_resolve_interpret(interpret), mass=mass)

  if table is None:
    out = call(qt, kt, lse3, None, None)
  else:
    w = table.indices.shape[-1]
    indices = jnp.broadcast_to(jnp.asarray(table.indices, jnp.int32),
                               (b_, h_, n, w)).reshape(gtot, n * w)
    counts = jnp.broadcast_to(jnp.asarray(table.counts, jnp.int32),
                              (b_, h_, n)).reshape(gtot, n)
    g = _heads_per_call(gtot, n, w, SMEM_TABLE_BUDGET_BYTES)
    if g == gtot:
      out = call(qt, kt, lse3, indices.reshape(-1), counts.reshape(-1))
    else:
      # The whole table would not fit in SMEM: one pallas_call per group of
      # g (batch, head) pairs, each prefetching only its own rows.
      c = gtot // g
      split = lambda x: x.reshape(c, g, *x.shape[1:])
      out = jax.lax.map(
          lambda a: call(a[0], a[1], a[2], a[3].reshape(-1), a[4].reshape(-1)),
          (split(qt), split(kt), split(lse3), split(indices), split(counts)))
  return out.reshape(b_, h_, n, n)

"""Sparsity map from a given row log-sum-exp: Pallas Mosaic TPU kernel.

Splash-attention style: the grid is (B, H, query block i, table slot t). With
a block table, its indices and counts are scalar-prefetched into SMEM and drive
the K BlockSpec's index_map, so the pipeline DMAs exactly the active key
blocks; slots past a row's count clamp to its last valid entry (no new DMA,
no compute). Without a table the last grid axis walks all n key blocks.

Each step computes one [b, b] score tile in float32 on the MXU, compares it
with the per-row bound (lse + log(threshold)) / sm_scale (the log domain, no
exp), reduces it to one count and writes it into its column of the output row,
which stays resident in VMEM across the (arbitrary) slot axis: initialised to
NaN (sparse) or 0 (dense) at t == 0, updated by a one-hot select.

Layouts: q, k are transposed to [B, H, S, D] so a tile is (b, D) (lane dim =
D, the full head dim); lse is passed as [B, H, S, 1] so the bound is a column
vector; the output is [B, H, n, 1, n] (a (1, n) row per step, full dims).
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

__all__ = ["sparsity_map_from_lse"]


def _map_kernel(*refs, block_size: int, seq_len: int, num_blocks: int,
                num_heads: int, width: int, log_threshold: float,
                inv_scale: float, sparse: bool):
  if sparse:
    idx_ref, cnt_ref, q_ref, k_ref, lse_ref, o_ref = refs
  else:
    q_ref, k_ref, lse_ref, o_ref = refs
  bs = block_size
  b, h, i, t = (pl.program_id(a) for a in range(4))

  if sparse:
    row = (b * num_heads + h) * num_blocks + i
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
    bound = jnp.where(row_ids < seq_len,
                      (lse_ref[...] + log_threshold) * inv_scale, -jnp.inf)
    below = s < bound
    if seq_len % bs:
      col_ids = j * bs + jax.lax.broadcasted_iota(jnp.int32, (1, bs), 1)
      below = jnp.logical_and(below, col_ids < seq_len)
    c = jnp.sum(below.astype(jnp.float32), axis=0, keepdims=True)   # [1, bs]
    c = jnp.sum(c, axis=1, keepdims=True)                          # [1, 1]
    rows_valid = jnp.clip(seq_len - i * bs, 0, bs)
    cols_valid = jnp.clip(seq_len - j * bs, 0, bs)
    denom = jnp.full((1, 1), rows_valid * cols_valid, jnp.int32)
    val = c / denom.astype(jnp.float32)
    cols = jax.lax.broadcasted_iota(jnp.int32, o_ref.shape, 1)      # [1, n]
    o_ref[...] = jnp.where(cols == j, val, o_ref[...])


def _resolve_interpret(interpret):
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret


@functools.partial(
    jax.jit, static_argnames=("block_size", "threshold", "sm_scale", "interpret"))
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
      others are NaN. The table is scalar-prefetched (SMEM: 4 * B*H*n*(w+1)
      bytes).
    block_size: b, a multiple of 8 (64 or 128; 128 fills the MXU).
    threshold: static probability threshold.
    sm_scale: softmax scale, default 1/sqrt(D).
    interpret: False, True (TPU interpret mode, `pltpu.InterpretParams()`,
      runs on CPU) or a `pltpu.InterpretParams`.
  Returns:
    float32 [B, H, n, n].
  """
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
  pads = ((0, 0), (0, sp - s_), (0, 0), (0, 0))
  qt = jnp.pad(q, pads).transpose(0, 2, 1, 3)                     # [B,H,Sp,D]
  kt = jnp.pad(k, pads).transpose(0, 2, 1, 3)
  lse4 = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, sp - s_)))
  lse4 = lse4[..., None]                                           # [B,H,Sp,1]

  sparse = table is not None
  if sparse:
    w = table.indices.shape[-1]
    indices = jnp.broadcast_to(jnp.asarray(table.indices, jnp.int32),
                               (b_, h_, n, w)).reshape(-1)
    counts = jnp.broadcast_to(jnp.asarray(table.counts, jnp.int32),
                              (b_, h_, n)).reshape(-1)
    num_prefetch = 2

    def k_map(b, h, i, t, idx_ref, cnt_ref):
      row = (b * h_ + h) * n + i
      slot = jnp.maximum(jnp.minimum(t, cnt_ref[row] - 1), 0)
      return b, h, idx_ref[row * w + slot], 0

    prefetch = (indices, counts)
  else:
    w = n
    num_prefetch = 0

    def k_map(b, h, i, t):
      return b, h, t, 0

    prefetch = ()

  def fixed(f):
    # index maps for q / lse / out: ignore the slot and the prefetch refs.
    return lambda b, h, i, t, *_: f(b, h, i)

  in_specs = [
      pl.BlockSpec((None, None, bs, d_), fixed(lambda b, h, i: (b, h, i, 0))),
      pl.BlockSpec((None, None, bs, d_), k_map),
      pl.BlockSpec((None, None, bs, 1), fixed(lambda b, h, i: (b, h, i, 0))),
  ]
  out_spec = pl.BlockSpec((None, None, None, 1, n),
                          fixed(lambda b, h, i: (b, h, i, 0, 0)))
  kernel = functools.partial(
      _map_kernel, block_size=bs, seq_len=s_, num_blocks=n, num_heads=h_,
      width=w, log_threshold=math.log(threshold), inv_scale=1.0 / scale,
      sparse=sparse)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=num_prefetch,
          grid=(b_, h_, n, w),
          in_specs=in_specs,
          out_specs=out_spec,
      ),
      out_shape=jax.ShapeDtypeStruct((b_, h_, n, 1, n), jnp.float32),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_resolve_interpret(interpret),
      name="mod_sparsity_map_tpu",
  )(*prefetch, qt, kt, lse4)
  return out.reshape(b_, h_, n, n)

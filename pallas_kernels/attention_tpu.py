"""Block-sparse flash attention, Pallas Mosaic TPU (splash-attention style).

The compacted table and the row counts are scalar-prefetched
(`pltpu.PrefetchScalarGridSpec`) and drive the K/V `index_map`: grid step
(head, i, j) reads key block indices[head, i, j]. Steps past the row's count
compute nothing, and since the table pads each row by repeating its last valid
id, the pipeline sees an unchanged block index and issues no new DMA. The
online-softmax state lives in VMEM scratch across the (arbitrary) j axis.

The prefetched table lives in SMEM, which is small, so the heads are processed
in groups sized to keep one call's table under `TpuConfig.smem_table_entries`.
Only block n-1 can hold keys past the sequence end; it gets a masked step, all
other blocks run unmasked.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import numpy as np

from pallas_kernels.block_table import BlockTable, table_or_dense

__all__ = ["TpuConfig", "block_sparse_attention_fwd", "block_sparse_lse"]

HEAD_DIMS = (64, 128)
_LANES = 128
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_NT = (((1,), (1,)), ((), ()))      # contract the last dims: q @ k^T
_NN = (((1,), (0,)), ((), ()))      # p @ v


@dataclasses.dataclass(frozen=True)
class TpuConfig:
  """smem_table_entries: int32 table entries one pallas_call may prefetch."""

  smem_table_entries: int = 1 << 16


DEFAULT_CONFIG = TpuConfig()


def _kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, *refs, seq_len: int,
            block_size: int, num_blocks: int, width: int, sm_scale: float,
            with_out: bool):
  if with_out:
    o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
  else:
    lse_ref, m_scr, l_scr = refs
    o_ref = acc_scr = None
  g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  row = g * num_blocks + i
  count = cnt_ref[row]
  blk = idx_ref[row * width + j]
  bq = q_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, _MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    if with_out:
      acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def step(masked: bool):
    q = q_ref[...]
    k = k_ref[...]
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * sm_scale
    if masked:
      col = blk * block_size + lax.broadcasted_iota(jnp.int32, s.shape, 1)
      s = jnp.where(col < seq_len, s, _MASK_VALUE)
    m_prev = m_scr[:, 0:1]
    l_prev = l_scr[:, 0:1]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next)
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = jnp.broadcast_to(m_next, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l_next, l_scr.shape)
    if with_out:
      v = v_ref[...]
      pv = lax.dot_general(p.astype(v.dtype), v, _NN,
                           preferred_element_type=jnp.float32)
      acc_scr[...] = alpha * acc_scr[...] + pv

  run = j < count
  if seq_len % block_size:
    is_tail = blk == num_blocks - 1
    pl.when(jnp.logical_and(run, jnp.logical_not(is_tail)))(lambda: step(False))
    pl.when(jnp.logical_and(run, is_tail))(lambda: step(True))
  else:
    pl.when(run)(lambda: step(False))

  @pl.when(j == width - 1)
  def _finish():
    l = l_scr[:, 0:1]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    lse_col = jnp.where(empty, -jnp.inf, m_scr[:, 0:1] + jnp.log(l_safe))   # [bq, 1]
    # Column -> row without a transpose: pick the diagonal of a broadcast.
    eye = (lax.broadcasted_iota(jnp.int32, (bq, bq), 0)
           == lax.broadcasted_iota(jnp.int32, (bq, bq), 1))
    lse_ref[...] = jnp.sum(jnp.where(eye, lse_col, 0.0), axis=0, keepdims=True)
    if with_out:
      o_ref[...] = (acc_scr[...] / l_safe).astype(o_ref.dtype)


def _call_group(idx, cnt, q, k, v, *, seq_len, block_size, sm_scale, with_out,
                interpret):
  """One pallas_call over a group of g heads: q/k/v [g, S_pad, D]."""
  g, s_pad, d = q.shape
  n = s_pad // block_size
  w = idx.shape[-1]
  idx_flat = idx.reshape(-1)
  cnt_flat = cnt.reshape(-1)

  def q_map(gi, i, j, idx_ref, cnt_ref):
    return gi, i, 0

  def kv_map(gi, i, j, idx_ref, cnt_ref):
    return gi, idx_ref[(gi * n + i) * w + j], 0

  def lse_map(gi, i, j, idx_ref, cnt_ref):
    return gi, i, 0, 0

  in_specs = [
      pl.BlockSpec((None, block_size, d), q_map),
      pl.BlockSpec((None, block_size, d), kv_map),
      pl.BlockSpec((None, block_size, d), kv_map) if with_out else None,
  ]
  lse_shape = jax.ShapeDtypeStruct((g, n, 1, block_size), jnp.float32)
  lse_spec = pl.BlockSpec((None, None, 1, block_size), lse_map)
  scratch = [pltpu.VMEM((block_size, _LANES), jnp.float32),
             pltpu.VMEM((block_size, _LANES), jnp.float32)]
  if with_out:
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), lse_shape]
    out_specs = [pl.BlockSpec((None, block_size, d), q_map), lse_spec]
    scratch.append(pltpu.VMEM((block_size, d), jnp.float32))
  else:
    out_shape = [lse_shape]
    out_specs = [lse_spec]

  kernel = functools.partial(
      _kernel, seq_len=seq_len, block_size=block_size, num_blocks=n, width=w,
      sm_scale=sm_scale, with_out=with_out)
  if interpret is True:
    interpret = pltpu.InterpretParams()
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(g, n, w),
          in_specs=in_specs,
          out_specs=out_specs,
          scratch_shapes=scratch,
      ),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_attention_fwd_tpu" if with_out else "block_sparse_lse_tpu",
  )(idx_flat, cnt_flat, q, k, v)
  if with_out:
    out, lse = outs
  else:
    out, (lse,) = None, outs
  return out, lse.reshape(g, n * block_size)


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "sm_scale", "with_out", "config", "interpret"))
def _fwd(q, k, v, indices, counts, *, block_size, sm_scale, with_out, config,
         interpret):
  b, s, h, d = q.shape
  n = -(-s // block_size)
  s_pad = n * block_size
  w = indices.shape[-1]
  bh = b * h
  indices = jnp.broadcast_to(indices, (b, h, n, w)).reshape(bh, n, w)
  counts = jnp.broadcast_to(counts, (b, h, n)).reshape(bh, n)

  def heads_major(x):      # [B, S, H, D] -> [B*H, S_pad, D]
    x = jnp.pad(x, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3).reshape(bh, s_pad, d)

  qh, kh = heads_major(q), heads_major(k)
  vh = heads_major(v) if with_out else None

  g = max(1, min(bh, config.smem_table_entries // (n * (w + 1))))
  num_groups = -(-bh // g)
  pad = num_groups * g - bh
  call = functools.partial(_call_group, seq_len=s, block_size=block_size,
                           sm_scale=sm_scale, with_out=with_out,
                           interpret=interpret)
  if num_groups == 1:
    out, lse = call(indices, counts, qh, kh, vh)
  else:
    def grouped(x):
      x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
      return x.reshape(num_groups, g, *x.shape[1:])
    xs = (grouped(indices), grouped(counts), grouped(qh), grouped(kh),
          grouped(vh) if with_out else None)
    out, lse = lax.map(lambda a: call(*a), xs)
    out = None if out is None else out.reshape(num_groups * g, s_pad, d)[:bh]
    lse = lse.reshape(num_groups * g, s_pad)[:bh]
  lse = lse.reshape(b, h, s_pad)[..., :s]
  if not with_out:
    return None, lse
  out = out.reshape(b, h, s_pad, d).transpose(0, 2, 1, 3)[:, :s]
  return out, lse


def _check(q):
  d = q.shape[-1]
  if d not in HEAD_DIMS:
    raise ValueError(f"tpu backend: head_dim must be one of {HEAD_DIMS}, got {d}")


def block_sparse_attention_fwd(q, k, v, table: Optional[BlockTable], *, block_size: int,
                               sm_scale: Optional[float] = None,
                               interpret: bool = False,
                               config: TpuConfig = DEFAULT_CONFIG):
  """Returns (out [B, S, H, D] in q.dtype, lse float32 [B, H, S])."""
  _check(q)
  scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  table = table_or_dense(table, q.shape[1], block_size)
  return _fwd(q, k, v, table.indices, table.counts, block_size=block_size,
              sm_scale=scale, with_out=True, config=config, interpret=interpret)


def block_sparse_lse(q, k, table: Optional[BlockTable], *, block_size: int,
                     sm_scale: Optional[float] = None, interpret: bool = False,
                     config: TpuConfig = DEFAULT_CONFIG):
  """Row log-sum-exp only (no V, no P @ V): float32 [B, H, S]."""
  _check(q)
  scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  table = table_or_dense(table, q.shape[1], block_size)
  return _fwd(q, k, None, table.indices, table.counts, block_size=block_size,
              sm_scale=scale, with_out=False, config=config, interpret=interpret)[1]

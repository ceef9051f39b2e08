"""Block-sparse attention in plain XLA: gather the active K/V blocks per row.

Runs on every device (CPU, GPU, TPU) and accepts any head_dim. For each query
block it gathers the key/value blocks listed in the table, a chunk of table
slots at a time, and merges the chunks with an online softmax so memory stays
bounded. Work is proportional to the table width w (XLA cannot skip per row),
so this is the portable fallback and the test oracle, not the fast path.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.block_table import BlockTable, table_or_dense

__all__ = ["block_sparse_attention_fwd", "block_sparse_lse"]

# Upper bound on the float32 logits materialised per chunk (elements).
_CHUNK_ELEMENTS = 1 << 25


def _to_blocks(x, n, block_size):
  """[B, S, H, D] -> [B, H, n, block, D] (zero-padded to n * block)."""
  b, s, h, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, n * block_size - s), (0, 0), (0, 0)))
  return x.reshape(b, n, block_size, h, d).transpose(0, 3, 1, 2, 4)


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "with_out"))
def _fwd(q, k, v, indices, counts, *, block_size, sm_scale, with_out):
  b, s, h, d = q.shape
  n = -(-s // block_size)
  w = indices.shape[-1]
  indices = jnp.broadcast_to(indices, (b, h, n, w))
  counts = jnp.broadcast_to(counts, (b, h, n))
  precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

  qb = _to_blocks(q, n, block_size)
  kb = _to_blocks(k, n, block_size)
  vb = _to_blocks(v, n, block_size) if with_out else None

  per_slot = b * h * n * block_size * block_size
  c = max(1, min(w, _CHUNK_ELEMENTS // max(per_slot, 1)))
  num_chunks = -(-w // c)
  idx = jnp.pad(indices, ((0, 0), (0, 0), (0, 0), (0, num_chunks * c - w)))
  idx = idx.reshape(b, h, n, num_chunks, c).transpose(3, 0, 1, 2, 4)  # [C, B, H, n, c]
  token = jnp.arange(block_size)

  def step(carry, xs):
    m_prev, l_prev, acc = carry
    j0, idx_c = xs                                            # idx_c [B, H, n, c]
    flat = idx_c.reshape(b, h, n * c, 1, 1)
    kg = jnp.take_along_axis(kb, flat, axis=2).reshape(b, h, n, c * block_size, d)
    logits = jnp.einsum("bhiqd,bhikd->bhiqk", qb, kg, precision=precision,
                        preferred_element_type=jnp.float32) * sm_scale
    slot_ok = (j0 + jnp.arange(c)) < counts[..., None]           # [B, H, n, c]
    key_ok = idx_c[..., None] * block_size + token < s           # [B, H, n, c, bk]
    ok = (slot_ok[..., None] & key_ok).reshape(b, h, n, 1, c * block_size)
    logits = jnp.where(ok, logits, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(logits - m_safe[..., None])
    l_new = alpha * l_prev + jnp.sum(p, axis=-1)
    if with_out:
      vg = jnp.take_along_axis(vb, flat, axis=2).reshape(b, h, n, c * block_size, d)
      pv_dtype = jnp.float32 if v.dtype == jnp.float32 else v.dtype
      pv = jnp.einsum("bhiqk,bhikd->bhiqd", p.astype(pv_dtype), vg,
                      precision=precision, preferred_element_type=jnp.float32)
      acc = alpha[..., None] * acc + pv
    return (m_new, l_new, acc), None

  m0 = jnp.full((b, h, n, block_size), -jnp.inf, jnp.float32)
  l0 = jnp.zeros((b, h, n, block_size), jnp.float32)
  acc0 = jnp.zeros((b, h, n, block_size, d) if with_out else (), jnp.float32)
  starts = jnp.arange(num_chunks, dtype=jnp.int32) * c
  (m, l, acc), _ = jax.lax.scan(step, (m0, l0, acc0), (starts, idx))

  lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + m, -jnp.inf)
  lse = lse.reshape(b, h, n * block_size)[..., :s]
  if not with_out:
    return None, lse
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]
  out = out.transpose(0, 2, 3, 1, 4).reshape(b, n * block_size, h, d)[:, :s]
  return out.astype(q.dtype), lse


def block_sparse_attention_fwd(q, k, v, table: Optional[BlockTable], *, block_size: int,
                               sm_scale: Optional[float] = None,
                               interpret: bool = False):
  """Returns (out [B, S, H, D] in q.dtype, lse float32 [B, H, S])."""
  del interpret  # plain XLA
  scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  table = table_or_dense(table, q.shape[1], block_size)
  return _fwd(q, k, v, table.indices, table.counts, block_size=block_size,
              sm_scale=scale, with_out=True)


def block_sparse_lse(q, k, table: Optional[BlockTable], *, block_size: int,
                     sm_scale: Optional[float] = None, interpret: bool = False):
  """Row log-sum-exp only (no P @ V): float32 [B, H, S]."""
  del interpret
  scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  table = table_or_dense(table, q.shape[1], block_size)
  return _fwd(q, k, k, table.indices, table.counts, block_size=block_size,
              sm_scale=scale, with_out=False)[1]

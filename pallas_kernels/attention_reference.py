"""Dense masked attention in float32: the oracle for the block-sparse kernels.

Materialises the [S, S] logits (per query chunk), so it is for tests and for
checking benchmark outputs, not for speed.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from pallas_kernels.block_table import BlockTable, block_mask_from_table

__all__ = ["block_sparse_attention_reference", "block_sparse_attention_fwd"]


def _expand_mask(block_mask, batch, heads, n):
  if block_mask is None:
    return jnp.ones((batch, heads, n, n), jnp.bool_)
  if isinstance(block_mask, BlockTable):
    block_mask = block_mask_from_table(block_mask, n)
  return jnp.broadcast_to(block_mask, (batch, heads, n, n))


@functools.partial(jax.jit,
                   static_argnames=("block_size", "sm_scale", "return_lse", "query_chunk",
                                    "p_round"))
def block_sparse_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_mask: Union[jax.Array, BlockTable, None],
    *,
    block_size: int = 128,
    sm_scale: Optional[float] = None,
    return_lse: bool = False,
    query_chunk: Optional[int] = None,
    p_round: Optional[Callable] = None,
):
  """Block-masked softmax attention computed in float32 (HIGHEST precision).

  Args:
    q, k, v: [B, S, H, D], any float dtype (upcast to float32).
    block_mask: bool [B, H, n, n] (broadcastable leading dims), a BlockTable,
      or None (dense); n = ceil(S / block_size).
    block_size: tokens per block.
    sm_scale: softmax scale, default 1/sqrt(D).
    return_lse: also return the row log-sum-exp.
    query_chunk: process this many query tokens at a time (a multiple of
      block_size) to bound memory; None does all at once.
    p_round: optional static function applied to the probabilities
      exp(s - max) before the P V product (the row sum stays exact): the
      quantized reference's model of the kernels' P rounding.
  Returns:
    out float32 [B, S, H, D] (zeros for rows with no active key), and with
    return_lse the natural-log lse float32 [B, H, S] (-inf for empty rows).
  """
  b, s, h, d = q.shape
  n = -(-s // block_size)
  scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
  mask = _expand_mask(block_mask, b, h, n)
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  key_block = jnp.arange(s) // block_size                      # [S]

  def one_chunk(q_start, q_len):
    qc = jax.lax.dynamic_slice_in_dim(q32, q_start, q_len, axis=1)
    q_block = (q_start + jnp.arange(q_len)) // block_size       # [Sc]
    rows = jnp.take(mask, q_block, axis=2, mode="clip")         # [B, H, Sc, n]
    allowed = jnp.take(rows, key_block, axis=3)                 # [B, H, Sc, S]
    logits = jnp.einsum("bqhd,bkhd->bhqk", qc, k32,
                        precision=jax.lax.Precision.HIGHEST) * scale
    logits = jnp.where(allowed, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    pv = p if p_round is None else p_round(p)
    out = jnp.einsum("bhqk,bkhd->bqhd", pv / jnp.where(l > 0, l, 1.0), v32,
                     precision=jax.lax.Precision.HIGHEST)
    lse = jnp.where(l[..., 0] > 0, jnp.log(l[..., 0]) + m_safe[..., 0], -jnp.inf)
    return out, lse

  if query_chunk is None or query_chunk >= s:
    out, lse = one_chunk(0, s)
  else:
    if query_chunk % block_size:
      raise ValueError(
          f"query_chunk must be a multiple of block_size={block_size}, got {query_chunk}")
    num = -(-s // query_chunk)
    pad = num * query_chunk - s
    q32 = jnp.pad(q32, ((0, 0), (0, pad), (0, 0), (0, 0)))
    outs, lses = jax.lax.map(lambda c: one_chunk(c * query_chunk, query_chunk),
                             jnp.arange(num))
    out = jnp.moveaxis(outs, 0, 1).reshape(b, num * query_chunk, h, d)[:, :s]
    lse = jnp.moveaxis(lses, 0, 2).reshape(b, h, num * query_chunk)[..., :s]
  return (out, lse) if return_lse else out


def block_sparse_attention_fwd(q, k, v, table: Optional[BlockTable], *,
                               block_size: int, sm_scale: float,
                               interpret: bool = False):
  """Backend entry point: (out in q.dtype, lse float32 [B, H, S])."""
  del interpret
  out, lse = block_sparse_attention_reference(
      q, k, v, table, block_size=block_size, sm_scale=sm_scale, return_lse=True)
  return out.astype(q.dtype), lse


def block_sparse_lse(q, k, table: Optional[BlockTable], *, block_size: int,
                     sm_scale: float, interpret: bool = False):
  """Backend entry point for the map pass: lse float32 [B, H, S] only."""
  return block_sparse_attention_fwd(q, k, k, table, block_size=block_size,
                                    sm_scale=sm_scale, interpret=interpret)[1]


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale"))
def mask_recall(q, k, block_mask, *, block_size: int = 128,
                sm_scale: Optional[float] = None) -> jax.Array:
  """Share of the dense softmax mass that falls inside `block_mask`, float32 [B, H].

  The diagnostic of a mask's quality: for every valid query row the dense
  probabilities p = softmax(sm_scale q k^T) over all valid keys, summed over the
  key blocks the mask keeps, averaged over rows. 1.0 for a full mask. Computed
  one query block at a time (memory [B, H, block_size, S]).
  """
  b, s, h, d = q.shape
  n = -(-s // block_size)
  scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  mask = _expand_mask(block_mask, b, h, n)
  pad = n * block_size - s
  qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
  kf = k.astype(jnp.float32)
  key_block = jnp.arange(s) // block_size

  def one_block(i):
    qi = jax.lax.dynamic_slice_in_dim(qf, i * block_size, block_size, axis=1)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qi, kf, precision="highest") * scale
    p = jax.nn.softmax(logits, axis=-1)                       # [B, H, bq, S]
    kept = jnp.take(mask[:, :, i, :], key_block, axis=-1)     # [B, H, S]
    inside = jnp.sum(p * kept[:, :, None, :], axis=-1)        # [B, H, bq]
    valid = (i * block_size + jnp.arange(block_size)) < s
    return jnp.sum(jnp.where(valid, inside, 0.0), axis=-1)    # [B, H]

  return jnp.sum(jax.lax.map(one_block, jnp.arange(n)), axis=0) / s

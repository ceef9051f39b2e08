"""Block-sparse flash attention, Pallas GPU through the Triton lowering.

One program per (query block, batch, head); the query block is the fastest grid
axis so consecutive programs read the same head's K/V (L2 reuse). Each program
keeps its [block_q, D] query tile in registers and runs a `lax.fori_loop` over
`counts[b, h, i]` active key blocks only, reading the key-block id from the
compacted table, in `block_k`-wide tiles (block_q = block_size, block_k 64 by
default) with an online softmax in base 2 (log2(e) folded into the scale) and
float32 accumulation.

Keys past the sequence end can only live in the last key block, and the table
is sorted, so that block is always the row's last entry: the main loop runs
unmasked and, when the sequence has a ragged tail, one peeled masked step
handles block n-1. Inputs are not padded: the tail query/key rows are read with
masked loads and the tail output rows written with a masked store.

The Triton lowering is deprecated from JAX 0.11 (still works there); this file
is self-contained so a Mosaic GPU backend can replace it.
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
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_table import BlockTable, table_or_dense

__all__ = ["TritonConfig", "block_sparse_attention_fwd", "block_sparse_lse"]

HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_MAX_I32_ELEMENTS = 2**31 - 1
# Finite "minus infinity" for masked logits (also after scaling by up to
# ~1e8): exp2 of it is 0 and there is no inf - inf.
_MASK_VALUE = -1e30


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Tiling and launch parameters; None picks the per-head_dim default.

  Defaults follow the tuned FlexAttention forward configs for H100 bf16
  (torch inductor `h100_default_flex_config`): D=128 -> block_k 64, 8 warps,
  3 stages; D=64 -> block_k 128, 4 warps, 3 stages. block_k is capped at the
  mask block size.

  Attributes:
    block_k: key tile of the inner loop; divides the mask block size.
    num_warps: warps per program.
    num_stages: software-pipelining depth of the key loop.
  """

  block_k: Optional[int] = None
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None

  def resolve(self, block_size: int, head_dim: int) -> "TritonConfig":
    # Defaults from the H200 tiling sweep (benchmarks/results/kernel-nvidia-h200-
    # 2026-11-27.json): for D=128, key tile 64 with 4 warps and 2 stages won at
    # S=16384 and 32760, densities 1 and 0.25 (10-15% ahead of 8 warps/3 stages).
    small = head_dim <= 64
    block_k = self.block_k or min(block_size, 128 if small else 64)
    cfg = TritonConfig(block_k=block_k,
                       num_warps=self.num_warps or 4,
                       num_stages=self.num_stages or (3 if small else 2))
    cfg.validate(block_size)
    return cfg

  def validate(self, block_size: int) -> None:
    if self.block_k not in (16, 32, 64, 128) or block_size % self.block_k:
      raise ValueError(
          f"TritonConfig.block_k must be one of 16, 32, 64, 128 and divide "
          f"block_size={block_size}, got {self.block_k}")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(
          f"TritonConfig.num_warps must be a power of 2 in [1, 16], got {self.num_warps}")
    if self.num_stages < 1:
      raise ValueError(f"TritonConfig.num_stages must be >= 1, got {self.num_stages}")


DEFAULT_CONFIG = TritonConfig()


def _attention_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, *out_refs,
                      seq_len: int, block_size: int, block_k: int,
                      num_blocks: int, scale_log2: float, with_out: bool):
  """One (query block, batch, head) program. Refs (squeezed blocks):

  idx_ref [w] int32, cnt_ref [1] int32, q_ref [block_size, D],
  k_ref / v_ref [S, D] (whole sequence of this head; v_ref None when lse-only),
  out_refs: (o_ref [block_size, D], lse_ref [block_size]) or (lse_ref,).
  """
  if with_out:
    o_ref, lse_ref = out_refs
  else:
    (lse_ref,) = out_refs
  i = pl.program_id(0)
  fold_scale = scale_log2 > 0
  sub = block_size // block_k                 # key tiles per mask block
  head_dim = q_ref.shape[-1]
  q_tail = seq_len % block_size != 0          # last query block is ragged
  k_tail_len = seq_len - (num_blocks - 1) * block_size   # valid keys in block n-1
  has_tail = k_tail_len != block_size

  if q_tail:
    rows = i * block_size + jnp.arange(block_size)
    row_ok = (rows < seq_len)[:, None]
    q = plgpu.load(q_ref, mask=row_ok, other=0.0)
  else:
    q = q_ref[...]

  count = cnt_ref[0]

  def tile(start, carry, masked: bool):
    acc, m_prev, l_prev = carry
    if masked:
      key_ok = (start + jnp.arange(block_k)) < seq_len          # [block_k]
      k = plgpu.load(k_ref.at[pl.ds(start, block_k), :],
                     mask=key_ok[:, None], other=0.0)
    else:
      k = k_ref[pl.ds(start, block_k), :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)      # [bq, bk]
    if not fold_scale:
      s = s * scale_log2
    if masked:
      s = jnp.where(key_ok[None, :], s, _MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    if fold_scale:
      # m is kept in raw logit units (scale > 0 preserves the max): the scale
      # goes into one fused multiply-add per element, exp2(s * c - m * c).
      m_scaled = m_next * scale_log2
      alpha = jnp.exp2(m_prev * scale_log2 - m_scaled)
      p = jnp.exp2(s * scale_log2 - m_scaled[:, None])
    else:
      alpha = jnp.exp2(m_prev - m_next)
      p = jnp.exp2(s - m_next[:, None])
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    if with_out:
      if masked:
        v = plgpu.load(v_ref.at[pl.ds(start, block_k), :],
                       mask=key_ok[:, None], other=0.0)
      else:
        v = v_ref[pl.ds(start, block_k), :]
      pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)
      acc = alpha[:, None] * acc + pv
    return acc, m_next, l_next

  width = idx_ref.shape[0]

  def body(t, carry):
    # The key offset of this tile is carried from the previous iteration; the
    # next one is computed here, its table load issued before the tile's
    # math, so the load latency hides behind compute and the K/V loads of
    # the pipelined next iteration depend only on a loop-carried value (as
    # in FlexAttention's get_offset_for_next_block).
    start, acc, m, l = carry
    t1 = t + 1
    if sub == 1:
      nxt = idx_ref[jnp.minimum(t1, width - 1)] * block_size
    else:
      # t >= 0: lax.div/rem avoid jnp's sign-correcting floor division.
      jump = idx_ref[jnp.minimum(lax.div(t1, sub), width - 1)] * block_size
      nxt = jnp.where(lax.rem(t1, sub) == 0, jump, start + block_k)
    acc, m, l = tile(pl.multiple_of(start, block_k), (acc, m, l), masked=False)
    return nxt, acc, m, l

  acc = jnp.zeros((block_size, head_dim) if with_out else (), jnp.float32)
  m = jnp.full((block_size,), -jnp.inf, jnp.float32)
  l = jnp.zeros((block_size,), jnp.float32)

  if has_tail:
    last = idx_ref[jnp.maximum(count - 1, 0)]
    tail_active = jnp.logical_and(count > 0, last == num_blocks - 1)
    n_main = count - tail_active.astype(jnp.int32)
  else:
    n_main = count
  start0 = idx_ref[0] * block_size
  _, acc, m, l = lax.fori_loop(0, n_main * sub, body, (start0, acc, m, l))
  carry = (acc, m, l)

  if has_tail:
    n_tail_tiles = -(-k_tail_len // block_k)   # tiles holding valid keys

    def tail(carry):
      for j in range(n_tail_tiles):
        # `last` == n - 1 here; a traced start keeps the ragged slice legal.
        start = pl.multiple_of(last * block_size + j * block_k, block_k)
        carry = tile(start, carry, masked=True)
      return carry

    carry = lax.cond(tail_active, tail, lambda c: c, carry)

  acc, m, l = carry
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  m_log2 = m * scale_log2 if fold_scale else m
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m_log2 + jnp.log2(l_safe)) * _LN2)
  if with_out:
    out = (acc / l_safe[:, None]).astype(o_ref.dtype)
    if q_tail:
      plgpu.store(o_ref, out, mask=row_ok)
    else:
      o_ref[...] = out


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "sm_scale", "with_out", "config", "interpret"))
def _fwd(q, k, v, indices, counts, *, block_size: int, sm_scale: float,
         with_out: bool, config: TritonConfig, interpret: bool):
  b, s, h, d = q.shape
  n = -(-s // block_size)
  w = indices.shape[-1]
  config = config.resolve(block_size, d)
  if b > 1 and b * s * h * d >= _MAX_I32_ELEMENTS:
    # The Triton lowering addresses with int32 offsets: run one batch element
    # at a time rather than overflow.
    tb = indices.shape[0]
    per = lambda x: x[:, None]
    tab_i = jnp.broadcast_to(indices, (b, *indices.shape[1:])) if tb == 1 else indices
    tab_c = jnp.broadcast_to(counts, (b, *counts.shape[1:])) if tb == 1 else counts
    def one(args):
      qb, kb, vb, ib, cb = args
      return _fwd(qb, kb, vb, ib, cb, block_size=block_size, sm_scale=sm_scale,
                  with_out=with_out, config=config, interpret=interpret)
    out, lse = lax.map(one, (per(q), per(k), None if v is None else per(v),
                             per(tab_i), per(tab_c)))
    return (None if out is None else out[:, 0]), lse[:, 0]
  # A table with leading dims of 1 is shared, not materialised per (b, h).
  tb, th = indices.shape[0], indices.shape[1]
  if tb not in (1, b) or th not in (1, h) or counts.shape != indices.shape[:-1]:
    raise ValueError(f"table of shape {indices.shape} does not broadcast to "
                     f"[{b}, {h}, {n}, w]")
  counts = counts.reshape(tb, th, n, 1)
  tmap = lambda bi, hi: (bi if tb > 1 else 0, hi if th > 1 else 0)

  kernel = functools.partial(
      _attention_kernel, seq_len=s, block_size=block_size,
      block_k=config.block_k, num_blocks=n,
      scale_log2=float(sm_scale) * _LOG2E, with_out=with_out)

  grid = (n, b, h)
  in_specs = [
      pl.BlockSpec((None, None, None, w), lambda i, bi, hi: (*tmap(bi, hi), i, 0)),
      pl.BlockSpec((None, None, None, 1), lambda i, bi, hi: (*tmap(bi, hi), i, 0)),
      pl.BlockSpec((None, block_size, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
      pl.BlockSpec((None, s, None, d), lambda i, bi, hi: (bi, 0, hi, 0)),
      pl.BlockSpec((None, s, None, d), lambda i, bi, hi: (bi, 0, hi, 0)),
  ]
  lse_shape = jax.ShapeDtypeStruct((b, h, n * block_size), jnp.float32)
  lse_spec = pl.BlockSpec((None, None, block_size), lambda i, bi, hi: (bi, hi, i))
  if with_out:
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), lse_shape]
    out_specs = [
        pl.BlockSpec((None, block_size, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        lse_spec,
    ]
    operands = (indices, counts, q, k, v)
  else:
    out_shape = [lse_shape]
    out_specs = [lse_spec]
    in_specs[4] = None
    operands = (indices, counts, q, k, None)

  outs = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(
          num_warps=config.num_warps, num_stages=config.num_stages),
      interpret=interpret,
      name="block_sparse_attention_fwd" if with_out else "block_sparse_lse",
  )(*operands)
  if with_out:
    out, lse = outs
    return out, lse[..., :s]
  return None, outs[0][..., :s]


def _check(q, block_size):
  d = q.shape[-1]
  if d not in HEAD_DIMS:
    raise ValueError(f"triton backend: head_dim must be one of {HEAD_DIMS}, got {d}")
  if q.dtype not in DTYPES:
    raise ValueError(f"triton backend: dtype must be one of bfloat16, float16, "
                     f"float32, got {q.dtype}")


def block_sparse_attention_fwd(q, k, v, table: Optional[BlockTable], *, block_size: int,
                               sm_scale: Optional[float] = None,
                               interpret: bool = False,
                               config: TritonConfig = DEFAULT_CONFIG):
  """Returns (out [B, S, H, D] in q.dtype, lse float32 [B, H, S])."""
  _check(q, block_size)
  scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  table = table_or_dense(table, q.shape[1], block_size)
  return _fwd(q, k, v, table.indices, table.counts, block_size=block_size,
              sm_scale=scale, with_out=True, config=config, interpret=interpret)


def block_sparse_lse(q, k, table: Optional[BlockTable], *, block_size: int,
                     sm_scale: Optional[float] = None, interpret: bool = False,
                     config: TritonConfig = DEFAULT_CONFIG):
  """Row log-sum-exp only (no V loads, no P @ V): float32 [B, H, S]."""
  _check(q, block_size)
  scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  table = table_or_dense(table, q.shape[1], block_size)
  return _fwd(q, k, None, table.indices, table.counts, block_size=block_size,
              sm_scale=scale, with_out=False, config=config, interpret=interpret)[1]

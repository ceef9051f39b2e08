"""Sparsity map from a given row log-sum-exp: Pallas GPU kernel (Triton lowering).

The second pass of MOD-DiT's measurement step: after the flash pass has
produced the row log-sum-exp lse [B, H, S] (natural log), recount the QK tiles
without any PV and without exp:

    p[r, c] < threshold  <=>  q_r . k_c < (lse_r + log(threshold)) / sm_scale.

One program per (query block i, batch b, head h) loads its q tile once, loops
over the row's key blocks (all n for the dense map, table entries < counts for
the sparse one), computes the [bq, bk] score tile in float32 on the tensor
cores, compares it with the per-row bound, and reduces it to one count per key
block. The counts are gathered in a register row vector of n_pad =
next_power_of_2(n) floats by one-hot selects (n_pad / (32 * num_warps) values
per thread, e.g. 4 at n = 540, 8 warps) and the whole output row is written
once at the end; blocks not visited stay NaN.

Padded queries (rows past seq_len) get a bound of -inf; padded keys (only in the
last key block, and only when seq_len % block_size != 0) are masked out per
tile. The Triton lowering is deprecated from JAX 0.11 (still works there): this
file is self-contained so that a Mosaic GPU version can replace it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.map_reference import check_map_args, resolve_sm_scale

__all__ = ["MapBlockConfig", "sparsity_map_from_lse", "sparsity_map_triton"]


@dataclasses.dataclass(frozen=True)
class MapBlockConfig:
  """Launch parameters of the map kernel (tile = block_size x block_size).

  Attributes:
    num_warps: warps per program; None = 8 for block_size >= 128, else 4.
    num_stages: software-pipelining stages of the K-tile loop; None = 2 for
      block_size >= 128 and head_dim >= 128, else 3.
  """

  num_warps: Optional[int] = None
  num_stages: Optional[int] = None

  def __post_init__(self):
    if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16; got {self.num_warps}")
    if self.num_stages is not None and not 1 <= self.num_stages <= 8:
      raise ValueError(f"num_stages must be in [1, 8], got {self.num_stages}")

  def resolve(self, block_size: int, head_dim: int) -> tuple[int, int]:
    warps = self.num_warps or (8 if block_size >= 128 else 4)
    stages = self.num_stages or (2 if block_size >= 128 and head_dim >= 128 else 3)
    return warps, stages


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def _map_kernel(q_ref, k_ref, lse_ref, *refs, block_size: int, seq_len: int,
                num_blocks: int, log_threshold: float, inv_scale: float,
                sparse: bool):
  """One output row: q tile i of one (batch, head) against its key blocks."""
  if sparse:
    idx_ref, cnt_ref, o_ref = refs
  else:
    (o_ref,) = refs
  bs = block_size
  n_pad = o_ref.shape[-1]
  i = pl.program_id(0)

  q = q_ref[...]                                                # [bs, D]
  lse = lse_ref[...].astype(jnp.float32)                        # [bs]
  row_ids = i * bs + jnp.arange(bs, dtype=jnp.int32)
  # Row bound on the raw score q.k; padded rows can never be below it.
  bound = jnp.where(row_ids < seq_len, (lse + log_threshold) * inv_scale,
                    -jnp.inf)
  bound = bound[:, None]
  cols = jnp.arange(n_pad, dtype=jnp.int32)
  has_tail = seq_len % bs != 0

  def count_block(j):
    start = pl.multiple_of(j * bs, bs)
    k = k_ref[pl.ds(start, bs), :]                              # [bs, D]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)  # [bs, bs]
    below = s < bound
    if has_tail:
      key_ok = start + jnp.arange(bs, dtype=jnp.int32) < seq_len
      below = jnp.logical_and(below, key_ok[None, :])
    return jnp.sum(below.astype(jnp.float32))

  if sparse:
    def body(t, row):
      j = idx_ref[t]
      return jnp.where(cols == j, count_block(j), row)
    row0 = jnp.full((n_pad,), jnp.nan, jnp.float32)
    row = jax.lax.fori_loop(0, cnt_ref[0], body, row0)
  else:
    def body(j, row):
      return jnp.where(cols == j, count_block(j), row)
    row = jax.lax.fori_loop(0, num_blocks, body,
                            jnp.zeros((n_pad,), jnp.float32))

  rows_valid = jnp.clip(seq_len - i * bs, 0, bs).astype(jnp.float32)
  cols_valid = jnp.clip(seq_len - cols * bs, 0, bs).astype(jnp.float32)
  # Columns past n (n_pad > n) divide by 0 and are sliced off by the wrapper.
  o_ref[...] = row / (rows_valid * cols_valid)


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "threshold", "sm_scale", "interpret",
                     "config"))
def sparsity_map_triton(q: jax.Array, k: jax.Array, lse: jax.Array,
                        table: Any = None, *, block_size: int, threshold: float,
                        sm_scale: Optional[float] = None,
                        interpret: bool = False,
                        config: MapBlockConfig = MapBlockConfig()) -> jax.Array:
  """`sparsity_map_from_lse` with explicit launch parameters (`config`)."""
  b_, s_, h_, d_, n = check_map_args(q, k, lse, table, block_size=block_size,
                                     threshold=threshold)
  bs = block_size
  if not _is_pow2(bs) or bs < 16:
    raise ValueError(
        f"block_size must be a power of 2 >= 16 for the Triton map kernel "
        f"(64 or 128 in practice), got {bs}")
  if q.dtype != k.dtype:
    raise ValueError(f"q and k must have the same dtype, got {q.dtype}, {k.dtype}")
  if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ValueError(f"q, k dtype must be bfloat16, float16 or float32, got {q.dtype}")
  scale = resolve_sm_scale(sm_scale, d_)
  if scale <= 0:
    raise ValueError(f"sm_scale must be positive, got {scale}")
  num_warps, num_stages = config.resolve(bs, d_)

  sp = n * bs
  dp = max(16, pl.next_power_of_2(d_))
  n_pad = max(16, pl.next_power_of_2(n))
  # Zero padding: padded keys/queries are masked in the kernel, padded head
  # dims add 0 to every dot product. A no-op (no copy) when already aligned.
  if sp != s_ or dp != d_:
    pads = ((0, 0), (0, sp - s_), (0, 0), (0, dp - d_))
    q = jnp.pad(q, pads)
    k = jnp.pad(k, pads)
  lse = lse.astype(jnp.float32)
  if sp != s_:
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, sp - s_)))

  in_specs = [
      pl.BlockSpec((None, bs, None, dp), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, sp, None, dp), lambda i, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, None, bs), lambda i, b, h: (b, h, i)),
  ]
  args = [q, k, lse]
  sparse = table is not None
  if sparse:
    w = table.indices.shape[-1]
    indices = jnp.broadcast_to(jnp.asarray(table.indices, jnp.int32), (b_, h_, n, w))
    counts = jnp.broadcast_to(jnp.asarray(table.counts, jnp.int32), (b_, h_, n))
    in_specs += [
        pl.BlockSpec((None, None, None, w), lambda i, b, h: (b, h, i, 0)),
        pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, i)),
    ]
    args += [indices, counts]

  kernel = functools.partial(
      _map_kernel, block_size=bs, seq_len=s_, num_blocks=n,
      log_threshold=math.log(threshold), inv_scale=1.0 / scale, sparse=sparse)
  out = pl.pallas_call(
      kernel,
      grid=(n, b_, h_),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, None, n_pad),
                             lambda i, b, h: (b, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct((b_, h_, n, n_pad), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name="mod_sparsity_map",
  )(*args)
  return out[..., :n]


def sparsity_map_from_lse(q: jax.Array, k: jax.Array, lse: jax.Array,
                          table: Any = None, *, block_size: int,
                          threshold: float, sm_scale: Optional[float] = None,
                          interpret: bool = False) -> jax.Array:
  """Sparsity map S float32 [B, H, n, n] (Pallas Triton kernel).

  Args:
    q, k: [B, S, H, D] bfloat16 (tensor cores), float16 or float32.
    lse: float32 [B, H, S], natural-log row log-sum-exp of sm_scale * q k^T
      over the (masked) row, from the flash pass.
    table: None (dense: every block) or a block table (`.indices` int32
      [B, H, n, w] ascending active key-block ids, `.counts` int32 [B, H, n]);
      only active blocks are measured, the others are NaN.
    block_size: b, a power of 2 >= 16 (64 or 128); n = ceil(S / b).
    threshold: static probability threshold.
    sm_scale: softmax scale, default 1/sqrt(D).
    interpret: run the kernel in the Pallas interpreter (CPU tests).
  Returns:
    float32 [B, H, n, n].
  """
  return sparsity_map_triton(q, k, lse, table, block_size=block_size,
                             threshold=threshold, sm_scale=sm_scale,
                             interpret=interpret)

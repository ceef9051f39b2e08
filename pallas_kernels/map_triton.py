"""Sparsity map from a given row log-sum-exp: Pallas GPU kernel (Triton lowering).

The second pass of MOD-DiT's measurement step: after the flash pass has
produced the row log-sum-exp lse [B, H, S] (natural log), recount the QK tiles
without any PV and without exp:

    p[r, c] < threshold  <=>  q_r . k_c < (lse_r + log(threshold)) / sm_scale.

Each program loads one q tile (query block i of one batch, head), computes the
[bq, bk] score tiles of its key blocks in float32 on the tensor cores, compares
them with the per-row bound and reduces each to one count per key block.

Dense map (table=None): the row's n key blocks are split into chunks of a
power-of-2 width, one program each (more programs when B*H*n is small, so the
last wave is full). Each tile is summed over its key columns into per-row
counts (inside a warp); the per-row counts of
`count_group` consecutive tiles are kept in a [bq, count_group] register tile
and reduced across rows (across warps, through shared memory) once per group,
whose counts are then stored. Sparse map (a block table): one program per row
loops over the table entries < counts, reduces each tile to a scalar and
gathers the counts in a register row vector of n_pad = next_power_of_2(n)
floats by one-hot selects; the whole output row is written once at the end and
blocks not visited stay NaN.

Padded queries (rows past seq_len) get a bound of -inf; padded keys (only in the
last key block, and only when seq_len % block_size != 0) are masked out per
tile.

The block mass map (`block_mass_from_lse`, the oracle's statistic) is the same
launch with the tile reduced to sum(exp(sm_scale * q.k - lse)) instead of the
count below the bound (padded and empty rows: no mass), divided by the valid
rows of the query block instead of the valid pairs. The Triton lowering is deprecated from JAX 0.11 (still works there): this
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

__all__ = ["MapBlockConfig", "sparsity_map_from_lse", "sparsity_map_triton",
           "block_mass_from_lse"]


@dataclasses.dataclass(frozen=True)
class MapBlockConfig:
  """Launch parameters of the map kernel (tile = block_size x block_size).

  Attributes:
    num_warps: warps per program; None = 8 for block_size >= 128, else 4.
    num_stages: software-pipelining stages of the K-tile loop; None = 2 for
      block_size >= 128 and head_dim >= 128, else 3.
    key_splits: dense map only: the key blocks of a query-block row are cut
      into chunks of n_pad / key_splits (a power of 2), one program each
      (n_pad = max(16, next_power_of_2(n)); chunks past n are not launched);
      None = halve the chunk until the grid has MIN_PROGRAMS programs or the
      chunk is 8 blocks.
    count_group: dense map only: key blocks whose per-row counts are held in
      registers before one cross-warp reduction (a power of 2 >= 2).
  """

  num_warps: Optional[int] = None
  num_stages: Optional[int] = None
  key_splits: Optional[int] = None
  count_group: int = 16

  def __post_init__(self):
    if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16; got {self.num_warps}")
    if self.num_stages is not None and not 1 <= self.num_stages <= 8:
      raise ValueError(f"num_stages must be in [1, 8], got {self.num_stages}")
    if self.key_splits is not None and not _is_pow2(self.key_splits):
      raise ValueError(f"key_splits must be a power of 2 or None, got {self.key_splits!r}")
    if not (_is_pow2(self.count_group) and self.count_group >= 2):
      raise ValueError(f"count_group must be a power of 2 >= 2, got {self.count_group}")

  def resolve(self, block_size: int, head_dim: int) -> tuple[int, int]:
    warps = self.num_warps or (8 if block_size >= 128 else 4)
    stages = self.num_stages or (2 if block_size >= 128 and head_dim >= 128 else 3)
    return warps, stages

  def resolve_dense(self, rows: int, n: int) -> tuple[int, int]:
    """(chunk width, count_group) for `rows` = B * H * n query-block rows of n
    key blocks; the grid runs ceil(n / width) programs per row."""
    n_pad = _n_pad(n)
    if self.key_splits is None:
      width = n_pad
      while rows * -(-n // width) < MIN_PROGRAMS and width // 2 >= 8:
        width //= 2
    elif self.key_splits > n_pad // 2:
      raise ValueError(f"key_splits={self.key_splits} must be at most n_pad / 2 = "
                       f"{n_pad // 2} (n_pad = max(16, next_power_of_2({n} key blocks)))")
    else:
      width = n_pad // self.key_splits
    return width, min(self.count_group, width)


# Dense map: split key ranges until the grid has this many programs: about six
# per SM of a 132-SM H100/H200, i.e. three waves at two resident programs per SM.
MIN_PROGRAMS = 768


def _is_pow2(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x > 0 and (x & (x - 1)) == 0


def _n_pad(n: int) -> int:
  """A power of 2 >= max(16, n): the sparse program's register row, and the
  dense map's widest chunk."""
  return max(16, pl.next_power_of_2(n))


def _row_bound(lse_ref, i, *, block_size: int, seq_len: int, log_threshold: float,
               inv_scale: float, mass: bool = False):
  """Per-row value [bs, 1] of query block i: the bound on the raw score q.k
  (count), or the row's lse (mass; +inf for padded and empty rows: no mass)."""
  bs = block_size
  lse = lse_ref[...].astype(jnp.float32)                        # [bs]
  row_ids = i * bs + jnp.arange(bs, dtype=jnp.int32)
  if mass:
    return jnp.where((row_ids < seq_len) & (lse > -jnp.inf), lse, jnp.inf)[:, None]
  # Padded rows (past seq_len) can never be below it.
  bound = jnp.where(row_ids < seq_len, (lse + log_threshold) * inv_scale,
                    -jnp.inf)
  return bound[:, None]


def _tile(q, k_ref, j, bound, *, block_size: int, seq_len: int, mass: bool = False,
          scale: float = 1.0):
  """float32 [bs, bs] of key block j: 1 where the score is below the row bound
  (count), or p = exp(scale q.k - lse) (mass); 0 on padded keys."""
  bs = block_size
  start = pl.multiple_of(j * bs, bs)
  k = k_ref[pl.ds(start, bs), :]                                # [bs, D]
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32)    # [bs, bs]
  x = jnp.exp(s * scale - bound) if mass else (s < bound).astype(jnp.float32)
  if seq_len % bs:
    key_ok = start + jnp.arange(bs, dtype=jnp.int32) < seq_len
    x = jnp.where(key_ok[None, :], x, 0.0)
  return x


def _pair_counts(i, cols, *, block_size: int, seq_len: int, mass: bool = False):
  """Valid (query, key) pairs of blocks (i, cols), 0 past n (count); the valid
  rows of block i (mass)."""
  bs = block_size
  rows_valid = jnp.clip(seq_len - i * bs, 0, bs)
  if mass:
    return jnp.full(cols.shape, rows_valid, jnp.float32)
  cols_valid = jnp.clip(seq_len - cols * bs, 0, bs)
  return (rows_valid * cols_valid).astype(jnp.float32)


def _dense_map_kernel(q_ref, k_ref, lse_ref, o_ref, *, block_size: int,
                      seq_len: int, num_blocks: int, count_group: int,
                      mass: bool = False, scale: float = 1.0, **bound_kw):
  """Key blocks [split * w, (split + 1) * w) of query block i, w = o_ref width."""
  geom = dict(block_size=block_size, seq_len=seq_len)
  tile_kw = dict(mass=mass, scale=scale)
  # Program ids are read here, not inside the loops (the interpreter needs that).
  i, split = pl.program_id(0), pl.program_id(1)
  width = o_ref.shape[-1]
  first = split * width
  q = q_ref[...]                                                # [bs, D]
  bound = _row_bound(lse_ref, i, **geom, **bound_kw, mass=mass)
  lanes = jnp.arange(count_group, dtype=jnp.int32)

  def group(g, carry):
    j0 = first + g * count_group

    def tile(t, acc):
      # Row counts stay in the dot's layout: a reduction inside each warp.
      row_counts = jnp.sum(_tile(q, k_ref, j0 + t, bound, **geom, **tile_kw), axis=1)
      return jnp.where(lanes[None, :] == t, row_counts[:, None], acc)

    trip = jnp.clip(num_blocks - j0, 0, count_group)
    acc = jax.lax.fori_loop(0, trip, tile,
                            jnp.zeros((block_size, count_group), jnp.float32))
    # Blocks past n divide 0 by 0 and are sliced off by the wrapper.
    counts = jnp.sum(acc, axis=0) / _pair_counts(i, j0 + lanes, **geom, mass=mass)
    o_ref[pl.ds(pl.multiple_of(g * count_group, count_group), count_group)] = counts
    return carry

  jax.lax.fori_loop(0, width // count_group, group, 0)


def _sparse_map_kernel(q_ref, k_ref, lse_ref, idx_ref, cnt_ref, o_ref, *,
                       block_size: int, seq_len: int, mass: bool = False,
                       scale: float = 1.0, **bound_kw):
  """Active key blocks (table entries < counts) of query block i; others NaN."""
  geom = dict(block_size=block_size, seq_len=seq_len)
  i = pl.program_id(0)
  cols = jnp.arange(o_ref.shape[-1], dtype=jnp.int32)
  q = q_ref[...]                                                # [bs, D]
  bound = _row_bound(lse_ref, i, **geom, **bound_kw, mass=mass)

  def body(t, row):
    j = idx_ref[t]
    count = jnp.sum(_tile(q, k_ref, j, bound, **geom, mass=mass, scale=scale))
    return jnp.where(cols == j, count, row)

  row = jax.lax.fori_loop(0, cnt_ref[0], body,
                          jnp.full(cols.shape, jnp.nan, jnp.float32))
  # Columns past n (n_pad > n) divide by 0 and are sliced off by the wrapper.
  o_ref[...] = row / _pair_counts(i, cols, **geom, mass=mass)


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "threshold", "sm_scale", "interpret",
                     "config", "statistic"))
def sparsity_map_triton(q: jax.Array, k: jax.Array, lse: jax.Array,
                        table: Any = None, *, block_size: int, threshold: float,
                        sm_scale: Optional[float] = None,
                        interpret: bool = False,
                        config: MapBlockConfig = MapBlockConfig(),
                        statistic: str = "count") -> jax.Array:
  """`sparsity_map_from_lse` with explicit launch parameters (`config`);
  statistic "mass" gives `block_mass_from_lse` (threshold unused)."""
  if statistic not in ("count", "mass"):
    raise ValueError(f"statistic must be 'count' or 'mass', got {statistic!r}")
  mass = statistic == "mass"
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
  n_pad = _n_pad(n)
  # Zero padding: padded keys/queries are masked in the kernel, padded head
  # dims add 0 to every dot product. A no-op (no copy) when already aligned.
  if sp != s_ or dp != d_:
    pads = ((0, 0), (0, sp - s_), (0, 0), (0, dp - d_))
    q = jnp.pad(q, pads)
    k = jnp.pad(k, pads)
  lse = lse.astype(jnp.float32)
  if sp != s_:
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, sp - s_)))

  sparse = table is not None
  if sparse:
    splits, width = 1, n_pad
  else:
    width, group = config.resolve_dense(b_ * h_ * n, n)
    splits = -(-n // width)
  # Grid (i, split, b, h); Pallas folds i and split into the launch's x axis.
  in_specs = [
      pl.BlockSpec((None, bs, None, dp), lambda i, s, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, sp, None, dp), lambda i, s, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, None, bs), lambda i, s, b, h: (b, h, i)),
  ]
  args = [q, k, lse]
  kw = dict(block_size=bs, seq_len=s_, log_threshold=math.log(threshold),
            inv_scale=1.0 / scale, mass=mass, scale=scale)
  if sparse:
    w = table.indices.shape[-1]
    indices = jnp.broadcast_to(jnp.asarray(table.indices, jnp.int32), (b_, h_, n, w))
    counts = jnp.broadcast_to(jnp.asarray(table.counts, jnp.int32), (b_, h_, n))
    in_specs += [
        pl.BlockSpec((None, None, None, w), lambda i, s, b, h: (b, h, i, 0)),
        pl.BlockSpec((None, None, 1), lambda i, s, b, h: (b, h, i)),
    ]
    args += [indices, counts]
    kernel = functools.partial(_sparse_map_kernel, **kw)
  else:
    kernel = functools.partial(_dense_map_kernel, num_blocks=n, count_group=group,
                               **kw)
  out = pl.pallas_call(
      kernel,
      grid=(n, splits, b_, h_),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, None, width),
                             lambda i, s, b, h: (b, h, i, s)),
      out_shape=jax.ShapeDtypeStruct((b_, h_, n, splits * width), jnp.float32),
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


def block_mass_from_lse(q: jax.Array, k: jax.Array, lse: jax.Array,
                        table: Any = None, *, block_size: int,
                        sm_scale: Optional[float] = None,
                        interpret: bool = False) -> jax.Array:
  """Block mass map M float32 [B, H, n, n] (Pallas Triton kernel): M[i, j] = sum
  of exp(sm_scale q.k - lse) over block (i, j) / valid rows of query block i.
  Args as `sparsity_map_from_lse` without the threshold; NaN off the table."""
  return sparsity_map_triton(q, k, lse, table, block_size=block_size, threshold=0.5,
                             sm_scale=sm_scale, interpret=interpret, statistic="mass")

"""Sparsity map from a given row log-sum-exp: Pallas Mosaic GPU kernel (Hopper).

The second pass of MOD-DiT's measurement step (ALGORITHM.md section 1) with
the structure of the Mosaic attention kernel (attention_mosaic_gpu): a CTA per
(128-row query block, head, batch), two compute warpgroups of 64 rows and a
memory warpgroup streaming the row's K blocks (all of them, or the table's)
through a TMA ring. Each step is one wgmma Q K^T and a compare with the row
bound, in the log domain and without exp:

    p[r, c] < threshold  <=>  q_r . k_c < (lse_r + log(threshold)) / sm_scale,

(the bound per query row comes in with Q). Each warp sums its 16 x 128
compares in registers and warp shuffles and leaves one partial count per step
in shared memory; every 64 steps (and at the row's end) each warpgroup adds
its 4 warps' partials and writes 64 counts with one TMA store. The wrapper
adds the two warpgroups' counts, divides by the valid pairs and, with a table,
scatters them to [B, H, n, n] (NaN elsewhere). Keys past the sequence end
(block n-1 only) are masked in a peeled last step; query rows past it get a
bound of -inf.

Quantized precisions compare the same quantized scores the quantized attention
kernel exponentiates: int8 / e4m3 Q K^T in int32 / float32 against the bound
divided by scale_q * scale_k (per block), with K smoothed by its mean (its lse
is of the smoothed scores, as the quantized attention pass returns).

Needs a Hopper GPU, 16-bit inputs, head_dim 64 or 128 and block_size 128.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import attention_mosaic_gpu as amg
from pallas_kernels import quantize
from pallas_kernels.map_reference import check_map_args, resolve_sm_scale

__all__ = ["MapConfig", "sparsity_map_from_lse", "quantized_map_from_lse",
           "sparsity_map_mosaic", "PRECISIONS"]

PRECISIONS = quantize.PRECISIONS
BLOCK_SIZE = amg.BLOCK_SIZE
_ROWS = amg._ROWS_PER_WG
_WGS = amg._COMPUTE_WGS
_CHUNK = 64                 # steps whose counts one TMA store writes
_WARPS = 4


@dataclasses.dataclass(frozen=True)
class MapConfig:
  """Launch parameters of the map kernel.

  Attributes:
    stages: K shared-memory slots in flight (2 to 6).
    compute_registers: registers per thread of the compute warpgroups.
    longest_first: with a table, run each head's rows longest first (as the
      attention kernel does).

  The kernel always lowers with Lane semantics (its inline Mosaic code is
  written for them).
  """

  stages: int = 3
  compute_registers: int = 200
  longest_first: bool = True

  def validate(self, head_dim: int, precision: str) -> None:
    if not 2 <= self.stages <= 6:
      raise ValueError(f"MapConfig.stages must be in [2, 6], got {self.stages}")
    regs = self.compute_registers
    if regs % 8 or not 24 <= regs <= amg._MAX_COMPUTE_REGISTERS:
      raise ValueError(f"MapConfig.compute_registers must be a multiple of 8 in [24, "
                       f"{amg._MAX_COMPUTE_REGISTERS}], got {regs}")
    itemsize = 2 if precision == "bf16" else 1
    need = (2 * _WGS * _ROWS + self.stages * BLOCK_SIZE) * head_dim * itemsize
    if need + amg._SMEM_RESERVE > amg._SMEM_LIMIT:
      raise ValueError(f"MapConfig.stages={self.stages} with head_dim={head_dim} needs "
                       f"{(need + amg._SMEM_RESERVE) // 1024} KB of shared memory (> "
                       f"{amg._SMEM_LIMIT // 1024} KB); use fewer stages")


DEFAULT_CONFIG = MapConfig()


def _mgpu():
  from jax._src.lib.mlir import ir  # pylint: disable=import-outside-toplevel
  from jax._src.lib.mlir.dialects import arith, memref, vector  # pylint: disable=import-outside-toplevel
  import jax.experimental.mosaic.gpu as mgpu  # pylint: disable=import-outside-toplevel
  from jax.experimental.mosaic.gpu import fragmented_array as fa  # pylint: disable=import-outside-toplevel
  from jax.experimental.mosaic.gpu import utils as mu  # pylint: disable=import-outside-toplevel
  return ir, arith, memref, vector, mgpu, fa, mu


def _thread_coords():
  """(warp in warpgroup, lane, thread in warpgroup) as i32 values."""
  ir, arith, *_, mu = _mgpu()
  i32 = ir.IntegerType.get_signless(32)
  tid = arith.remui(mu.thread_idx(), mu.c(128, i32))
  return (arith.divui(tid, mu.c(32, i32)), arith.remui(tid, mu.c(32, i32)), tid)


def _index(x):
  ir, arith, *_ = _mgpu()
  return arith.index_cast(ir.IndexType.get(), x)


def _load_rows(ref):
  """f32 [64] shared-memory vector -> the wgmma row layout (each thread its rows)."""
  rows_layout = plgpu.Layout.WGMMA.reduce(1)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),),
                     return_type=plgpu.ShapeDtypeStruct((_ROWS,), jnp.float32, rows_layout))
  def load(_, smem):
    ir, arith, memref, vector, mgpu, fa, mu = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    layout = fa.WGMMA_LAYOUT.reduce((1,))
    warp, lane, _ = _thread_coords()
    base = arith.addi(arith.muli(warp, mu.c(16, i32)), arith.divui(lane, mu.c(4, i32)))
    shape = layout.registers_shape((_ROWS,))
    regs = np.empty(shape, dtype=object)
    # Row layout: register h of thread (warp, lane) holds row 16 warp + 8 h + lane // 4.
    for idx in np.ndindex(shape):
      h = idx[2]
      row = arith.addi(base, mu.c(8 * h, i32))
      val = memref.load(smem, [_index(row)])
      regs[idx] = vector.broadcast(ir.VectorType.get((1,), ir.F32Type.get()), val)
    return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None)

  return load(ref)


def _store_warp_counts(below, part_ref, slot):
  """Each warp's count of `below` (f32 0/1 [64, 128]) -> part_ref[warp, slot]."""

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(),
                                plgpu.Layout.WG_SPLAT(())))
  def store(_, x, part, s):
    ir, arith, memref, vector, _, _, mu = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    acc = None
    for reg in x.registers.flat:
      acc = reg if acc is None else arith.addf(acc, reg)
    n = ir.VectorType(acc.type).shape[0]
    total = None
    for i in range(n):
      e = vector.extract(acc, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([i]))
      total = e if total is None else arith.addf(total, e)
    for d in (16, 8, 4, 2, 1):
      total = arith.addf(total, mu.shfl_bfly(total, d))
    warp, lane, _ = _thread_coords()
    is_first = arith.cmpi(arith.CmpIPredicate.eq, lane, mu.c(0, i32))
    slot_idx = _index(s.registers.item())
    with mu.when(is_first):
      memref.store(total, part, [_index(warp), slot_idx])

  store(below, part_ref, slot)


def _sum_warp_counts(part_ref, tot_ref):
  """tot_ref[s] = sum over the 4 warps of part_ref[:, s], s < 64 (one warpgroup)."""

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
  def reduce(_, part, tot):
    ir, arith, memref, _, _, _, mu = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    mu.warpgroup_barrier()              # every warp's partials are in
    _, _, tid = _thread_coords()
    with mu.when(arith.cmpi(arith.CmpIPredicate.ult, tid, mu.c(_CHUNK, i32))):
      col = _index(tid)
      s = None
      for w in range(_WARPS):
        v = memref.load(part, [_index(mu.c(w, i32)), col])
        s = v if s is None else arith.addf(s, v)
      memref.store(s, tot, [col])

  reduce(part_ref, tot_ref)


def _kernel(table_refs, scale_ref, q_ref, k_ref, bound_ref, out_ref, scoped, *,
            seq_len: int, num_blocks: int, heads: int, stages: int, per_batch: bool,
            per_head: bool, compute_registers: int, qk: Optional[str]):
  (q_smem3, k_smem, bnd_smem3, part_smem, tot_smem), loaded, k_freed, schedule = scoped
  k_loaded, q_loaded, b_loaded = loaded
  wg = lax.axis_index("wg")
  dense = table_refs is None
  tail_len = seq_len - (num_blocks - 1) * BLOCK_SIZE
  has_tail = tail_len != BLOCK_SIZE
  bi, hi, qi = amg._tile_coords(lax.axis_index("ctas"), heads=heads,
                                num_blocks=num_blocks, heads_fastest=False)

  if dense:
    count, block_id, n_main = num_blocks, (lambda t: t), num_blocks - int(has_tail)
  else:
    idx_ref, cnt_ref, order_ref = table_refs
    lead = (bi if per_batch else 0, hi if per_head else 0)
    if order_ref is not None:
      qi = order_ref[(*lead, qi)]
    row = (*lead, qi)
    count = cnt_ref[row]
    block_id = lambda t: idx_ref[(*row, t)]
    n_main = count
    if has_tail:
      last = block_id(jnp.maximum(count - 1, 0))
      tail_active = jnp.logical_and(count > 0, last == num_blocks - 1)
      n_main = count - tail_active.astype(jnp.int32)

  def ring_slot(g):
    return lax.rem(g, jnp.array(stages, g.dtype))

  def schedule_barrier():
    plgpu.barrier_arrive(schedule)
    plgpu.barrier_wait(schedule)

  @pl.when(wg < _WGS)
  def _compute():
    plgpu.set_max_registers(compute_registers, action="increase")
    q_smem = q_smem3.at[wg]
    part = part_smem.at[wg]
    tot = tot_smem.at[wg]
    plgpu.barrier_wait(b_loaded.at[wg])
    bound = _load_rows(bnd_smem3.at[wg])          # [64] raw-score bound per row
    plgpu.barrier_wait(q_loaded.at[wg])

    if qk is None:
      step_bound = lambda t: bound
    elif dense:
      step_bound = lambda t: bound * scale_ref[bi, hi, t]       # 1 / k_scale
    else:
      step_bound = lambda t: bound * scale_ref[bi, hi, qi, t]

    @amg._when(count > 0)
    def _():
      plgpu.barrier_wait(k_loaded.at[ring_slot(jnp.int32(0))])

    pl.when(wg == 1)(schedule_barrier)

    def flush(t):
      # The previous chunk's store must have read tot before it is rewritten.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      _sum_warp_counts(part, tot)
      plgpu.commit_smem()
      t0 = t - lax.rem(t, _CHUNK)
      plgpu.copy_smem_to_gmem(tot, out_ref.at[bi, hi, qi, wg, pl.ds(t0, _CHUNK)])

    def step(t, carry, masked: bool):
      slot = ring_slot(t)
      b_t = step_bound(t)

      def qk_scope(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
        schedule_barrier()
        return acc_ref[...]

      acc_dtype = jnp.int32 if qk == "int8" else jnp.float32
      s = pl.run_scoped(qk_scope, plgpu.ACC((_ROWS, BLOCK_SIZE), acc_dtype))
      plgpu.barrier_arrive(k_freed.at[slot])
      if qk == "int8":
        s = s.astype(jnp.float32)
      below = s < lax.broadcast_in_dim(b_t, s.shape, [0])
      if masked:
        key = plgpu.broadcasted_iota(jnp.int32, (_ROWS, BLOCK_SIZE), 1,
                                     layout=plgpu.Layout.WGMMA)
        below = jnp.logical_and(below, key < tail_len)
      ones = jnp.where(below, 1.0, 0.0).astype(jnp.float32)
      _store_warp_counts(ones, part, lax.rem(t, _CHUNK))
      plgpu.barrier_arrive(schedule)
      nxt = t + 1

      @pl.when(nxt < count)
      def _():
        plgpu.barrier_wait(k_loaded.at[ring_slot(nxt)])

      plgpu.barrier_wait(schedule)

      @pl.when(jnp.logical_or(lax.rem(t, _CHUNK) == _CHUNK - 1, nxt == count))
      def _():
        flush(t)
      return carry

    lax.fori_loop(0, n_main, functools.partial(step, masked=False), 0)
    if has_tail:
      lax.fori_loop(n_main, count, functools.partial(step, masked=True), 0)
    pl.when(wg == 0)(schedule_barrier)
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _WGS)
  def _memory():
    plgpu.set_max_registers(amg._MEMORY_REGISTERS, action="decrease")
    for w in range(_WGS):
      rows = pl.ds(qi * BLOCK_SIZE + w * _ROWS, _ROWS)
      plgpu.copy_gmem_to_smem(bound_ref.at[bi, hi, rows], bnd_smem3.at[w], b_loaded.at[w])
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem3.at[w], q_loaded.at[w])

    @pl.loop(0, count)
    def _(t):
      slot = ring_slot(t)

      @pl.when(t >= stages)
      def _():
        plgpu.barrier_wait(k_freed.at[slot])
      src = (bi, pl.ds(block_id(t) * BLOCK_SIZE, BLOCK_SIZE), hi)
      plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_loaded.at[slot])


@functools.partial(jax.jit, static_argnames=("config", "qk", "width"))
def _counts(q, k, bound, indices, counts, step_scale, *, config: MapConfig,
            qk: Optional[str], width: int):
  """Below-threshold counts [B, H, n, 2, width64] (one row per compute warpgroup)."""
  b, s, h, d = q.shape
  n = -(-s // BLOCK_SIZE)
  dense = indices is None
  tb, th = (1, 1) if dense else indices.shape[:2]
  w64 = -(-width // _CHUNK) * _CHUNK
  order = None
  if not dense and config.longest_first:
    order = jnp.argsort(-counts, axis=-1, stable=True).astype(jnp.int32)
  table_args = () if dense else (indices, counts) + (() if order is None else (order,))
  scale_args = () if step_scale is None else (step_scale,)
  kernel = functools.partial(
      _kernel, seq_len=s, num_blocks=n, heads=h, stages=config.stages,
      per_batch=tb > 1, per_head=th > 1, compute_registers=config.compute_registers, qk=qk)

  def entry(*refs):
    refs = list(refs)
    table_refs = None
    if not dense:
      table_refs = (refs.pop(0), refs.pop(0), refs.pop(0) if order is not None else None)
    scale_ref = refs.pop(0) if step_scale is not None else None
    q_ref, k_ref, bound_ref, out_ref = refs
    tiles = amg._tiles(q.dtype, d)
    smem = (
        plgpu.SMEM((_WGS, _ROWS, d), q.dtype, transforms=tiles),
        plgpu.SMEM((config.stages, BLOCK_SIZE, d), k.dtype, transforms=tiles),
        plgpu.SMEM((_WGS, _ROWS), jnp.float32),
        plgpu.SMEM((_WGS, _WARPS, _CHUNK), jnp.float32),
        plgpu.SMEM((_WGS, _CHUNK), jnp.float32),
    )
    loaded = (plgpu.Barrier(num_barriers=config.stages),
              plgpu.Barrier(num_barriers=_WGS), plgpu.Barrier(num_barriers=_WGS))
    k_freed = plgpu.Barrier(num_arrivals=_WGS, num_barriers=config.stages)
    schedule = plgpu.Barrier(num_arrivals=_WGS)
    pl.run_scoped(
        lambda *scoped: kernel(table_refs, scale_ref, q_ref, k_ref, bound_ref, out_ref,
                               scoped),
        smem, loaded, k_freed, schedule, collective_axes="wg")

  pad = -s % 8
  if pad:
    q, k = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k))
  return plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((b, h, n, _WGS, w64), jnp.float32),
      grid=(b * h * n,),
      grid_names=("ctas",),
      num_threads=_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
  )(*table_args, *scale_args, q, k, bound)


def _pairs(seq_len: int, n: int):
  valid = np.clip(seq_len - np.arange(n) * BLOCK_SIZE, 0, BLOCK_SIZE).astype(np.float32)
  return jnp.asarray(valid)


def _finish(raw, table, seq_len: int):
  """Counts [B, H, n, 2, w64] -> fractions [B, H, n, n] (NaN off the table)."""
  b, h, n = raw.shape[:3]
  cnt = raw[:, :, :, 0] + raw[:, :, :, 1]
  valid = _pairs(seq_len, n)
  if table is None:
    return cnt[..., :n] / (valid[:, None] * valid[None, :])
  w = table.indices.shape[-1]
  idx = jnp.broadcast_to(table.indices, (b, h, n, w))
  num = jnp.broadcast_to(table.counts, (b, h, n))
  frac = cnt[..., :w] / (valid[None, None, :, None] * valid[idx])
  dest = jnp.where(jnp.arange(w) < num[..., None], idx, n)          # n: dropped
  out = jnp.full((b, h, n, n + 1), jnp.nan, jnp.float32)
  bi = jnp.arange(b)[:, None, None, None]
  hi = jnp.arange(h)[None, :, None, None]
  ri = jnp.arange(n)[None, None, :, None]
  return out.at[bi, hi, ri, dest].set(frac)[..., :n]


def _bound(lse, seq_len: int, n: int, threshold: float, factor):
  """Per-row bound on the raw scores, [B, H, n * 128] (-inf past the sequence)."""
  bound = (lse.astype(jnp.float32) + math.log(threshold)) * factor
  return jnp.pad(bound, ((0, 0), (0, 0), (0, n * BLOCK_SIZE - seq_len)),
                 constant_values=-jnp.inf)


def _check(q, block_size, config, precision, sm_scale):
  amg._check(q, block_size, sm_scale, amg.DEFAULT_CONFIG, False, precision, False,
             dtype=jnp.bfloat16 if precision != "bf16" else None)
  config.validate(q.shape[-1], precision)


@functools.partial(jax.jit, static_argnames=("block_size", "threshold", "sm_scale",
                                              "config"))
def sparsity_map_mosaic(q: jax.Array, k: jax.Array, lse: jax.Array, table: Any = None, *,
                        block_size: int, threshold: float, sm_scale: Optional[float] = None,
                        config: MapConfig = DEFAULT_CONFIG) -> jax.Array:
  """`sparsity_map_from_lse` with explicit launch parameters (16-bit inputs)."""
  b_, s_, h_, d_, n = check_map_args(q, k, lse, table, block_size=block_size,
                                     threshold=threshold)
  scale = resolve_sm_scale(sm_scale, d_)
  _check(q, block_size, config, "bf16", scale)
  bound = _bound(lse, s_, n, threshold, 1.0 / scale)
  idx, cnt = (None, None) if table is None else (table.indices, table.counts)
  width = n if table is None else table.indices.shape[-1]
  raw = _counts(q, k, bound, idx, cnt, None, config=config, qk=None, width=width)
  return _finish(raw, table, s_)


def sparsity_map_from_lse(q: jax.Array, k: jax.Array, lse: jax.Array,
                          table: Any = None, *, block_size: int,
                          threshold: float, sm_scale: Optional[float] = None,
                          interpret: bool = False) -> jax.Array:
  """Sparsity map S float32 [B, H, n, n] (Pallas Mosaic GPU kernel).

  Args: as `map_triton.sparsity_map_from_lse` (q, k 16-bit; block_size 128);
  interpret=True is refused (no interpret mode: the CPU tests lower it).
  """
  if interpret:
    raise ValueError("mosaic_gpu map has no interpret mode; use implementation="
                     "'triton' with interpret=True on CPU")
  return sparsity_map_mosaic(q, k, lse, table, block_size=block_size,
                             threshold=threshold, sm_scale=sm_scale)


@functools.partial(jax.jit, static_argnames=("block_size", "threshold", "sm_scale",
                                              "config"))
def _quantized_map(qq, lse, table, *, block_size, threshold, sm_scale, config):
  del block_size
  b_, s_, h_, _ = qq.q.shape
  n = -(-s_ // BLOCK_SIZE)
  # acc * q_scale * k_scale * sm_scale < lse + log(thr)
  #   <=>  acc < (lse + log(thr)) / (sm_scale q_scale) * (1 / k_scale).
  q_rows = jnp.repeat(qq.q_scale, quantize.Q_ROWS, axis=-1)[..., :s_]
  bound = _bound(lse, s_, n, threshold, 1.0 / (sm_scale * q_rows))
  inv_k = 1.0 / qq.k_scale
  idx = cnt = None
  width = n
  if table is not None:
    idx, cnt = table.indices, table.counts
    width = idx.shape[-1]
    ib = jnp.broadcast_to(idx, (b_, h_, n, width))
    inv_k = inv_k[jnp.arange(b_)[:, None, None, None], jnp.arange(h_)[None, :, None, None], ib]
  qk = "int8" if qq.precision.startswith("int8") else "fp8"
  raw = _counts(qq.q, qq.k, bound, idx, cnt, inv_k, config=config, qk=qk, width=width)
  return _finish(raw, table, s_)


def quantized_map_from_lse(qq: quantize.QuantizedQKV, lse: jax.Array, table: Any = None, *,
                           block_size: int, threshold: float, sm_scale: float,
                           config: MapConfig = DEFAULT_CONFIG) -> jax.Array:
  """The map of the quantized scores (`quantize_qkv` output) against their lse."""
  check_map_args(qq.q, qq.k, lse, table, block_size=block_size, threshold=threshold)
  _check(qq.q, block_size, config, qq.precision, sm_scale)
  return _quantized_map(qq, lse, table, block_size=block_size, threshold=float(threshold),
                        sm_scale=float(sm_scale), config=config)

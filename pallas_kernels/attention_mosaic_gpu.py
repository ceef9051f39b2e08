"""Block-sparse flash attention for Hopper (sm_90) in Pallas Mosaic GPU.

The structure of FlashAttention-3 as jax's own `ops/gpu/attention_mgpu.py`
writes it, with the key loop driven by the compacted block table:

  * a CTA runs `tiles_per_cta` consecutive tiles (128-row query block i,
    head, batch element) with three warpgroups: two compute warpgroups own
    64 query rows each, one memory warpgroup feeds them;
  * the memory warpgroup loads each tile's Q into one of two slots, reads
    key-block ids from `indices[b, h, i, :]` and streams those K and V tiles
    by TMA into a ring of `stages` shared-memory slots, refilling a slot as
    soon as both compute warpgroups release it; the ring runs on across
    tiles, so the next tile's loads overlap the current tile's epilogue;
  * each compute warpgroup runs `counts[b, h, i]` steps of wgmma Q K^T, the
    online softmax in base 2 in registers (scale folded into one FMA), and
    wgmma P V with float32 accumulation; a schedule barrier alternates the two
    warpgroups so one's softmax overlaps the other's matrix work.

Inactive blocks are never loaded nor computed. Tails: TMA reads past the
sequence end are zero-filled and writes past it dropped, so inputs are not
padded (except to a multiple of 8 rows, TMA's tile); keys past S live only
in block n-1, which (the table is sorted) is the last entry of its row and
runs as one peeled step with a key mask. Empty rows give zeros and
lse = -inf, as in the other backends. Dense attention (table=None) runs a
static loop over every key block, without table reads.

Needs a Hopper GPU, 16-bit inputs, head_dim a multiple of 64 (64 or 128 here)
and block_size 128. The lse-only pass (`block_sparse_lse`, used by the
sparsity map) has no P V to speed up and stays on the Triton kernel.
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
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import attention_triton
from pallas_kernels.block_table import BlockTable, check_block_table

__all__ = ["MosaicConfig", "block_sparse_attention_fwd", "block_sparse_lse",
           "is_supported_device"]

HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)
BLOCK_SIZE = 128            # one CTA's query rows = one mask block
_ROWS_PER_WG = 64           # wgmma M per compute warpgroup
_COMPUTE_WGS = BLOCK_SIZE // _ROWS_PER_WG
_SMEM_LIMIT = 232448        # bytes of shared memory per block on sm_90
_SMEM_RESERVE = 4096
_MEMORY_REGISTERS = 40       # per thread of the memory warpgroup
_MAX_COMPUTE_REGISTERS = (65536 // 128 - _MEMORY_REGISTERS) // _COMPUTE_WGS // 8 * 8
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Launch parameters.

  Attributes:
    stages: K/V shared-memory slots in flight (2, 3 or 4; more than 2 only
      fits in the 227 KB of shared memory with head_dim 64).
    compute_registers: registers per thread given to the compute warpgroups
      (the memory warpgroup gets 40; at most 232 fit).
    heads_fastest: order of the (batch, head, query block) tiles. False:
      query blocks fastest, so the tiles in flight share one head's K/V in
      L2. True: heads fastest, as jax's FA3 kernel launches.
    tiles_per_cta: tiles each CTA runs back to back (consecutive in that
      order). With more than one, the memory warpgroup loads the next tile's
      Q and first K/V blocks while the compute warpgroups finish the current
      tile, hiding the per-tile start-up that weighs on short rows (few
      active blocks); the hardware still balances whole CTAs. Measured no
      gain (with longest_first a CTA's tiles are a head's k longest rows,
      which works against the balancing).
    longest_first: within each (batch, head) run the query blocks in
      descending order of their active-block count (an argsort of the counts
      per call), so the shortest rows fill the last wave (LPT scheduling)
      while the tiles in flight still share one head's K/V. Measured +1-5%
      effective throughput at density 0.1-0.25 (H100), never a loss beyond
      noise; tiles_per_cta > 1 measured no gain (both in
      benchmarks/results/sweeps/mosaic-order-*.json).
  """

  stages: int = 2
  compute_registers: int = 232
  heads_fastest: bool = False
  tiles_per_cta: int = 1
  longest_first: bool = True

  def validate(self, head_dim: int) -> None:
    if self.stages not in (2, 3, 4):
      raise ValueError(f"MosaicConfig.stages must be 2, 3 or 4, got {self.stages}")
    if not 1 <= self.tiles_per_cta <= 16:
      raise ValueError(f"MosaicConfig.tiles_per_cta must be in [1, 16], got "
                       f"{self.tiles_per_cta}")
    # setmaxnreg takes multiples of 8, and the three warpgroups must fit the
    # SM's 64K registers: asking for more hangs the kernel (seen on an H200).
    regs = self.compute_registers
    if regs % 8 or not 24 <= regs <= _MAX_COMPUTE_REGISTERS:
      raise ValueError(
          f"MosaicConfig.compute_registers must be a multiple of 8 in [24, "
          f"{_MAX_COMPUTE_REGISTERS}] (2 x 128 threads x it + 128 x "
          f"{_MEMORY_REGISTERS} <= 65536), got {regs}")
    q_slots = min(2, self.tiles_per_cta)
    tiles = 2 * (q_slots * _COMPUTE_WGS * _ROWS_PER_WG
                 + 2 * self.stages * BLOCK_SIZE) * head_dim
    # + lse staging, barriers and alignment: 2.7 KB measured (stages=3, D=128).
    if tiles + _SMEM_RESERVE > _SMEM_LIMIT:
      raise ValueError(
          f"MosaicConfig.stages={self.stages} with head_dim={head_dim} and "
          f"tiles_per_cta={self.tiles_per_cta} needs "
          f"{(tiles + _SMEM_RESERVE) // 1024} KB of shared memory (> "
          f"{_SMEM_LIMIT // 1024} KB per block on sm_90); use fewer stages")


DEFAULT_CONFIG = MosaicConfig()


def is_supported_device(device: Optional[jax.Device] = None) -> bool:
  """True on an sm_90 (Hopper) GPU, the only target of this kernel."""
  device = device or jax.devices()[0]
  return (device.platform == "gpu"
          and str(getattr(device, "compute_capability", "")) in ("9.0", "9.0a"))


def _when(cond):
  """pl.when that also takes a static Python bool (the dense path's bounds)."""
  if isinstance(cond, bool):
    return (lambda f: f()) if cond else (lambda f: None)
  return pl.when(cond)


def _tile_coords(j, *, heads: int, num_blocks: int, heads_fastest: bool):
  """Linear tile id -> (batch, head, query block) in the configured order."""
  if heads_fastest:
    return j // (heads * num_blocks), j % heads, (j // heads) % num_blocks
  return j // (heads * num_blocks), (j // num_blocks) % heads, j % num_blocks


def _kernel(table_refs, q_ref, k_ref, v_ref, out_ref, lse_ref, scoped, *,
            seq_len: int, num_blocks: int, heads: int, num_tiles: int,
            tiles_per_cta: int, q_slots: int, stages: int, scale_log2: float,
            per_batch: bool, per_head: bool, heads_fastest: bool,
            compute_registers: int):
  (qo_smem3, k_smem, v_smem, lse_smem3), loaded, freed, schedule = scoped
  k_loaded, v_loaded, q_loaded = loaded
  k_freed, v_freed, q_freed = freed
  wg = lax.axis_index("wg")
  head_dim = q_ref.shape[-1]
  dtype = q_ref.dtype
  first_tile = lax.axis_index("ctas") * tiles_per_cta
  my_tiles = jnp.minimum(tiles_per_cta, num_tiles - first_tile)
  tail_len = seq_len - (num_blocks - 1) * BLOCK_SIZE     # valid keys in block n-1
  has_tail = tail_len != BLOCK_SIZE

  def tile_info(u):
    """Coordinates, step count and key-block lookup of this CTA's tile u."""
    bi, hi, qi = _tile_coords(first_tile + u, heads=heads, num_blocks=num_blocks,
                              heads_fastest=heads_fastest)
    if table_refs is None:
      # Dense: a static loop over every key block, no table reads (FA3's loop).
      return bi, hi, qi, num_blocks, (lambda t: t), num_blocks - int(has_tail)
    idx_ref, cnt_ref, order_ref = table_refs
    lead = (bi if per_batch else 0, hi if per_head else 0)
    if order_ref is not None:
      qi = order_ref[(*lead, qi)]        # the qi-th longest row of this head
    row = (*lead, qi)
    count = cnt_ref[row]
    block_id = lambda t: idx_ref[(*row, t)]
    n_main = count
    if has_tail:
      last = block_id(jnp.maximum(count - 1, 0))
      tail_active = jnp.logical_and(count > 0, last == num_blocks - 1)
      n_main = count - tail_active.astype(jnp.int32)
    return bi, hi, qi, count, block_id, n_main

  def ring_slot(g):
    return lax.rem(g, jnp.array(stages, g.dtype))

  def schedule_barrier():
    plgpu.barrier_arrive(schedule)
    plgpu.barrier_wait(schedule)

  @pl.when(wg < _COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(compute_registers, action="increase")
    rows = plgpu.Layout.WGMMA.reduce(1)

    def tile(u, g0):
      # g0: K/V steps this CTA has consumed before this tile (ring position).
      bi, hi, qi, count, _, n_main = tile_info(u)
      qslot = lax.rem(u, jnp.int32(q_slots))
      qo_smem = qo_smem3.at[qslot, wg]
      lse_smem = lse_smem3.at[qslot, wg]
      q_base = qi * BLOCK_SIZE + wg * _ROWS_PER_WG
      plgpu.barrier_wait(q_loaded.at[qslot * _COMPUTE_WGS + wg])
      m_i = plgpu.layout_cast(jnp.full((_ROWS_PER_WG,), -jnp.inf, jnp.float32), rows)
      l_i = plgpu.layout_cast(jnp.full((_ROWS_PER_WG,), 0, jnp.float32), rows)
      acc = plgpu.layout_cast(jnp.full((_ROWS_PER_WG, head_dim), 0, jnp.float32),
                              plgpu.Layout.WGMMA)

      @_when(count > 0)
      def _():
        plgpu.barrier_wait(k_loaded.at[ring_slot(g0)])

      pl.when(wg == 1)(schedule_barrier)

      def step(t, carry, masked: bool):
        acc, m_i, l_i = carry
        slot = ring_slot(g0 + t)

        def qk_scope(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
          schedule_barrier()
          return acc_ref[...]

        qk = pl.run_scoped(qk_scope, plgpu.ACC((_ROWS_PER_WG, BLOCK_SIZE), jnp.float32))
        plgpu.barrier_arrive(k_freed.at[slot])
        if masked:
          key = plgpu.broadcasted_iota(jnp.int32, (_ROWS_PER_WG, BLOCK_SIZE), 1,
                                       layout=plgpu.Layout.WGMMA)
          qk = jnp.where(key < tail_len, qk, -jnp.inf)

        # m is kept in scaled base-2 units: p = exp2(qk * c - m) is one FMA.
        m_new = jnp.maximum(m_i, qk.max(axis=1) * scale_log2)
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(qk * scale_log2 - lax.broadcast_in_dim(m_new, qk.shape, [0]))
        acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i *= alpha
        p16 = p.astype(dtype)
        if head_dim <= 128:
          # The order jax's FA3 found fastest: row sums before the barriers.
          l_i += p.sum(axis=1)
          acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        plgpu.barrier_arrive(schedule)          # softmax done
        plgpu.barrier_wait(v_loaded.at[slot])
        plgpu.barrier_wait(schedule)            # tensor cores free
        if head_dim > 128:
          l_i += p.sum(axis=1)

        def wait_next_k():
          nxt = t + 1

          @pl.when(nxt < count)
          def _():
            plgpu.barrier_wait(k_loaded.at[ring_slot(g0 + nxt)])

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          wait_next_k()

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_freed.at[slot])
        return acc, m_new, l_i

      carry = lax.fori_loop(0, n_main, functools.partial(step, masked=False),
                            (acc, m_i, l_i))
      if has_tail:
        carry = lax.fori_loop(n_main, count, functools.partial(step, masked=True),
                              carry)
      pl.when(wg == 0)(schedule_barrier)
      acc, m_i, l_i = carry

      l_safe = jnp.where(l_i == 0.0, 1.0, l_i)       # empty row: zeros, lse -inf
      acc /= lax.broadcast_in_dim(l_safe, acc.shape, [0])
      qo_smem[...] = acc.astype(dtype)              # Q is no longer needed
      lse_smem[...] = m_i * _LN2 + jnp.log(l_safe)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[bi, pl.ds(q_base, _ROWS_PER_WG), hi])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(q_base, _ROWS_PER_WG)])
      # Once the stores have read the slot, the memory warpgroup may refill it
      # with a later tile's Q (which it loads while this epilogue runs).
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      plgpu.barrier_arrive(q_freed.at[qslot])
      return g0 + count

    lax.fori_loop(0, my_tiles, tile, jnp.int32(0))
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE_WGS)
  def _memory():
    plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

    def tile(u, g0):
      bi, hi, qi, count, block_id, _ = tile_info(u)
      qslot = lax.rem(u, jnp.int32(q_slots))

      @pl.when(u >= q_slots)
      def _():
        plgpu.barrier_wait(q_freed.at[qslot])

      for w in range(_COMPUTE_WGS):
        rows = pl.ds(qi * BLOCK_SIZE + w * _ROWS_PER_WG, _ROWS_PER_WG)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], qo_smem3.at[qslot, w],
                                q_loaded.at[qslot * _COMPUTE_WGS + w])

      @pl.loop(0, count)
      def _(t):
        g = g0 + t
        slot = ring_slot(g)
        src = (bi, pl.ds(block_id(t) * BLOCK_SIZE, BLOCK_SIZE), hi)
        refill = g >= stages            # the slot held step g - stages

        @pl.when(refill)
        def _():
          plgpu.barrier_wait(k_freed.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_loaded.at[slot])

        @pl.when(refill)
        def _():
          plgpu.barrier_wait(v_freed.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_loaded.at[slot])
      return g0 + count

    lax.fori_loop(0, my_tiles, tile, jnp.int32(0))


@functools.partial(jax.jit, static_argnames=("sm_scale", "config"))
def _fwd(q, k, v, indices, counts, *, sm_scale: float, config: MosaicConfig):
  """indices, counts: the table, or both None for dense attention."""
  b, s, h, d = q.shape
  n = -(-s // BLOCK_SIZE)
  dense = indices is None
  tb, th = (1, 1) if dense else indices.shape[:2]
  if tb not in (1, b) or th not in (1, h) or (
      not dense and counts.shape != indices.shape[:-1]):
    raise ValueError(f"table of shape {indices.shape} does not broadcast to "
                     f"[{b}, {h}, {n}, w]")
  stages = config.stages
  num_tiles = b * h * n
  per_cta = config.tiles_per_cta
  q_slots = min(2, per_cta)
  order = None
  if not dense and config.longest_first:
    order = jnp.argsort(-counts, axis=-1, stable=True).astype(jnp.int32)
  table_args = () if dense else (indices, counts) + (() if order is None else (order,))
  kernel = functools.partial(
      _kernel, seq_len=s, num_blocks=n, heads=h, num_tiles=num_tiles,
      tiles_per_cta=per_cta, q_slots=q_slots, stages=stages,
      scale_log2=float(sm_scale) * _LOG2E, per_batch=tb > 1, per_head=th > 1,
      heads_fastest=config.heads_fastest, compute_registers=config.compute_registers)

  def entry(*refs):
    table_refs = None if dense else (*refs[:2], refs[2] if order is not None else None)
    q_ref, k_ref, v_ref, out_ref, lse_ref = refs[-5:]
    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    smem = (
        plgpu.SMEM((q_slots, _COMPUTE_WGS, _ROWS_PER_WG, d), q.dtype, transforms=tiles),
        plgpu.SMEM((stages, BLOCK_SIZE, d), q.dtype, transforms=tiles),
        plgpu.SMEM((stages, BLOCK_SIZE, d), q.dtype, transforms=tiles),
        plgpu.SMEM((q_slots, _COMPUTE_WGS, _ROWS_PER_WG), jnp.float32),
    )
    loaded = (plgpu.Barrier(num_barriers=stages),
              plgpu.Barrier(num_barriers=stages),
              plgpu.Barrier(num_barriers=q_slots * _COMPUTE_WGS))
    freed = (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
             plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
             plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=q_slots))
    schedule = plgpu.Barrier(num_arrivals=_COMPUTE_WGS)
    pl.run_scoped(
        lambda *scoped: kernel(table_refs, q_ref, k_ref, v_ref, out_ref,
                               lse_ref, scoped),
        smem, loaded, freed, schedule, collective_axes="wg")

  # TMA tiles the sequence axis by 8 rows: pad the rare S % 8 != 0 (the pad
  # keys sit in block n-1 and are masked like any tail).
  pad = -s % 8
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
  out, lse = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((b, h, n * BLOCK_SIZE), jnp.float32)),
      grid=(-(-num_tiles // per_cta),),
      grid_names=("ctas",),
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(*table_args, q, k, v)
  return out[:, :s], lse[..., :s]


def _check_table(table: Optional[BlockTable], n: int):
  # The kernel reads ids straight from the table: shapes must match and the
  # rows must be sorted and in range, as compact_block_mask builds them (the
  # public API canonicalises anything else before calling here).
  if table is None:
    return
  check_block_table(table, n, name="table")
  if table.indices.ndim != 4:
    raise ValueError(f"mosaic_gpu backend: table must be [batch, heads, n, w], got "
                     f"indices shape {table.indices.shape}")
  if not table.canonical:
    raise ValueError("mosaic_gpu backend: table must be canonical (built by "
                     "compact_block_mask or dense_block_table); pass hand-built "
                     "tables through pallas_kernels.block_sparse_attention")


def _check(q, block_size, sm_scale, config, interpret):
  if interpret:
    # jax's GPU interpreter simulates every warpgroup and barrier: minutes for
    # even one small head. CPU tests lower this kernel instead (see tests/).
    raise ValueError("mosaic_gpu backend has no interpret mode; use "
                     "implementation='triton' with interpret=True on CPU")
  d = q.shape[-1]
  if d not in HEAD_DIMS:
    raise ValueError(f"mosaic_gpu backend: head_dim must be one of {HEAD_DIMS}, "
                     f"got {d}")
  if jnp.dtype(q.dtype) not in map(jnp.dtype, DTYPES):
    raise ValueError(f"mosaic_gpu backend: dtype must be bfloat16 or float16, got "
                     f"{q.dtype}; use implementation='triton' for float32")
  if block_size != BLOCK_SIZE:
    raise ValueError(f"mosaic_gpu backend: block_size must be {BLOCK_SIZE}, got "
                     f"{block_size}; use implementation='triton' for 64")
  if not sm_scale > 0:
    raise ValueError(f"mosaic_gpu backend: sm_scale must be > 0, got {sm_scale}")
  config.validate(d)


def block_sparse_attention_fwd(q, k, v, table: Optional[BlockTable], *,
                               block_size: int, sm_scale: Optional[float] = None,
                               interpret: bool = False,
                               config: MosaicConfig = DEFAULT_CONFIG):
  """Returns (out [B, S, H, D] in q.dtype, lse float32 [B, H, S]).

  table=None is dense attention through a static loop (no table reads).
  """
  scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  _check(q, block_size, scale, config, interpret)
  _check_table(table, -(-q.shape[1] // BLOCK_SIZE))
  indices, counts = (None, None) if table is None else (table.indices, table.counts)
  return _fwd(q, k, v, indices, counts, sm_scale=scale, config=config)


def block_sparse_lse(q, k, table: Optional[BlockTable], *, block_size: int,
                     sm_scale: Optional[float] = None, interpret: bool = False):
  """Row log-sum-exp only, float32 [B, H, S]: the Triton kernel's QK-only pass."""
  return attention_triton.block_sparse_lse(q, k, table, block_size=block_size,
                                           sm_scale=sm_scale, interpret=interpret)

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

Quantized precisions (`pallas_kernels.quantize`: "fp8", "int8_fp8",
"int8_bf16"): Q and K arrive as float8_e4m3fn or int8 with per-block scales
(K smoothed by its mean); Q K^T accumulates in float32 or int32 and each step
rescales by scale_q * scale_k[key block] * sm_scale (one FMA per score, as in
bf16). With FP8 P V, V arrives transposed (K-major, [B, H, D, S]: Hopper's
8-bit wgmma takes no transposed operand) with its keys permuted within each
16-key group so that the float32 scores' register layout becomes wgmma's 8-bit
A-operand layout without data movement (`_p_to_fp8_operand`); P enters as
e4m3(448 p); each step's P V accumulates into the running float32
accumulator (MosaicConfig.pv_two_level=True puts it in a fresh one first,
SageAttention2's two-level accumulation: same error measured, 3-7% slower).
int8 scores become float32 by a bit-level add (MosaicConfig.int8_magic). The
quantized kernels lower with Lane semantics on every jax version.

The lse-only pass (`block_sparse_lse`, used by the sparsity map) is the same
kernel without V and P V.

Needs a Hopper GPU, 16-bit inputs, head_dim 64 or 128 and block_size 128.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import quantize
from pallas_kernels.block_table import BlockTable, check_block_table

__all__ = ["MosaicConfig", "block_sparse_attention_fwd", "block_sparse_lse",
           "quantized_attention_fwd", "quantized_lse", "default_config",
           "is_supported_device", "PRECISIONS"]

HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)
PRECISIONS = quantize.PRECISIONS     # all computed natively by this backend
BLOCK_SIZE = 128            # one CTA's query rows = one mask block
_ROWS_PER_WG = 64           # wgmma M per compute warpgroup
_COMPUTE_WGS = BLOCK_SIZE // _ROWS_PER_WG
_SMEM_LIMIT = 232448        # bytes of shared memory per block on sm_90
_SMEM_RESERVE = 4096
_MEMORY_REGISTERS = 40       # per thread of the memory warpgroup
_MAX_COMPUTE_REGISTERS = (65536 // 128 - _MEMORY_REGISTERS) // _COMPUTE_WGS // 8 * 8
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_LOG2_P_SCALE = math.log2(quantize.P_SCALE)
_LN_P_SCALE = math.log(quantize.P_SCALE)
_LOWERINGS = (None, "lane", "warpgroup")
_MAGIC = 12582912.0          # 1.5 * 2^23: adding an int < 2^22 to its bits adds to its value
_MAGIC_BITS = 0x4B400000


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Launch parameters.

  Attributes:
    stages: K/V shared-memory slots in flight (2, 3 or 4; with 16-bit inputs
      more than 2 only fit in the 227 KB of shared memory with head_dim 64,
      8-bit tiles fit 4 at head_dim 128).
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
      gain at head_dim 128 (with longest_first a CTA's tiles are a head's k
      longest rows, which works against the balancing).
    longest_first: within each (batch, head) run the query blocks in
      descending order of their active-block count (an argsort of the counts
      per call), so the shortest rows fill the last wave (LPT scheduling)
      while the tiles in flight still share one head's K/V. Measured +1-5%
      effective throughput at density 0.1-0.25 (H100), never a loss beyond
      noise; tiles_per_cta > 1 measured no gain (both in
      benchmarks/results/sweeps/mosaic-order-*.json).
    lowering: Mosaic GPU lowering semantics: None = jax's default (Lane in
      jax 0.10, Warpgroup from 0.11), "lane" or "warpgroup". The quantized
      kernels always lower with Lane semantics.
    exp2_poly_groups: of each 128-key tile's 16 eight-column groups, how many
      (the last ones) exponentiate by a degree-3 polynomial on the FMA pipe
      (relative error 2e-4, below bf16 P's rounding) instead of the SFU's
      ex2: at head_dim 64 the SFU's 16 ex2 per clock match the tensor cores'
      time per tile, so moving a quarter of them off it can unblock the
      matrix work (FlashAttention-4's trick). 0 = all on the SFU; needs Lane
      semantics (set when > 0). Measured no gain on an H200 (D=64 bf16:
      +0-13% time for 2-6 groups; D=128 int8_fp8: +4-8%): the softmax is not
      SFU-bound alone, the extra FMA-pipe work costs as much as it frees.
    int8_magic: int8 Q K^T only: turn the int32 scores into float32 by adding
      0x4B400000 to their bits (the float 1.5 * 2^23 + x, exact for |x| <
      2^22) and folding the bias into the softmax FMA, instead of one
      int-to-float conversion per score, which shares the SFU's 16 per clock.
    pv_two_level: FP8 P V only: each step's P V goes to a fresh float32
      accumulator that is added to the running one (SageAttention2's guard
      against the FP8 tensor cores' reduced-precision accumulation); False
      accumulates into the running one as the 16-bit kernel does.
  """

  stages: int = 2
  compute_registers: int = 232
  heads_fastest: bool = False
  tiles_per_cta: int = 1
  longest_first: bool = True
  lowering: Optional[str] = None
  exp2_poly_groups: int = 0
  int8_magic: bool = False
  pv_two_level: bool = True

  def validate(self, head_dim: int, precision: str = "bf16", with_out: bool = True) -> None:
    if self.stages not in (2, 3, 4):
      raise ValueError(f"MosaicConfig.stages must be 2, 3 or 4, got {self.stages}")
    if not 1 <= self.tiles_per_cta <= 16:
      raise ValueError(f"MosaicConfig.tiles_per_cta must be in [1, 16], got "
                       f"{self.tiles_per_cta}")
    if self.lowering not in _LOWERINGS:
      raise ValueError(f"MosaicConfig.lowering must be one of {_LOWERINGS}, got "
                       f"{self.lowering!r}")
    if not 0 <= self.exp2_poly_groups <= 16:
      raise ValueError(f"MosaicConfig.exp2_poly_groups must be in [0, 16], got "
                       f"{self.exp2_poly_groups}")
    if self.exp2_poly_groups and self.lowering == "warpgroup":
      raise ValueError("MosaicConfig.exp2_poly_groups needs Lane lowering semantics")
    if precision != "bf16" and self.lowering == "warpgroup":
      raise ValueError(f"MosaicConfig.lowering='warpgroup' is not supported with "
                       f"precision={precision!r} (the quantized kernels lower with "
                       f"Lane semantics)")
    # setmaxnreg takes multiples of 8, and the three warpgroups must fit the
    # SM's 64K registers: asking for more hangs the kernel (seen on an H200).
    regs = self.compute_registers
    if regs % 8 or not 24 <= regs <= _MAX_COMPUTE_REGISTERS:
      raise ValueError(
          f"MosaicConfig.compute_registers must be a multiple of 8 in [24, "
          f"{_MAX_COMPUTE_REGISTERS}] (2 x 128 threads x it + 128 x "
          f"{_MEMORY_REGISTERS} <= 65536), got {regs}")
    need = _smem_bytes(self, head_dim, precision, with_out)
    # + lse staging, barriers and alignment: 2.7 KB measured (stages=3, D=128).
    if need + _SMEM_RESERVE > _SMEM_LIMIT:
      raise ValueError(
          f"MosaicConfig.stages={self.stages} with head_dim={head_dim}, "
          f"precision={precision!r} and tiles_per_cta={self.tiles_per_cta} needs "
          f"{(need + _SMEM_RESERVE) // 1024} KB of shared memory (> "
          f"{_SMEM_LIMIT // 1024} KB per block on sm_90); use fewer stages")


def _smem_bytes(config: MosaicConfig, head_dim: int, precision: str, with_out: bool) -> int:
  qk_bytes = 2 if precision == "bf16" else 1
  v_bytes = 1 if quantize.fp8_pv(precision) else 2
  q_slots = min(2, config.tiles_per_cta)
  need = q_slots * _COMPUTE_WGS * _ROWS_PER_WG * head_dim * qk_bytes
  need += config.stages * BLOCK_SIZE * head_dim * qk_bytes
  if with_out:
    need += config.stages * BLOCK_SIZE * head_dim * v_bytes
    if qk_bytes == 1:     # the output cannot be staged in an 8-bit Q slot
      need += _COMPUTE_WGS * _ROWS_PER_WG * head_dim * 2
  return need


DEFAULT_CONFIG = MosaicConfig()


# Measured on an H200 (jax 0.11.2; benchmarks/results/kernel-nvidia-h200-2026-12-02-fp8-*):
# int8 scores by the bit-level add and FP8 P V into the running accumulator
# were the fastest correct quantized variant (3-7% over the plain one, same
# error); at head_dim 64 Lane lowering ran 2.8% ahead of jax 0.11's default
# Warpgroup lowering (17550 tokens x 30 heads, d = 0.2).
QUANTIZED_CONFIG = MosaicConfig(int8_magic=True, pv_two_level=False)
HEAD_DIM_64_CONFIG = MosaicConfig(lowering="lane")


def default_config(head_dim: int, precision: str = "bf16") -> MosaicConfig:
  """The launch parameters used when none are given."""
  if precision != "bf16":
    return QUANTIZED_CONFIG
  if head_dim == 64:
    return HEAD_DIM_64_CONFIG
  return DEFAULT_CONFIG


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


def _tiles(dtype, minor: int):
  """SMEM transforms of a [rows, minor] tile of `dtype` for TMA and wgmma."""
  row_bytes = minor * jnp.dtype(dtype).itemsize
  swizzle = min(128, row_bytes)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _p_to_fp8_operand(p):
  """float32 P [64, 128] (wgmma accumulator layout) -> e4m3 wgmma A operand.

  The accumulator layout gives each thread columns 8g + 2c + {0, 1} of every
  8-column group g (c = lane % 4); the 8-bit A layout wants 16j + 4c + {0..3}
  of every 16-column group j. Concatenating the thread's e4m3 pairs of groups
  2j and 2j + 1 fills operand columns 16j + 4c + e with score columns
  16j + 8 (e // 2) + 2c + e % 2: a fixed permutation within each 16-key group,
  undone by storing V's keys in that order (quantize.fp8_pv_key_order). No
  data moves between threads.
  """
  from jax._src.lib.mlir import ir  # pylint: disable=import-outside-toplevel
  from jax._src.lib.mlir.dialects import vector  # pylint: disable=import-outside-toplevel
  from jax.experimental import mosaic as _  # pylint: disable=import-outside-toplevel,unused-import
  import jax.experimental.mosaic.gpu as mgpu  # pylint: disable=import-outside-toplevel
  from jax.experimental.mosaic.gpu import fragmented_array as fa  # pylint: disable=import-outside-toplevel
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=import-outside-toplevel

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA,),
      return_type=plgpu.ShapeDtypeStruct(p.shape, quantize.FP8, plgpu.Layout.WGMMA_8BIT))
  def convert(_, x):
    f8 = ir.Float8E4M3FNType.get()
    i16 = ir.IntegerType.get_signless(16)
    x8 = x.astype(f8)                              # vector<2 x e4m3> registers
    old = x8.registers
    new = np.empty(fa.WGMMA_LAYOUT_8BIT.registers_shape(tuple(x.shape)), dtype=object)
    as16 = lambda r: mgpu_utils.bitcast(r, ir.VectorType.get((1,), i16))
    for idx in np.ndindex(new.shape):
      j = idx[1]
      lo = old[(idx[0], 2 * j, *idx[2:])]
      hi = old[(idx[0], 2 * j + 1, *idx[2:])]
      pair = mgpu_utils.vector_concat([as16(lo), as16(hi)])     # vector<2 x i16>
      new[idx] = vector.bitcast(ir.VectorType.get((4,), f8), pair)
    return mgpu.FragmentedArray(_registers=new, _layout=fa.WGMMA_LAYOUT_8BIT,
                                _is_signed=None)

  return convert(p)


# 2^f on [-1/2, 1/2], least-squares for relative error (max 1.8e-4): 1 + f (c1 + f (c2 + f c3)).
_EXP2_C1, _EXP2_C2, _EXP2_C3 = "0f3F317D30", "0f3E77BAF5", "0f3D5FA700"
_EXP2_POLY = f"""{{
  .reg .f32 x, t, r, f, p;
  .reg .b32 i, b;
  max.ftz.f32 x, $1, 0fC2FE0000;
  add.rn.f32 t, x, 0f4B400000;
  sub.rn.f32 r, t, 0f4B400000;
  sub.rn.f32 f, x, r;
  fma.rn.f32 p, f, {_EXP2_C3}, {_EXP2_C2};
  fma.rn.f32 p, p, f, {_EXP2_C1};
  fma.rn.f32 p, p, f, 0f3F800000;
  mov.b32 i, t;
  sub.s32 i, i, 0x4B400000;
  shl.b32 i, i, 23;
  mov.b32 b, p;
  add.s32 b, b, i;
  mov.b32 $0, b;
}}"""


def _exp2_mixed(x, poly_groups: int):
  """exp2 of f32 [64, 128] (wgmma layout): the last `poly_groups` of the 16
  eight-column groups by the polynomial above on the FMA pipe (x clamped at
  -127, so -inf gives 0: 2^round(x) is added to the exponent bits), the rest
  by ex2.approx on the SFU."""
  from jax._src.lib.mlir import ir  # pylint: disable=import-outside-toplevel
  from jax._src.lib.mlir.dialects import llvm  # pylint: disable=import-outside-toplevel
  import jax.experimental.mosaic.gpu as mgpu  # pylint: disable=import-outside-toplevel

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA,),
      return_type=plgpu.ShapeDtypeStruct(x.shape, jnp.float32, plgpu.Layout.WGMMA))
  def exp2(_, v):
    f32 = ir.F32Type.get()
    groups = v.shape[1] // 8
    ex2 = mgpu.FragmentedArray._lift_fast_instr("ex2.approx.ftz.f32")  # pylint: disable=protected-access
    poly = mgpu.FragmentedArray._lift_fast_instr(  # pylint: disable=protected-access
        lambda a: llvm.inline_asm(f32, [a], _EXP2_POLY, "=f,f"))
    out = np.empty_like(v.registers)
    for idx, reg in np.ndenumerate(v.registers):
      out[idx] = poly(reg) if idx[1] >= groups - poly_groups else ex2(reg)
    return mgpu.FragmentedArray(_registers=out, _layout=v.layout, _is_signed=None)

  return exp2(x)


@dataclasses.dataclass(frozen=True)
class _Kind:
  """What one kernel instance computes (static)."""
  qk: Optional[str] = None      # None (16-bit Q K^T), "fp8" or "int8"
  pv_fp8: bool = False          # FP8 P V from a K-major V^T
  with_out: bool = True         # False: the lse only (no V, no P V)

  @property
  def quantized(self) -> bool:
    return self.qk is not None or self.pv_fp8


def _kernel(table_refs, scale_refs, q_ref, k_ref, v_ref, out_ref, lse_ref, scoped, *,
            seq_len: int, num_blocks: int, heads: int, num_tiles: int,
            tiles_per_cta: int, q_slots: int, stages: int, scale_log2: float,
            per_batch: bool, per_head: bool, heads_fastest: bool,
            compute_registers: int, kind: _Kind, out_dtype, exp2_poly_groups: int = 0,
            int8_magic: bool = False, pv_two_level: bool = True):
  (q_smem3, k_smem, v_smem, o_smem2, lse_smem3), loaded, freed, schedule = scoped
  k_loaded, v_loaded, q_loaded = loaded
  k_freed, v_freed, q_freed = freed
  wg = lax.axis_index("wg")
  head_dim = q_ref.shape[-1]
  dense = table_refs is None
  tail_len = seq_len - (num_blocks - 1) * BLOCK_SIZE     # valid keys in block n-1
  has_tail = tail_len != BLOCK_SIZE
  first_tile = lax.axis_index("ctas") * tiles_per_cta
  my_tiles = jnp.minimum(tiles_per_cta, num_tiles - first_tile)
  with_out = kind.with_out

  def tile_info(u):
    """Coordinates, step count and key-block lookup of this CTA's tile u."""
    bi, hi, qi = _tile_coords(first_tile + u, heads=heads, num_blocks=num_blocks,
                              heads_fastest=heads_fastest)
    if dense:
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
      q_smem = q_smem3.at[qslot, wg]
      o_smem = q_smem if o_smem2 is None else o_smem2.at[wg]
      lse_smem = lse_smem3.at[qslot, wg]
      q_base = qi * BLOCK_SIZE + wg * _ROWS_PER_WG

      if kind.qk is None:
        step_scale = lambda t: scale_log2
      else:
        # Per-step factor of the raw scores: sm_scale log2(e) q_scale k_scale[t].
        qs_ref, ks_ref, _ = scale_refs
        c_q = scale_log2 * qs_ref[bi, hi, qi * _COMPUTE_WGS + wg]
        if dense:
          step_scale = lambda t: c_q * ks_ref[bi, hi, t]
        else:
          step_scale = lambda t: c_q * ks_ref[bi, hi, qi, t]

      plgpu.barrier_wait(q_loaded.at[qslot * _COMPUTE_WGS + wg])
      m_i = plgpu.layout_cast(jnp.full((_ROWS_PER_WG,), -jnp.inf, jnp.float32), rows)
      l_i = plgpu.layout_cast(jnp.full((_ROWS_PER_WG,), 0, jnp.float32), rows)
      acc = None
      if with_out:
        acc = plgpu.layout_cast(jnp.full((_ROWS_PER_WG, head_dim), 0, jnp.float32),
                                plgpu.Layout.WGMMA)

      @_when(count > 0)
      def _():
        plgpu.barrier_wait(k_loaded.at[ring_slot(g0)])

      pl.when(wg == 1)(schedule_barrier)

      def wait_next_k(t):
        nxt = t + 1

        @pl.when(nxt < count)
        def _():
          plgpu.barrier_wait(k_loaded.at[ring_slot(g0 + nxt)])

      def step(t, carry, masked: bool):
        acc, m_i, l_i, c = carry[:4] if kind.qk is not None else (*carry, scale_log2)
        slot = ring_slot(g0 + t)
        if kind.qk is not None:
          # Prefetch the next step's factor: its load overlaps this step.
          c_next = step_scale(jnp.minimum(t + 1, jnp.maximum(count - 1, 0)))

        def qk_scope(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          schedule_barrier()
          return acc_ref[...]

        acc_dtype = jnp.int32 if kind.qk == "int8" else jnp.float32
        qk = pl.run_scoped(qk_scope, plgpu.ACC((_ROWS_PER_WG, BLOCK_SIZE), acc_dtype))
        plgpu.barrier_arrive(k_freed.at[slot])
        bias = 0.0
        if kind.qk == "int8" and int8_magic:
          # Bits of 1.5 * 2^23 + x: exact, |x| <= 127^2 * 128 < 2^22.
          qk = lax.bitcast_convert_type(qk + jnp.int32(_MAGIC_BITS), jnp.float32)
          bias = _MAGIC
        elif kind.qk == "int8":
          qk = qk.astype(jnp.float32)        # exact: |q.k| < 2^21
        if masked:
          key = plgpu.broadcasted_iota(jnp.int32, (_ROWS_PER_WG, BLOCK_SIZE), 1,
                                       layout=plgpu.Layout.WGMMA)
          qk = jnp.where(key < tail_len, qk, -jnp.inf)

        # m is kept in scaled base-2 units: p = exp2(qk * c - m) is one FMA.
        row_max = qk.max(axis=1)
        m_new = jnp.maximum(m_i, (row_max - bias if bias else row_max) * c)
        alpha = jnp.exp2(m_i - m_new)
        # FP8 P V takes P scaled by 448 (e4m3's range); the row sum carries the
        # same factor, which cancels in acc / l.
        shift = m_new - _LOG2_P_SCALE if kind.pv_fp8 else m_new
        if bias:
          shift = shift + bias * c                 # (bias + x) c - (m + bias c)
        x = qk * c - lax.broadcast_in_dim(shift, qk.shape, [0])
        p = _exp2_mixed(x, exp2_poly_groups) if exp2_poly_groups else jnp.exp2(x)
        if not with_out:
          l_i *= alpha
          l_i += p.sum(axis=1)
          plgpu.barrier_arrive(schedule)
          plgpu.barrier_wait(schedule)
          wait_next_k(t)
          return (acc, m_new, l_i) + ((c_next,) if kind.qk is not None else ())

        acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i *= alpha
        p_op = _p_to_fp8_operand(p) if kind.pv_fp8 else p.astype(v_ref.dtype)
        if head_dim <= 128:
          # The order jax's FA3 found fastest: row sums before the barriers.
          l_i += p.sum(axis=1)
          acc, l_i, m_new, p_op = lax.optimization_barrier((acc, l_i, m_new, p_op))
        plgpu.barrier_arrive(schedule)          # softmax done
        plgpu.barrier_wait(v_loaded.at[slot])
        plgpu.barrier_wait(schedule)            # tensor cores free
        if head_dim > 128:
          l_i += p.sum(axis=1)

        if kind.pv_fp8 and pv_two_level:
          def pv(acc_ref):
            plgpu.wgmma(acc_ref, p_op, v_smem.at[slot].transpose((1, 0)))
            wait_next_k(t)
            return acc_ref[...]
          # Two-level accumulation: this step's P V in a fresh accumulator.
          acc = acc + pl.run_scoped(pv, plgpu.ACC((_ROWS_PER_WG, head_dim), jnp.float32))
        elif kind.pv_fp8:
          def pv(acc_ref):
            plgpu.wgmma(acc_ref, p_op, v_smem.at[slot].transpose((1, 0)))
            wait_next_k(t)
          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        else:
          def pv(acc_ref):
            plgpu.wgmma(acc_ref, p_op, v_smem.at[slot])
            wait_next_k(t)
          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_freed.at[slot])
        return (acc, m_new, l_i) + ((c_next,) if kind.qk is not None else ())

      carry = (acc, m_i, l_i)
      if kind.qk is not None:
        carry += (step_scale(0),)
      carry = lax.fori_loop(0, n_main, functools.partial(step, masked=False), carry)
      if has_tail:
        carry = lax.fori_loop(n_main, count, functools.partial(step, masked=True),
                              carry)
      pl.when(wg == 0)(schedule_barrier)
      acc, m_i, l_i = carry[:3]

      l_safe = jnp.where(l_i == 0.0, 1.0, l_i)       # empty row: zeros, lse -inf
      if with_out:
        if kind.pv_fp8:
          # out = acc / l * scale_v (V's per-(batch, head) scale).
          inv = scale_refs[2][bi, hi] / l_safe
          acc *= lax.broadcast_in_dim(inv, acc.shape, [0])
        else:
          acc /= lax.broadcast_in_dim(l_safe, acc.shape, [0])
        o_smem[...] = acc.astype(out_dtype)        # (16-bit: Q is no longer needed)
      lse = m_i * _LN2 + jnp.log(l_safe)
      if kind.pv_fp8:
        lse -= _LN_P_SCALE
      lse_smem[...] = lse
      plgpu.commit_smem()
      if with_out:
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[bi, pl.ds(q_base, _ROWS_PER_WG), hi])
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
        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem3.at[qslot, w],
                                q_loaded.at[qslot * _COMPUTE_WGS + w])

      @pl.loop(0, count)
      def _(t):
        g = g0 + t
        slot = ring_slot(g)
        start = block_id(t) * BLOCK_SIZE
        src = (bi, pl.ds(start, BLOCK_SIZE), hi)
        refill = g >= stages            # the slot held step g - stages

        @pl.when(refill)
        def _():
          plgpu.barrier_wait(k_freed.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_loaded.at[slot])
        if not with_out:
          return

        @pl.when(refill)
        def _():
          plgpu.barrier_wait(v_freed.at[slot])
        if kind.pv_fp8:
          v_src = v_ref.at[bi, hi, :, pl.ds(start, BLOCK_SIZE)]   # V^T: [D, 128 keys]
        else:
          v_src = v_ref.at[src]
        plgpu.copy_gmem_to_smem(v_src, v_smem.at[slot], v_loaded.at[slot])
      return g0 + count

    lax.fori_loop(0, my_tiles, tile, jnp.int32(0))


@functools.partial(jax.jit, static_argnames=("sm_scale", "config", "kind", "out_dtype"))
def _fwd(q, k, v, indices, counts, scales, *, sm_scale: float, config: MosaicConfig,
         kind: _Kind, out_dtype):
  """The kernel on prepared operands.

  q, k: [B, S, H, D] (16-bit, or int8 / e4m3 with kind.qk); v: [B, S, H, D]
  16-bit, or with kind.pv_fp8 e4m3 V^T [B, H, D, n * 128] (keys in the
  fp8_pv_key_order), or None without output; indices, counts: the table, or
  both None for dense attention; scales: None, or (q_scale [B, H, 2n],
  k_scale ([B, H, n] dense, [B, H, n, w] per table entry), v_scale [B, H] or
  None). Returns (out or None, lse [B, H, S]).
  """
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
  scale_args = () if scales is None else tuple(x for x in scales if x is not None)
  kernel = functools.partial(
      _kernel, seq_len=s, num_blocks=n, heads=h, num_tiles=num_tiles,
      tiles_per_cta=per_cta, q_slots=q_slots, stages=stages,
      scale_log2=float(sm_scale) * _LOG2E, per_batch=tb > 1, per_head=th > 1,
      heads_fastest=config.heads_fastest, compute_registers=config.compute_registers,
      kind=kind, out_dtype=out_dtype, exp2_poly_groups=config.exp2_poly_groups,
      int8_magic=config.int8_magic, pv_two_level=config.pv_two_level)
  with_out = kind.with_out

  def entry(*refs):
    refs = list(refs)
    table_refs = None
    if not dense:
      table_refs = (refs.pop(0), refs.pop(0), refs.pop(0) if order is not None else None)
    scale_refs = None
    if scales is not None:
      scale_refs = tuple(refs.pop(0) if x is not None else None for x in scales)
    q_ref, k_ref = refs.pop(0), refs.pop(0)
    v_ref = refs.pop(0) if with_out else None
    out_ref = refs.pop(0) if with_out else None
    (lse_ref,) = refs
    qk_tiles = _tiles(q.dtype, d)
    smem = [
        plgpu.SMEM((q_slots, _COMPUTE_WGS, _ROWS_PER_WG, d), q.dtype, transforms=qk_tiles),
        plgpu.SMEM((stages, BLOCK_SIZE, d), k.dtype, transforms=qk_tiles),
    ]
    if not with_out:
      smem.append(None)
    elif kind.pv_fp8:
      smem.append(plgpu.SMEM((stages, d, BLOCK_SIZE), v.dtype,
                             transforms=_tiles(v.dtype, BLOCK_SIZE)))
    else:
      smem.append(plgpu.SMEM((stages, BLOCK_SIZE, d), v.dtype, transforms=_tiles(v.dtype, d)))
    if with_out and kind.qk is not None:
      smem.append(plgpu.SMEM((_COMPUTE_WGS, _ROWS_PER_WG, d), out_dtype,
                             transforms=_tiles(out_dtype, d)))
    else:
      smem.append(None)
    smem.append(plgpu.SMEM((q_slots, _COMPUTE_WGS, _ROWS_PER_WG), jnp.float32))
    loaded = (plgpu.Barrier(num_barriers=stages),
              plgpu.Barrier(num_barriers=stages),
              plgpu.Barrier(num_barriers=q_slots * _COMPUTE_WGS))
    freed = (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
             plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
             plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=q_slots))
    schedule = plgpu.Barrier(num_arrivals=_COMPUTE_WGS)
    present = tuple(x for x in smem if x is not None)

    def body(smem_refs, *barriers):
      it = iter(smem_refs)
      allocated = tuple(next(it) if x is not None else None for x in smem)
      kernel(table_refs, scale_refs, q_ref, k_ref, v_ref, out_ref, lse_ref,
             (allocated, *barriers))

    pl.run_scoped(body, present, loaded, freed, schedule, collective_axes="wg")

  # TMA tiles the sequence axis by 8 rows: pad the rare S % 8 != 0 (the pad
  # keys sit in block n-1 and are masked like any tail).
  pad = -s % 8
  if pad:
    q, k = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k))
    if with_out and not kind.pv_fp8:
      v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  out_shape = [jax.ShapeDtypeStruct((b, h, n * BLOCK_SIZE), jnp.float32)]
  if with_out:
    out_shape.insert(0, jax.ShapeDtypeStruct(q.shape, out_dtype))
  params = dict(approx_math=True)
  lowering = "lane" if kind.quantized or config.exp2_poly_groups else config.lowering
  if lowering is not None:
    params["lowering_semantics"] = (plgpu.LoweringSemantics.Lane if lowering == "lane"
                                    else plgpu.LoweringSemantics.Warpgroup)
  operands = (*table_args, *scale_args, q, k) + ((v,) if with_out else ())
  outs = plgpu.kernel(
      entry,
      out_type=tuple(out_shape),
      grid=(-(-num_tiles // per_cta),),
      grid_names=("ctas",),
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(**params),
  )(*operands)
  if with_out:
    out, lse = outs
    return out[:, :s], lse[..., :s]
  (lse,) = outs
  return None, lse[..., :s]


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


def _check(q, block_size, sm_scale, config, interpret, precision="bf16", with_out=True,
           dtype=None):
  if interpret:
    # jax's GPU interpreter simulates every warpgroup and barrier: minutes for
    # even one small head. CPU tests lower this kernel instead (see tests/).
    raise ValueError("mosaic_gpu backend has no interpret mode; use "
                     "implementation='triton' with interpret=True on CPU")
  quantize.check_precision(precision)
  d = q.shape[-1]
  if d not in HEAD_DIMS:
    raise ValueError(f"mosaic_gpu backend: head_dim must be one of {HEAD_DIMS}, "
                     f"got {d}")
  dtype = q.dtype if dtype is None else dtype
  if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
    raise ValueError(f"mosaic_gpu backend: dtype must be bfloat16 or float16, got "
                     f"{dtype}; use implementation='triton' for float32")
  if block_size != BLOCK_SIZE:
    raise ValueError(f"mosaic_gpu backend: block_size must be {BLOCK_SIZE}, got "
                     f"{block_size}; use implementation='triton' for 64")
  if not sm_scale > 0:
    raise ValueError(f"mosaic_gpu backend: sm_scale must be > 0, got {sm_scale}")
  config.validate(d, precision, with_out)


def _table_args(table):
  return (None, None) if table is None else (table.indices, table.counts)


def block_sparse_attention_fwd(q, k, v, table: Optional[BlockTable], *,
                               block_size: int, sm_scale: Optional[float] = None,
                               interpret: bool = False,
                               config: Optional[MosaicConfig] = None,
                               precision: str = "bf16"):
  """Returns (out [B, S, H, D] in q.dtype, lse float32 [B, H, S]).

  table=None is dense attention through a static loop (no table reads).
  precision != "bf16" quantizes q, k, v (`quantize.quantize_qkv`) and runs the
  quantized kernel; its lse is that of the smoothed scores.
  """
  scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  config = default_config(q.shape[-1], precision) if config is None else config
  _check(q, block_size, scale, config, interpret, precision)
  _check_table(table, -(-q.shape[1] // BLOCK_SIZE))
  if precision != "bf16":
    qq = quantize.quantize_qkv(q, k, v, precision=precision)
    return quantized_attention_fwd(qq, table, block_size=block_size, sm_scale=scale,
                                   config=config, out_dtype=q.dtype)
  return _fwd(q, k, v, *_table_args(table), None, sm_scale=scale, config=config,
              kind=_Kind(), out_dtype=q.dtype)


def _key_major_v(v8):
  """e4m3 V [B, S, H, D] -> V^T [B, H, D, n * 128], keys in fp8_pv_key_order.

  The order maps key bits (b3 b2 b1 b0) of a 16-key group to source bits
  (b1 b3 b2 b0): one transpose with the layout change, no gather.
  """
  b, s, h, d = v8.shape
  sp = -(-s // BLOCK_SIZE) * BLOCK_SIZE
  v8 = jnp.pad(v8, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
  v8 = v8.reshape(b, sp // 16, 2, 2, 2, 2, h, d)        # source key bits s3 s2 s1 s0
  # -> [B, H, D, group, q3 = s2, q2 = s1, q1 = s3, q0 = s0]
  return v8.transpose(0, 6, 7, 1, 3, 4, 2, 5).reshape(b, h, d, sp)


def _step_scales(qq, table):
  """k_scale per step: [B, H, n] (dense) or per table entry [B, H, n, w]."""
  if table is None:
    return qq.k_scale
  b, _, h, _ = qq.q.shape
  n, w = table.indices.shape[-2:]
  idx = jnp.broadcast_to(table.indices, (b, h, n, w))
  bi = jnp.arange(b)[:, None, None, None]
  hi = jnp.arange(h)[None, :, None, None]
  return qq.k_scale[bi, hi, idx]


def _q_scales(qq):
  """q_scale padded to two entries per query block: [B, H, 2n]."""
  n = -(-qq.q.shape[1] // BLOCK_SIZE)
  return jnp.pad(qq.q_scale, ((0, 0), (0, 0), (0, 2 * n - qq.q_scale.shape[-1])),
                 constant_values=1.0)


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "config",
                                              "out_dtype", "with_out"))
def _quantized(qq, table, *, block_size, sm_scale, config, out_dtype, with_out):
  del block_size
  precision = qq.precision
  pv_fp8 = quantize.fp8_pv(precision) and with_out
  kind = _Kind(qk="int8" if precision.startswith("int8") else "fp8", pv_fp8=pv_fp8,
               with_out=with_out)
  v = None
  if with_out:
    v = _key_major_v(qq.v) if pv_fp8 else qq.v
  scales = (_q_scales(qq), _step_scales(qq, table), qq.v_scale if pv_fp8 else None)
  return _fwd(qq.q, qq.k, v, *_table_args(table), scales, sm_scale=sm_scale,
              config=config, kind=kind, out_dtype=out_dtype)


def quantized_attention_fwd(qq: quantize.QuantizedQKV, table: Optional[BlockTable], *,
                            block_size: int, sm_scale: float,
                            config: Optional[MosaicConfig] = None, out_dtype=jnp.bfloat16):
  """The quantized kernel on `quantize_qkv`'s output: (out, lse of smoothed scores)."""
  config = default_config(qq.q.shape[-1], qq.precision) if config is None else config
  if qq.v is None:
    raise ValueError("quantized_attention_fwd needs V (quantize_qkv(q, k, v, ...))")
  _check(qq.q, block_size, sm_scale, config, False, qq.precision, True, dtype=out_dtype)
  _check_table(table, -(-qq.q.shape[1] // BLOCK_SIZE))
  return _quantized(qq, table, block_size=block_size, sm_scale=float(sm_scale),
                    config=config, out_dtype=jnp.dtype(out_dtype), with_out=True)


def quantized_lse(qq: quantize.QuantizedQKV, table: Optional[BlockTable], *,
                  block_size: int, sm_scale: float,
                  config: Optional[MosaicConfig] = None):
  """Row lse [B, H, S] of the quantized (smoothed) scores: the lse-only kernel."""
  config = default_config(qq.q.shape[-1], qq.precision) if config is None else config
  _check(qq.q, block_size, sm_scale, config, False, qq.precision, False,
         dtype=jnp.bfloat16)
  _check_table(table, -(-qq.q.shape[1] // BLOCK_SIZE))
  return _quantized(qq, table, block_size=block_size, sm_scale=float(sm_scale),
                    config=config, out_dtype=jnp.dtype(jnp.bfloat16), with_out=False)[1]


def block_sparse_lse(q, k, table: Optional[BlockTable], *, block_size: int,
                     sm_scale: Optional[float] = None, interpret: bool = False,
                     config: Optional[MosaicConfig] = None, precision: str = "bf16"):
  """Row log-sum-exp only, float32 [B, H, S]: the kernel without V and P V."""
  scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  config = default_config(q.shape[-1], precision) if config is None else config
  _check(q, block_size, scale, config, interpret, precision, with_out=False)
  _check_table(table, -(-q.shape[1] // BLOCK_SIZE))
  if precision != "bf16":
    qq = quantize.quantize_qkv(q, k, None, precision=precision)
    return quantized_lse(qq, table, block_size=block_size, sm_scale=scale, config=config)
  return _fwd(q, k, None, *_table_args(table), None, sm_scale=scale, config=config,
              kind=_Kind(with_out=False), out_dtype=q.dtype)[1]

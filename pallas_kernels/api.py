"""Public entry points: validation, mask -> table, and backend dispatch.

Backends live one per module and are picked by `implementation=`:

  "xla"        plain XLA gather (every device, any head_dim; the fallback),
  "mosaic_gpu" Pallas Mosaic GPU for Hopper (wgmma, TMA, warp specialization;
               bf16/f16, block_size 128; attention, lse-only and map passes,
               all precisions natively),
  "triton"     Pallas GPU through the Triton lowering,
  "tpu"        Pallas Mosaic TPU with scalar-prefetched tables,
  "reference"  dense masked float32 attention (the test oracle; slow),
  None         the best for the device: tpu on TPU; on GPU for head_dim in
               {64, 128} and 16-bit dtypes mosaic_gpu on sm_90 with
               block_size 128, else triton; otherwise xla.

Each attention module provides `block_sparse_attention_fwd(q, k, v, table, *,
block_size, sm_scale, interpret) -> (out, lse)` and `block_sparse_lse(q, k,
table, ...) -> lse`, where table=None means dense (`table_or_dense` builds the
all-active table for backends without a dedicated dense loop); each map module
provides `sparsity_map_from_lse(q, k, lse, table, *, block_size, threshold,
sm_scale, interpret)`. A new backend is one line in `_BACKENDS`. Map modules may
also provide `block_mass_from_lse(q, k, lse, table, *, block_size, sm_scale,
interpret)` (the block mass map of `block_mass_map`); those without it refuse
an explicit `implementation=` for the mass map.

Precisions (`precision=`, see pallas_kernels.quantize): "bf16" (no
quantization, the default), "fp8", "int8_fp8", "int8_bf16". A backend module
that lists a precision in its `PRECISIONS` computes it natively
(`quantized_attention_fwd(qq, table, ...)`, `quantized_lse(qq, table, ...)`,
`quantized_map_from_lse(qq, lse, table, ...)` on `quantize_qkv`'s output);
every other backend computes the same quantized function in reference form:
Q, K, V quantized and dequantized to float32 with the same scales, then its
float32 path (P is not rounded there).
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp

from pallas_kernels import quantize
from pallas_kernels.block_table import (BlockTable, block_mask_from_table, check_block_table,
                                        compact_block_mask)

__all__ = [
    "IMPLEMENTATIONS",
    "BLOCK_SIZES",
    "PRECISIONS",
    "default_implementation",
    "block_sparse_attention",
    "block_sparse_attention_with_map",
    "sparsity_map",
    "block_mass_map",
]

# name -> (attention module, sparsity-map module), both under pallas_kernels.
_BACKENDS = {
    "xla": ("attention_xla", "map_xla"),
    "mosaic_gpu": ("attention_mosaic_gpu", "map_mosaic_gpu"),
    "triton": ("attention_triton", "map_triton"),
    "tpu": ("attention_tpu", "map_tpu"),
    "reference": ("attention_reference", "map_reference"),
}
IMPLEMENTATIONS = tuple(_BACKENDS)
PRECISIONS = quantize.PRECISIONS
_PALLAS = ("mosaic_gpu", "triton", "tpu")  # backends with a head_dim restriction
BLOCK_SIZES = (64, 128)
HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)

MaskLike = Union[jax.Array, BlockTable, None]


def default_implementation(dtype, head_dim: int, block_size: int = 128) -> str:
  """The backend `implementation=None` resolves to on the default device."""
  platform = jax.default_backend()
  if platform == "tpu" and head_dim in HEAD_DIMS:
    return "tpu"
  if (platform == "gpu" and head_dim in HEAD_DIMS
      and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)):
    from pallas_kernels import attention_mosaic_gpu  # pylint: disable=import-outside-toplevel
    if block_size == attention_mosaic_gpu.BLOCK_SIZE and attention_mosaic_gpu.is_supported_device():
      return "mosaic_gpu"
    return "triton"
  return "xla"


def _attention_module(implementation: str):
  return importlib.import_module(f"pallas_kernels.{_BACKENDS[implementation][0]}")


def _map_module(implementation: str):
  """The map pass of `implementation`, falling back to xla, then reference."""
  names = [_BACKENDS[implementation][1], _BACKENDS["xla"][1], _BACKENDS["reference"][1]]
  for name in dict.fromkeys(names):
    try:
      return importlib.import_module(f"pallas_kernels.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"pallas_kernels.{name}":
        raise
  raise NotImplementedError(
      f"no sparsity-map backend is available for implementation={implementation!r} "
      f"(looked for pallas_kernels.{', pallas_kernels.'.join(dict.fromkeys(names))})")


def _native(module, precision: str) -> bool:
  return precision in getattr(module, "PRECISIONS", ("bf16",))


def _validate_qkv(q, k, v, *, block_size, implementation, need_v=True, precision="bf16"):
  quantize.check_precision(precision)
  names = ("q", "k", "v") if need_v else ("q", "k")
  arrays = (q, k, v) if need_v else (q, k)
  for name, x in zip(names, arrays):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{name} must be an array [batch, seq_len, heads, head_dim], "
                       f"got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"{name} must be rank 4 [batch, seq_len, heads, head_dim], "
                       f"got shape {tuple(x.shape)}")
  for name, x in zip(names[1:], arrays[1:]):
    if x.shape != q.shape:
      raise ValueError(f"{name}.shape {tuple(x.shape)} must equal q.shape "
                       f"{tuple(q.shape)} (self-attention, same heads and head_dim)")
    if x.dtype != q.dtype:
      raise ValueError(f"q, k{', v' if need_v else ''} must share one dtype, got "
                       f"q {q.dtype} and {name} {x.dtype}")
  if jnp.dtype(q.dtype) not in DTYPES:
    raise ValueError(f"q/k/v dtype must be one of bfloat16, float16, float32, "
                     f"got {q.dtype}")
  if block_size not in BLOCK_SIZES:
    raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  head_dim = q.shape[-1]
  if implementation in _PALLAS and head_dim not in HEAD_DIMS:
    raise ValueError(f"implementation={implementation!r} supports head_dim in "
                     f"{HEAD_DIMS}, got head_dim={head_dim}; use implementation='xla'")


def _broadcastable(lead, batch, heads):
  return len(lead) == 2 and lead[0] in (1, batch) and lead[1] in (1, heads)


def _to_table(block_mask: MaskLike, batch: int, heads: int, n: int,
              *, broadcast: bool) -> Optional[BlockTable]:
  """Validates `block_mask` and returns its BlockTable (None for dense)."""
  if block_mask is None:
    return None
  if isinstance(block_mask, BlockTable):
    check_block_table(block_mask, n, name="block_mask")
    lead = block_mask.indices.shape[:-2]
    if not _broadcastable(lead, batch, heads):
      raise ValueError(
          f"block_mask (BlockTable) leading dims must be [batch, heads] = "
          f"[{batch}, {heads}] (or 1 to broadcast), got indices shape "
          f"{tuple(block_mask.indices.shape)}")
    # Keep every id and count in range: never an out-of-bounds read.
    table = BlockTable(indices=jnp.clip(block_mask.indices, 0, n - 1),
                       counts=jnp.clip(block_mask.counts, 0, block_mask.width),
                       canonical=block_mask.canonical)
    if not table.canonical:
      # A hand-built table: sort and de-duplicate its rows (through the mask
      # it encodes), since the kernels find the ragged tail block last.
      table = compact_block_mask(block_mask_from_table(table, n), max_width=table.width)
  else:
    if not hasattr(block_mask, "shape"):
      raise ValueError(f"block_mask must be a bool array [batch, heads, n, n], a "
                       f"BlockTable or None, got {type(block_mask).__name__}")
    if block_mask.dtype != jnp.bool_:
      raise ValueError(f"block_mask must be bool, got {block_mask.dtype}")
    shape = tuple(block_mask.shape)
    if len(shape) != 4 or shape[-2:] != (n, n) or not _broadcastable(shape[:2], batch, heads):
      raise ValueError(
          f"block_mask must have shape [batch, heads, n, n] = [{batch}, {heads}, {n}, {n}] "
          f"(n = ceil(seq_len / block_size); batch/heads may be 1), got {shape}")
    table = compact_block_mask(block_mask)
  if broadcast:
    table = table.broadcast_to((batch, heads))
  return table


def _resolve(q, implementation, sm_scale, block_size):
  impl = implementation or default_implementation(q.dtype, q.shape[-1], block_size)
  scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  return impl, scale


def _fwd(q, k, v, block_mask, *, block_size, sm_scale, implementation, interpret,
         precision="bf16"):
  b, s, h, _ = q.shape
  n = -(-s // block_size)
  impl, scale = _resolve(q, implementation, sm_scale, block_size)
  table = _to_table(block_mask, b, h, n, broadcast=False)
  module = _attention_module(impl)
  qq = None
  if precision == "bf16":
    # None = dense: backends with a static all-blocks loop (mosaic_gpu) use it.
    out, lse = module.block_sparse_attention_fwd(
        q, k, v, table, block_size=block_size, sm_scale=scale, interpret=interpret)
  else:
    qq = quantize.quantize_qkv(q, k, v, precision=precision)
    if _native(module, precision):
      out, lse = module.quantized_attention_fwd(qq, table, block_size=block_size,
                                                sm_scale=scale, out_dtype=q.dtype)
    else:                   # reference form: the dequantized values in float32
      qd, kd, vd = quantize.dequantize(qq)
      out, lse = module.block_sparse_attention_fwd(
          qd, kd, vd, table, block_size=block_size, sm_scale=scale, interpret=interpret)
      out = out.astype(q.dtype)
  return out, lse, table, impl, scale, qq


@functools.partial(jax.jit, static_argnames=(
    "block_size", "sm_scale", "implementation", "interpret", "precision"))
def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           block_mask: MaskLike, *, block_size: int = 128,
                           sm_scale: Optional[float] = None,
                           implementation: Optional[str] = None,
                           interpret: bool = False,
                           precision: str = "bf16") -> jax.Array:
  """Block-sparse softmax attention.

  Args:
    q, k, v: [B, S, H, D] (like jax.nn.dot_product_attention), one dtype of
      bfloat16, float16, float32. The Pallas backends need D in {64, 128}.
    block_mask: bool [B, H, n, n] with n = ceil(S / block_size) (B or H may be
      1 to broadcast), or a BlockTable, or None for dense attention.
    block_size: 64 or 128 tokens per mask block.
    sm_scale: softmax scale, default 1 / sqrt(D).
    implementation: one of IMPLEMENTATIONS or None (best for the device).
    interpret: run the Pallas backends in interpret mode (CPU testing).
    precision: one of PRECISIONS: "bf16" (no quantization: the inputs' dtype),
      "fp8" (Q, K, P, V in e4m3), "int8_fp8" (int8 Q K^T, e4m3 P V) or
      "int8_bf16" (int8 Q K^T, 16-bit P V); quantized with per-block scales
      after smoothing K by its token mean (pallas_kernels.quantize). Native
      on mosaic_gpu; the other backends compute the same quantized function
      in reference form (dequantized float32 inputs).
  Returns:
    [B, S, H, D] in q.dtype. Keys past S never count; a query whose mask row
    is empty gets zeros.
  """
  _validate_qkv(q, k, v, block_size=block_size, implementation=implementation,
                precision=precision)
  return _fwd(q, k, v, block_mask, block_size=block_size, sm_scale=sm_scale,
              implementation=implementation, interpret=interpret,
              precision=precision)[0]


def _map(q, k, lse, table, *, impl, block_size, threshold, scale, interpret, qq=None):
  module = _map_module(impl)
  if qq is None:
    return module.sparsity_map_from_lse(
        q, k, lse, table, block_size=block_size, threshold=threshold,
        sm_scale=scale, interpret=interpret)
  if _native(module, qq.precision):
    return module.quantized_map_from_lse(qq, lse, table, block_size=block_size,
                                         threshold=threshold, sm_scale=scale)
  qd, kd, _ = quantize.dequantize(qq)
  return module.sparsity_map_from_lse(
      qd, kd, lse, table, block_size=block_size, threshold=threshold,
      sm_scale=scale, interpret=interpret)


@functools.partial(jax.jit, static_argnames=(
    "block_size", "threshold", "sm_scale", "implementation", "interpret", "precision"))
def block_sparse_attention_with_map(
    q: jax.Array, k: jax.Array, v: jax.Array, block_mask: MaskLike, *,
    block_size: int = 128, threshold: float = 1e-4,
    sm_scale: Optional[float] = None, implementation: Optional[str] = None,
    interpret: bool = False, precision: str = "bf16"):
  """Block-sparse attention plus the sparsity map of the same blocks.

  One flash pass (which also yields the row log-sum-exp) and one QK-only map
  pass over the same table. Arguments as in `block_sparse_attention`;
  `threshold` is the probability below which an entry counts as negligible.
  With a quantized `precision`, the map counts the same quantized scores the
  flash pass exponentiated (Q and K quantized once for both passes).

  Returns:
    (out [B, S, H, D] in q.dtype, S float32 [B, H, n, n]); with block_mask
    given, S is NaN on inactive blocks (see the map backends).
  """
  _validate_qkv(q, k, v, block_size=block_size, implementation=implementation,
                precision=precision)
  out, lse, table, impl, scale, qq = _fwd(
      q, k, v, block_mask, block_size=block_size, sm_scale=sm_scale,
      implementation=implementation, interpret=interpret, precision=precision)
  b, _, h, _ = q.shape
  if table is not None:
    table = table.broadcast_to((b, h))
  smap = _map(q, k, lse, table, impl=impl, block_size=block_size,
              threshold=threshold, scale=scale, interpret=interpret, qq=qq)
  return out, smap


@functools.partial(jax.jit, static_argnames=(
    "block_size", "threshold", "sm_scale", "implementation", "interpret", "precision"))
def sparsity_map(q: jax.Array, k: jax.Array, *, block_size: int = 128,
                 threshold: float = 1e-4, block_mask: MaskLike = None,
                 sm_scale: Optional[float] = None,
                 implementation: Optional[str] = None,
                 interpret: bool = False, precision: str = "bf16") -> jax.Array:
  """The MOD-DiT sparsity map S [B, H, n, n] (float32).

  S[i, j] = fraction of the valid (query, key) pairs of block (i, j) whose
  softmax probability is below `threshold`, with the softmax over the row's
  active blocks (all blocks when block_mask is None). Runs an lse-only flash
  pass (no V) and then the map pass; inactive blocks are NaN. `precision` as
  in `block_sparse_attention` (both passes on the same quantized scores).
  """
  _validate_qkv(q, k, None, block_size=block_size, implementation=implementation,
                need_v=False, precision=precision)
  b, s, h, _ = q.shape
  n = -(-s // block_size)
  impl, scale = _resolve(q, implementation, sm_scale, block_size)
  table = _to_table(block_mask, b, h, n, broadcast=False)
  module = _attention_module(impl)
  qq = None
  if precision == "bf16":
    lse = module.block_sparse_lse(
        q, k, table, block_size=block_size, sm_scale=scale, interpret=interpret)
  else:
    qq = quantize.quantize_qkv(q, k, None, precision=precision)
    if _native(module, precision):
      lse = module.quantized_lse(qq, table, block_size=block_size, sm_scale=scale)
    else:
      qd, kd, _ = quantize.dequantize(qq)
      lse = module.block_sparse_lse(
          qd, kd, table, block_size=block_size, sm_scale=scale, interpret=interpret)
  if table is not None:
    table = table.broadcast_to((b, h))
  return _map(q, k, lse, table, impl=impl, block_size=block_size,
              threshold=threshold, scale=scale, interpret=interpret, qq=qq)


def _mass_module(implementation: Optional[str], impl: str):
  """The map module that computes the mass map for `impl`: its own, or (only
  when implementation=None picked `impl`) xla's."""
  module = _map_module(impl)
  if hasattr(module, "block_mass_from_lse"):
    return module
  if implementation is None:
    return _map_module("xla")
  with_mass = [name for name in IMPLEMENTATIONS
               if hasattr(_map_module(name), "block_mass_from_lse")]
  raise ValueError(f"implementation={implementation!r} has no block mass map "
                   f"({module.__name__} lacks block_mass_from_lse); use one of {with_mass}")


@functools.partial(jax.jit, static_argnames=(
    "block_size", "sm_scale", "implementation", "interpret"))
def block_mass_map(q: jax.Array, k: jax.Array, *, block_size: int = 128,
                   block_mask: MaskLike = None, sm_scale: Optional[float] = None,
                   implementation: Optional[str] = None,
                   interpret: bool = False) -> jax.Array:
  """The block mass map M [B, H, n, n] (float32): the softmax mass per block.

  M[i, j] = (sum over valid query rows r of block i and valid keys c of block j
  of p[r, c]) / (valid rows of block i), p the softmax over the row's active
  blocks (all when block_mask is None): the mean share of a block-row's
  attention that falls in key block j (rows sum to 1; inactive blocks NaN).
  The same two passes as `sparsity_map` (lse-only flash pass, then a QK replay
  summing exp(s - lse)). Backends without a mass kernel refuse an explicit
  `implementation`; with None the default backend's, else xla's, is used.
  """
  _validate_qkv(q, k, None, block_size=block_size, implementation=implementation,
                need_v=False)
  b, s, h, _ = q.shape
  n = -(-s // block_size)
  impl, scale = _resolve(q, implementation, sm_scale, block_size)
  module = _mass_module(implementation, impl)
  table = _to_table(block_mask, b, h, n, broadcast=False)
  lse = _attention_module(impl).block_sparse_lse(
      q, k, table, block_size=block_size, sm_scale=scale, interpret=interpret)
  if table is not None:
    table = table.broadcast_to((b, h))
  return module.block_mass_from_lse(q, k, lse, table, block_size=block_size,
                                    sm_scale=scale, interpret=interpret)

"""Quantized attention inputs (SageAttention2-style) shared by every backend.

`precision` names what the attention and sparsity-map passes compute with:

  "bf16"      no quantization: the inputs' own 16-bit (or f32) dtype (default);
  "fp8"       Q, K and V in float8_e4m3fn, P in float8_e4m3fn;
  "int8_fp8"  Q and K in int8, P and V in float8_e4m3fn (SageAttention2's
              recipe: INT8 Q K^T, FP8 P V);
  "int8_bf16" Q and K in int8, P and V in the inputs' 16-bit dtype
              (SageAttention1's: INT8 Q K^T, 16-bit P V; about 1e-2 from the
              float32 reference where FP8 P V costs 3-4e-2 on random data).

The quantized function, identical on every backend:

  * K is smoothed by its mean over the (valid) tokens of each (batch, head):
    k - mean(k). Every score of a query row moves by the same q . mean(k), so
    softmax, the output and the sparsity map are unchanged; the row
    log-sum-exp moves by sm_scale * q . mean(k) (quantized modes report the
    lse of the smoothed scores, which is what their map pass compares with).
  * Q is scaled per block of Q_ROWS = 64 query rows (one compute warpgroup of
    the Mosaic kernel), K per block of K_ROWS = 128 keys, both per (batch,
    head): scale = max|x| / QMAX (QMAX 448 for e4m3, 127 for int8; 1 for an
    all-zero block), x_q = round(x / scale) (int8: to nearest even, clipped
    to +-127; e4m3: nearest even, saturated to +-448).
  * V is scaled per (batch, head) (e4m3 is floating point: one scale loses
    no relative precision), v_q = e4m3(v / scale_v).
  * The kernels accumulate Q K^T in int32 (exact) or float32, rescale by
    scale_q * scale_k * sm_scale, run the online softmax in float32 and feed
    P V with P as e4m3(P_SCALE * p), p = exp(s - running max) in [0, 1],
    accumulating each step's P V in a fresh float32 accumulator that is then
    added to the running one (two-level accumulation). The row sum uses the
    unquantized p.

Backends without quantized kernels compute the same function in reference
form: quantize-dequantize (`dequantize`) to float32 with identical scales and
run their float32 path; only P stays unquantized there (the reference
`quantized_attention_reference(quantize_p=True)` models P's rounding with the
final row max, which the kernel's running max approaches).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "PRECISIONS",
    "QuantizedQKV",
    "quantize_qkv",
    "dequantize",
    "check_precision",
    "quantized_attention_reference",
    "quantized_sparsity_map_reference",
]

PRECISIONS = ("bf16", "fp8", "int8_fp8", "int8_bf16")
Q_ROWS = 64            # query rows per Q scale
K_ROWS = 128           # keys per K scale
FP8_MAX = 448.0        # largest finite float8_e4m3fn
INT8_MAX = 127.0
P_SCALE = 448.0        # P enters the P V product as e4m3(P_SCALE * p)
FP8 = jnp.float8_e4m3fn


def check_precision(precision) -> str:
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
  return precision


def qk_dtype(precision: str):
  return jnp.int8 if precision.startswith("int8") else FP8


def fp8_pv(precision: str) -> bool:
  """Whether `precision` runs P V in float8_e4m3fn."""
  return precision in ("fp8", "int8_fp8")


@struct.dataclass
class QuantizedQKV:
  """Quantized Q, K (smoothed), V and their float32 scales.

  Attributes:
    q, k: [B, S, H, D] int8 or float8_e4m3fn (k = quantized k - mean).
    v: [B, S, H, D] float8_e4m3fn ("int8_bf16": the input V unchanged), or
      None (lse / map passes).
    q_scale: [B, H, ceil(S / Q_ROWS)], k_scale: [B, H, ceil(S / K_ROWS)],
    v_scale: [B, H] (None without an e4m3 v); k_mean: [B, H, D].
    precision: static, "fp8", "int8_fp8" or "int8_bf16".
  """

  q: jax.Array
  k: jax.Array
  v: Optional[jax.Array]
  q_scale: jax.Array
  k_scale: jax.Array
  v_scale: Optional[jax.Array]
  k_mean: jax.Array
  precision: str = struct.field(pytree_node=False, default="fp8")

  @property
  def shape(self):
    return self.q.shape


def _block_absmax(x, rows: int):
  """max |x| over blocks of `rows` tokens: [B, S, H, D] -> [B, H, ceil(S / rows)]."""
  b, s, h, d = x.shape
  nb = -(-s // rows)
  x = jnp.pad(jnp.abs(x), ((0, 0), (0, nb * rows - s), (0, 0), (0, 0)))
  return jnp.max(x.reshape(b, nb, rows, h, d), axis=(2, 4)).transpose(0, 2, 1)


def _per_token(scale, rows: int, s: int):
  """[B, H, nb] -> [B, S, H, 1] (each block's scale on its rows)."""
  return jnp.repeat(scale, rows, axis=-1)[..., :s].transpose(0, 2, 1)[..., None]


def _scale_of(amax, qmax):
  return jnp.where(amax > 0, amax / qmax, 1.0).astype(jnp.float32)


def _cast(x, dtype, qmax):
  if dtype == jnp.int8:
    return jnp.clip(jnp.round(x), -qmax, qmax).astype(jnp.int8)
  return jnp.clip(x, -qmax, qmax).astype(dtype)


def _quantize_blocks(x, rows: int, dtype):
  qmax = INT8_MAX if dtype == jnp.int8 else FP8_MAX
  scale = _scale_of(_block_absmax(x, rows), qmax)
  xq = _cast(x / _per_token(scale, rows, x.shape[1]), dtype, qmax)
  return xq, scale


@functools.partial(jax.jit, static_argnames=("precision",))
def quantize_qkv(q: jax.Array, k: jax.Array, v: Optional[jax.Array] = None, *,
                 precision: str) -> QuantizedQKV:
  """Smooths K and quantizes Q, K (and V) with per-block scales (module docstring).

  Args:
    q, k, v: [B, S, H, D] float arrays (v may be None).
    precision: "fp8", "int8_fp8" or "int8_bf16".
  """
  if precision not in PRECISIONS[1:]:
    raise ValueError(f"quantize_qkv: precision must be one of {PRECISIONS[1:]}, "
                     f"got {precision!r}")
  dtype = qk_dtype(precision)
  qf = q.astype(jnp.float32)
  kf = k.astype(jnp.float32)
  k_mean = jnp.mean(kf, axis=1)                                   # [B, H, D]
  ks = kf - k_mean[:, None]
  q8, q_scale = _quantize_blocks(qf, Q_ROWS, dtype)
  k8, k_scale = _quantize_blocks(ks, K_ROWS, dtype)
  v8 = v_scale = None
  if v is not None and not fp8_pv(precision):
    v8 = v
  elif v is not None:
    vf = v.astype(jnp.float32)
    v_scale = _scale_of(jnp.max(jnp.abs(vf), axis=(1, 3)), FP8_MAX)   # [B, H]
    v8 = _cast(vf / v_scale[:, None, :, None], FP8, FP8_MAX)
  return QuantizedQKV(q=q8, k=k8, v=v8, q_scale=q_scale, k_scale=k_scale,
                      v_scale=v_scale, k_mean=k_mean, precision=precision)


@jax.jit
def dequantize(qq: QuantizedQKV):
  """float32 (q, k, v) of the quantized values times their scales (v None if absent).

  k is the smoothed key (k - mean): same softmax, lse shifted (module docstring).
  """
  s = qq.q.shape[1]
  q = _exact(qq.q).astype(jnp.float32) * _per_token(qq.q_scale, Q_ROWS, s)
  k = _exact(qq.k).astype(jnp.float32) * _per_token(qq.k_scale, K_ROWS, s)
  v = None
  if qq.v is not None:
    v = _exact(qq.v).astype(jnp.float32)
    if qq.v_scale is not None:
      v = v * qq.v_scale[:, None, :, None]
  return q, k, v


def _exact(x):
  """x unchanged, but kept as computed: XLA on GPU drops a float round trip such as
  f32 -> e4m3 -> f32 under its default excess-precision rule once both converts
  land in one program, which would silently unquantize the reference forms (an
  H200 measured P's rounding error as exactly 0). The barrier keeps the pair."""
  return jax.lax.optimization_barrier(x)


def round_p(p):
  """P as the P V product sees it: e4m3(P_SCALE * p) / P_SCALE."""
  return _exact((p * P_SCALE).astype(FP8)).astype(jnp.float32) / P_SCALE


@functools.partial(jax.jit, static_argnames=(
    "precision", "block_size", "sm_scale", "return_lse", "quantize_p", "query_chunk"))
def quantized_attention_reference(q, k, v, block_mask, *, precision: str,
                                  block_size: int = 128,
                                  sm_scale: Optional[float] = None,
                                  return_lse: bool = False, quantize_p: bool = True,
                                  query_chunk: Optional[int] = None):
  """Pure-jnp block-sparse attention of the quantized inputs (float32).

  Q, K, V are quantized and dequantized exactly as every backend does
  (`quantize_qkv`); with quantize_p and FP8 P V, P is rounded as the Mosaic
  kernel feeds it to P V (against the final row max) while the row sum stays
  exact.
  precision="bf16" is `block_sparse_attention_reference` itself.

  Returns:
    out float32 [B, S, H, D], and with return_lse the lse [B, H, S] of the
    smoothed scores.
  """
  from pallas_kernels import attention_reference  # pylint: disable=import-outside-toplevel
  check_precision(precision)
  if precision == "bf16":
    return attention_reference.block_sparse_attention_reference(
        q, k, v, block_mask, block_size=block_size, sm_scale=sm_scale,
        return_lse=return_lse, query_chunk=query_chunk)
  qd, kd, vd = dequantize(quantize_qkv(q, k, v, precision=precision))
  return attention_reference.block_sparse_attention_reference(
      qd, kd, vd, block_mask, block_size=block_size, sm_scale=sm_scale,
      return_lse=return_lse, query_chunk=query_chunk,
      p_round=round_p if quantize_p and fp8_pv(precision) else None)


@functools.partial(jax.jit, static_argnames=("precision", "block_size", "threshold",
                                              "sm_scale"))
def quantized_sparsity_map_reference(q, k, *, precision: str, block_size: int,
                                     threshold: float, sm_scale: Optional[float] = None,
                                     block_mask=None):
  """The sparsity map of the quantized scores (float32 softmax over them)."""
  from pallas_kernels import map_reference  # pylint: disable=import-outside-toplevel
  check_precision(precision)
  if precision != "bf16":
    q, k, _ = dequantize(quantize_qkv(q, k, None, precision=precision))
  return map_reference.sparsity_map_reference(
      q, k, block_size=block_size, threshold=threshold, sm_scale=sm_scale,
      block_mask=block_mask)


def fp8_pv_key_order(block: int = 16) -> np.ndarray:
  """The key order within each 16-key group in which the Mosaic kernel's FP8
  P operand holds its columns (see attention_mosaic_gpu._p_to_fp8_operand):
  operand column q of a group is score column order[q]."""
  del block
  order = np.empty(16, np.int32)
  for col in range(16):
    c, e = col // 4, col % 4
    order[col] = 8 * (e // 2) + 2 * c + (e % 2)
  return order


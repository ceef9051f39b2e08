"""Quantized precisions ("fp8", "int8_fp8", "int8_bf16"): the quantization math,
every backend's quantized path against the quantized reference (interpret mode
on CPU), argument checks, and the Mosaic GPU kernels (lowered for CUDA on CPU,
compiled and checked on a Hopper GPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import attention_mosaic_gpu as mg
from pallas_kernels import compact_block_mask
from pallas_kernels import map_mosaic_gpu as mm
from pallas_kernels import quantize as qz
from pallas_kernels.map_reference import sparsity_map_reference
from tests.pallas_kernels.lowering import lower

PLATFORM = jax.default_backend()
INTERPRET = PLATFORM == "cpu"
ON_HOPPER = PLATFORM == "gpu" and mg.is_supported_device()
hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 (Hopper) GPU")
QUANTIZED = qz.PRECISIONS[1:]
# rel err of the quantized function vs the float32 reference, random normal
# inputs with a key bias (measured 5.0-5.5e-2, 3.6-3.9e-2, 1.2-1.3e-2; FP8 P V
# costs ~2.7e-2 for V and ~2.5e-2 for P on such inputs whatever the scales).
F32_BOUND = {"fp8": 8e-2, "int8_fp8": 6e-2, "int8_bf16": 2.5e-2}
# ... with three tokens of 50x larger K (measured 1.2-1.5e-1, 5.3-5.6e-2, 4.5-5e-2).
OUTLIER_BOUND = {"fp8": 2.5e-1, "int8_fp8": 9e-2, "int8_bf16": 8e-2}

_BACKENDS = ["xla", "reference"]
if PLATFORM in ("cpu", "gpu"):
  _BACKENDS.append("triton")
if PLATFORM in ("cpu", "tpu"):
  _BACKENDS.append("tpu")
BACKENDS = tuple(_BACKENDS)


def _qkv(seed, b, s, h, d, dtype=jnp.bfloat16, k_bias=1.0, outliers=()):
  keys = jax.random.split(jax.random.key(seed), 3)
  q, k, v = (jax.random.normal(x, (b, s, h, d), jnp.float32) for x in keys)
  k = k + k_bias                      # a shared key bias: what smoothing removes
  if outliers:
    k = k.at[:, jnp.asarray(outliers)].multiply(50.0)
  return tuple(x.astype(dtype) for x in (q, k, v))


def _mask(seed, b, h, n, density, empty_rows=()):
  rng = np.random.default_rng(seed)
  mask = (rng.random((b, h, n, n)) < density) | np.eye(n, dtype=bool)
  for r in empty_rows:
    mask[..., r, :] = False
  return jnp.asarray(mask)


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.isfinite(out).all(), "non-finite output"
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# ----------------------------------------------------------------------------
# The quantization itself.

@pytest.mark.parametrize("precision", QUANTIZED)
def test_scales_per_block_and_ranges(precision):
  b, s, h, d = 1, 300, 2, 64                    # ragged: 300 = 4 * 64 + 44
  q, k, v = _qkv(0, b, s, h, d, jnp.float32)
  q = q.at[:, 64:128, 1].set(0.0)               # an all-zero Q block: scale 1
  qq = qz.quantize_qkv(q, k, v, precision=precision)
  assert qq.q.shape == q.shape and qq.k.shape == k.shape
  assert qq.q.dtype == qz.qk_dtype(precision) and qq.k.dtype == qq.q.dtype
  assert qq.q_scale.shape == (b, h, 5) and qq.k_scale.shape == (b, h, 3)
  qmax = qz.INT8_MAX if precision.startswith("int8") else qz.FP8_MAX
  qf = np.asarray(q)
  for blk in range(5):
    rows = qf[0, blk * 64:(blk + 1) * 64, 0]
    np.testing.assert_allclose(qq.q_scale[0, 0, blk], np.abs(rows).max() / qmax, rtol=1e-6)
  assert float(qq.q_scale[0, 1, 1]) == 1.0
  ks = np.asarray(k, np.float32) - np.asarray(k, np.float32).mean(axis=1, keepdims=True)
  np.testing.assert_allclose(qq.k_mean, np.asarray(k).mean(axis=1), rtol=1e-5, atol=1e-6)
  last = ks[0, 256:, 1]                          # ragged last K block: valid keys only
  np.testing.assert_allclose(qq.k_scale[0, 1, 2], np.abs(last).max() / qmax, rtol=1e-5)
  assert np.abs(np.asarray(qq.q, np.float32)).max() <= qmax
  if qz.fp8_pv(precision):
    assert qq.v.dtype == qz.FP8 and qq.v_scale.shape == (b, h)
    np.testing.assert_allclose(qq.v_scale, np.abs(np.asarray(v)).max(axis=(1, 3)) / 448.0,
                               rtol=1e-6)
  else:
    assert qq.v_scale is None
    np.testing.assert_array_equal(np.asarray(qq.v), np.asarray(v))
  # Dequantized values: int8 within half a step, e4m3 within 2^-4 relative.
  qd, kd, _ = qz.dequantize(qq)
  step = np.asarray(jnp.repeat(qq.q_scale, 64, axis=-1)[..., :s]).transpose(0, 2, 1)[..., None]
  err = np.abs(np.asarray(qd) - qf)
  if precision.startswith("int8"):
    assert (err <= 0.5 * step * (1 + 1e-5)).all()
  else:
    assert (err <= 2.0 ** -4 * np.abs(qf) + 2.0 ** -9 * step * (1 + 1e-5)).all()
  kerr = np.abs(np.asarray(kd) - ks)
  assert kerr.max() <= np.abs(ks).max() * (2.0 ** -4 if precision == "fp8" else 1 / 254) + 1e-6


def test_smoothing_leaves_softmax_unchanged():
  q, k, v = _qkv(1, 1, 200, 2, 64, jnp.float32, k_bias=3.0)
  mask = _mask(1, 1, 2, 4, 0.5, empty_rows=(2,))
  mean = k.mean(axis=1, keepdims=True)
  out, lse = pk.block_sparse_attention_reference(q, k, v, mask, block_size=64, return_lse=True)
  out_s, lse_s = pk.block_sparse_attention_reference(q, k - mean, v, mask, block_size=64,
                                                     return_lse=True)
  np.testing.assert_allclose(out_s, out, rtol=1e-4, atol=1e-5)
  shift = np.einsum("bshd,bhd->bhs", np.asarray(q), np.asarray(mean[:, 0])) / 8.0
  finite = np.isfinite(np.asarray(lse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse_s)), finite)
  np.testing.assert_allclose(np.asarray(lse_s)[finite] + shift[finite],
                             np.asarray(lse)[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", QUANTIZED)
@pytest.mark.parametrize("outliers", [(), (5, 130, 299)], ids=["plain", "outliers"])
def test_quantized_reference_error_bounds(precision, outliers):
  q, k, v = _qkv(2, 1, 300, 2, 64, outliers=outliers)
  ref = pk.block_sparse_attention_reference(q, k, v, None, block_size=64)
  out = pk.quantized_attention_reference(q, k, v, None, precision=precision, block_size=64)
  bound = (OUTLIER_BOUND if outliers else F32_BOUND)[precision]
  err = _rel_err(out, ref)
  assert err < bound, f"{precision}: rel err {err:.3e}"
  # P's rounding is part of the FP8 error only.
  no_p = pk.quantized_attention_reference(q, k, v, None, precision=precision,
                                          block_size=64, quantize_p=False)
  if qz.fp8_pv(precision):
    assert _rel_err(no_p, out) > 1e-3
  else:
    np.testing.assert_array_equal(np.asarray(no_p), np.asarray(out))


@pytest.mark.parametrize("precision", QUANTIZED)
def test_quantized_reference_tails_empty_rows_and_dense(precision):
  b, s, h, d = 1, 200, 2, 64
  n = -(-s // 64)
  q, k, v = _qkv(3, b, s, h, d)
  mask = _mask(3, b, h, n, 0.4, empty_rows=(1,))
  out, lse = pk.quantized_attention_reference(q, k, v, mask, precision=precision,
                                              block_size=64, return_lse=True)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(np.asarray(out[:, 64:128]), 0.0)
  assert np.isneginf(np.asarray(lse[..., 64:128])).all()
  assert np.isfinite(np.asarray(lse[..., :64])).all()
  dense = pk.quantized_attention_reference(q, k, v, None, precision=precision, block_size=64)
  all_true = pk.quantized_attention_reference(q, k, v, jnp.ones((b, h, n, n), bool),
                                              precision=precision, block_size=64)
  np.testing.assert_allclose(dense, all_true, rtol=1e-6, atol=1e-6)
  ref = pk.block_sparse_attention_reference(q, k, v, mask, block_size=64)
  assert _rel_err(out, ref) < F32_BOUND[precision]


def test_fp8_pv_key_order_is_a_permutation_within_16():
  order = qz.fp8_pv_key_order()
  np.testing.assert_array_equal(np.sort(order), np.arange(16))
  # operand column 4c + e <- score column 8 (e // 2) + 2c + e % 2
  np.testing.assert_array_equal(order[:8], [0, 1, 8, 9, 2, 3, 10, 11])


def test_key_major_v_layout():
  v = jax.random.normal(jax.random.key(4), (1, 200, 2, 64)).astype(qz.FP8)
  vt = np.asarray(mg._key_major_v(v).astype(jnp.float32))
  assert vt.shape == (1, 2, 64, 256)
  order = qz.fp8_pv_key_order()
  v32 = np.pad(np.asarray(v.astype(jnp.float32)), ((0, 0), (0, 56), (0, 0), (0, 0)))
  for key in (0, 5, 17, 199, 255):
    src = 16 * (key // 16) + order[key % 16]
    np.testing.assert_array_equal(vt[0, :, :, key], v32[0, src])


# ----------------------------------------------------------------------------
# Backends in reference form (quantize-dequantize, float32) vs the reference.

@pytest.mark.parametrize("impl,precision", [(i, "int8_fp8") for i in BACKENDS]
                         + [("xla", "int8_bf16"), ("xla", "fp8")])
def test_backends_compute_the_quantized_function(impl, precision):
  b, s, h, d, block = 1, 200, 2, 64, 64
  n = -(-s // block)
  q, k, v = _qkv(5, b, s, h, d, outliers=(7,))
  mask = _mask(5, b, h, n, 0.5, empty_rows=(2,))
  out = pk.block_sparse_attention(q, k, v, mask, block_size=block, implementation=impl,
                                  interpret=INTERPRET, precision=precision)
  assert out.dtype == q.dtype and out.shape == q.shape
  ref = pk.quantized_attention_reference(q, k, v, mask, precision=precision,
                                         block_size=block, quantize_p=False)
  assert _rel_err(out, ref) < 1.5e-2            # bf16 output rounding
  np.testing.assert_array_equal(np.asarray(out[:, 128:192], np.float32), 0.0)
  if impl not in ("xla", "reference"):
    return
  dense = pk.block_sparse_attention(q, k, v, None, block_size=block, implementation=impl,
                                    interpret=INTERPRET, precision=precision)
  dref = pk.quantized_attention_reference(q, k, v, None, precision=precision,
                                          block_size=block, quantize_p=False)
  assert _rel_err(dense, dref) < 1.5e-2


@pytest.mark.parametrize("impl", BACKENDS)
def test_backends_quantized_map_matches_reference(impl):
  b, s, h, d, block = 1, 200, 2, 64, 64
  n = -(-s // block)
  q, k, v = _qkv(6, b, s, h, d, jnp.float32)
  mask = _mask(6, b, h, n, 0.5)
  kw = dict(block_size=block, threshold=1e-2, implementation=impl, interpret=INTERPRET,
            precision="int8_fp8")
  _, smap = pk.block_sparse_attention_with_map(q, k, v, mask, **kw)
  expected = pk.quantized_sparsity_map_reference(q, k, precision="int8_fp8", block_size=block,
                                                 threshold=1e-2, block_mask=mask)
  np.testing.assert_array_equal(np.isnan(smap), ~np.asarray(mask))
  np.testing.assert_allclose(smap, expected, atol=2 / block ** 2)
  dense = pk.sparsity_map(q, k, block_size=block, threshold=1e-2, implementation=impl,
                          interpret=INTERPRET, precision="fp8")
  expected = pk.quantized_sparsity_map_reference(q, k, precision="fp8", block_size=block,
                                                 threshold=1e-2)
  np.testing.assert_allclose(dense, expected, atol=2 / block ** 2)


def test_quantized_map_reference_is_the_map_of_the_dequantized_scores():
  q, k, _ = _qkv(7, 1, 130, 1, 64, jnp.float32)
  qd, kd, _ = qz.dequantize(qz.quantize_qkv(q, k, None, precision="int8_fp8"))
  a = pk.quantized_sparsity_map_reference(q, k, precision="int8_fp8", block_size=64,
                                          threshold=1e-3)
  b = sparsity_map_reference(qd, kd, block_size=64, threshold=1e-3)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------
# Argument checks.

def test_precision_is_validated():
  q, k, v = _qkv(8, 1, 128, 1, 64)
  with pytest.raises(ValueError, match="precision must be one of"):
    pk.block_sparse_attention(q, k, v, None, block_size=64, precision="int4")
  with pytest.raises(ValueError, match="precision must be one of"):
    pk.sparsity_map(q, k, block_size=64, precision="fp16")
  with pytest.raises(ValueError, match="precision must be one of"):
    pk.block_sparse_attention_with_map(q, k, v, None, block_size=64, precision=None)
  with pytest.raises(ValueError, match="quantize_qkv: precision"):
    qz.quantize_qkv(q, k, v, precision="bf16")
  with pytest.raises(ValueError, match="warpgroup"):
    mg.MosaicConfig(lowering="warpgroup").validate(128, "fp8")
  with pytest.raises(ValueError, match="lowering must be"):
    mg.MosaicConfig(lowering="wg").validate(128)
  with pytest.raises(ValueError, match="shared memory"):
    mg.MosaicConfig(stages=4).validate(128, "int8_bf16")       # 16-bit V tiles
  mg.MosaicConfig(stages=4).validate(128, "fp8")                 # 8-bit tiles fit
  with pytest.raises(ValueError, match="MapConfig.stages"):
    mm.MapConfig(stages=7).validate(128, "bf16")
  with pytest.raises(ValueError, match="no interpret mode"):
    mm.sparsity_map_from_lse(q, k, jnp.zeros((1, 1, 128)), None, block_size=128,
                             threshold=1e-4, interpret=True)
  with pytest.raises(ValueError, match="block_size must be 128"):
    mg.block_sparse_attention_fwd(q, k, v, None, block_size=64, precision="fp8")


# ----------------------------------------------------------------------------
# Mosaic GPU kernels: lowered for CUDA everywhere.

LOWER_CASES = [
    (1000, 128, (1, 1)),     # ragged tail
    (1024, 64, (2, 2)),
    (1000, 128, None),       # dense: the static loop
    (100, 64, None),         # shorter than one block
]


@pytest.mark.parametrize("precision", QUANTIZED)
@pytest.mark.parametrize("s,d,lead", LOWER_CASES)
def test_quantized_kernels_lower_for_cuda(precision, s, d, lead):
  b, h = 2, 2
  n = -(-s // 128)
  q = jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((b, h, s), jnp.float32)
  table = None if lead is None else compact_block_mask(_mask(0, *lead, n, 0.5))
  cfg = mg.MosaicConfig(stages=3, tiles_per_cta=2) if lead == (2, 2) else None
  fwd = lambda q, k, v, t: mg.block_sparse_attention_fwd(
      q, k, v, t, block_size=128, precision=precision, config=cfg)
  assert "mosaic_gpu" in lower(fwd, "cuda", q, q, q, table)
  lse_fn = lambda q, k, t: mg.block_sparse_lse(q, k, t, block_size=128, precision=precision)
  assert "mosaic_gpu" in lower(lse_fn, "cuda", q, q, table)

  def map_fn(q, k, l, t):
    qq = qz.quantize_qkv(q, k, None, precision=precision)
    return mm.quantized_map_from_lse(qq, l, t, block_size=128, threshold=1e-4, sm_scale=0.1)
  assert "mosaic_gpu" in lower(map_fn, "cuda", q, q, lse, table)


@pytest.mark.parametrize("s,d,lead", LOWER_CASES)
@pytest.mark.parametrize("lowering", [None, "lane", "warpgroup"])
def test_bf16_lse_and_map_lower_for_cuda(s, d, lead, lowering):
  b, h = 2, 2
  n = -(-s // 128)
  q = jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((b, h, s), jnp.float32)
  table = None if lead is None else compact_block_mask(_mask(1, *lead, n, 0.5))
  cfg = mg.MosaicConfig(lowering=lowering)
  lse_fn = lambda q, k, t: mg.block_sparse_lse(q, k, t, block_size=128, config=cfg)
  assert "mosaic_gpu" in lower(lse_fn, "cuda", q, q, table)
  if lowering == "warpgroup":
    fwd = lambda q, k, v, t: mg.block_sparse_attention_fwd(q, k, v, t, block_size=128,
                                                          config=cfg)
    assert "mosaic_gpu" in lower(fwd, "cuda", q, q, q, table)
  if lowering is None:
    map_fn = lambda q, k, l, t: mm.sparsity_map_from_lse(q, k, l, t, block_size=128,
                                                         threshold=1e-4)
    assert "mosaic_gpu" in lower(map_fn, "cuda", q, q, lse, table)


def test_public_api_lowers_every_precision_on_mosaic_gpu():
  q = jax.ShapeDtypeStruct((1, 300, 2, 128), jnp.bfloat16)
  mask = _mask(2, 1, 2, 3, 0.5)
  for precision in qz.PRECISIONS:
    with_map = functools.partial(pk.block_sparse_attention_with_map, block_mask=mask,
                                 implementation="mosaic_gpu", precision=precision)
    assert "mosaic_gpu" in lower(with_map, "cuda", q, q, q)
    smap = functools.partial(pk.sparsity_map, implementation="mosaic_gpu",
                             precision=precision)
    assert "mosaic_gpu" in lower(smap, "cuda", q, q)


# ----------------------------------------------------------------------------
# Mosaic GPU kernels: compiled on a Hopper GPU.

# (batch, seq_len, heads, head_dim, density, empty query-block rows, outlier keys)
GPU_CASES = [
    (1, 1024, 2, 128, 0.5, (), ()),
    (2, 1000, 3, 128, 0.3, (2,), (17,)),       # ragged tail, empty row, an outlier
    (1, 4100, 2, 64, 0.4, (0, 32), ()),        # tail of 4 keys
    (1, 640, 1, 128, 1.0, (), ()),             # dense (table=None)
    (1, 100, 2, 64, 1.0, (), ()),              # S < 128: one ragged block
]


@hopper
@pytest.mark.parametrize("precision", QUANTIZED)
@pytest.mark.parametrize("b,s,h,d,density,empty,outliers", GPU_CASES)
def test_quantized_kernel_matches_quantized_reference(precision, b, s, h, d, density, empty,
                                                      outliers):
  n = -(-s // 128)
  q, k, v = _qkv(s + d, b, s, h, d, outliers=outliers)
  mask = None if density >= 1.0 else _mask(s, b, h, n, density, empty)
  out = pk.block_sparse_attention(q, k, v, mask, implementation="mosaic_gpu",
                                  precision=precision)
  ref, ref_lse = pk.quantized_attention_reference(q, k, v, mask, precision=precision,
                                                  return_lse=True)
  # The kernel rounds P against its running max, the reference against the
  # final one; bf16 output.
  assert _rel_err(out, ref) < (2.5e-2 if qz.fp8_pv(precision) else 1e-2)
  f32 = pk.block_sparse_attention_reference(q, k, v, mask)
  assert _rel_err(out, f32) < (OUTLIER_BOUND if outliers else F32_BOUND)[precision]
  for r in empty:
    rows = slice(r * 128, min(s, (r + 1) * 128))
    assert not np.asarray(out[:, rows], np.float32).any(), "empty row not zero"
  qq = qz.quantize_qkv(q, k, v, precision=precision)
  table = None if mask is None else compact_block_mask(mask)
  _, lse = mg.quantized_attention_fwd(qq, table, block_size=128, sm_scale=d ** -0.5)
  lse_only = mg.quantized_lse(qq, table, block_size=128, sm_scale=d ** -0.5)
  ref_lse = np.asarray(ref_lse)
  finite = np.isfinite(ref_lse)
  for got in (np.asarray(lse), np.asarray(lse_only)):
    np.testing.assert_array_equal(np.isfinite(got), finite)
    np.testing.assert_allclose(got[finite], ref_lse[finite], atol=2e-2, rtol=1e-3)


@hopper
@pytest.mark.parametrize("precision", qz.PRECISIONS)
@pytest.mark.parametrize("s,d,density", [(1000, 128, 0.4), (4100, 64, 1.0), (640, 128, 1.0)])
def test_mosaic_map_matches_reference_counts(precision, s, d, density):
  """Identical counts to the reference except at ties (atol: two entries)."""
  b, h = 1, 2
  n = -(-s // 128)
  q, k, v = _qkv(s, b, s, h, d)
  mask = None if density >= 1.0 else _mask(s + 1, b, h, n, density, (3,))
  _, smap = pk.block_sparse_attention_with_map(q, k, v, mask, implementation="mosaic_gpu",
                                               precision=precision, threshold=1e-3)
  ref = pk.quantized_sparsity_map_reference(q, k, precision=precision, block_size=128,
                                            threshold=1e-3, block_mask=mask)
  smap, ref = np.asarray(smap), np.asarray(ref)
  np.testing.assert_array_equal(np.isnan(smap), np.isnan(ref))
  ok = ~np.isnan(ref)
  np.testing.assert_allclose(smap[ok], ref[ok], atol=2 / 128 ** 2 + 1e-6)
  alone = pk.sparsity_map(q, k, block_mask=mask, implementation="mosaic_gpu",
                          precision=precision, threshold=1e-3)
  np.testing.assert_allclose(np.asarray(alone)[ok], ref[ok], atol=2 / 128 ** 2 + 1e-6)


@hopper
def test_bf16_lse_only_kernel_matches_reference():
  q, k, _ = _qkv(9, 2, 1000, 3, 128)
  mask = _mask(9, 2, 3, 8, 0.4, (1,))
  lse = mg.block_sparse_lse(q, k, compact_block_mask(mask), block_size=128)
  _, ref = pk.block_sparse_attention_reference(q, k, k, mask, return_lse=True)
  ref, lse = np.asarray(ref), np.asarray(lse)
  finite = np.isfinite(ref)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(lse[finite], ref[finite], atol=2e-2, rtol=1e-3)
  dense = mg.block_sparse_lse(q, k, None, block_size=128)
  _, dref = pk.block_sparse_attention_reference(q, k, k, None, return_lse=True)
  np.testing.assert_allclose(np.asarray(dense), np.asarray(dref), atol=2e-2, rtol=1e-3)


@hopper
def test_quantized_kernel_deterministic():
  q, k, v = _qkv(10, 1, 2048, 4, 128)
  f = jax.jit(functools.partial(pk.block_sparse_attention, block_mask=None,
                                implementation="mosaic_gpu", precision="int8_fp8"))
  np.testing.assert_array_equal(np.asarray(f(q, k, v), np.float32),
                                np.asarray(f(q, k, v), np.float32))


# ----------------------------------------------------------------------------
# The polynomial exp2 (MosaicConfig.exp2_poly_groups).

def _f32(hexstr):
  return np.array([int(hexstr[2:], 16)], np.uint32).view(np.float32)[0]


def test_exp2_polynomial_constants_and_range():
  """Emulates the PTX sequence in float32: rel err < 2e-4 on [-126, 9], -inf -> 0."""
  c1, c2, c3 = (_f32(c) for c in (mg._EXP2_C1, mg._EXP2_C2, mg._EXP2_C3))
  assert "0fC2FE0000" in mg._EXP2_POLY and _f32("0fC2FE0000") == -127.0
  big = np.float32(12582912.0)                 # 1.5 * 2^23: rounds to an integer
  x = np.concatenate([np.linspace(-126.0, 9.0, 200001, dtype=np.float32),
                      np.float32([-np.inf, -1e30, -127.0, 0.0])])
  with np.errstate(over="ignore", invalid="ignore"):
    xc = np.maximum(x, np.float32(-127.0))
    t = (xc + big).astype(np.float32)
    f = (xc - (t - big).astype(np.float32)).astype(np.float32)
    p = (f * c3 + c2).astype(np.float32)
    p = (p * f + c1).astype(np.float32)
    p = (p * f + np.float32(1.0)).astype(np.float32)
    bits = p.view(np.int32) + ((t.view(np.int32) - big.view(np.int32)) << 23)
    y = bits.view(np.float32)
  ref = np.exp2(x.astype(np.float64))
  ok = ref > 1e-37
  assert np.abs(y[ok] / ref[ok] - 1).max() < 2e-4
  assert (y[~ok] >= 0).all() and (y[~ok] < 1e-37).all()


def test_exp2_poly_lowers_and_is_validated():
  q = jax.ShapeDtypeStruct((1, 1000, 2, 64), jnp.bfloat16)
  table = compact_block_mask(_mask(3, 1, 1, 8, 0.5))
  for precision in ("bf16", "int8_fp8"):
    cfg = mg.MosaicConfig(exp2_poly_groups=4, stages=3)
    fwd = lambda q, k, v, t: mg.block_sparse_attention_fwd(
        q, k, v, t, block_size=128, precision=precision, config=cfg)
    assert "mosaic_gpu" in lower(fwd, "cuda", q, q, q, table)
  with pytest.raises(ValueError, match="exp2_poly_groups"):
    mg.MosaicConfig(exp2_poly_groups=17).validate(64)
  with pytest.raises(ValueError, match="Lane"):
    mg.MosaicConfig(exp2_poly_groups=4, lowering="warpgroup").validate(64)


@hopper
@pytest.mark.parametrize("groups", [4, 16])
def test_exp2_poly_kernel_matches_reference(groups):
  q, k, v = _qkv(11, 1, 1500, 2, 64)
  mask = _mask(11, 1, 2, 12, 0.5, (3,))
  cfg = mg.MosaicConfig(exp2_poly_groups=groups)
  out, _ = mg.block_sparse_attention_fwd(q, k, v, compact_block_mask(mask), block_size=128,
                                         config=cfg)
  ref = pk.block_sparse_attention_reference(q, k, v, mask)
  assert _rel_err(out, ref) < 1.5e-2


def test_round_trips_survive_one_program():
  """The reference forms round through float8 (f32 -> e4m3 -> f32) inside one jitted
  program; XLA may drop such a pair under its excess-precision rule (it did on an
  H200: P's rounding error measured exactly 0), so the pair is fenced by an
  optimization barrier. Checked here by value under jit and in the lowered program."""
  p = jax.random.uniform(jax.random.key(3), (512,), jnp.float32)
  rounded = jax.jit(qz.round_p)(p)
  expected = np.asarray((np.asarray(p) * qz.P_SCALE).astype(jnp.float8_e4m3fn), np.float32) / qz.P_SCALE
  np.testing.assert_allclose(np.asarray(rounded), expected, rtol=1e-6)  # XLA divides as x * (1/448)
  assert float(jnp.abs(rounded - p).max()) > 1e-3
  assert "optimization_barrier" in jax.jit(qz.round_p).lower(p).as_text()
  q, k, v = _qkv(2, 1, 200, 2, 64)
  fused = jax.jit(lambda q, k, v: qz.dequantize(qz.quantize_qkv(q, k, v, precision="fp8")))
  assert fused.lower(q, k, v).as_text().count("optimization_barrier") >= 3
  for got, x in zip(fused(q, k, v), (q, k, v)):
    assert float(jnp.abs(got - x.astype(jnp.float32)).max()) > 0

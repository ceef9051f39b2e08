"""Block-sparse attention: every backend against the dense float32 reference.

On CPU the Pallas backends run in interpret mode (INTERPRET); on an accelerator
they run compiled. Inputs are fresh random normals, never zeros; errors are
relative, ||out - ref|| / ||ref||, with dtype-keyed tolerances.
"""

import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pallas_kernels as pk
from pallas_kernels import BlockTable, compact_block_mask
from pallas_kernels.block_table import block_mask_from_table
from tests.pallas_kernels.lowering import lower

PLATFORM = jax.default_backend()
INTERPRET = PLATFORM == "cpu"
TOL = {jnp.float32: 1e-4, jnp.float16: 5e-3, jnp.bfloat16: 1.5e-2}

_BACKENDS = ["xla"]
if PLATFORM in ("cpu", "gpu"):
  _BACKENDS.append("triton")
if PLATFORM in ("cpu", "tpu"):
  _BACKENDS.append("tpu")
BACKENDS = tuple(_BACKENDS)


def _module(impl):
  return importlib.import_module(f"pallas_kernels.attention_{impl}")


def _qkv(seed, b, s, h, d, dtype):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (b, s, h, d), jnp.float32).astype(dtype)
               for k in keys)


def _random_mask(seed, b, h, n, density, diagonal=True, empty_rows=()):
  rng = np.random.default_rng(seed)
  mask = rng.random((b, h, n, n)) < density
  if diagonal:
    mask |= np.eye(n, dtype=bool)
  for r in empty_rows:
    mask[..., r, :] = False
  return jnp.asarray(mask)


def _rel_err(out, ref):
  out = np.asarray(out, np.float32)
  ref = np.asarray(ref, np.float32)
  assert not np.isnan(out).any(), "NaN in output"
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _attend(impl, q, k, v, mask, block_size):
  return pk.block_sparse_attention(q, k, v, mask, block_size=block_size,
                                   implementation=impl, interpret=INTERPRET)


def _check_against_reference(impl, q, k, v, mask, block_size):
  out = _attend(impl, q, k, v, mask, block_size)
  chex.assert_shape(out, q.shape)
  assert out.dtype == q.dtype
  ref = pk.block_sparse_attention_reference(q, k, v, mask, block_size=block_size)
  err = _rel_err(out, ref)
  assert err < TOL[q.dtype.type], f"{impl}: rel err {err:.2e}"
  return out, ref


# ----------------------------------------------------------------------------
# Reference sanity.

def test_reference_matches_dense_attention():
  q, k, v = _qkv(0, 2, 96, 3, 32, jnp.float32)
  ref = pk.block_sparse_attention_reference(q, k, v, None, block_size=64)
  expected = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(ref, expected, rtol=2e-5, atol=2e-5)


def test_reference_mask_and_chunking():
  q, k, v = _qkv(1, 1, 200, 2, 16, jnp.float32)
  n = 4
  mask = _random_mask(1, 1, 2, n, 0.5, empty_rows=(1,))
  full, lse = pk.block_sparse_attention_reference(q, k, v, mask, block_size=64,
                                                  return_lse=True)
  chunked, lse_c = pk.block_sparse_attention_reference(
      q, k, v, mask, block_size=64, return_lse=True, query_chunk=128)
  np.testing.assert_allclose(full, chunked, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lse, lse_c, rtol=1e-6)
  # Row block 1 is empty: zeros and lse = -inf.
  np.testing.assert_array_equal(full[:, 64:128], 0.0)
  assert np.all(np.isneginf(lse[..., 64:128]))
  # A query attending to a single block equals dense attention over that block.
  q0, k0, v0 = q[:, :64], k[:, :64], v[:, :64]
  only_first = jnp.zeros((1, 2, n, n), bool).at[:, :, 0, 0].set(True)
  out = pk.block_sparse_attention_reference(q, k, v, only_first, block_size=64)
  expected = jax.nn.dot_product_attention(q0, k0, v0)
  np.testing.assert_allclose(out[:, :64], expected, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------
# Every backend vs the reference.

CASES = [
    # b, s, h, d, block, dtype, density
    pytest.param(1, 256, 2, 64, 64, jnp.float32, 0.4, id="s=256_block=64_d=64_f32"),
    pytest.param(2, 200, 1, 128, 64, jnp.bfloat16, 0.5, id="s=200_block=64_d=128_bf16"),
    pytest.param(1, 300, 2, 64, 128, jnp.bfloat16, 0.6, id="s=300_block=128_d=64_bf16"),
    pytest.param(1, 250, 1, 64, 128, jnp.float32, 0.6, id="s=250_block=128_d=64_f32"),
    pytest.param(1, 330, 1, 128, 128, jnp.bfloat16, 0.6, id="s=330_block=128_d=128_bf16"),
]


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("b,s,h,d,block,dtype,density", CASES)
def test_matches_reference(impl, b, s, h, d, block, dtype, density):
  n = -(-s // block)
  q, k, v = _qkv(s + d, b, s, h, d, dtype)
  mask = _random_mask(s, b, h, n, density, empty_rows=(1,))
  out, _ = _check_against_reference(impl, q, k, v, mask, block)
  # The empty row block gets exact zeros.
  np.testing.assert_array_equal(np.asarray(out[:, block:2 * block], np.float32), 0.0)


# One shape shared by the focused tests below, so each backend compiles it once.
B, S, H, D, BLOCK = 1, 200, 2, 64, 64
N = -(-S // BLOCK)


@pytest.mark.parametrize("impl", BACKENDS)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), density=st.floats(0.0, 1.0))
def test_random_masks(impl, seed, density):
  q, k, v = _qkv(seed, B, S, H, D, jnp.bfloat16)
  mask = _random_mask(seed, B, H, N, density, diagonal=False)
  out, ref = _check_against_reference(impl, q, k, v, mask, BLOCK) \
      if np.asarray(mask).any() else (None, None)
  if out is None:   # all rows empty: all zeros
    out = _attend(impl, q, k, v, mask, BLOCK)
    np.testing.assert_array_equal(np.asarray(out, np.float32), 0.0)


@pytest.mark.parametrize("impl", BACKENDS)
def test_dense_none_equals_all_true(impl):
  q, k, v = _qkv(3, B, S, H, D, jnp.float32)
  dense, ref = _check_against_reference(impl, q, k, v, None, BLOCK)
  all_true = _attend(impl, q, k, v, jnp.ones((B, H, N, N), bool), BLOCK)
  np.testing.assert_allclose(dense, all_true, rtol=1e-6, atol=1e-6)
  expected = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  assert _rel_err(dense, expected) < TOL[jnp.float32]


@pytest.mark.parametrize("impl", BACKENDS)
def test_diagonal_only(impl):
  q, k, v = _qkv(4, B, S, H, D, jnp.float32)
  mask = jnp.broadcast_to(jnp.eye(N, dtype=bool), (B, H, N, N))
  out, _ = _check_against_reference(impl, q, k, v, mask, BLOCK)
  # Diagonal-only = dense attention within each block (ragged last block too).
  for i in range(N):
    sl = slice(i * BLOCK, min(S, (i + 1) * BLOCK))
    expected = jax.nn.dot_product_attention(q[:, sl], k[:, sl], v[:, sl])
    np.testing.assert_allclose(out[:, sl], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", BACKENDS)
def test_empty_rows_give_zeros_and_neginf_lse(impl):
  q, k, v = _qkv(5, B, S, H, D, jnp.float32)
  mask = _random_mask(5, B, H, N, 0.5, empty_rows=(0, N - 1))
  mask = mask.at[0, 1].set(False)                     # a fully empty head
  table = compact_block_mask(mask)
  out, lse = _module(impl).block_sparse_attention_fwd(
      q, k, v, table, block_size=BLOCK, sm_scale=D ** -0.5, interpret=INTERPRET)
  ref, ref_lse = pk.block_sparse_attention_reference(q, k, v, mask, block_size=BLOCK,
                                                     return_lse=True)
  assert not np.isnan(np.asarray(out)).any() and not np.isnan(np.asarray(lse)).any()
  np.testing.assert_array_equal(out[:, :BLOCK], 0.0)
  np.testing.assert_array_equal(out[:, (N - 1) * BLOCK:], 0.0)
  np.testing.assert_array_equal(out[:, :, 1], 0.0)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  assert _rel_err(out, ref) < TOL[jnp.float32]


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lse(impl, dtype):
  q, k, v = _qkv(6, B, S, H, D, dtype)
  mask = _random_mask(6, B, H, N, 0.5, empty_rows=(2,))
  table = compact_block_mask(mask)
  scale = 0.3
  mod = _module(impl)
  _, lse = mod.block_sparse_attention_fwd(q, k, v, table, block_size=BLOCK,
                                          sm_scale=scale, interpret=INTERPRET)
  _, ref_lse = pk.block_sparse_attention_reference(
      q, k, v, mask, block_size=BLOCK, sm_scale=scale, return_lse=True)
  chex.assert_shape(lse, (B, H, S))
  assert lse.dtype == jnp.float32
  finite = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isneginf(lse), ~finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite],
                             rtol=1e-5, atol=1e-4)
  lse_only = mod.block_sparse_lse(q, k, table, block_size=BLOCK, sm_scale=scale,
                                  interpret=INTERPRET)
  np.testing.assert_allclose(lse_only, lse, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", BACKENDS)
def test_explicit_and_negative_sm_scale(impl):
  q, k, v = _qkv(17, B, S, H, D, jnp.float32)
  mask = _random_mask(17, B, H, N, 0.5)
  for scale in (0.05, -0.1):
    out = pk.block_sparse_attention(q, k, v, mask, block_size=BLOCK, sm_scale=scale,
                                    implementation=impl, interpret=INTERPRET)
    ref = pk.block_sparse_attention_reference(q, k, v, mask, block_size=BLOCK,
                                              sm_scale=scale)
    assert _rel_err(out, ref) < TOL[jnp.float32], scale


@pytest.mark.parametrize("impl", BACKENDS)
def test_deterministic(impl):
  q, k, v = _qkv(7, B, S, H, D, jnp.bfloat16)
  mask = _random_mask(7, B, H, N, 0.5)
  a = _attend(impl, q, k, v, mask, BLOCK)
  b = _attend(impl, q, k, v, mask, BLOCK)
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("impl", BACKENDS)
def test_table_input_and_broadcast(impl):
  q, k, v = _qkv(8, B, S, H, D, jnp.float32)
  mask = _random_mask(8, 1, H, N, 0.5)                     # batch-broadcast mask
  from_mask = _attend(impl, q, k, v, mask, BLOCK)
  table = compact_block_mask(mask, max_width=N)
  from_table = _attend(impl, q, k, v, table, BLOCK)
  np.testing.assert_array_equal(from_mask, from_table)
  _check_against_reference(impl, q, k, v, mask, BLOCK)
  # A narrow table (rows truncated to 2 blocks) = the mask it encodes.
  narrow = compact_block_mask(mask, max_width=2)
  out = _attend(impl, q, k, v, narrow, BLOCK)
  ref = pk.block_sparse_attention_reference(q, k, v, block_mask_from_table(narrow),
                                            block_size=BLOCK)
  assert _rel_err(out, ref) < TOL[jnp.float32]


@pytest.mark.parametrize("impl", [i for i in BACKENDS if i != "tpu"])
def test_float16(impl):
  q, k, v = _qkv(9, B, S, H, D, jnp.float16)
  _check_against_reference(impl, q, k, v, _random_mask(9, B, H, N, 0.5), BLOCK)


def test_xla_accepts_any_head_dim():
  q, k, v = _qkv(10, 1, 100, 2, 40, jnp.float32)
  mask = _random_mask(10, 1, 2, 2, 0.7)
  _check_against_reference("xla", q, k, v, mask, 64)


def test_default_implementation():
  from pallas_kernels.attention_mosaic_gpu import is_supported_device
  gpu = "mosaic_gpu" if PLATFORM == "gpu" and is_supported_device() else "triton"
  expected = {"cpu": "xla", "gpu": gpu, "tpu": "tpu"}[PLATFORM]
  assert pk.default_implementation(jnp.bfloat16, 128) == expected
  if PLATFORM == "gpu":
    assert pk.default_implementation(jnp.bfloat16, 128, block_size=64) == "triton"
  assert pk.default_implementation(jnp.bfloat16, 96) == "xla"
  if PLATFORM == "gpu":
    assert pk.default_implementation(jnp.float32, 128) == "xla"
  q, k, v = _qkv(11, B, S, H, D, jnp.float32)
  out = pk.block_sparse_attention(q, k, v, None, block_size=BLOCK)
  assert _rel_err(out, jax.nn.dot_product_attention(q, k, v)) < TOL[jnp.float32]


def test_xla_chunked_online_softmax(monkeypatch):
  """The XLA backend's slot chunking (used at large shapes) is exact."""
  from pallas_kernels import attention_xla
  q, k, v = _qkv(12, B, S, H, D, jnp.float32)
  mask = _random_mask(12, B, H, N, 0.6, empty_rows=(1,))
  table = compact_block_mask(mask)
  full = attention_xla.block_sparse_attention_fwd(q, k, v, table, block_size=BLOCK)
  monkeypatch.setattr(attention_xla, "_CHUNK_ELEMENTS", 1)
  attention_xla._fwd.clear_cache()
  chunked = attention_xla.block_sparse_attention_fwd(q, k, v, table, block_size=BLOCK)
  attention_xla._fwd.clear_cache()
  np.testing.assert_allclose(full[0], chunked[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(full[1], chunked[1], rtol=1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
def test_triton_splits_batch_past_int32(monkeypatch):
  """Inputs too large for int32 offsets run one batch element at a time."""
  from pallas_kernels import attention_triton
  q, k, v = _qkv(18, 2, S, H, D, jnp.float32)
  mask = _random_mask(18, 1, H, N, 0.5)
  table = compact_block_mask(mask)
  whole = attention_triton.block_sparse_attention_fwd(q, k, v, table, block_size=BLOCK,
                                                      interpret=INTERPRET)
  monkeypatch.setattr(attention_triton, "_MAX_I32_ELEMENTS", 16)
  attention_triton._fwd.clear_cache()
  split = attention_triton.block_sparse_attention_fwd(q, k, v, table, block_size=BLOCK,
                                                      interpret=INTERPRET)
  attention_triton._fwd.clear_cache()
  np.testing.assert_array_equal(whole[0], split[0])
  np.testing.assert_array_equal(whole[1], split[1])


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
@pytest.mark.parametrize("block_k", [16, 32])
def test_triton_sub_tiles(block_k):
  """block_k < block_size: several key tiles per mask block (carried offsets)."""
  from pallas_kernels import attention_triton
  q, k, v = _qkv(20, B, S, H, D, jnp.float32)
  mask = _random_mask(20, B, H, N, 0.5, empty_rows=(1,))
  cfg = attention_triton.TritonConfig(block_k=block_k, num_warps=4, num_stages=2)
  out, lse = attention_triton.block_sparse_attention_fwd(
      q, k, v, compact_block_mask(mask), block_size=BLOCK, interpret=INTERPRET,
      config=cfg)
  ref, ref_lse = pk.block_sparse_attention_reference(q, k, v, mask, block_size=BLOCK,
                                                     return_lse=True)
  assert _rel_err(out, ref) < TOL[jnp.float32]
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-4)


def test_user_table_is_clipped_into_range():
  q, k, v = _qkv(19, B, S, H, D, jnp.float32)
  bad = BlockTable(indices=jnp.full((B, H, N, 2), 99, jnp.int32),
                   counts=jnp.full((B, H, N), 7, jnp.int32))
  out = pk.block_sparse_attention(q, k, v, bad, block_size=BLOCK, implementation="xla")
  only_last = jnp.zeros((B, H, N, N), bool).at[..., N - 1].set(True)
  ref = pk.block_sparse_attention_reference(q, k, v, only_last, block_size=BLOCK)
  assert _rel_err(out, ref) < TOL[jnp.float32]


@pytest.mark.parametrize("impl", BACKENDS)
def test_hand_built_table_is_sorted_and_deduplicated(impl):
  """Unsorted rows with repeats, at a ragged length: same as the mask they encode.

  The Pallas kernels find the ragged last key block as a row's last entry; a
  table with block n-1 first would count the padded keys without the fix.
  """
  s = 3 * 64 + 17
  n = -(-s // 64)
  q, k, v = _qkv(23, 1, s, 2, 64, jnp.float32)
  rng = np.random.default_rng(23)
  rows = [rng.permutation(n - 1)[:2] for _ in range(2 * n)]
  rows = [np.concatenate([[n - 1], r, r[:1]]) for r in rows]       # tail first, a repeat
  indices = jnp.asarray(np.stack(rows).reshape(1, 2, n, 4), jnp.int32)
  table = BlockTable(indices=indices, counts=jnp.full((1, 2, n), 4, jnp.int32))
  assert not table.canonical and compact_block_mask(jnp.eye(n, dtype=bool)).canonical
  mask = block_mask_from_table(table)
  out = pk.block_sparse_attention(q, k, v, table, block_size=64, implementation=impl,
                                  interpret=INTERPRET)
  ref = pk.block_sparse_attention_reference(q, k, v, mask, block_size=64)
  assert _rel_err(out, ref) < TOL[jnp.float32]


@pytest.mark.skipif(not INTERPRET, reason="TPU grouping checked in interpret mode")
def test_tpu_head_groups():
  """Tables too large for SMEM are split into head groups."""
  from pallas_kernels import attention_tpu
  q, k, v = _qkv(13, 2, S, 3, D, jnp.float32)
  mask = _random_mask(13, 2, 3, N, 0.5)
  table = compact_block_mask(mask)
  cfg = attention_tpu.TpuConfig(smem_table_entries=2 * N * (N + 1))   # 2 heads/call
  out, lse = attention_tpu.block_sparse_attention_fwd(
      q, k, v, table, block_size=BLOCK, interpret=True, config=cfg)
  ref, ref_lse = pk.block_sparse_attention_reference(q, k, v, mask, block_size=BLOCK,
                                                     return_lse=True)
  assert _rel_err(out, ref) < TOL[jnp.float32]
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------
# The *_map entry points (they also run the colleague's map pass).

@pytest.mark.parametrize("impl", BACKENDS)
def test_with_map_and_sparsity_map(impl):
  from pallas_kernels.map_reference import sparsity_map_reference
  q, k, v = _qkv(14, B, S, H, D, jnp.float32)
  mask = _random_mask(14, B, H, N, 0.5)
  out, smap = pk.block_sparse_attention_with_map(
      q, k, v, mask, block_size=BLOCK, threshold=1e-2, implementation=impl,
      interpret=INTERPRET)
  np.testing.assert_allclose(out, _attend(impl, q, k, v, mask, BLOCK), rtol=1e-6,
                             atol=1e-6)
  expected = sparsity_map_reference(q, k, block_size=BLOCK, threshold=1e-2,
                                    block_mask=mask)
  chex.assert_shape(smap, (B, H, N, N))
  np.testing.assert_array_equal(np.isnan(smap), ~np.asarray(mask))
  np.testing.assert_allclose(smap, expected, atol=2 / BLOCK ** 2)
  dense = pk.sparsity_map(q, k, block_size=BLOCK, threshold=1e-2,
                          implementation=impl, interpret=INTERPRET)
  expected = sparsity_map_reference(q, k, block_size=BLOCK, threshold=1e-2)
  np.testing.assert_allclose(dense, expected, atol=2 / BLOCK ** 2)


# ----------------------------------------------------------------------------
# Argument errors.

def test_errors():
  q, k, v = _qkv(15, 1, 128, 2, 64, jnp.float32)
  attend = functools.partial(pk.block_sparse_attention, block_size=64)
  with pytest.raises(ValueError, match="q must be rank 4"):
    attend(q[0], k, v, None)
  with pytest.raises(ValueError, match="k.shape"):
    attend(q, k[:, :64], v, None)
  with pytest.raises(ValueError, match="dtype"):
    attend(q, k.astype(jnp.bfloat16), v, None)
  with pytest.raises(ValueError, match="float32"):
    attend(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32), None)
  with pytest.raises(ValueError, match=r"block_size must be one of \(64, 128\)"):
    pk.block_sparse_attention(q, k, v, None, block_size=32)
  with pytest.raises(ValueError, match="implementation must be"):
    attend(q, k, v, None, implementation="cuda")
  for impl in ("triton", "tpu"):
    q96 = jnp.ones((1, 128, 2, 96), jnp.float32)
    with pytest.raises(ValueError, match=r"head_dim in \(64, 128\), got head_dim=96"):
      attend(q96, q96, q96, None, implementation=impl)
  with pytest.raises(ValueError, match=r"block_mask must have shape \[batch, heads, n, n\]"):
    attend(q, k, v, jnp.ones((1, 2, 3, 3), bool))
  with pytest.raises(ValueError, match="block_mask must have shape"):
    attend(q, k, v, jnp.ones((2, 2), bool))
  with pytest.raises(ValueError, match="block_mask must be bool"):
    attend(q, k, v, jnp.ones((1, 2, 2, 2), jnp.int32))
  with pytest.raises(ValueError, match="BlockTable"):
    table = compact_block_mask(jnp.ones((3, 2, 2, 2), bool))
    attend(q, k, v, table)
  with pytest.raises(ValueError, match="expected n=2"):
    attend(q, k, v, compact_block_mask(jnp.ones((1, 2, 3, 3), bool)))
  with pytest.raises(ValueError, match="q must be rank 4"):
    pk.sparsity_map(q[0], k, block_size=64)


# ----------------------------------------------------------------------------
# Lowering at production shapes: the GPU/TPU kernels can't run here, but their
# lowering to Triton IR / Mosaic MLIR runs in Python and catches most bugs.




LOWER_CASES = [
    pytest.param(32760, 128, 128, id="s=32760_block=128_d=128"),
    pytest.param(16384, 64, 64, id="s=16384_block=64_d=64"),
    pytest.param(69120, 128, 128, id="s=69120_block=128_d=128"),
]


@pytest.mark.parametrize("impl,platform", [("triton", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("s,block,d", LOWER_CASES)
@pytest.mark.parametrize("lse_only", [False, True], ids=["fwd", "lse"])
def test_kernel_lowers(impl, platform, s, block, d, lse_only):
  heads = 16 if impl == "triton" else 2
  n = -(-s // block)
  x = jax.ShapeDtypeStruct((1, s, heads, d), jnp.bfloat16)
  table = BlockTable(jax.ShapeDtypeStruct((1, heads, n, min(n, 300)), jnp.int32),
                     jax.ShapeDtypeStruct((1, heads, n), jnp.int32))
  mod = _module(impl)
  if lse_only:
    fn = lambda q, k, t: mod.block_sparse_lse(q, k, t, block_size=block)
    args = (x, x, table)
  else:
    fn = lambda q, k, v, t: mod.block_sparse_attention_fwd(q, k, v, t, block_size=block)
    args = (x, x, x, table)
  text = lower(fn, platform, *args)
  assert ("triton" in text) if impl == "triton" else ("tpu_custom_call" in text)


# ----------------------------------------------------------------------------
# Larger shapes (slow in interpret mode).

@pytest.mark.slow
@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_larger_shapes(impl, dtype):
  b, s, h, d, block = 2, 1000, 2, 128, 128
  n = -(-s // block)
  q, k, v = _qkv(16, b, s, h, d, dtype)
  _check_against_reference(impl, q, k, v, _random_mask(16, b, h, n, 0.3), block)

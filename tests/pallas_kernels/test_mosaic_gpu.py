"""The Mosaic GPU (Hopper) backend.

On an sm_90 GPU the compiled kernel is checked against the float32 reference
(fresh random inputs, odd lengths, empty rows, both 16-bit dtypes, D 64/128,
broadcast tables). Everywhere else the kernel is traced and lowered for CUDA,
which runs the whole Pallas -> Mosaic GPU lowering in Python, and the argument
checks run; the compiled cases skip.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import attention_mosaic_gpu as mg
from pallas_kernels import compact_block_mask
from tests.pallas_kernels.lowering import lower

ON_HOPPER = jax.default_backend() == "gpu" and mg.is_supported_device()
hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 (Hopper) GPU")
TOL = {jnp.float16: 5e-3, jnp.bfloat16: 1.5e-2}


def _qkv(seed, b, s, h, d, dtype):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (b, s, h, d), jnp.float32).astype(dtype)
               for k in keys)


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


# (batch, seq_len, heads, head_dim, dtype, density, empty query-block rows)
CASES = [
    (1, 1024, 2, 128, jnp.bfloat16, 0.5, ()),
    (2, 1000, 3, 128, jnp.bfloat16, 0.3, (2,)),       # ragged tail, empty row
    (1, 4100, 2, 64, jnp.float16, 0.4, (0, 32)),      # tail of 4 keys
    (1, 640, 1, 128, jnp.float16, 1.0, ()),           # dense
    (1, 8269, 2, 128, jnp.bfloat16, 0.1, (5,)),
    (2, 2048, 2, 64, jnp.bfloat16, 0.05, ()),         # mostly diagonal only
    (1, 100, 2, 128, jnp.bfloat16, 1.0, ()),          # S < 128: one ragged block
    (2, 300, 2, 128, jnp.float16, 0.0, ()),           # last row holds only the tail
]


@hopper
@pytest.mark.parametrize("b,s,h,d,dtype,density,empty", CASES)
def test_matches_reference(b, s, h, d, dtype, density, empty):
  n = -(-s // 128)
  q, k, v = _qkv(s + d, b, s, h, d, dtype)
  mask = _mask(s, b, h, n, density, empty)
  out, lse = mg.block_sparse_attention_fwd(q, k, v, compact_block_mask(mask),
                                           block_size=128)
  ref, ref_lse = pk.block_sparse_attention_reference(q, k, v, mask, block_size=128,
                                                     return_lse=True)
  assert out.dtype == dtype and out.shape == q.shape and lse.shape == (b, h, s)
  assert _rel_err(out, ref) < TOL[dtype]
  ref_lse = np.asarray(ref_lse)
  lse = np.asarray(lse)
  finite = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=2e-2, rtol=1e-3)
  for r in empty:
    rows = slice(r * 128, min(s, (r + 1) * 128))
    assert not np.asarray(out[:, rows], np.float32).any(), "empty row not zero"


@hopper
@pytest.mark.parametrize("lead", [(1, 1), (2, 1), (1, 3)])
def test_broadcast_tables_and_public_api(lead):
  b, s, h, d = 2, 777, 3, 128
  n = -(-s // 128)
  q, k, v = _qkv(1, b, s, h, d, jnp.bfloat16)
  mask = _mask(2, *lead, n, 0.4)
  out = pk.block_sparse_attention(q, k, v, mask, implementation="mosaic_gpu")
  ref = pk.block_sparse_attention_reference(q, k, v, mask)
  assert _rel_err(out, ref) < TOL[jnp.bfloat16]
  # The default on Hopper is this backend: same bits.
  default = pk.block_sparse_attention(q, k, v, mask)
  np.testing.assert_array_equal(np.asarray(default, np.float32),
                                np.asarray(out, np.float32))


@hopper
@pytest.mark.parametrize("config", [mg.MosaicConfig(stages=3), mg.MosaicConfig(stages=4),
                                    mg.MosaicConfig(compute_registers=224)])
def test_other_configs_match_reference(config):
  """Deeper K/V rings (they fit at head_dim 64) and a smaller register split."""
  b, s, h, d = 1, 1500, 2, 64
  q, k, v = _qkv(8, b, s, h, d, jnp.bfloat16)
  mask = _mask(9, b, h, 12, 0.5, (3,))
  out, _ = mg.block_sparse_attention_fwd(q, k, v, compact_block_mask(mask), block_size=128,
                                         config=config)
  ref = pk.block_sparse_attention_reference(q, k, v, mask)
  assert _rel_err(out, ref) < TOL[jnp.bfloat16]


@hopper
@pytest.mark.parametrize("tiles_per_cta,heads_fastest,longest_first", [
    (2, False, False), (3, True, False), (4, False, False), (1, False, True),
    (2, True, True)])
@pytest.mark.parametrize("dense", [False, True])
def test_other_tile_orders_match_reference(tiles_per_cta, heads_fastest, longest_first,
                                           dense):
  """Several tiles per CTA (the last CTA fewer: 2 * 3 * 9 = 54 tiles), launch
  orders, longest rows first."""
  b, s, h, d = 2, 1100, 3, 128
  n = -(-s // 128)
  q, k, v = _qkv(tiles_per_cta, b, s, h, d, jnp.bfloat16)
  mask = None if dense else _mask(tiles_per_cta, b, h, n, 0.3, (0, 4, 8))
  table = None if dense else compact_block_mask(mask)
  cfg = mg.MosaicConfig(tiles_per_cta=tiles_per_cta, heads_fastest=heads_fastest,
                        longest_first=longest_first)
  out, lse = mg.block_sparse_attention_fwd(q, k, v, table, block_size=128, config=cfg)
  one_out, one_lse = mg.block_sparse_attention_fwd(q, k, v, table, block_size=128)
  ref = pk.block_sparse_attention_reference(q, k, v, mask)
  assert _rel_err(out, ref) < TOL[jnp.bfloat16]
  assert _rel_err(out, one_out) < 1e-3
  np.testing.assert_allclose(np.asarray(lse), np.asarray(one_lse), rtol=1e-6)


@hopper
def test_heads_fastest_launch_order_same_result():
  q, k, v = _qkv(6, 2, 1000, 3, 128, jnp.bfloat16)
  table = compact_block_mask(_mask(7, 2, 3, 8, 0.4, (1,)))
  run = lambda cfg: np.asarray(mg.block_sparse_attention_fwd(
      q, k, v, table, block_size=128, config=cfg)[0], np.float32)
  np.testing.assert_array_equal(run(mg.MosaicConfig(heads_fastest=True)),
                                run(mg.MosaicConfig()))


@hopper
def test_deterministic_and_dense_matches_cudnn():
  q, k, v = _qkv(3, 1, 2048, 4, 128, jnp.bfloat16)
  f = jax.jit(functools.partial(pk.block_sparse_attention, block_mask=None,
                                implementation="mosaic_gpu"))
  a, b = np.asarray(f(q, k, v), np.float32), np.asarray(f(q, k, v), np.float32)
  np.testing.assert_array_equal(a, b)
  ref = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  assert _rel_err(a, ref) < 1e-2


@hopper
@pytest.mark.parametrize("s", [100, 1000, 2048])
def test_dense_static_loop_matches_dense_table(s):
  """table=None (the static all-blocks loop) = the all-active table."""
  q, k, v = _qkv(s, 2, s, 3, 128, jnp.bfloat16)
  n = -(-s // 128)
  static = mg.block_sparse_attention_fwd(q, k, v, None, block_size=128)
  driven = mg.block_sparse_attention_fwd(q, k, v, pk.dense_block_table((1, 1), n),
                                         block_size=128)
  # Same arithmetic; the compiler may round the lse differently (1 ulp seen).
  assert _rel_err(static[0], driven[0]) < 1e-3
  np.testing.assert_allclose(np.asarray(static[1]), np.asarray(driven[1]), rtol=1e-6)
  ref = pk.block_sparse_attention_reference(q, k, v, None)
  assert _rel_err(static[0], ref) < TOL[jnp.bfloat16]


@hopper
def test_with_map_and_sparsity_map_run():
  b, s, h, d = 1, 1000, 2, 128
  n = -(-s // 128)
  q, k, v = _qkv(4, b, s, h, d, jnp.bfloat16)
  mask = _mask(5, b, h, n, 0.5)
  out, smap = pk.block_sparse_attention_with_map(q, k, v, mask, implementation="mosaic_gpu")
  ref_map = pk.sparsity_map(q, k, block_mask=mask, implementation="triton")
  np.testing.assert_allclose(np.asarray(smap), np.asarray(ref_map), atol=2e-2)
  assert _rel_err(out, pk.block_sparse_attention_reference(q, k, v, mask)) < 1.5e-2


@pytest.mark.parametrize("s,d,dtype,lead", [
    (100, 128, jnp.bfloat16, (1, 1)),      # shorter than one block
    (1024, 128, jnp.bfloat16, (1, 2)),
    (1000, 128, jnp.float16, (1, 1)),     # ragged tail: the masked last step
    (4100, 64, jnp.bfloat16, (2, 2)),
    (1000, 128, jnp.bfloat16, None),      # dense: the static loop, with a tail
    (1024, 64, jnp.float16, None),
])
@pytest.mark.parametrize("config", [
    mg.MosaicConfig(), mg.MosaicConfig(heads_fastest=True), mg.MosaicConfig(tiles_per_cta=3),
    mg.MosaicConfig(longest_first=False)], ids=["default", "heads_fastest", "k3", "natural_order"])
def test_lowers_for_cuda(s, d, dtype, lead, config):
  """The full Pallas -> Mosaic GPU lowering runs (no GPU needed)."""
  b, h = 2, 2
  n = -(-s // 128)
  q = jax.ShapeDtypeStruct((b, s, h, d), dtype)
  table = None if lead is None else compact_block_mask(_mask(0, *lead, n, 0.5))
  fn = lambda q, k, v, t: mg.block_sparse_attention_fwd(q, k, v, t, block_size=128,
                                                       config=config)
  text = lower(fn, "cuda", q, q, q, table)
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("kwargs,dtype,d,message", [
    ({}, jnp.float32, 128, "bfloat16 or float16"),
    ({"block_size": 64}, jnp.bfloat16, 128, "block_size must be 128"),
    ({}, jnp.bfloat16, 96, "head_dim must be one of"),
    ({"sm_scale": 0.0}, jnp.bfloat16, 128, "sm_scale must be > 0"),
    ({"config": mg.MosaicConfig(stages=3)}, jnp.bfloat16, 128, "shared memory"),
    ({"config": mg.MosaicConfig(stages=1)}, jnp.bfloat16, 128, "stages must be"),
    ({"interpret": True}, jnp.bfloat16, 128, "no interpret mode"),
    # 240 registers x 2 compute warpgroups overflow the register file: the
    # kernel would hang, so the config is refused up front.
    ({"config": mg.MosaicConfig(compute_registers=240)}, jnp.bfloat16, 128, "compute_registers"),
    ({"config": mg.MosaicConfig(compute_registers=228)}, jnp.bfloat16, 128, "multiple of 8"),
    ({"config": mg.MosaicConfig(tiles_per_cta=0)}, jnp.bfloat16, 128, "tiles_per_cta"),
])
def test_rejects_unsupported(kwargs, dtype, d, message):
  q = jnp.ones((1, 256, 1, d), dtype)
  kwargs = {"block_size": 128, **kwargs}
  table = pk.dense_block_table((1, 1), 2)
  with pytest.raises(ValueError, match=message):
    mg.block_sparse_attention_fwd(q, q, q, table, **kwargs)


def test_backend_refuses_tables_it_cannot_trust():
  """Direct calls need a table from compact_block_mask (the API canonicalises)."""
  q = jnp.ones((1, 256, 1, 128), jnp.bfloat16)
  good = compact_block_mask(jnp.ones((1, 1, 2, 2), bool))
  assert good.canonical and not good.replace(counts=good.counts).canonical
  with pytest.raises(ValueError, match="canonical"):
    mg.block_sparse_attention_fwd(q, q, q, good.replace(counts=good.counts), block_size=128)
  with pytest.raises(ValueError, match="query-block rows"):
    mg.block_sparse_attention_fwd(q, q, q, compact_block_mask(jnp.ones((1, 1, 3, 3), bool)),
                                  block_size=128)


def test_public_api_names_the_backend():
  q = jnp.ones((1, 256, 1, 128), jnp.float32)
  with pytest.raises(ValueError, match="mosaic_gpu backend: dtype"):
    pk.block_sparse_attention(q, q, q, None, implementation="mosaic_gpu")

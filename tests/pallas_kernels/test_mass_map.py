"""The block mass map (the oracle's statistic): every backend against the
from-scratch reference, the api entry, and the refusal of backends without it.

M[i, j] = sum of the softmax probabilities of block (i, j) / valid rows of query
block i, so each row sums to 1 over its active blocks. On CPU the Pallas
kernels run in interpret mode.
"""

from __future__ import annotations

import math
import types
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import api, map_reference, map_tpu, map_triton
from tests.pallas_kernels.lowering import lower
from tests.pallas_kernels.test_sparsity_map import (ALL_BACKENDS, BACKENDS, INTERPRET,
                                                    LOWER_CASES, _abstract_args, _runnable,
                                                    local_lse, make_inputs, make_mask,
                                                    make_table)

CASES = [
    # (B, S, H, D, block_size, mask kind, dtypes)
    (2, 77, 2, 32, 16, "dense", ("f32", "bf16")),       # a partial last block
    (1, 100, 2, 32, 32, "random", ("f32", "bf16")),
    (1, 90, 2, 32, 16, "random_empty_row", ("f32",)),
    (1, 200, 1, 64, 64, "random", ("bf16",)),
]
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def run_mass(backend, q, k, lse, table, **kw):
  interpret = INTERPRET if backend in ("triton", "tpu") else False
  return BACKENDS[backend].block_mass_from_lse(q, k, lse, table, interpret=interpret, **kw)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "b,seq_len,h,d,block,mask,dtype",
    [pytest.param(*c[:6], DTYPES[t], id=f"seq_len={c[1]}_block={c[4]}_d={c[3]}_mask={c[5]}_{t}")
     for c in CASES for t in c[6]])
def test_matches_reference(backend, dtype, b, seq_len, h, d, block, mask):
  if backend == "reference" and dtype == jnp.bfloat16:
    pytest.skip("reference upcasts; covered by f32")
  seed = zlib.crc32(f"mass{seq_len}{block}{mask}".encode()) % 1000
  q, k = make_inputs(b, seq_len, h, d, dtype, seed)
  n = -(-seq_len // block)
  bm = make_mask(mask, b, h, n, seed)
  q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
  want = np.asarray(map_reference.block_mass_map_reference(
      q32, k32, block_size=block, block_mask=None if bm is None else jnp.asarray(bm)))
  lse = local_lse(q, k, bm, block, 1.0 / math.sqrt(d))
  got = np.asarray(run_mass(backend, q, k, lse, None if bm is None else make_table(bm),
                            block_size=block, sm_scale=None))
  chex.assert_shape(got, (b, h, n, n))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  if bm is not None:
    np.testing.assert_array_equal(np.isnan(got), ~bm)
  # the map is not trivial: mass uneven over the blocks
  act = want[~np.isnan(want)]
  assert act.max() - act.min() > 0.1
  np.testing.assert_allclose(got, want, atol=1e-5 if dtype == jnp.float32 else 3e-3, rtol=0)
  rows = np.nansum(got, axis=-1)
  nonempty = np.ones(rows.shape, bool) if bm is None else bm.any(-1)
  np.testing.assert_allclose(rows[nonempty], 1.0, atol=1e-4 if dtype == jnp.float32 else 2e-2)
  np.testing.assert_array_equal(rows[~nonempty], 0.0)


@pytest.mark.parametrize("implementation", [None, "triton"])
def test_api_entry(implementation):
  """block_mass_map: lse pass + mass replay, dense or with a block mask."""
  if implementation in ("triton", "tpu") and not _runnable(implementation):
    pytest.skip(f"{implementation} kernel cannot run on {jax.default_backend()}")
  b, s, h, d, bs = 2, 150, 2, 64, 64
  q, k = make_inputs(b, s, h, d, jnp.float32, 7)
  n = -(-s // bs)
  bm = make_mask("random", b, h, n, 7)
  interpret = INTERPRET and implementation in ("triton", "tpu")
  for mask in (None, bm):
    want = map_reference.block_mass_map_reference(q, k, block_size=bs,
                                                  block_mask=None if mask is None else jnp.asarray(mask))
    got = pallas_kernels.block_mass_map(q, k, block_size=64, implementation=implementation,
                                        block_mask=None if mask is None else jnp.asarray(mask),
                                        interpret=interpret)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)


def test_backend_without_mass_is_refused(monkeypatch):
  bare = types.SimpleNamespace(__name__="pallas_kernels.map_bare")
  real = api._map_module
  monkeypatch.setattr(api, "_map_module", lambda impl: bare if impl == "triton" else real(impl))
  q, k = make_inputs(1, 64, 1, 64, jnp.float32, 0)
  unjitted = api.block_mass_map.__wrapped__  # the patches act at trace time
  with pytest.raises(ValueError, match=r"implementation='triton' has no block mass map.*map_bare"):
    unjitted(q, k, block_size=64, implementation="triton")
  # implementation=None falls back to xla's mass map when the default has none
  monkeypatch.setattr(api, "default_implementation", lambda *a, **kw: "triton")
  xla_attention = api._attention_module("xla")
  monkeypatch.setattr(api, "_attention_module", lambda impl: xla_attention)
  got = unjitted(q, k, block_size=64)
  want = map_reference.block_mass_map_reference(q, k, block_size=64)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_bad_arguments():
  q, k = make_inputs(1, 64, 1, 64, jnp.float32, 0)
  with pytest.raises(ValueError, match="block_size must be one of"):
    pallas_kernels.block_mass_map(q, k, block_size=96)
  with pytest.raises(ValueError, match="implementation must be None or one of"):
    pallas_kernels.block_mass_map(q, k, implementation="cuda")
  with pytest.raises(ValueError, match="k.shape"):
    pallas_kernels.block_mass_map(q, k[:, :32])


@pytest.mark.parametrize("seq_len,block,d,sparse", LOWER_CASES[:3])
def test_triton_mass_kernel_lowers_for_cuda(seq_len, block, d, sparse):
  q, lse, table = _abstract_args(seq_len, block, d, sparse)
  fn = lambda q, k, lse, t: map_triton.block_mass_from_lse(q, k, lse, t, block_size=block)
  assert "triton" in lower(fn, "cuda", q, q, lse, table)


@pytest.mark.parametrize("seq_len,block,d,sparse", LOWER_CASES[:2])
def test_tpu_mass_kernel_lowers_for_tpu(seq_len, block, d, sparse):
  q, lse, table = _abstract_args(seq_len, block, d, sparse, heads=2)
  fn = lambda q, k, lse, t: map_tpu.block_mass_from_lse(q, k, lse, t, block_size=block)
  assert "tpu_custom_call" in lower(fn, "tpu", q, q, lse, table)

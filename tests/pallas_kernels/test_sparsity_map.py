"""Sparsity-map backends (XLA, Pallas Triton, Pallas TPU) against the reference.

On CPU the Pallas kernels run in interpret mode (Triton: the HLO interpreter;
TPU: `pltpu.InterpretParams`); on an accelerator the matching backend runs
compiled. The row log-sum-exp is computed here in float32 from the (masked)
scores, so these tests do not depend on the attention kernels.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import map_reference, map_tpu, map_triton, map_xla
from tests.pallas_kernels.lowering import lower

PLATFORM = jax.default_backend()
INTERPRET = PLATFORM == "cpu"

BACKENDS = {
    "reference": map_reference,
    "xla": map_xla,
    "triton": map_triton,
    "tpu": map_tpu,
}


def _runnable(name: str) -> bool:
  if name == "triton":
    return PLATFORM in ("cpu", "gpu")
  if name == "tpu":
    return PLATFORM in ("cpu", "tpu")
  return True


def _backend_param(name):
  return pytest.param(name, id=name, marks=pytest.mark.skipif(
      not _runnable(name), reason=f"{name} kernel cannot run on {PLATFORM}"))


KERNEL_BACKENDS = [_backend_param(n) for n in ("xla", "triton", "tpu")]
ALL_BACKENDS = [_backend_param(n) for n in BACKENDS]


class Table(NamedTuple):
  """Duck-typed block table (a pytree): indices [B, H, n, w], counts [B, H, n]."""
  indices: jax.Array
  counts: jax.Array


def make_table(block_mask: np.ndarray, width: int | None = None) -> Table:
  """Ascending active ids per row; padding repeats the last valid id (0 if none)."""
  block_mask = np.asarray(block_mask, bool)
  counts = block_mask.sum(-1).astype(np.int32)
  w = int(width or max(1, counts.max()))
  assert counts.max() <= w
  idx = np.zeros(block_mask.shape[:-1] + (w,), np.int32)
  for pos in np.ndindex(block_mask.shape[:-1]):
    act = np.flatnonzero(block_mask[pos])
    last = act[-1] if act.size else 0
    idx[pos] = np.concatenate([act, np.full(w - act.size, last)])
  return Table(jnp.asarray(idx), jnp.asarray(counts))


def make_mask(kind: str, b: int, h: int, n: int, seed: int) -> np.ndarray | None:
  rng = np.random.default_rng(seed)
  eye = np.eye(n, dtype=bool)
  if kind == "dense":
    return None
  if kind == "diagonal":
    return np.broadcast_to(eye, (b, h, n, n)).copy()
  if kind == "random":
    return (rng.random((b, h, n, n)) < 0.4) | eye
  if kind == "random_empty_row":
    # No diagonal guard, and query-block row 0 of the first head is empty.
    m = rng.random((b, h, n, n)) < 0.5
    m[0, 0, 0] = False
    m[..., 1:, 1] = True
    return m
  raise ValueError(kind)


def make_inputs(b, s, h, d, dtype, seed, q_scale=2.5):
  """Fresh random q, k (never zeros); q scaled so the softmax is peaky."""
  kq, kk = jax.random.split(jax.random.key(seed))
  q = (q_scale * jax.random.normal(kq, (b, s, h, d), jnp.float32)).astype(dtype)
  k = jax.random.normal(kk, (b, s, h, d), jnp.float32).astype(dtype)
  return q, k


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale"))
def _masked_lse(q, k, block_mask, block_size, sm_scale):
  """float32 natural-log row log-sum-exp of the (masked) scores."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * sm_scale
  if block_mask is not None:
    seq = q.shape[1]
    tok = jnp.repeat(jnp.repeat(jnp.asarray(block_mask), block_size, axis=-2),
                     block_size, axis=-1)[..., :seq, :seq]
    s = jnp.where(tok, s, -jnp.inf)
  return jax.nn.logsumexp(s, axis=-1)


def local_lse(q, k, block_mask, block_size, sm_scale):
  """float32 natural-log row log-sum-exp of the (masked) scores."""
  bm = None if block_mask is None else jnp.asarray(block_mask)
  return _masked_lse(q, k, bm, block_size, float(sm_scale))


def run_map(backend, q, k, lse, table, **kw):
  interpret = INTERPRET if backend in ("triton", "tpu") else False
  return BACKENDS[backend].sparsity_map_from_lse(q, k, lse, table,
                                                 interpret=interpret, **kw)


def pair_counts(seq_len, block_size):
  nv = map_reference.block_token_counts(seq_len, block_size)
  return nv[:, None] * nv[None, :]


def assert_maps_match(got, want, *, seq_len, block_size, max_flips, mean_tol):
  """Same NaN pattern; counts differ by at most `max_flips` per block."""
  got = np.asarray(got)
  want = np.asarray(want)
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  act = ~np.isnan(want)
  assert np.all((got[act] >= 0) & (got[act] <= 1))
  flips = np.abs(got - want) * pair_counts(seq_len, block_size)
  assert np.max(flips[act], initial=0.0) <= max_flips + 1e-3, np.max(flips[act])
  assert np.mean(np.abs(got - want)[act]) <= mean_tol


def assert_nontrivial(ref):
  vals = np.asarray(ref)[~np.isnan(np.asarray(ref))]
  assert vals.size
  inside = (vals > 0) & (vals < 1)
  assert inside.mean() >= 0.5, f"map too trivial: {inside.mean()=}"
  assert 0.05 < vals.mean() < 0.95, vals.mean()


CASES = [
    # (B, S, H, D, block_size, mask kind)
    (1, 64, 2, 32, 16, "dense"),
    (2, 77, 2, 32, 16, "dense"),
    (1, 77, 2, 32, 16, "random"),
    (2, 100, 2, 32, 32, "random"),
    (1, 61, 2, 32, 16, "diagonal"),
    (1, 90, 2, 32, 16, "random_empty_row"),
    (1, 200, 1, 64, 64, "random"),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "b,seq_len,h,d,block,mask",
    [pytest.param(*c, id=f"seq_len={c[1]}_block={c[4]}_d={c[3]}_mask={c[5]}")
     for c in CASES])
def test_matches_reference(backend, dtype, b, seq_len, h, d, block, mask):
  if backend == "reference" and dtype == jnp.bfloat16:
    pytest.skip("reference upcasts; covered by f32")
  seed = zlib.crc32(f"{seq_len}{block}{mask}".encode()) % 1000
  q, k = make_inputs(b, seq_len, h, d, dtype, seed)
  n = -(-seq_len // block)
  bm = make_mask(mask, b, h, n, seed)
  thr = 1e-3
  scale = 1.0 / math.sqrt(d)
  q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
  want = map_reference.sparsity_map_reference(
      q32, k32, block_size=block, threshold=thr,
      block_mask=None if bm is None else jnp.asarray(bm))
  assert_nontrivial(want)
  lse = local_lse(q, k, bm, block, scale)
  table = None if bm is None else make_table(bm)
  got = run_map(backend, q, k, lse, table, block_size=block, threshold=thr,
                sm_scale=None)
  chex.assert_shape(got, (b, h, n, n))
  # Near-threshold entries may flip between p < t and log-domain compares
  # (f32), and with the accumulation order of bf16 products (bf16).
  max_flips = 2 if dtype == jnp.float32 else 6
  assert_maps_match(got, want, seq_len=seq_len, block_size=block,
                    max_flips=max_flips, mean_tol=2e-3)
  if bm is not None:
    np.testing.assert_array_equal(np.isnan(np.asarray(got)), ~bm)
  else:
    assert not np.any(np.isnan(np.asarray(got)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_narrow_table_and_explicit_scale(backend):
  """w < n (rows with fewer active blocks than w) and a non-default sm_scale."""
  b, seq_len, h, d, block = 1, 120, 2, 32, 16
  n = -(-seq_len // block)
  rng = np.random.default_rng(3)
  bm = np.zeros((b, h, n, n), bool)
  for pos in np.ndindex(b, h, n):
    bm[pos + (rng.choice(n, size=rng.integers(1, 4), replace=False),)] = True
  table = make_table(bm, width=4)
  q, k = make_inputs(b, seq_len, h, d, jnp.float32, 11, q_scale=1.0)
  scale = 0.6
  lse = local_lse(q, k, bm, block, scale)
  want = map_reference.sparsity_map_from_lse(q, k, lse, table, block_size=block,
                                             threshold=2e-2, sm_scale=scale)
  assert_nontrivial(want)
  got = run_map(backend, q, k, lse, table, block_size=block, threshold=2e-2,
                sm_scale=scale)
  assert_maps_match(got, want, seq_len=seq_len, block_size=block, max_flips=2,
                    mean_tol=1e-3)
  np.testing.assert_array_equal(np.isnan(np.asarray(got)), ~bm)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_threshold_monotone_and_deterministic(backend):
  b, seq_len, h, d, block = 1, 70, 2, 32, 16
  n = -(-seq_len // block)
  bm = make_mask("random", b, h, n, 5)
  table = make_table(bm)
  q, k = make_inputs(b, seq_len, h, d, jnp.bfloat16, 5)
  lse = local_lse(q, k, bm, block, 1 / math.sqrt(d))
  maps = [np.asarray(run_map(backend, q, k, lse, table, block_size=block,
                             threshold=t, sm_scale=None))
          for t in (1e-3, 1e-2, 1e-3)]
  assert np.all(maps[0][bm] <= maps[1][bm])
  assert np.any(maps[0][bm] < maps[1][bm])
  np.testing.assert_array_equal(maps[0], maps[2])       # bitwise, NaN included


@pytest.mark.skipif(not _runnable("triton"), reason=f"triton kernel cannot run on {PLATFORM}")
@pytest.mark.parametrize("key_splits,count_group", [(1, 16), (4, 4), (8, 2), (None, 16)],
                         ids=["one_program_4_groups", "splits=4_groups=4",
                              "splits=8_groups=2", "auto"])
def test_triton_dense_key_splits_and_count_groups(key_splits, count_group):
  """The dense map's key split and per-group counts: n = 38 blocks (n_pad 64),
  a short last block, groups past n and a partly filled last group."""
  b, seq_len, h, d, block = 1, 16 * 37 + 5, 2, 32, 16
  n = -(-seq_len // block)
  cfg = map_triton.MapBlockConfig(key_splits=key_splits, count_group=count_group)
  if key_splits is None:
    # A small grid: chunks of 8 blocks, 5 programs per row (none past n).
    assert cfg.resolve_dense(b * h * n, n) == (8, 8)
  q, k = make_inputs(b, seq_len, h, d, jnp.bfloat16, 21)
  lse = local_lse(q, k, None, block, 1 / math.sqrt(d))
  want = map_reference.sparsity_map_from_lse(q, k, lse, None, block_size=block,
                                             threshold=1e-3)
  assert_nontrivial(want)
  got = map_triton.sparsity_map_triton(q, k, lse, None, block_size=block, threshold=1e-3,
                                       interpret=INTERPRET, config=cfg)
  chex.assert_shape(got, (b, h, n, n))
  assert not np.any(np.isnan(np.asarray(got)))
  assert_maps_match(got, want, seq_len=seq_len, block_size=block, max_flips=6,
                    mean_tol=2e-3)


def test_triton_map_config_rejects_bad_values():
  for bad in (3, True, 0.5):
    with pytest.raises(ValueError, match="key_splits"):
      map_triton.MapBlockConfig(key_splits=bad)
  for bad in (1, None, 12):
    with pytest.raises(ValueError, match="count_group"):
      map_triton.MapBlockConfig(count_group=bad)
  with pytest.raises(ValueError, match="key_splits=32"):
    map_triton.MapBlockConfig(key_splits=32).resolve_dense(10, 32)
  # Large grids keep one program per row; the group never exceeds the chunk.
  assert map_triton.MapBlockConfig().resolve_dense(10_000, 200) == (256, 16)
  assert map_triton.MapBlockConfig(key_splits=4).resolve_dense(10, 32) == (8, 8)
  # 4096 tokens, 12 heads (n = 32): two chunks of 16 blocks per row.
  assert map_triton.MapBlockConfig().resolve_dense(12 * 32, 32) == (16, 16)


@pytest.mark.skipif(not _runnable("tpu"), reason=f"tpu kernel cannot run on {PLATFORM}")
def test_tpu_table_split_over_calls(monkeypatch):
  """A table past the SMEM budget is split over several pallas_calls."""
  monkeypatch.setattr(map_tpu, "SMEM_TABLE_BUDGET_BYTES", 1)
  b, seq_len, h, d, block = 2, 45, 2, 16, 16       # unique shape: fresh trace
  n = -(-seq_len // block)
  assert map_tpu._heads_per_call(b * h, n, n, 1) == 1
  bm = make_mask("random", b, h, n, 4)
  table = make_table(bm)
  q, k = make_inputs(b, seq_len, h, d, jnp.float32, 4)
  lse = local_lse(q, k, bm, block, 1 / math.sqrt(d))
  want = map_reference.sparsity_map_from_lse(q, k, lse, table, block_size=block,
                                             threshold=1e-3)
  got = run_map("tpu", q, k, lse, table, block_size=block, threshold=1e-3,
                sm_scale=None)
  assert_maps_match(got, want, seq_len=seq_len, block_size=block, max_flips=2,
                    mean_tol=1e-3)


def test_reference_against_brute_force():
  """The jnp reference against an explicit per-block loop in numpy (float64)."""
  b, seq_len, h, d, block = 1, 37, 2, 8, 8
  n = -(-seq_len // block)
  q, k = make_inputs(b, seq_len, h, d, jnp.float32, 7, q_scale=2.0)
  bm = make_mask("random", b, h, n, 7)
  thr = 5e-3
  got = np.asarray(map_reference.sparsity_map_reference(
      q, k, block_size=block, threshold=thr, block_mask=jnp.asarray(bm)))
  qn = np.asarray(q, np.float64)
  kn = np.asarray(k, np.float64)
  want = np.full((b, h, n, n), np.nan)
  for bi, hi in np.ndindex(b, h):
    s = qn[bi, :, hi] @ kn[bi, :, hi].T / math.sqrt(d)
    tok = np.kron(bm[bi, hi], np.ones((block, block), bool))[:seq_len, :seq_len]
    s = np.where(tok, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    for i, j in zip(*np.nonzero(bm[bi, hi])):
      blk = p[i * block:(i + 1) * block, j * block:(j + 1) * block]
      want[bi, hi, i, j] = np.mean(blk < thr)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert_nontrivial(got)


def test_reference_from_lse_matches_softmax_reference():
  b, seq_len, h, d, block = 2, 50, 2, 16, 16
  n = -(-seq_len // block)
  q, k = make_inputs(b, seq_len, h, d, jnp.float32, 9)
  for mask in ("dense", "random"):
    bm = make_mask(mask, b, h, n, 9)
    lse = local_lse(q, k, bm, block, 1 / math.sqrt(d))
    table = None if bm is None else make_table(bm)
    a = map_reference.sparsity_map_from_lse(q, k, lse, table, block_size=block,
                                            threshold=1e-3)
    ref = map_reference.sparsity_map_reference(
        q, k, block_size=block, threshold=1e-3,
        block_mask=None if bm is None else jnp.asarray(bm))
    assert_maps_match(a, ref, seq_len=seq_len, block_size=block, max_flips=2,
                      mean_tol=1e-3)


def test_colleague_block_table_is_accepted():
  """The project's BlockTable (flax pytree) works as the `table` argument."""
  block_table = pytest.importorskip("pallas_kernels.block_table")
  b, seq_len, h, d, block = 1, 48, 2, 16, 16
  n = -(-seq_len // block)
  bm = make_mask("random", b, h, n, 2)
  table = block_table.compact_block_mask(jnp.asarray(bm))
  q, k = make_inputs(b, seq_len, h, d, jnp.float32, 2)
  lse = local_lse(q, k, bm, block, 1 / math.sqrt(d))
  want = map_reference.sparsity_map_from_lse(q, k, lse, make_table(bm),
                                             block_size=block, threshold=1e-3)
  for name in ("xla", "triton"):
    got = run_map(name, q, k, lse, table, block_size=block, threshold=1e-3,
                  sm_scale=None)
    assert_maps_match(got, want, seq_len=seq_len, block_size=block,
                      max_flips=2, mean_tol=1e-3)


@pytest.mark.parametrize("backend", [n for n in BACKENDS])
def test_bad_arguments_raise(backend):
  mod = BACKENDS[backend]
  q, k = make_inputs(1, 32, 2, 16, jnp.float32, 0)
  lse = jnp.zeros((1, 2, 32))
  with pytest.raises(ValueError, match="lse"):
    mod.sparsity_map_from_lse(q, k, lse[:, :1], None, block_size=16,
                              threshold=1e-3, sm_scale=None)
  with pytest.raises(ValueError, match="q and k"):
    mod.sparsity_map_from_lse(q, k[:, :16], lse, None, block_size=16,
                              threshold=1e-3, sm_scale=None)
  with pytest.raises(ValueError, match="table"):
    bad = Table(jnp.zeros((1, 2, 3, 2), jnp.int32), jnp.zeros((1, 2, 3), jnp.int32))
    mod.sparsity_map_from_lse(q, k, lse, bad, block_size=16, threshold=1e-3,
                              sm_scale=None)
  if backend == "triton":
    with pytest.raises(ValueError, match="block_size"):
      mod.sparsity_map_from_lse(q, k, lse, None, block_size=24, threshold=1e-3,
                                sm_scale=None, interpret=True)


# --- Lowering checks: the compiled kernels can't run here, but their lowering
# to Triton IR / Mosaic MLIR (done in Python) can, at production shapes.




LOWER_CASES = [
    pytest.param(32760, 128, 128, False, id="seq_len=32760_block=128_dense"),
    pytest.param(32760, 128, 128, True, id="seq_len=32760_block=128_table"),
    pytest.param(16384, 64, 64, True, id="seq_len=16384_block=64_d=64_table"),
    pytest.param(69120, 128, 128, True, id="seq_len=69120_block=128_table"),
]


def _abstract_args(seq_len, block, d, sparse, heads=16):
  n = -(-seq_len // block)
  q = jax.ShapeDtypeStruct((1, seq_len, heads, d), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((1, heads, seq_len), jnp.float32)
  table = None
  if sparse:
    w = min(n, 300)
    table = Table(jax.ShapeDtypeStruct((1, heads, n, w), jnp.int32),
                  jax.ShapeDtypeStruct((1, heads, n), jnp.int32))
  return q, lse, table


@pytest.mark.parametrize("seq_len,block,d,sparse", LOWER_CASES)
def test_triton_kernel_lowers_for_cuda(seq_len, block, d, sparse):
  q, lse, table = _abstract_args(seq_len, block, d, sparse)
  fn = lambda q, k, lse, t: map_triton.sparsity_map_from_lse(
      q, k, lse, t, block_size=block, threshold=1e-4, sm_scale=None)
  text = lower(fn, "cuda", q, q, lse, table)
  assert "triton" in text


@pytest.mark.parametrize("seq_len,block,d,sparse", LOWER_CASES[:3])
def test_tpu_kernel_lowers_for_tpu(seq_len, block, d, sparse):
  q, lse, table = _abstract_args(seq_len, block, d, sparse, heads=2)
  fn = lambda q, k, lse, t: map_tpu.sparsity_map_from_lse(
      q, k, lse, t, block_size=block, threshold=1e-4, sm_scale=None)
  text = lower(fn, "tpu", q, q, lse, table)
  assert "tpu_custom_call" in text

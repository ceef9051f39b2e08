"""BlockTable compaction: properties of compact_block_mask / block_mask_from_table."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels import BlockTable, block_mask_from_table, compact_block_mask
from pallas_kernels.block_table import check_block_table, dense_block_table


def _random_mask(seed, shape, density):
  return jnp.asarray(np.random.default_rng(seed).random(shape) < density)


def _check_table_properties(mask: np.ndarray, table: BlockTable, width: int):
  mask = np.asarray(mask)
  idx = np.asarray(table.indices)
  cnt = np.asarray(table.counts)
  assert idx.dtype == np.int32 and cnt.dtype == np.int32
  assert idx.shape == mask.shape[:-1] + (width,)
  assert cnt.shape == mask.shape[:-1]
  for pos in np.ndindex(*mask.shape[:-1]):
    active = np.flatnonzero(mask[pos])
    c = int(cnt[pos])
    assert c == min(len(active), width)
    np.testing.assert_array_equal(idx[pos][:c], active[:c])   # ascending, first w
    pad = idx[pos][c:]
    expected_pad = active[c - 1] if c > 0 else 0
    assert np.all(pad == expected_pad), (pos, idx[pos], c)


@jax.jit
def _roundtrip(mask):
  table = compact_block_mask(mask)
  return table, block_mask_from_table(table)


@settings(max_examples=12, deadline=None)
@given(n=st.sampled_from([1, 2, 7]), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_compact_roundtrip_random(n, density, seed):
  mask = np.random.default_rng(seed).random((2, 3, n, n)) < density
  table, back = _roundtrip(mask)
  _check_table_properties(mask, table, n)
  np.testing.assert_array_equal(back, mask)


@pytest.mark.parametrize("width", [1, 3, 6])
def test_compact_truncates_to_max_width(width):
  n = 6
  mask = _random_mask(3, (4, n, n), 0.7)
  table = compact_block_mask(mask, max_width=width)
  _check_table_properties(mask, table, width)
  expanded = np.asarray(block_mask_from_table(table))
  # Each row keeps its first `width` active blocks and nothing else.
  mask = np.asarray(mask)
  keep = np.cumsum(mask, axis=-1) <= width
  np.testing.assert_array_equal(expanded, mask & keep)


def test_compact_special_rows():
  n = 5
  mask = np.zeros((n, n), bool)
  mask[1, 2] = True                        # single block
  mask[2] = True                           # full row
  mask[3, [0, 4]] = True                   # first and last
  table = compact_block_mask(jnp.asarray(mask))
  np.testing.assert_array_equal(table.counts, [0, 1, n, 2, 0])
  np.testing.assert_array_equal(table.indices[0], [0] * n)          # empty row pads 0
  np.testing.assert_array_equal(table.indices[1], [2] * n)
  np.testing.assert_array_equal(table.indices[2], np.arange(n))
  np.testing.assert_array_equal(table.indices[3], [0, 4, 4, 4, 4])  # repeats last


def test_compact_is_jittable_and_leading_dims():
  mask = _random_mask(1, (2, 2, 3, 4, 4), 0.5)
  eager = compact_block_mask(mask, max_width=3)
  jitted = jax.jit(compact_block_mask, static_argnums=1)(mask, 3)
  chex.assert_trees_all_equal(eager, jitted)
  chex.assert_shape(jitted.indices, (2, 2, 3, 4, 3))
  assert eager.num_blocks == 4 and eager.width == 3 and eager.shape == (2, 2, 3)


def test_table_is_a_pytree():
  table = compact_block_mask(_random_mask(2, (2, 3, 3), 0.5))
  leaves = jax.tree_util.tree_leaves(table)
  assert len(leaves) == 2
  doubled = jax.tree_util.tree_map(lambda x: x, table)
  assert isinstance(doubled, BlockTable)
  out = jax.jit(lambda t: t.counts.sum())(table)
  assert int(out) == int(np.asarray(table.counts).sum())


def test_block_mask_from_table_ignores_padding():
  table = BlockTable(indices=jnp.array([[1, 3, 0], [2, 2, 2], [0, 0, 0], [0, 1, 2]],
                                       jnp.int32),
                     counts=jnp.array([2, 1, 0, 3], jnp.int32))
  expected = np.zeros((4, 4), bool)
  expected[0, [1, 3]] = True
  expected[1, 2] = True
  expected[3, :3] = True
  np.testing.assert_array_equal(block_mask_from_table(table), expected)


def test_dense_table_and_density():
  table = dense_block_table((2, 3), 4)
  np.testing.assert_array_equal(block_mask_from_table(table), np.ones((2, 3, 4, 4), bool))
  assert float(table.density()) == 1.0
  half = compact_block_mask(jnp.asarray(np.tril(np.ones((4, 4), bool))))
  assert float(half.density()) == pytest.approx(10 / 16)


def test_compact_errors():
  with pytest.raises(ValueError, match="square"):
    compact_block_mask(jnp.ones((3, 4), bool))
  with pytest.raises(ValueError, match="bool"):
    compact_block_mask(jnp.ones((3, 3), jnp.int32))
  with pytest.raises(ValueError, match="max_width"):
    compact_block_mask(jnp.ones((3, 3), bool), max_width=4)
  with pytest.raises(ValueError, match="max_width"):
    compact_block_mask(jnp.ones((3, 3), bool), max_width=0)


def test_check_block_table_errors():
  good = compact_block_mask(jnp.ones((2, 3, 3), bool))
  check_block_table(good, 3)
  with pytest.raises(ValueError, match="expected n=4"):
    check_block_table(good, 4)
  with pytest.raises(ValueError, match="int32"):
    check_block_table(BlockTable(good.indices.astype(jnp.int16), good.counts), 3)
  with pytest.raises(ValueError, match="counts"):
    check_block_table(BlockTable(good.indices, good.counts[..., :2]), 3)
  with pytest.raises(ValueError, match="BlockTable"):
    check_block_table(np.ones((3, 3), bool), 3)


@pytest.mark.parametrize("seq_len", [64, 200])
def test_mask_recall_matches_brute_force(seq_len):
  from pallas_kernels.attention_reference import mask_recall
  kq, kk, km = jax.random.split(jax.random.key(seq_len), 3)
  q = jax.random.normal(kq, (2, seq_len, 3, 16)) * 2
  k = jax.random.normal(kk, (2, seq_len, 3, 16)) * 2
  n = -(-seq_len // 32)
  mask = jax.random.bernoulli(km, 0.5, (2, 3, n, n))
  p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0, axis=-1)
  blocks = jnp.arange(seq_len) // 32
  expected = (p * mask[:, :, blocks][:, :, :, blocks]).sum(-1).mean(-1)
  got = mask_recall(q, k, mask, block_size=32)
  chex.assert_trees_all_close(got, expected, atol=1e-5)
  assert np.allclose(mask_recall(q, k, jnp.ones_like(mask), block_size=32), 1.0, atol=1e-5)

"""Prediction, line selection and the MOD-DiT mask."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax import features as F
from modjax import predict as P


def _rng(*key):
  return np.random.default_rng(abs(hash(key)) % (2**32))


def _random_features(rng, lead, n, scale=1.0):
  x = rng.normal(size=lead + (3 * n,)) * scale
  return F.PatternFeatures.from_vector(jnp.asarray(x, jnp.float32))


def _numpy_predict_mask(prev, cur, interval, k, bpf, block_diagonal):
  """Brute-force reference: lexsort on (value, candidate index), loops over lines."""
  p, c = np.asarray(prev.to_vector(), np.float64), np.asarray(cur.to_vector(), np.float64)
  pred = (c + (c - p) / interval).astype(np.float32)
  n = (pred.shape[-1]) // 3
  lead = pred.shape[:-1]
  pred = pred.reshape(-1, 3 * n)
  bd = np.broadcast_to(block_diagonal, lead).reshape(-1)
  fb = F.frame_block_mask(n, bpf)
  out = np.zeros((pred.shape[0], n, n), bool)
  for h in range(pred.shape[0]):
    values = np.concatenate([pred[h, 2 * n - 1:3 * n - 1] / 2, pred[h, :2 * n - 1]])
    order = np.lexsort((np.arange(3 * n - 1), values))[:k]
    for line in order:
      if line < n:
        out[h, :, line] = True
      else:
        out[h] |= np.eye(n, k=int(line - n - (n - 1)), dtype=bool)
    if bd[h]:
      out[h] |= fb
    out[h] |= np.eye(n, dtype=bool)
  return out.reshape(lead + (n, n))


def test_predict_features_is_linear_extrapolation():
  rng = _rng("extrap")
  prev, cur = _random_features(rng, (2, 3), 6), _random_features(rng, (2, 3), 6)
  pred = P.predict_features(prev, cur, 10)
  want = cur.to_vector() + (cur.to_vector() - prev.to_vector()) / 10
  np.testing.assert_allclose(pred.to_vector(), want, rtol=1e-6, atol=1e-6)


def test_line_scores_order_and_halving():
  n = 4
  feats = F.PatternFeatures(diag=jnp.arange(7.0) + 100, col=jnp.arange(4.0) * 2, block=jnp.zeros(()))
  np.testing.assert_array_equal(P.line_scores(feats),
                                [0, 1, 2, 3, 100, 101, 102, 103, 104, 105, 106])
  assert P.num_candidate_lines(n) == 11


@pytest.mark.parametrize("n,bpf,ncols,ndiags", [(12, 3, 2, 3), (16, 4, 3, 4), (13, 4, 1, 5),
                                                (20, 5, 4, 0), (10, 3, 0, 4)])
def test_planted_lines_are_selected(n, bpf, ncols, ndiags):
  """A map that is high (sparse) except on chosen columns and diagonals: fitting
  it twice and predicting keeps exactly those lines."""
  rng = _rng("plant", n, bpf, ncols, ndiags)
  cols = rng.choice(n, ncols, replace=False)
  offsets = rng.choice(np.arange(-(n - 1), n), ndiags, replace=False)
  important = np.zeros((n, n), bool)
  important[:, cols] = True
  for o in offsets:
    important |= np.eye(n, k=int(o), dtype=bool)
  maps = []
  for _ in range(2):  # two noisy measurements of the same structure
    s = np.where(important, 0.0, 1.0) + rng.uniform(-0.03, 0.03, size=(n, n))
    maps.append(np.clip(s, 0, 1).astype(np.float32))
  prev, cur = (F.fit_pattern_features(jnp.asarray(m), bpf) for m in maps)
  keep_cols, keep_diags = P.select_lines(P.predict_features(prev, cur, 10), ncols + ndiags)
  np.testing.assert_array_equal(np.flatnonzero(keep_cols), np.sort(cols))
  np.testing.assert_array_equal(np.flatnonzero(keep_diags) - (n - 1), np.sort(offsets))
  mask = P.predict_mask(prev, cur, interval=10, top_k=ncols + ndiags, blocks_per_frame=bpf,
                        block_diagonal=False)
  np.testing.assert_array_equal(mask, important | np.eye(n, dtype=bool))


def test_ties_keep_lower_candidate_index():
  n = 5
  # every candidate value is 0.5 (columns 1.0 halve to 0.5): pure ties.
  feats = F.PatternFeatures(diag=jnp.full((2 * n - 1,), 0.5), col=jnp.full((n,), 1.0),
                            block=jnp.zeros(()))
  for k in (1, 3, n, n + 2, 3 * n - 2):
    keep_cols, keep_diags = P.select_lines(feats, k)
    keep = np.concatenate([keep_cols, keep_diags])
    np.testing.assert_array_equal(keep, np.arange(3 * n - 1) < k)  # columns first, then diags
  # -0.0 and 0.0 tie too; the lower index wins.
  vals = jnp.asarray([1.0, 0.0, 2.0, -0.0, 0.0])
  np.testing.assert_array_equal(P.smallest_k_mask(vals, 2), [False, True, False, True, False])


def test_nan_candidates_rank_last():
  vals = jnp.asarray([[np.nan, 3.0, 1.0, np.inf, 2.0], [np.nan, np.nan, 5.0, np.nan, -1.0]])
  np.testing.assert_array_equal(P.smallest_k_mask(vals, 3),
                                [[False, True, True, False, True], [True, False, True, False, True]])


@pytest.mark.parametrize("lead", [(), (3,), (2, 2, 3)])
@pytest.mark.parametrize("n,bpf,top_k", [(9, 3, 4), (13, 4, 0.25), (8, 5, 1), (7, 2, 100)])
def test_predict_mask_matches_bruteforce(lead, n, bpf, top_k):
  rng = _rng("bf", lead, n, bpf, top_k)
  prev, cur = _random_features(rng, lead, n), _random_features(rng, lead, n)
  block_diagonal = rng.uniform(size=lead) < 0.5
  got = P.predict_mask(prev, cur, interval=3, top_k=top_k, blocks_per_frame=bpf,
                       block_diagonal=jnp.asarray(block_diagonal))
  chex.assert_shape(got, lead + (n, n))
  assert got.dtype == jnp.bool_
  k = P.resolve_top_k(top_k, n)
  np.testing.assert_array_equal(got, _numpy_predict_mask(prev, cur, 3, k, bpf, block_diagonal))


def test_block_diagonal_heads_get_frame_blocks():
  n, bpf = 11, 3  # blocks 9, 10 lie past the last full frame block
  rng = _rng("bd")
  prev, cur = _random_features(rng, (4,), n), _random_features(rng, (4,), n)
  bd = jnp.asarray([True, False, True, False])
  with_bd = P.predict_mask(prev, cur, interval=10, top_k=3, blocks_per_frame=bpf, block_diagonal=bd)
  without = P.predict_mask(prev, cur, interval=10, top_k=3, blocks_per_frame=bpf,
                           block_diagonal=jnp.zeros(4, bool))
  fb = F.frame_block_mask(n, bpf)
  for h in range(4):
    if bd[h]:
      np.testing.assert_array_equal(with_bd[h], np.asarray(without[h]) | fb)
    else:
      np.testing.assert_array_equal(with_bd[h], without[h])
  assert not fb[9:].any()  # the partial frame at the end is not a frame block


def test_block_diagonal_mode_threshold():
  feats = F.PatternFeatures(diag=jnp.zeros((4, 5)), col=jnp.zeros((4, 3)),
                            block=jnp.asarray([0.5, 1.0, 1.5, np.nan]))
  np.testing.assert_array_equal(P.block_diagonal_mode(feats), [True, True, False, False])
  np.testing.assert_array_equal(P.block_diagonal_mode(feats, e_max=2.0), [True, True, True, False])


def test_diagonal_guard_when_lines_miss_it():
  n = 6
  # one clearly best line: column 4; the main diagonal is the worst candidate.
  col = jnp.full((n,), 10.0).at[4].set(-10.0)
  diag = jnp.full((2 * n - 1,), 10.0).at[n - 1].set(50.0)
  feats = F.PatternFeatures(diag=diag, col=col, block=jnp.asarray(5.0))
  mask = np.asarray(P.predict_mask(feats, feats, interval=10, top_k=1, blocks_per_frame=2,
                                   block_diagonal=False))
  want = np.eye(n, dtype=bool)
  want[:, 4] = True
  np.testing.assert_array_equal(mask, want)
  assert mask.sum(-1).min() >= 1


@pytest.mark.parametrize("n,bpf", [(10, 3), (16, 4), (24, 8), (5, 7)])
@pytest.mark.parametrize("top_k", [1, 3, 0.2, 0.5, 1.0])
def test_row_width_bound(n, bpf, top_k):
  rng = _rng("width", n, bpf, top_k)
  prev, cur = _random_features(rng, (6,), n), _random_features(rng, (6,), n)
  # bias towards columns and near-main diagonals so rows fill up
  mask = P.predict_mask(prev, cur, interval=10, top_k=top_k, blocks_per_frame=bpf,
                        block_diagonal=jnp.ones((6,), bool))
  width = P.max_row_width(top_k, n, bpf)
  assert int(np.asarray(mask).sum(-1).max()) <= width
  assert width == min(n, P.resolve_top_k(top_k, n) + bpf)


def test_row_width_bound_is_tight():
  n, bpf, k = 16, 4, 3
  # k columns outside frame block 0, every diagonal unattractive: row 0 of a
  # block-diagonal head holds exactly k columns + its bpf frame blocks (the
  # guard (0, 0) among them), the bound.
  col = jnp.full((n,), 5.0).at[jnp.asarray([5, 9, 13])].set(-5.0)
  feats = F.PatternFeatures(diag=jnp.full((2 * n - 1,), 5.0), col=col, block=jnp.asarray(0.0))
  mask = np.asarray(P.predict_mask(feats, feats, interval=10, top_k=k, blocks_per_frame=bpf,
                                   block_diagonal=True))
  assert mask[0].sum() == k + bpf == P.max_row_width(k, n, bpf)
  # Past the last full frame block (blocks 8..10 here) the guard is the extra block.
  n2 = 11
  col2 = jnp.full((n2,), 5.0).at[jnp.asarray([0, 1, 2])].set(-5.0)
  feats2 = F.PatternFeatures(diag=jnp.full((2 * n2 - 1,), 5.0), col=col2, block=jnp.asarray(0.0))
  mask2 = np.asarray(P.predict_mask(feats2, feats2, interval=10, top_k=k, blocks_per_frame=bpf,
                                    block_diagonal=True))
  assert mask2[10].sum() == k + 1 <= P.max_row_width(k, n2, bpf)


def test_row_width_bound_adversarial():
  """Lines chosen to crowd rows: every column and diagonal near the main one."""
  rng = _rng("adv")
  for n, bpf, k in [(12, 3, 5), (12, 4, 11), (9, 9, 4), (10, 1, 6), (7, 3, 20)]:
    for _ in range(5):
      # low values on a random mix of columns and near-diagonal lines
      col = rng.uniform(-1, 0, size=n)
      offsets = np.abs(np.arange(-(n - 1), n))
      diag = rng.uniform(-1, 0, size=2 * n - 1) + 0.1 * offsets
      feats = F.PatternFeatures(diag=jnp.asarray(diag, jnp.float32),
                                col=jnp.asarray(2 * col, jnp.float32), block=jnp.asarray(0.0))
      mask = np.asarray(P.predict_mask(feats, feats, interval=10, top_k=k, blocks_per_frame=bpf,
                                       block_diagonal=True))
      assert mask.sum(-1).max() <= P.max_row_width(k, n, bpf)


@pytest.mark.parametrize("top_k,n,want", [
    (1, 10, 1), (29, 10, 29), (350, 10, 29), (0.5, 10, 15), (1.0, 10, 29), (0.01, 10, 1),
    (0.1, 5, 1), (0.25, 7, 5), (np.int64(4), 10, 4), (np.float32(0.5), 10, 15)])
def test_resolve_top_k(top_k, n, want):
  assert P.resolve_top_k(top_k, n) == want


@pytest.mark.parametrize("top_k", [0, -3, 0.0, 1.5, -0.2, True, "10", None])
def test_resolve_top_k_rejects(top_k):
  with pytest.raises(ValueError, match="top_k"):
    P.resolve_top_k(top_k, 10)


def test_fraction_top_k_keeps_that_many_lines():
  n = 20
  rng = _rng("frac")
  feats = _random_features(rng, (3,), n)
  for frac in (0.05, 0.3, 0.77):
    keep_cols, keep_diags = P.select_lines(feats, frac)
    total = np.asarray(keep_cols).sum(-1) + np.asarray(keep_diags).sum(-1)
    np.testing.assert_array_equal(total, round(frac * (3 * n - 1)))


def test_lines_to_mask():
  n = 5
  keep_cols = jnp.asarray([False, True, False, False, False])
  keep_diags = jnp.zeros((2 * n - 1,), bool).at[jnp.asarray([n - 1 + 2, n - 1 - 4])].set(True)
  want = np.eye(n, k=2, dtype=bool) | np.eye(n, k=-4, dtype=bool)
  want[:, 1] = True
  np.testing.assert_array_equal(P.lines_to_mask(keep_cols, keep_diags, n), want)
  with pytest.raises(ValueError, match="keep_diags"):
    P.lines_to_mask(keep_cols, keep_diags[:-1], n)


def test_jit_with_static_args_compiles_once():
  n, bpf, lead = 12, 3, (2, 3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(prev, cur, interval, block_diagonal):
    return P.predict_mask(prev, cur, interval=interval, top_k=0.2, blocks_per_frame=bpf,
                          block_diagonal=block_diagonal)

  rng = _rng("jit")
  for interval in (10.0, 5.0, 3.0):  # a traced interval never retraces
    prev, cur = _random_features(rng, lead, n), _random_features(rng, lead, n)
    bd = jnp.asarray(rng.uniform(size=lead) < 0.5)
    got = step(prev, cur, jnp.float32(interval), bd)
    want = P.predict_mask(prev, cur, interval=interval, top_k=0.2, blocks_per_frame=bpf,
                          block_diagonal=bd)
    np.testing.assert_array_equal(got, want)
  static = jax.jit(P.predict_mask, static_argnames=("interval", "top_k", "blocks_per_frame"))
  np.testing.assert_array_equal(
      static(prev, cur, interval=3.0, top_k=0.2, blocks_per_frame=bpf, block_diagonal=bd), want)

"""Stage 1: the ridge fit of a sparsity map as a mixture of lines."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax import features as F

# (n, blocks_per_frame): divisible and not, and n < bpf (no frame block at all).
GEOMETRIES = [(5, 2), (8, 3), (13, 4), (8, 4), (12, 3), (3, 5), (1, 1)]


def _dense_solution(s, bpf, ridge):
  """Reference: explicit M, float64 normal equations."""
  n = s.shape[-1]
  m = F.design_matrix(n, bpf)
  g = m.T @ m + ridge * np.eye(3 * n)
  rhs = s.reshape(s.shape[:-2] + (n * n,)).astype(np.float64) @ m
  return np.linalg.solve(g, rhs[..., None])[..., 0]


def _rng(*key):
  return np.random.default_rng(abs(hash(key)) % (2**32))


def test_design_matrix_columns_are_the_bases():
  n, bpf = 7, 3
  m = F.design_matrix(n, bpf).reshape(n, n, 3 * n)
  for o in range(-(n - 1), n):
    np.testing.assert_array_equal(m[..., o + n - 1], np.eye(n, k=o))
  for j in range(n):
    expect = np.zeros((n, n))
    expect[:, j] = 1
    np.testing.assert_array_equal(m[..., 2 * n - 1 + j], expect)
  # frame blocks [0,3) and [3,6); block 6 belongs to none.
  e = np.zeros((n, n))
  e[:3, :3] = e[3:6, 3:6] = 1
  np.testing.assert_array_equal(m[..., -1], e)


@pytest.mark.parametrize("n,bpf", GEOMETRIES)
@pytest.mark.parametrize("ridge", [1.0, 0.25])
def test_gram_matrix_matches_explicit(n, bpf, ridge):
  m = F.design_matrix(n, bpf)
  np.testing.assert_allclose(F.gram_matrix(n, bpf, ridge), m.T @ m + ridge * np.eye(3 * n))


@pytest.mark.parametrize("n,bpf", GEOMETRIES)
def test_moments_match_explicit(n, bpf):
  s = _rng("mom", n, bpf).uniform(size=(2, 3, n, n)).astype(np.float32)
  m = F.design_matrix(n, bpf)
  want = s.reshape(2, 3, n * n).astype(np.float64) @ m
  np.testing.assert_allclose(F.moment_vector(jnp.asarray(s), bpf), want, rtol=1e-5, atol=1e-5)
  diag = np.stack([np.trace(s, offset=o, axis1=-2, axis2=-1) for o in range(-(n - 1), n)], -1)
  np.testing.assert_allclose(F.diagonal_sums(jnp.asarray(s)), diag, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,bpf", GEOMETRIES)
@pytest.mark.parametrize("ridge", [1.0, 0.1])
def test_fit_matches_dense_least_squares(n, bpf, ridge):
  s = _rng("fit", n, bpf, ridge).uniform(size=(2, 3, n, n)).astype(np.float32)
  got = F.fit_pattern_features(jnp.asarray(s), bpf, ridge)
  chex.assert_shape([got.diag, got.col, got.block], [(2, 3, 2 * n - 1), (2, 3, n), (2, 3)])
  assert got.diag.dtype == got.col.dtype == got.block.dtype == jnp.float32
  want = _dense_solution(s, bpf, ridge)
  # f32 solve; tolerance grows with the conditioning (~1/ridge).
  np.testing.assert_allclose(got.to_vector(), want, rtol=2e-4, atol=2e-4 / ridge)


@pytest.mark.parametrize("lead", [(), (4,), (2, 1, 3)])
def test_leading_dims_are_independent_rhs(lead):
  n, bpf = 9, 4
  s = _rng("lead", lead).uniform(size=lead + (n, n)).astype(np.float32)
  got = F.fit_pattern_features(jnp.asarray(s), bpf)
  flat = s.reshape((-1, n, n))
  per_head = [F.fit_pattern_features(jnp.asarray(h), bpf).to_vector() for h in flat]
  np.testing.assert_allclose(got.to_vector().reshape(-1, 3 * n), np.stack(per_head),
                             rtol=1e-5, atol=1e-5)
  assert got.block.shape == lead


def test_bf16_input_is_solved_in_f32():
  n, bpf = 10, 3
  s = jnp.asarray(_rng("bf16").uniform(size=(3, n, n)), jnp.bfloat16)
  got = F.fit_pattern_features(s, bpf)
  assert got.col.dtype == jnp.float32
  want = _dense_solution(np.asarray(s.astype(jnp.float32)), bpf, 1.0)
  np.testing.assert_allclose(got.to_vector(), want, rtol=2e-4, atol=2e-4)


def _line_map(n, bpf, cols, diags, e):
  """A map that *is* a mixture of known lines and the frame-block pattern."""
  s = np.zeros((n, n))
  for j, v in cols.items():
    s[:, j] += v
  for o, v in diags.items():
    s += v * np.eye(n, k=o)
  s += e * F.frame_block_mask(n, bpf)
  return s


@pytest.mark.parametrize("n,bpf", [(8, 3), (13, 4), (16, 4)])
def test_reconstruction_of_a_line_mixture(n, bpf):
  rng = _rng("recon", n, bpf)
  cols = {int(j): float(rng.uniform(0.2, 1)) for j in rng.choice(n, 3, replace=False)}
  diags = {int(o): float(rng.uniform(0.2, 1))
           for o in rng.choice(np.arange(-(n - 1), n), 4, replace=False)}
  s = _line_map(n, bpf, cols, diags, float(rng.uniform(0.2, 1)))
  feats = F.fit_pattern_features(jnp.asarray(s, jnp.float32), bpf, ridge=1e-4)
  recon = F.reconstruct_map(feats, n, bpf)
  np.testing.assert_allclose(recon, s, atol=5e-3)
  # A map outside the span is not reproduced: the residual is real.
  noise = rng.uniform(size=(n, n))
  feats = F.fit_pattern_features(jnp.asarray(noise, jnp.float32), bpf, ridge=1e-4)
  assert np.abs(np.asarray(F.reconstruct_map(feats, n, bpf)) - noise).max() > 0.1


@pytest.mark.parametrize("n,bpf", [(5, 2), (13, 4)])
def test_reconstruct_is_design_matrix_product(n, bpf):
  x = _rng("rmap", n, bpf).normal(size=(2, 3 * n)).astype(np.float32)
  feats = F.PatternFeatures.from_vector(jnp.asarray(x))
  want = (F.design_matrix(n, bpf) @ x[..., None].astype(np.float64))[..., 0].reshape(2, n, n)
  np.testing.assert_allclose(F.reconstruct_map(feats, n, bpf), want, rtol=1e-6, atol=1e-6)


def test_vector_roundtrip():
  x = jnp.asarray(_rng("vec").normal(size=(2, 3, 21)), jnp.float32)
  feats = F.PatternFeatures.from_vector(x)
  chex.assert_shape([feats.diag, feats.col, feats.block], [(2, 3, 13), (2, 3, 7), (2, 3)])
  np.testing.assert_array_equal(feats.to_vector(), x)
  assert feats.n == 7 and feats.batch_shape == (2, 3)


def test_jit_compiles_once_with_static_args():
  n, bpf = 12, 3

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fit(s):
    return F.fit_pattern_features(s, bpf, 1.0)

  rng = _rng("jit")
  for _ in range(3):
    s = jnp.asarray(rng.uniform(size=(2, 4, n, n)), jnp.float32)
    got = fit(s)
    np.testing.assert_allclose(got.to_vector(), _dense_solution(np.asarray(s), bpf, 1.0),
                               rtol=2e-4, atol=2e-4)
  # static-argnums style too
  jitted = jax.jit(F.fit_pattern_features, static_argnums=(1, 2))
  chex.assert_trees_all_close(jitted(s, bpf, 1.0), F.fit_pattern_features(s, bpf, 1.0),
                              rtol=1e-6, atol=1e-6)


def test_nan_stays_in_its_head():
  n, bpf = 8, 2
  s = _rng("nan").uniform(size=(3, n, n)).astype(np.float32)
  s[1, 2, 5] = np.nan
  feats = F.fit_pattern_features(jnp.asarray(s), bpf)
  np.testing.assert_array_equal(F.has_nan(feats), [False, True, False])
  assert np.isfinite(np.asarray(feats.to_vector())[[0, 2]]).all()


def test_frame_geometry():
  np.testing.assert_array_equal(F.frame_index(7, 3), [0, 0, 0, 1, 1, 1, -1])
  fb = F.frame_block_mask(7, 3)
  assert fb.sum() == 2 * 9 and not fb[6].any() and not fb[:, 6].any()
  assert not F.frame_block_mask(3, 5).any()


@pytest.mark.parametrize("kwargs,match", [
    (dict(s=np.ones((4, 4), np.float32), blocks_per_frame=0), "blocks_per_frame"),
    (dict(s=np.ones((4, 4), np.float32), blocks_per_frame=2, ridge=0.0), "ridge"),
    (dict(s=np.ones((4, 5), np.float32), blocks_per_frame=2), "n, n"),
    (dict(s=np.ones((4, 4), np.int32), blocks_per_frame=2), "float"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    F.fit_pattern_features(**kwargs)

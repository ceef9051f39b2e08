"""Baseline masks: static spatio-temporal window and the oracle top-k blocks."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax import masks as M


def _rng(*key):
  return np.random.default_rng(abs(hash(key)) % (2**32))


def _window_loops(n, bpf, s, t, sink):
  out = np.zeros((n, n), bool)
  for i, j in itertools.product(range(n), range(n)):
    fi, pi, fj, pj = i // bpf, i % bpf, j // bpf, j % bpf
    out[i, j] = ((abs(fi - fj) <= t and abs(pi - pj) <= s) or fj < sink or i == j)
  return out


@pytest.mark.parametrize("n,bpf", [(12, 4), (14, 4), (7, 3), (3, 5)])
@pytest.mark.parametrize("s,t,sink", [(0, 0, 0), (1, 0, 1), (1, 1, 1), (2, 1, 2), (0, 2, 0)])
def test_static_window_matches_definition(n, bpf, s, t, sink):
  got = M.static_window_mask(n, bpf, spatial_radius=s, temporal_radius=t, sink_frames=sink)
  assert got.shape == (n, n) and got.dtype == bool
  np.testing.assert_array_equal(got, _window_loops(n, bpf, s, t, sink))
  assert got.diagonal().all()


def test_static_window_partial_frame_is_an_extra_frame():
  n, bpf = 10, 4  # frames [0,4) [4,8) and a partial [8,10)
  got = M.static_window_mask(n, bpf, spatial_radius=0, temporal_radius=0, sink_frames=0)
  np.testing.assert_array_equal(got, np.eye(n, dtype=bool))
  got = M.static_window_mask(n, bpf, spatial_radius=3, temporal_radius=0, sink_frames=0)
  assert got[8, 9] and got[9, 8] and not got[8, 7]
  got = M.static_window_mask(n, bpf, spatial_radius=0, temporal_radius=1, sink_frames=0)
  assert got[9, 5] and got[8, 4] and not got[8, 0]


@pytest.mark.parametrize("n,bpf", [(40, 6), (30, 5)])
def test_static_window_density_is_monotone(n, bpf):
  def dens(s, t, sink):
    return M.static_window_mask(n, bpf, spatial_radius=s, temporal_radius=t, sink_frames=sink).mean()
  for s, t, sink in itertools.product(range(bpf), range(n // bpf + 1), range(3)):
    d = dens(s, t, sink)
    assert dens(s + 1, t, sink) >= d
    assert dens(s, t + 1, sink) >= d
    assert dens(s, t, sink + 1) >= d
  assert dens(bpf - 1, n // bpf, 0) == 1.0


@pytest.mark.parametrize("n,bpf,sink", [(40, 6, 1), (64, 8, 0), (100, 7, 2), (13, 4, 1)])
def test_budget_matching_picks_the_closest_window(n, bpf, sink):
  grid = {(s, t): M.static_window_mask(n, bpf, spatial_radius=s, temporal_radius=t,
                                       sink_frames=sink).mean()
          for s in range(bpf) for t in range(-(-n // bpf))}
  for target in _rng("budget", n, bpf).uniform(0.02, 1.0, size=12):
    spec = M.static_window_spec_for_density(n, bpf, target, sink_frames=sink)
    best = min(abs(d - target) for d in grid.values())
    assert abs(spec.density - target) == pytest.approx(best, abs=1e-12)
    assert grid[(spec.spatial_radius, spec.temporal_radius)] == pytest.approx(spec.density)
    mask = M.static_window_for_density(n, bpf, target, sink_frames=sink)
    np.testing.assert_array_equal(mask, spec.mask())
    assert mask.mean() == pytest.approx(spec.density)


def test_budget_matching_within_two_block_rows_at_video_scale():
  n, bpf = 160, 16  # e.g. 10 latent frames of 16 blocks
  floor = M.static_window_mask(n, bpf, spatial_radius=0, temporal_radius=0).mean()
  for target in np.linspace(floor, 1.0, 25):
    spec = M.static_window_spec_for_density(n, bpf, float(target))
    assert abs(spec.density - target) <= 2.0 / n


def test_budget_below_floor_gives_smallest_window():
  spec = M.static_window_spec_for_density(24, 4, 0.01)
  assert (spec.spatial_radius, spec.temporal_radius) == (0, 0)


@pytest.mark.parametrize("bad", [dict(spatial_radius=-1, temporal_radius=0),
                                 dict(spatial_radius=0, temporal_radius=1.5),
                                 dict(spatial_radius=0, temporal_radius=0, sink_frames=-1)])
def test_static_window_rejects_bad_radii(bad):
  with pytest.raises(ValueError, match="radius|sink_frames"):
    M.static_window_mask(10, 2, **bad)
  with pytest.raises(ValueError, match="target_density"):
    M.static_window_for_density(10, 2, 1.5)


@pytest.mark.parametrize("lead", [(), (3,), (2, 2)])
@pytest.mark.parametrize("keep", [1, 7, 0.3, 1.0])
def test_oracle_keeps_the_smallest_blocks(lead, keep):
  n = 9
  s = _rng("oracle", lead, keep).uniform(size=lead + (n, n)).astype(np.float32)
  got = np.asarray(M.topk_blocks_mask(jnp.asarray(s), keep))
  chex.assert_shape(got, lead + (n, n))
  k = M.resolve_block_count(keep, n)
  flat = s.reshape((-1, n * n))
  kth = np.sort(flat, axis=-1)[:, k - 1].reshape(lead + (1, 1))
  np.testing.assert_array_equal(got, (s <= kth) | np.eye(n, dtype=bool))
  without_guard = got & ~np.eye(n, dtype=bool)
  assert (without_guard.reshape(-1, n * n).sum(-1) <= k).all()


def test_oracle_ties_nan_and_guard():
  n = 4
  s = np.full((n, n), 0.5, np.float32)
  s[3, 0] = np.nan
  got = np.asarray(M.topk_blocks_mask(jnp.asarray(s), 3))
  want = np.eye(n, dtype=bool)
  want[0, :3] = True  # equal values: lowest row-major indices
  np.testing.assert_array_equal(got, want)
  s = np.zeros((n, n), np.float32)
  s[:, 1] = np.nan  # blocks a sparse map skipped
  got = np.asarray(M.topk_blocks_mask(jnp.asarray(s), n * n - n))
  np.testing.assert_array_equal(got[:, 1], np.eye(n, dtype=bool)[:, 1])


def test_oracle_jits_with_static_keep():
  fn = jax.jit(M.topk_blocks_mask, static_argnums=1)
  s = jnp.asarray(_rng("ojit").uniform(size=(2, 3, 8, 8)), jnp.float32)
  np.testing.assert_array_equal(fn(s, 0.25), M.topk_blocks_mask(s, 0.25))
  np.testing.assert_allclose(M.mask_density(fn(s, 64)), np.ones((2, 3)))


@pytest.mark.parametrize("keep,want", [(0.5, 50), (1.0, 100), (0.001, 1), (150, 100), (3, 3)])
def test_resolve_block_count(keep, want):
  assert M.resolve_block_count(keep, 10) == want


@pytest.mark.parametrize("keep", [0, 0.0, 1.2, True, "x"])
def test_resolve_block_count_rejects(keep):
  with pytest.raises(ValueError, match="keep"):
    M.resolve_block_count(keep, 10)


def test_mask_density():
  mask = np.zeros((2, 4, 4), bool)
  mask[0, :2] = True
  mask[1] = np.eye(4, dtype=bool)
  np.testing.assert_allclose(M.mask_density(mask), [0.5, 0.25])

"""Baseline masks: static spatio-temporal window and the mass oracle (top mass per row)."""

import itertools
import zlib

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


def _seeded(*key):
  return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _loop_top_mass(mass, k):
  """Brute force: per row, the diagonal, then the k - 1 largest other masses
  (lower column first on ties, NaN last)."""
  n = mass.shape[-1]
  flat = mass.reshape(-1, n, n)
  out = np.zeros(flat.shape, bool)
  for h, i in itertools.product(range(flat.shape[0]), range(n)):
    row = np.where(np.isnan(flat[h, i]), -np.inf, flat[h, i])
    others = [j for j in range(n) if j != i]
    order = sorted(others, key=lambda j: (-row[j], j))
    out[h, i, [i] + order[:k - 1]] = True
  return out.reshape(mass.shape)


@pytest.mark.parametrize("lead", [(), (3,), (2, 2)])
@pytest.mark.parametrize("n,keep", [(9, 1), (9, 4), (7, 0.3), (5, 1.0), (6, 99)])
def test_oracle_keeps_the_most_mass_per_row(lead, n, keep):
  mass = _seeded("mass", lead, n, keep).dirichlet(np.ones(n), size=lead + (n,)).astype(np.float32)
  got = np.asarray(M.top_mass_row_mask(jnp.asarray(mass), keep))
  chex.assert_shape(got, lead + (n, n))
  k = M.resolve_row_count(keep, n)
  np.testing.assert_array_equal(got, _loop_top_mass(mass, k))
  assert (got.sum(-1) == k).all()                       # the same budget in every row
  assert got[..., np.arange(n), np.arange(n)].all()     # the guard is one of them
  off = ~np.eye(n, dtype=bool)
  kept_min = np.where(got & off, mass, np.inf).min(-1)
  dropped_max = np.where(~got & off, mass, -np.inf).max(-1)
  assert (kept_min >= dropped_max).all()


def test_oracle_mask_holds_more_mass_than_any_other_mask_of_its_row_counts():
  rng = _seeded("beats")
  n, k = 12, 4
  mass = rng.dirichlet(np.full(n, 0.3), size=(2, 3, n)).astype(np.float32)
  oracle = np.asarray(M.top_mass_row_mask(jnp.asarray(mass), k))
  for _ in range(20):
    other = np.zeros_like(oracle)
    for idx in np.ndindex(oracle.shape[:-1]):
      i = idx[-1]
      pick = rng.choice([j for j in range(n) if j != i], k - 1, replace=False)
      other[idx + (i,)] = True
      other[idx][pick] = True
    assert (np.where(oracle, mass, 0).sum(-1) >= np.where(other, mass, 0).sum(-1) - 1e-6).all()


def test_oracle_ties_nan_and_guard():
  n = 4
  mass = np.full((n, n), 0.25, np.float32)
  mass[0, 1] = np.nan                                   # a block a sparse map skipped
  got = np.asarray(M.top_mass_row_mask(jnp.asarray(mass), 2))
  want = np.eye(n, dtype=bool)
  want[0, 2] = True                                     # NaN last, then the lower column
  want[1, 0] = want[2, 0] = want[3, 0] = True
  np.testing.assert_array_equal(got, want)
  mass = np.zeros((n, n), np.float32)
  mass[:, 3] = 1.0                                      # even where the diagonal has no mass
  got = np.asarray(M.top_mass_row_mask(jnp.asarray(mass), 1))
  np.testing.assert_array_equal(got, np.eye(n, dtype=bool))


def test_mass_oracle_mask_of_q_k():
  """End to end: the dense mass map of q, k, then the per-row top mass."""
  from pallas_kernels import map_reference
  kq, kk = jax.random.split(jax.random.key(4))
  q = 2.0 * jax.random.normal(kq, (2, 150, 2, 64))
  k = jax.random.normal(kk, (2, 150, 2, 64))
  got = np.asarray(M.mass_oracle_mask(q, k, 0.5, block_size=64, implementation="xla"))
  mass = np.asarray(map_reference.block_mass_map_reference(q, k, block_size=64))
  np.testing.assert_array_equal(got, _loop_top_mass(mass, 2))


def test_oracle_jits_with_static_keep():
  fn = jax.jit(M.top_mass_row_mask, static_argnums=1)
  m = jnp.asarray(_seeded("ojit").uniform(size=(2, 3, 8, 8)), jnp.float32)
  np.testing.assert_array_equal(fn(m, 0.25), M.top_mass_row_mask(m, 0.25))
  np.testing.assert_allclose(M.mask_density(fn(m, 8)), np.ones((2, 3)))


@pytest.mark.parametrize("keep,want", [(0.5, 5), (1.0, 10), (0.001, 1), (150, 10), (3, 3), (0.26, 3)])
def test_resolve_row_count(keep, want):
  assert M.resolve_row_count(keep, 10) == want


@pytest.mark.parametrize("keep", [0, 0.0, 1.2, True, "x"])
def test_resolve_row_count_rejects(keep):
  with pytest.raises(ValueError, match="keep"):
    M.resolve_row_count(keep, 10)


def test_top_mass_rejects_bad_maps():
  with pytest.raises(ValueError, match="mass must be"):
    M.top_mass_row_mask(jnp.zeros((3, 4)), 1)
  with pytest.raises(ValueError, match="float"):
    M.top_mass_row_mask(jnp.zeros((4, 4), jnp.int32), 1)


def test_mask_density():
  mask = np.zeros((2, 4, 4), bool)
  mask[0, :2] = True
  mask[1] = np.eye(4, dtype=bool)
  np.testing.assert_allclose(M.mask_density(mask), [0.5, 0.25])

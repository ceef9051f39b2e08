"""Wan 3D RoPE: tables and rotation against numpy complex arithmetic and diffusers."""

import chex
import jax
import numpy as np
import pytest

from models.wan import rope

GRIDS_AND_DIMS = [((3, 4, 5), 12), ((2, 3, 2), 32), ((4, 2, 6), 128)]
IDS = [f"grid={'x'.join(map(str, g))}_{head_dim=}" for g, head_dim in GRIDS_AND_DIMS]


def _numpy_rope(x, grid, head_dim, theta=10000.0):
  """Each channel pair as a complex number times exp(i * pos * inv_freq), token by token."""
  dims = rope.axis_dims(head_dim)
  out = np.empty_like(x)
  for s, pos in enumerate(np.ndindex(*grid)):
    angles = np.concatenate([
        p * theta ** (-np.arange(0, d, 2) / d) for p, d in zip(pos, dims)])
    z = x[:, s, :, 0::2] + 1j * x[:, s, :, 1::2]
    z = z * np.exp(1j * angles)
    out[:, s, :, 0::2], out[:, s, :, 1::2] = z.real, z.imag
  return out


@pytest.mark.parametrize("head_dim,expected", [(128, (44, 42, 42)), (12, (4, 4, 4)),
                                               (16, (8, 4, 4))])
def test_axis_split_as_diffusers(head_dim, expected):
  assert rope.axis_dims(head_dim) == expected


@pytest.mark.parametrize("grid,head_dim", GRIDS_AND_DIMS, ids=IDS)
def test_apply_rope_matches_numpy(grid, head_dim):
  x = np.random.default_rng(0).standard_normal((2, np.prod(grid), 3, head_dim)).astype(np.float32)
  cos, sin = rope.rope_tables(grid, head_dim)
  chex.assert_shape((cos, sin), (np.prod(grid), head_dim // 2))
  out = jax.jit(rope.apply_rope)(x, cos, sin)
  chex.assert_trees_all_close(out, _numpy_rope(x.astype(np.float64), grid, head_dim),
                              atol=2e-5, rtol=1e-5)


def test_grid_past_max_seq_len_raises():
  with pytest.raises(ValueError, match="rope_max_seq_len=8"):
    rope.rope_tables((2, 9, 3), 12, max_seq_len=8)


@pytest.mark.parametrize("grid,head_dim", GRIDS_AND_DIMS, ids=IDS)
@pytest.mark.parametrize("patch_size", [(1, 2, 2), (2, 1, 2)], ids=lambda p: f"patch={p}")
def test_tables_match_diffusers(grid, head_dim, patch_size):
  pytest.importorskip("diffusers")
  import torch
  from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

  module = WanRotaryPosEmbed(head_dim, patch_size, max_seq_len=64)
  latent = torch.randn(1, 1, *(g * p for g, p in zip(grid, patch_size)))
  freqs_cos, freqs_sin = (t[0, :, 0].numpy() for t in module(latent))  # [S, D], interleaved
  cos, sin = rope.rope_tables(grid, head_dim, max_seq_len=64)
  # diffusers repeats each pair's angle twice; its rotation reads cos[0::2], sin[1::2].
  np.testing.assert_array_equal(freqs_cos[:, 0::2], freqs_cos[:, 1::2])
  np.testing.assert_allclose(cos, freqs_cos[:, 0::2], atol=1e-6, rtol=0)
  np.testing.assert_allclose(sin, freqs_sin[:, 1::2], atol=1e-6, rtol=0)

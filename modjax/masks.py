"""Baseline block masks to compare MOD-DiT against (ALGORITHM.md section 7).

* static window: a Radial/STA-like local spatio-temporal band at block
  granularity plus an attention sink on the first frames -- a numpy constant;
* oracle: per query-block row of each head, the key blocks holding the most
  softmax mass of the step (a static count per row, the diagonal among them),
  from the block mass map of `pallas_kernels.block_mass_map` -- traced.

Block geometry: block i lies in frame i // bpf at within-frame position
i % bpf (a frame's blocks are contiguous rows of tokens, so the within-frame
distance of two blocks is |pos(i) - pos(j)| in block units). Blocks past the
last full frame form one extra, partial frame.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from modjax.predict import resolve_count, smallest_k_mask

__all__ = [
    "static_window_mask", "static_window_for_density", "static_window_spec_for_density",
    "WindowSpec", "resolve_row_count", "top_mass_row_mask", "mass_oracle_mask",
    "mask_density",
]


def _check_geometry(n, blocks_per_frame):
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n (number of blocks) must be an int >= 1, got {n!r}")
  if (isinstance(blocks_per_frame, bool) or not isinstance(blocks_per_frame, (int, np.integer))
      or blocks_per_frame < 1):
    raise ValueError(f"blocks_per_frame must be an int >= 1, got {blocks_per_frame!r}")


def _check_nonneg_int(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def num_frames(n: int, blocks_per_frame: int) -> int:
  """Frames spanned by n blocks, a trailing partial frame included."""
  return -(-n // blocks_per_frame)


def static_window_mask(n: int, blocks_per_frame: int, *, spatial_radius: int,
                       temporal_radius: int, sink_frames: int = 1) -> np.ndarray:
  """bool [n, n] numpy constant: the local spatio-temporal window.

  Key block j is kept for query block i when
    |frame(i) - frame(j)| <= temporal_radius and |pos(i) - pos(j)| <= spatial_radius,
  or frame(j) < sink_frames (every query sees the first frames), or j == i.
  """
  _check_geometry(n, blocks_per_frame)
  _check_nonneg_int("spatial_radius", spatial_radius)
  _check_nonneg_int("temporal_radius", temporal_radius)
  _check_nonneg_int("sink_frames", sink_frames)
  idx = np.arange(n)
  frame, pos = idx // blocks_per_frame, idx % blocks_per_frame
  near_t = np.abs(frame[:, None] - frame[None, :]) <= temporal_radius
  near_s = np.abs(pos[:, None] - pos[None, :]) <= spatial_radius
  sink = np.broadcast_to(frame[None, :] < sink_frames, (n, n))
  return (near_t & near_s) | sink | np.eye(n, dtype=bool)


class WindowSpec(NamedTuple):
  """A static window chosen for a density budget (see static_window_for_density)."""
  n: int
  blocks_per_frame: int
  spatial_radius: int
  temporal_radius: int
  sink_frames: int
  density: float

  def mask(self) -> np.ndarray:
    return static_window_mask(self.n, self.blocks_per_frame, spatial_radius=self.spatial_radius,
                              temporal_radius=self.temporal_radius, sink_frames=self.sink_frames)


def static_window_for_density(n: int, blocks_per_frame: int, target_density: float, *,
                              sink_frames: int = 1) -> np.ndarray:
  """bool [n, n] numpy constant: the static window whose density is closest to
  target_density (budget matching); the radii are `static_window_spec_for_density`."""
  return static_window_spec_for_density(n, blocks_per_frame, target_density,
                                        sink_frames=sink_frames).mask()


def static_window_spec_for_density(n: int, blocks_per_frame: int, target_density: float, *,
                                   sink_frames: int = 1) -> WindowSpec:
  """Radii whose window density is closest to target_density (budget matching).

  Exhaustive over spatial_radius in [0, bpf - 1] and temporal_radius in
  [0, frames - 1] (larger radii change nothing). Among equally close windows the
  sparser one wins, then the smaller temporal radius. Targets below the
  smallest window (radii 0 plus the sink) give that window. With two integer
  radii the achievable densities are discrete: for video-sized maps the match is
  within one or two block rows (|error| ~ 1/n to 2/n), coarser for tiny n.
  """
  _check_geometry(n, blocks_per_frame)
  if not 0.0 < target_density <= 1.0:
    raise ValueError(f"target_density must be in (0, 1], got {target_density!r}")
  if isinstance(sink_frames, bool) or not isinstance(sink_frames, (int, np.integer)) or sink_frames < 0:
    raise ValueError(f"sink_frames must be an int >= 0, got {sink_frames!r}")
  counts = _window_counts(n, blocks_per_frame, sink_frames)  # [frames, min(bpf, n)]
  density = counts / float(n * n)
  err = np.abs(density - target_density)
  best = None
  for t in range(counts.shape[0]):
    for s in range(counts.shape[1]):
      key = (err[t, s], density[t, s], t, s)
      if best is None or key < best:
        best = key
  _, d, t, s = best
  return WindowSpec(n, blocks_per_frame, int(s), int(t), sink_frames, float(d))


def _window_counts(n: int, blocks_per_frame: int, sink_frames: int) -> np.ndarray:
  """int [frames, min(bpf, n)]: active blocks of static_window_mask(s, t) at [t, s].

  One O(n^2) pass: a 2-D histogram of (|frame diff|, |pos diff|) over the
  non-sink key columns, cumulated over both axes, plus the sink columns (the
  diagonal has zero distance, so it is always inside the window).
  """
  idx = np.arange(n)
  frame, pos = idx // blocks_per_frame, idx % blocks_per_frame
  nt, ns = num_frames(n, blocks_per_frame), min(blocks_per_frame, n)
  keys = frame >= sink_frames
  dt = np.abs(frame[:, None] - frame[None, keys]).ravel()
  ds = np.abs(pos[:, None] - pos[None, keys]).ravel()
  hist = np.bincount(dt * ns + ds, minlength=nt * ns).reshape(nt, ns)
  return hist.cumsum(0).cumsum(1) + n * int((~keys).sum())


def lines_mask_for_density(n: int, blocks_per_frame: int, target_density: float) -> np.ndarray:
  """bool [n, n] numpy constant shaped like a MOD-DiT mask: the frame blocks,
  then diagonals at offsets +-1, +-bpf, +-2bpf, ... interleaved with the first
  frame's columns (the attention sink), added until the density reaches
  target_density. A realistic fixed mask for measuring system speed apart from
  prediction quality (random-weight models give meaningless MOD masks)."""
  _check_geometry(n, blocks_per_frame)
  if not 0.0 < target_density <= 1.0:
    raise ValueError(f"target_density must be in (0, 1], got {target_density!r}")
  idx = np.arange(n)
  frame = idx // blocks_per_frame
  mask = (frame[:, None] == frame[None, :]) | np.eye(n, dtype=bool)
  offsets = [o for k in range(1, n) for o in
             ((k, -k) if k == 1 else ((k * blocks_per_frame, -k * blocks_per_frame)
                                     if k * blocks_per_frame < n else ()))]
  columns = list(range(min(blocks_per_frame, n)))
  lines = [("d", o) for o in offsets]
  for i, c in enumerate(columns):  # interleave sink columns between the diagonals
    lines.insert(min(2 * i + 1, len(lines)), ("c", c))
  lines += [("d", o) for k in range(2, n) for o in (k, -k) if ("d", o) not in lines]
  lines += [("c", c) for c in range(n) if ("c", c) not in lines]
  for kind, v in lines:
    if mask.mean() >= target_density:
      break
    if kind == "c":
      mask[:, v] = True
    else:
      mask |= (idx[None, :] - idx[:, None]) == v
  return mask


def resolve_row_count(keep: Union[int, float], n: int) -> int:
  """Key blocks kept per query-block row of n: an int in [1, n] (clamped above),
  or a float density in (0, 1] (n x density rounded half up, at least 1: the
  count whose density is nearest)."""
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n (number of blocks) must be an int >= 1, got {n!r}")
  return resolve_count(keep, n, name="keep", share="density")


def top_mass_row_mask(mass: jax.Array, keep: Union[int, float]) -> jax.Array:
  """Oracle mask: in every row i of each [n, n] map, the `keep` key blocks with
  the largest mass, the diagonal block (i, i) always one of them.

  mass: [..., n, n] block mass map (NaN -- a block a sparse map skipped --
  ranks last). keep: static count or density per row (`resolve_row_count`).
  Every row keeps exactly that many blocks (density keep / n); among equal
  masses the lower column wins.
  """
  mass = jnp.asarray(mass)
  if mass.ndim < 2 or mass.shape[-1] != mass.shape[-2]:
    raise ValueError(f"mass must be [..., n, n], got shape {mass.shape}")
  if not jnp.issubdtype(mass.dtype, jnp.floating):
    raise ValueError(f"mass must be a float array, got dtype {mass.dtype}")
  return _top_mass_row_mask(mass, resolve_row_count(keep, mass.shape[-1]))


@functools.partial(jax.jit, static_argnums=1)
def _top_mass_row_mask(mass, k):
  n = mass.shape[-1]
  v = -mass.astype(jnp.promote_types(mass.dtype, jnp.float32))
  v = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, v)  # the guard goes first
  return smallest_k_mask(v, k)


def mass_oracle_mask(q: jax.Array, k: jax.Array, keep: Union[int, float], *,
                     block_size: int = 128, implementation: Optional[str] = None) -> jax.Array:
  """bool [B, H, n, n]: `top_mass_row_mask` of the exact block mass map of q, k
  [B, S, H, D] (dense: an lse pass, then a QK replay summing exp(s - lse))."""
  mass = pallas_kernels.block_mass_map(q, k, block_size=block_size,
                                       implementation=implementation)
  return top_mass_row_mask(mass, keep)


def joint_mass_oracle_mask(q: jax.Array, k: jax.Array, keep: Union[int, float], video_blocks, *,
                           block_size: int = 128, implementation: Optional[str] = None):
  """`mass_oracle_mask` for a sequence of text and video tokens: the keep-per-row
  choice among the video-video blocks [v0, v1)^2 only, text rows and columns kept."""
  mass = pallas_kernels.block_mass_map(q, k, block_size=block_size,
                                       implementation=implementation)
  v0, v1 = video_blocks
  video = top_mass_row_mask(mass[..., v0:v1, v0:v1], keep)
  return embed_video_mask(video, mass.shape[-1], video_blocks)


def embed_video_mask(video_mask: jax.Array, total_blocks: int, video_blocks) -> jax.Array:
  """bool [..., N, N]: the [..., n, n] video-video mask placed at blocks
  [v0, v1) x [v0, v1) of the whole sequence's N x N grid, every other block (a
  text row or a text column, docs/algorithm.md section 10) True."""
  v0, v1 = video_blocks
  video_mask = jnp.asarray(video_mask, bool)
  if video_mask.shape[-2:] != (v1 - v0, v1 - v0):
    raise ValueError(f"video_mask must be [..., {v1 - v0}, {v1 - v0}] for video blocks "
                     f"[{v0}, {v1}), got shape {video_mask.shape}")
  if (v0, v1) == (0, total_blocks):
    return video_mask
  full = jnp.ones(video_mask.shape[:-2] + (total_blocks, total_blocks), bool)
  return full.at[..., v0:v1, v0:v1].set(video_mask)


def mask_density(mask) -> jax.Array:
  """float32 [...]: fraction of active blocks of each [..., n, n] mask."""
  return jnp.asarray(mask).astype(jnp.float32).mean(axis=(-2, -1))

"""The 3D rotary position embedding the video transformers share: per-token cos /
sin tables from per-axis positions, and the rotation of channel pairs.

The head dimension is split into one part per token axis (t, h, w); within a
part of d channels, channel pair i (channels 2i, 2i+1) rotates by
pos * theta ** (-2i / d). Per-axis angles are tiny numpy constants built at
trace time (float64, as in diffusers, then float32); the per-token tables are
broadcast from them on device, so a long video does not put a large constant
into the compiled program. Tokens are frame-major, then row, then column.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def axis_rope_tables(positions: Sequence[np.ndarray], axes_dim: Sequence[int],
                     theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin float32 [t*h*w, sum(axes_dim) // 2] for the (t, h, w) grid whose
  per-axis positions are `positions` (one angle per token and channel pair)."""
  grid = tuple(len(pos) for pos in positions)
  tables = []
  for axis, (pos, d) in enumerate(zip(positions, axes_dim)):
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
    angles = np.outer(np.asarray(pos, np.float64), inv_freq)            # [n, d/2]
    shape = [1, 1, 1, d // 2]
    shape[axis] = len(pos)
    tables.append([np.cos(angles).astype(np.float32).reshape(shape),
                   np.sin(angles).astype(np.float32).reshape(shape)])

  def per_token(parts):
    parts = [jnp.broadcast_to(jnp.asarray(t), (*grid, t.shape[-1])) for t in parts]
    return jnp.concatenate(parts, axis=-1).reshape(-1, sum(axes_dim) // 2)

  cos, sin = zip(*tables)
  return per_token(cos), per_token(sin)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates channel pairs (2i, 2i+1) of x [B, S, H, D] by the angles of the tables
  [S, D/2]; computed in float32, returned in x.dtype."""
  batch, seq, heads, head_dim = x.shape
  if cos.shape != (seq, head_dim // 2) or sin.shape != cos.shape:
    raise ValueError(
        f"RoPE tables must be [{seq}, {head_dim // 2}] for x of shape {x.shape}, "
        f"got cos {cos.shape} and sin {sin.shape}")
  pairs = x.astype(jnp.float32).reshape(batch, seq, heads, head_dim // 2, 2)
  x1, x2 = pairs[..., 0], pairs[..., 1]
  cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
  out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)

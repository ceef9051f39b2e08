"""HunyuanVideo's 3D rotary position embedding (diffusers' `HunyuanVideoRotaryPosEmbed`).

The head dimension is split into the three parts `rope_axes_dim` = (d_t, d_h, d_w)
(16, 56, 56 in the 13B model), in that order. Within a part of d channels, channel
pair i (channels 2i, 2i+1) rotates by pos * theta ** (-2i / d) with theta = 256 and
pos the token's index along that axis. It rotates the video tokens only (frame-major,
then row, then column); text tokens get no position. The rotation is
`models.rope.apply_rope` (pairs, float32).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from models.rope import apply_rope, axis_rope_tables

__all__ = ["apply_rope", "rope_tables"]


def rope_tables(grid: tuple[int, int, int], axes_dim: tuple[int, int, int],
                theta: float = 256.0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin float32 [t*h*w, sum(axes_dim) // 2]: one angle per video token and pair
  (`models.rope.axis_rope_tables`)."""
  if len(grid) != 3 or len(axes_dim) != 3 or any(d % 2 for d in axes_dim):
    raise ValueError(f"rope_tables needs a (t, h, w) grid and three even axis dims, got "
                     f"grid={tuple(grid)}, axes_dim={tuple(axes_dim)}")
  return axis_rope_tables([np.arange(n) for n in grid], axes_dim, theta)

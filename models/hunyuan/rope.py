"""HunyuanVideo's 3D rotary position embedding (diffusers' `HunyuanVideoRotaryPosEmbed`).

The head dimension is split into the three parts `rope_axes_dim` = (d_t, d_h, d_w)
(16, 56, 56 in the 13B model), in that order. Within a part of d channels, channel
pair i (channels 2i, 2i+1) rotates by pos * theta ** (-2i / d) with theta = 256 and
pos the token's index along that axis. It rotates the video tokens only (frame-major,
then row, then column); text tokens get no position. The rotation itself is Wan's
(`models.wan.rope.apply_rope`: pairs, float32).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from models.wan.rope import apply_rope

__all__ = ["apply_rope", "rope_tables"]


def rope_tables(grid: tuple[int, int, int], axes_dim: tuple[int, int, int],
                theta: float = 256.0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin float32 [t*h*w, sum(axes_dim) // 2]: one angle per video token and pair.

  Per-axis angles are small numpy constants (float64, then float32); the per-token
  tables are broadcast from them on device.
  """
  if len(grid) != 3 or len(axes_dim) != 3 or any(d % 2 for d in axes_dim):
    raise ValueError(f"rope_tables needs a (t, h, w) grid and three even axis dims, got "
                     f"grid={tuple(grid)}, axes_dim={tuple(axes_dim)}")
  tables = []
  for axis, (n, d) in enumerate(zip(grid, axes_dim)):
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
    angles = np.outer(np.arange(n, dtype=np.float64), inv_freq)         # [n, d/2]
    shape = [1, 1, 1, d // 2]
    shape[axis] = n
    tables.append([np.cos(angles).astype(np.float32).reshape(shape),
                   np.sin(angles).astype(np.float32).reshape(shape)])

  def per_token(parts):
    parts = [jnp.broadcast_to(jnp.asarray(t), (*grid, t.shape[-1])) for t in parts]
    return jnp.concatenate(parts, axis=-1).reshape(-1, sum(axes_dim) // 2)

  cos, sin = zip(*tables)
  return per_token(cos), per_token(sin)

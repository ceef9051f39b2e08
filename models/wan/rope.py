"""Wan's 3D rotary position embedding, as diffusers' `WanRotaryPosEmbed` computes it.

The head dimension is split into three parts, one per token axis: h and w get
2 * (head_dim // 6) channels each, t gets the rest. Within a part of d channels,
channel pair i (channels 2i, 2i+1) rotates by pos * theta ** (-2i / d), where pos
is the token's index along that axis. Tokens are in the model's native order
(frame-major, then row, then column).

The tables depend only on the static token grid: per-axis angles are built in
numpy at trace time (float64, like diffusers, then float32) and broadcast to
per-token tables on device.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

THETA = 10000.0


def axis_dims(head_dim: int) -> tuple[int, int, int]:
  """Channels of the head dimension given to the (t, h, w) axes."""
  h_dim = w_dim = 2 * (head_dim // 6)
  return head_dim - h_dim - w_dim, h_dim, w_dim


def rope_tables(grid: tuple[int, int, int], head_dim: int, *, max_seq_len: int = 1024,
                theta: float = THETA) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin float32 [t*h*w, head_dim // 2]: one angle per token and channel pair.

  The per-axis tables are tiny numpy constants (float64 angles, as in diffusers);
  the per-token tables are broadcast from them on device, so a long video does
  not put a large constant into the compiled program.
  """
  if head_dim % 2:
    raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
  if any(n > max_seq_len for n in grid):
    raise ValueError(f"token grid {tuple(grid)} exceeds rope_max_seq_len={max_seq_len} on an axis")
  tables = []
  for axis, (n, d) in enumerate(zip(grid, axis_dims(head_dim))):
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
    angles = np.outer(np.arange(n, dtype=np.float64), inv_freq)         # [n, d/2]
    shape = [1, 1, 1, d // 2]
    shape[axis] = n
    tables.append([np.cos(angles).astype(np.float32).reshape(shape),
                   np.sin(angles).astype(np.float32).reshape(shape)])

  def per_token(parts):
    parts = [jnp.broadcast_to(jnp.asarray(t), (*grid, t.shape[-1])) for t in parts]
    return jnp.concatenate(parts, axis=-1).reshape(-1, head_dim // 2)

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

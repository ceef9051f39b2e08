"""Wan's 3D rotary position embedding, as diffusers' `WanRotaryPosEmbed` computes it.

The head dimension is split into three parts, one per token axis: h and w get
2 * (head_dim // 6) channels each, t gets the rest. Within a part of d channels,
channel pair i (channels 2i, 2i+1) rotates by pos * theta ** (-2i / d), where pos
is the token's index along that axis. Tokens are in the model's native order
(frame-major, then row, then column).

The tables and the rotation are `models.rope`'s.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from models.rope import apply_rope, axis_rope_tables

__all__ = ["THETA", "apply_rope", "axis_dims", "rope_tables"]

THETA = 10000.0


def axis_dims(head_dim: int) -> tuple[int, int, int]:
  """Channels of the head dimension given to the (t, h, w) axes."""
  h_dim = w_dim = 2 * (head_dim // 6)
  return head_dim - h_dim - w_dim, h_dim, w_dim


def rope_tables(grid: tuple[int, int, int], head_dim: int, *, max_seq_len: int = 1024,
                theta: float = THETA) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin float32 [t*h*w, head_dim // 2]: one angle per token and channel pair."""
  if head_dim % 2:
    raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
  if any(n > max_seq_len for n in grid):
    raise ValueError(f"token grid {tuple(grid)} exceeds rope_max_seq_len={max_seq_len} on an axis")
  return axis_rope_tables([np.arange(n) for n in grid], axis_dims(head_dim), theta)

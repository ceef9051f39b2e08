"""CogVideoX's video-token positions: the 3D RoPE of 5b / 1.5 and the 3D sin-cos
embedding of 2b, as diffusers computes them.

Both depend only on the static token grid (t, h, w) and the config, so they are
numpy constants built at trace time (float64, then float32); the per-token RoPE
tables are broadcast from per-axis tables on device. Tokens are in the model's
order: frame-major, then row, then column. Text tokens get no position.

RoPE (diffusers `get_3d_rotary_pos_embed`, computed by the pipeline's
`_prepare_rotary_positional_embeddings` and handed to the transformer): the
head dimension D is split into t, h, w parts of D/4, 3D/8, 3D/8 channels;
within a part of d channels, channel pair i (channels 2i, 2i+1) rotates by
pos * 10000 ** (-2i / d).
  - CogVideoX 1.0 ("linspace" grid): t positions 0..T-1; the h x w grid is mapped
    onto the crop region that the sample grid (sample_height/p x sample_width/p)
    gets when the video's aspect ratio is fitted into it, so h positions run
    linspace(top, bottom * (h - 1) / h, h) (and w likewise): integers 0..h-1 at
    the sample size, fractional elsewhere.
  - CogVideoX 1.5 ("slice" grid): integer positions 0..n-1 on every axis; the
    video may not exceed the sample grid.

Sin-cos (diffusers `get_3d_sincos_pos_embed` inside `CogVideoXPatchEmbed`):
[D/4 temporal | 3D/8 from the w coordinate | 3D/8 from the h coordinate], each
part [sin | cos] of pos * 10000 ** (-j / (d / 2)), positions divided by the
temporal / spatial interpolation scales. diffusers adds it to the whole
[text; video] sequence with zeros on the text; we add it to the video tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from models.cogvideox.config import CogVideoXConfig
from models.rope import axis_rope_tables

THETA = 10000.0


def crop_region(grid_hw: tuple[int, int], base_width: int, base_height: int):
  """diffusers' `get_resize_crop_region_for_grid`: ((top, left), (bottom, right)) of
  an h x w grid fitted (aspect kept, centred) into base_height x base_width."""
  h, w = grid_hw
  if h / w > base_height / base_width:
    resize_height, resize_width = base_height, int(round(base_height / h * w))
  else:
    resize_width, resize_height = base_width, int(round(base_width / w * h))
  top = int(round((base_height - resize_height) / 2.0))
  left = int(round((base_width - resize_width) / 2.0))
  return (top, left), (top + resize_height, left + resize_width)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
  """Channels of the head dimension given to the (t, h, w) axes."""
  return head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3


def rope_positions(config: CogVideoXConfig, grid: tuple[int, int, int]):
  """Per-axis RoPE positions (t [T], h [H], w [W]), float64."""
  t, h, w = grid
  if config.patch_size_t is None:  # 1.0: crop-interpolated to the sample grid
    (top, left), (bottom, right) = crop_region(
        (h, w), config.sample_width // config.patch_size, config.sample_height // config.patch_size)
    pos_h = np.linspace(top, bottom * (h - 1) / h, h)
    pos_w = np.linspace(left, right * (w - 1) / w, w)
    pos_t = np.linspace(0, t * (t - 1) / t, t)
    return pos_t, pos_h, pos_w
  return tuple(np.arange(n, dtype=np.float64) for n in grid)


def rope_tables(config: CogVideoXConfig, grid: tuple[int, int, int],
                theta: float = THETA) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin float32 [t*h*w, head_dim // 2]: one angle per video token and channel pair."""
  return axis_rope_tables(rope_positions(config, grid), rope_axis_dims(config.head_dim), theta)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[len(pos), dim]: [sin | cos] of pos * 10000 ** (-j / (dim / 2)), float64."""
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_embedding(config: CogVideoXConfig, grid: tuple[int, int, int]) -> jnp.ndarray:
  """float32 [t*h*w, dim]: the 3D sin-cos position embedding of the video tokens.

  Per-axis tables are numpy constants; the per-token table is broadcast from them
  on device (at 480p x 49 frames it is 17550 x 1920 values)."""
  t, h, w = grid
  dim = config.dim
  spatial, temporal = 3 * dim // 4, dim // 4
  # diffusers divides float32 positions by the scales in float32
  scale_s = np.float32(config.spatial_interpolation_scale)
  pos_w = np.arange(w, dtype=np.float32) / scale_s
  pos_h = np.arange(h, dtype=np.float32) / scale_s
  pos_t = np.arange(t, dtype=np.float32) / np.float32(config.temporal_interpolation_scale)
  parts = [
      (_sincos_1d(temporal, pos_t).reshape(t, 1, 1, temporal)),     # [t, D/4]
      (_sincos_1d(spatial // 2, pos_w).reshape(1, 1, w, -1)),       # [w, 3D/8]
      (_sincos_1d(spatial // 2, pos_h).reshape(1, h, 1, -1)),       # [h, 3D/8]
  ]
  parts = [jnp.broadcast_to(jnp.asarray(p.astype(np.float32)), (t, h, w, p.shape[-1]))
           for p in parts]
  return jnp.concatenate(parts, axis=-1).reshape(t * h * w, dim)

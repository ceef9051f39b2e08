"""Procedural videos for training the demo DiT: bouncing shapes over a drifting texture.

Every video is a pure function of (key, label) written in jnp, so a whole batch is
generated on the device inside the jitted train step (no input pipeline).

Content of one video [3, F, H, W] in [-1, 1] (RGB, pixel space):
  - a background of two low-frequency plane waves in muted colours whose phase
    drifts slowly with time (a slowly moving texture, never static);
  - one to three shapes (circle, square, triangle), anti-aliased through a smooth
    signed distance (alpha = clip(0.5 - sdf_in_pixels, 0, 1)), each in its own
    saturated colour (SHAPE_COLORS: a red circle, a green square, a blue
    triangle), composited back to front in a random depth order, so they
    occlude each other;
  - the shapes move with constant velocity and reflect off the walls, except in
    the "gravity" motion where they fall and bounce on the floor (parabolic arcs).

The label (the "prompt") fixes what is in the video and how it moves:
    label = shape_set * NUM_MOTIONS + motion
  shape_set in [0, 7): bitmask - 1 over (circle, square, triangle), i.e. which
    shapes are present (each at most once);
  motion in [0, 4): MOTIONS = horizontal, vertical, diagonal, gravity (all the
    shapes of a video share the motion type; direction and speed are per shape).
The key draws everything else: positions, sizes, speeds, directions, shades,
depth order, background. The ranges are module constants (RADIUS, SPEED, ...),
which `benchmarks/demo_shapes.py` reads to judge sampled videos.

DATA_VERSION 2 (this file): the colour follows the shape, the shapes are a little
larger, the gravity arcs gentler and the background fainter than in version 1,
where every video drew its colours at random from all of PALETTE, so a label did
not say what its shapes look like (the first demo model, 1.8M parameters, mixed
colours within one shape and let shapes fade, split and wrap around the frame). To denoise well, a model must look within a frame (shape
identity and colour, occlusion) and across frames (each shape's trajectory), so
the trained DiT has both spatial and temporal attention structure.

Why pixel space (no VAE): a tiny learned autoencoder would be a second model to
train, ship and keep in sync with the DiT, and its latents would be hard to
judge by eye. At 32x32 pixels with a (1, 2, 2) patch the DiT already sees 256
tokens per frame, and the sparse-attention comparison only needs the DiT.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

DATA_VERSION = 2

SHAPES = ("circle", "square", "triangle")
MOTIONS = ("horizontal", "vertical", "diagonal", "gravity")
NUM_SHAPES = len(SHAPES)
NUM_SHAPE_SETS = 2**NUM_SHAPES - 1  # non-empty subsets of SHAPES
NUM_MOTIONS = len(MOTIONS)
NUM_CLASSES = NUM_SHAPE_SETS * NUM_MOTIONS  # 28

# Saturated object colours, RGB in [-1, 1]. Data version 1 drew each video's
# colours from all of PALETTE; version 2 gives shape i the colour SHAPE_COLORS[i].
# The background stays muted and dark (see _background), so the objects stand out.
PALETTE = jnp.array([
    [1.0, -0.8, -0.8],   # red
    [-0.8, 0.9, -0.8],   # green
    [-0.6, -0.5, 1.0],   # blue
    [1.0, 0.9, -0.8],    # yellow
    [1.0, -0.7, 1.0],    # magenta
    [-0.8, 1.0, 1.0],    # cyan
    [1.0, 1.0, 1.0],     # white
    [1.0, 0.25, -0.9],   # orange
], jnp.float32)
SHAPE_COLORS = PALETTE[jnp.array([0, 1, 2])]   # circle red, square green, triangle blue

# Ranges of the random draws (fractions of min(height, width) unless noted).
RADIUS = (0.13, 0.18)          # circle radius; square / triangle matched in size
SPEED = (0.035, 0.075)         # per frame, along the motion direction
SHADE = (0.85, 1.0)            # colour = SHAPE_COLORS[i] * shade
GRAVITY_PERIOD = (9.0, 15.0)   # frames between floor bounces
GRAVITY_APEX = (0.35, 0.8)     # bounce height, fraction of the free vertical range
GRAVITY_SIDEWAYS = 0.6         # horizontal speed factor of the gravity motion
BG_BASE = (-0.65, -0.25)       # background level per channel
BG_AMPLITUDE = (0.04, 0.14)    # per wave and channel
# (vy, vx) unit directions per motion type; gravity moves sideways and falls.
DIRECTIONS = ((0.0, 1.0), (1.0, 0.0), (0.7071, 0.7071), (0.0, GRAVITY_SIDEWAYS))


def label_of(shape_set, motion):
  """Label of a (shape_set, motion) pair; works on ints and arrays."""
  return shape_set * NUM_MOTIONS + motion


def decode_label(label):
  """(shape_set, motion) of a label; works on ints and arrays."""
  return label // NUM_MOTIONS, label % NUM_MOTIONS


def shapes_present(shape_set):
  """bool [NUM_SHAPES]: which of SHAPES a shape set holds."""
  bits = jnp.asarray(shape_set) + 1
  return (bits >> jnp.arange(NUM_SHAPES)) & 1 == 1


def describe_label(label: int) -> str:
  """Human-readable prompt of a label, e.g. 'circle+triangle, diagonal'."""
  if not 0 <= int(label) < NUM_CLASSES:
    raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}")
  shape_set, motion = decode_label(int(label))
  names = [s for s, p in zip(SHAPES, shapes_present(shape_set).tolist()) if p]
  return f"{'+'.join(names)}, {MOTIONS[motion]}"


@struct.dataclass
class Scene:
  """Everything drawn in one video. Object axis N = NUM_SHAPES (slot i is SHAPES[i])."""

  centers: jax.Array    # float [F, N, 2] (y, x) in pixels, pixel centres at i + 0.5
  radius: jax.Array     # float [N] pixels (circle radius; square / triangle matched)
  colors: jax.Array     # float [N, 3]
  present: jax.Array    # bool [N]
  depth: jax.Array      # int [N]: a permutation, larger is nearer the viewer
  bg_base: jax.Array    # float [3]
  bg_waves: jax.Array   # float [2, 4]: (ky, kx) cycles per frame size, drift, phase
  bg_colors: jax.Array  # float [2, 3]: amplitude per wave and channel


def _fold(u, lo, hi):
  """Position of a point moving freely as u inside [lo, hi] with elastic walls."""
  span = jnp.maximum(hi - lo, 1e-3)
  m = jnp.mod(u - lo, 2 * span)
  return lo + span - jnp.abs(m - span)


@functools.partial(jax.jit, static_argnames=("frames", "height", "width"))
def scene_for_label(key, label, frames: int, height: int, width: int) -> Scene:
  """Draw the scene of one video; `label` fixes the shapes and the motion type."""
  shape_set, motion = decode_label(jnp.asarray(label, jnp.int32))
  present = shapes_present(shape_set)
  n = NUM_SHAPES
  # One uniform draw carved into named pieces: a single threefry call compiles in a
  # fraction of the time of one call per piece.
  sizes = dict(radius=(n,), start=(n, 2), speed=(n,), sign=(n, 2), period=(n,), apex=(n,),
               phase=(n,), palette=(PALETTE.shape[0],), shade=(n,), depth=(n,),
               bg_base=(3,), angle=(2,), freq=(2,), drift=(2,), phase0=(2,), bg_colors=(2, 3))
  flat = jax.random.uniform(key, (sum(math.prod(v) for v in sizes.values()),))
  u, offset = {}, 0
  for name, shape in sizes.items():
    u[name] = flat[offset:offset + math.prod(shape)].reshape(shape)
    offset += math.prod(shape)
  between = lambda x, lo, hi: lo + (hi - lo) * x
  size = float(min(height, width))

  radius = size * between(u["radius"], *RADIUS)
  lo = jnp.stack([radius, radius], -1)                                     # [N, 2]
  hi = jnp.stack([height - radius, width - radius], -1)
  start = lo + (hi - lo) * u["start"]
  speed = size * between(u["speed"], *SPEED)
  sign = jnp.where(u["sign"] < 0.5, 1.0, -1.0)
  velocity = jnp.array(DIRECTIONS)[motion] * speed[:, None] * sign        # [N, 2]
  t = jnp.arange(frames, dtype=jnp.float32)[:, None, None]
  free = _fold(start + velocity * t, lo, hi)                              # [F, N, 2]
  # Gravity: elastic bounces on the floor, period P frames, apex height A.
  period = between(u["period"], *GRAVITY_PERIOD)
  apex = (hi[:, 0] - lo[:, 0]) * between(u["apex"], *GRAVITY_APEX)
  phase = jnp.mod(t[..., 0] / period + u["phase"], 1.0)                  # [F, N]
  fall_y = hi[:, 0] - 4.0 * apex * phase * (1.0 - phase)
  centers = jnp.where(motion == 3, free.at[..., 0].set(fall_y), free)

  del u["palette"]  # (version 1's colour draw; kept so the other draws stay put)
  colors = SHAPE_COLORS * between(u["shade"], *SHADE)[:, None]
  depth = jnp.argsort(u["depth"]).astype(jnp.int32)

  bg_base = between(u["bg_base"], *BG_BASE)
  angle = 2 * jnp.pi * u["angle"]
  freq = between(u["freq"], 0.6, 2.0)                                     # cycles per frame size
  drift = between(u["drift"], 0.08, 0.25) * jnp.array([1.0, -1.0])        # radians per frame
  phase0 = 2 * jnp.pi * u["phase0"]
  bg_waves = jnp.stack([freq * jnp.sin(angle), freq * jnp.cos(angle), drift, phase0], -1)
  bg_colors = between(u["bg_colors"], *BG_AMPLITUDE)
  return Scene(centers=centers, radius=radius, colors=colors, present=present, depth=depth,
               bg_base=bg_base, bg_waves=bg_waves, bg_colors=bg_colors)


def _sdf_circle(py, px, r):
  return jnp.sqrt(py**2 + px**2) - r


def _sdf_square(py, px, r):
  h = 0.85 * r
  qy, qx = jnp.abs(py) - h, jnp.abs(px) - h
  outside = jnp.sqrt(jnp.maximum(qy, 0.0)**2 + jnp.maximum(qx, 0.0)**2)
  return outside + jnp.minimum(jnp.maximum(qy, qx), 0.0)


def _sdf_triangle(py, px, r):
  """Equilateral triangle pointing up, half side 1.15 r, centroid at 0 (I. Quilez)."""
  r = 1.15 * r
  k = jnp.sqrt(3.0)
  x = jnp.abs(px) - r
  y = -py + r / k  # image rows grow downwards
  fold = x + k * y > 0.0
  x, y = jnp.where(fold, (x - k * y) / 2, x), jnp.where(fold, (-k * x - y) / 2, y)
  x = x - jnp.clip(x, -2.0 * r, 0.0)
  return -jnp.sqrt(x**2 + y**2) * jnp.sign(y)


def _background(scene: Scene, frames: int, height: int, width: int):
  size = float(min(height, width))
  y = (jnp.arange(height, dtype=jnp.float32) + 0.5) / size
  x = (jnp.arange(width, dtype=jnp.float32) + 0.5) / size
  t = jnp.arange(frames, dtype=jnp.float32)
  ky, kx, drift, phase = (scene.bg_waves[:, i] for i in range(4))           # [2] each
  arg = (2 * jnp.pi * (ky[:, None, None, None] * y[None, None, :, None]
                       + kx[:, None, None, None] * x[None, None, None, :])
         + drift[:, None, None, None] * t[None, :, None, None] + phase[:, None, None, None])
  waves = jnp.sin(arg)                                                    # [2, F, H, W]
  return scene.bg_base[:, None, None, None] + jnp.einsum("wc,wfhx->cfhx", scene.bg_colors, waves)


def render_scene(scene: Scene, frames: int, height: int, width: int):
  """float32 [3, F, H, W] in [-1, 1]."""
  video = _background(scene, frames, height, width)
  y = jnp.arange(height, dtype=jnp.float32)[None, :, None] + 0.5
  x = jnp.arange(width, dtype=jnp.float32)[None, None, :] + 0.5
  sdfs = (_sdf_circle, _sdf_square, _sdf_triangle)
  for rank in range(NUM_SHAPES):            # back to front
    i = jnp.argmax(scene.depth == rank)     # the object at this depth
    py = y - scene.centers[:, i, 0][:, None, None]
    px = x - scene.centers[:, i, 1][:, None, None]
    sdf = jax.lax.switch(i, [functools.partial(f, r=scene.radius[i]) for f in sdfs], py, px)
    alpha = jnp.clip(0.5 - sdf, 0.0, 1.0) * scene.present[i]              # [F, H, W]
    video = video * (1.0 - alpha) + scene.colors[i][:, None, None, None] * alpha
  return jnp.clip(video, -1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("frames", "height", "width"))
def video_for_label(key, label, frames: int = 16, height: int = 32, width: int = 32):
  """One video float32 [3, F, H, W] in [-1, 1] of class `label` (int or int array)."""
  return render_scene(scene_for_label(key, label, frames, height, width), frames, height, width)


@functools.partial(jax.jit, static_argnames=("batch", "frames", "height", "width"))
def sample_batch(key, batch: int, frames: int = 16, height: int = 32, width: int = 32):
  """(videos float32 [B, 3, F, H, W] in [-1, 1], labels int32 [B]) with uniform labels."""
  k_label, k_video = jax.random.split(key)
  labels = jax.random.randint(k_label, (batch,), 0, NUM_CLASSES, dtype=jnp.int32)
  render = lambda k, l: render_scene(scene_for_label(k, l, frames, height, width),
                                     frames, height, width)
  videos = jax.vmap(render)(jax.random.split(k_video, batch), labels)
  return videos, labels

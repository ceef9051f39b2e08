"""The procedural demo videos: shapes, range, determinism, labels match content."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.demo import data as dd

F, H, W = 8, 24, 24


@pytest.fixture(scope="module")
def batch():
  return dd.sample_batch(jax.random.key(0), 16, F, H, W)


def test_shapes_dtype_and_range(batch):
  videos, labels = batch
  chex.assert_shape(videos, (16, 3, F, H, W))
  chex.assert_shape(labels, (16,))
  assert videos.dtype == jnp.float32 and labels.dtype == jnp.int32
  chex.assert_tree_all_finite(videos)
  assert float(videos.min()) >= -1.0 and float(videos.max()) <= 1.0
  assert int(labels.min()) >= 0 and int(labels.max()) < dd.NUM_CLASSES
  # Real content: not flat, and the background moves between frames.
  assert float(videos.std()) > 0.2
  assert float(jnp.abs(videos[:, :, 1:] - videos[:, :, :-1]).mean()) > 1e-3


def test_deterministic_per_key_and_keys_differ(batch):
  again = dd.sample_batch(jax.random.key(0), 16, F, H, W)
  chex.assert_trees_all_equal(batch, again)
  other, _ = dd.sample_batch(jax.random.key(1), 16, F, H, W)
  assert float(jnp.abs(other - batch[0]).mean()) > 0.05
  # Same label, different keys: different videos; same key: the same video.
  a = dd.video_for_label(jax.random.key(3), 5, F, H, W)
  b = dd.video_for_label(jax.random.key(4), 5, F, H, W)
  chex.assert_trees_all_equal(a, dd.video_for_label(jax.random.key(3), 5, F, H, W))
  assert float(jnp.abs(a - b).mean()) > 0.05
  # Videos in a batch are the per-example generator's output (vmap is faithful).
  videos, labels = batch
  assert len(set(np.asarray(labels).tolist())) > 4


def test_labels_cover_all_classes():
  _, labels = dd.sample_batch(jax.random.key(7), 1024, 1, 4, 4)
  counts = np.bincount(np.asarray(labels), minlength=dd.NUM_CLASSES)
  assert counts.shape == (dd.NUM_CLASSES,) and counts.min() > 0


def test_label_codec():
  assert dd.NUM_CLASSES == 28
  for label in range(dd.NUM_CLASSES):
    shape_set, motion = dd.decode_label(label)
    assert dd.label_of(shape_set, motion) == label
    assert np.asarray(dd.shapes_present(shape_set)).any()
  assert dd.describe_label(dd.label_of(4, 2)) == "circle+triangle, diagonal"
  with pytest.raises(ValueError, match="label"):
    dd.describe_label(dd.NUM_CLASSES)


@pytest.mark.parametrize("motion", range(dd.NUM_MOTIONS), ids=lambda m: dd.MOTIONS[m])
def test_trajectories_follow_motion_type(motion):
  frames = F
  for seed in range(4):
    scene = dd.scene_for_label(jax.random.key(seed), dd.label_of(6, motion), frames, H, W)
    step = np.diff(np.asarray(scene.centers), axis=0)           # [F-1, N, 2] (dy, dx)
    dy, dx = np.abs(step[..., 0]), np.abs(step[..., 1])
    if dd.MOTIONS[motion] == "horizontal":
      np.testing.assert_allclose(dy, 0.0, atol=1e-5)
      assert (dx.max(0) > 0.5).all()
    elif dd.MOTIONS[motion] == "vertical":
      np.testing.assert_allclose(dx, 0.0, atol=1e-5)
      assert (dy.max(0) > 0.5).all()
    elif dd.MOTIONS[motion] == "diagonal":
      # Equal speed on both axes, except on the few frames of a wall bounce.
      assert (np.median(np.abs(dy - dx), axis=0) < 1e-3).all()
      assert (dy.max(0) > 0.5).all()
    else:  # gravity: sideways drift, falls with constant acceleration, bounces
      ddy = np.diff(np.asarray(scene.centers)[:, :, 0], 2, axis=0)  # rows grow downwards
      assert (np.median(ddy, axis=0) > 0.05).all()
      assert (dx.max(0) > 0.5).all()
    # Everything stays inside the frame.
    centers = np.asarray(scene.centers)
    assert (centers >= 0).all() and (centers[..., 0] <= H).all() and (centers[..., 1] <= W).all()


def test_rendered_shapes_match_label():
  """The shapes the label names are drawn (in their colour), the others are not."""
  for label in range(0, dd.NUM_CLASSES, 3):
    key = jax.random.key(label)
    scene = dd.scene_for_label(key, label, F, H, W)
    video = np.asarray(dd.video_for_label(key, label, F, H, W))
    shape_set, _ = dd.decode_label(label)
    present = np.asarray(dd.shapes_present(shape_set))
    np.testing.assert_array_equal(np.asarray(scene.present), present)
    # The front-most present object shows its own colour at its centre.
    depth = np.where(present, np.asarray(scene.depth), -1)
    front = int(np.argmax(depth))
    cy, cx = np.asarray(scene.centers[0, front]).astype(int)
    np.testing.assert_allclose(video[:, 0, cy, cx], np.asarray(scene.colors[front]), atol=1e-5)


def test_anti_aliased_edges():
  video = np.asarray(dd.video_for_label(jax.random.key(0), dd.label_of(0, 0), F, H, W))
  scene = dd.scene_for_label(jax.random.key(0), dd.label_of(0, 0), F, H, W)
  color = np.asarray(scene.colors[0])[:, None, None]
  frame = video[:, 0]
  inside = np.all(np.abs(frame - color) < 1e-5, axis=0).sum()
  radius = float(scene.radius[0])
  # Fully covered pixels ~ area of the circle shrunk by half a pixel.
  assert abs(inside - np.pi * (radius - 0.5) ** 2) < 0.25 * np.pi * radius**2


def test_colour_follows_the_shape_and_sizes_follow_the_ranges():
  """Data version 2: shape i is SHAPE_COLORS[i] times a shade in SHADE; radius and
  speed inside RADIUS and SPEED (fractions of the frame size)."""
  assert dd.DATA_VERSION == 2
  for seed in range(6):
    label = dd.label_of(6, seed % dd.NUM_MOTIONS)
    scene = dd.scene_for_label(jax.random.key(seed), label, F, H, W)
    colors = np.asarray(scene.colors)
    base = np.asarray(dd.SHAPE_COLORS)
    shade = (colors * base).sum(-1) / (base * base).sum(-1)
    np.testing.assert_allclose(colors, shade[:, None] * base, atol=1e-6)
    assert (shade >= dd.SHADE[0] - 1e-6).all() and (shade <= dd.SHADE[1] + 1e-6).all()
    radius = np.asarray(scene.radius) / min(H, W)
    assert (radius >= dd.RADIUS[0] - 1e-6).all() and (radius <= dd.RADIUS[1] + 1e-6).all()
    if dd.MOTIONS[seed % dd.NUM_MOTIONS] == "horizontal":
      speed = np.abs(np.diff(np.asarray(scene.centers)[:, :, 1], axis=0)).max(0) / min(H, W)
      assert (speed <= dd.SPEED[1] + 1e-6).all() and (speed >= dd.SPEED[0] - 1e-6).all()

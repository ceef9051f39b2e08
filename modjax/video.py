"""Turning model outputs into frames and files (imageio: mp4 via ffmpeg, gif without)."""

from __future__ import annotations

import os
import warnings

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".gif")


def to_frames(video: np.ndarray, *, value_range=(-1.0, 1.0)) -> np.ndarray:
  """[C, F, H, W] float -> uint8 [F, H, W, 3].

  Pixel-space models (3 channels in value_range) map linearly. Latent-space
  models without a decoder show their first three channels, normalised per
  video, so a random-weight model still gives a viewable file.
  """
  video = np.asarray(video, np.float32)
  if video.ndim != 4:
    raise ValueError(f"video must be [C, F, H, W], got shape {video.shape}")
  c = video.shape[0]
  if c == 3:
    lo, hi = value_range
    x = (video - lo) / (hi - lo)
  else:
    x = video[:3] if c >= 3 else np.repeat(video[:1], 3, axis=0)
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
  x = np.clip(x, 0.0, 1.0)
  return (np.transpose(x, (1, 2, 3, 0)) * 255.0 + 0.5).astype(np.uint8)


def check_output_path(path: str, suffixes=VIDEO_SUFFIXES, why: str = "") -> str:
  """Validate before any work is done: a known suffix and a writable folder.
  why: words after the allowed suffixes in the error (e.g. what the run writes)."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in suffixes:
    raise ValueError(f"--out must end in one of {tuple(suffixes)}{why}, got {path!r}")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise ValueError(f"--out folder does not exist: {folder!r}")
  if not os.access(folder, os.W_OK):
    raise ValueError(f"--out folder is not writable: {folder!r}")
  return suffix


def write_video(frames: np.ndarray, path: str, fps: int = 8) -> str:
  """Write uint8 [F, H, W, 3] frames. Returns the path written.

  mp4 needs imageio-ffmpeg; without it the video is written as .gif beside the
  requested path and that path is returned.
  """
  import imageio.v2 as imageio

  if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps < 1:
    raise ValueError(f"fps must be a positive int, got {fps!r}")
  suffix = check_output_path(path)
  if suffix == ".mp4":
    try:
      import imageio_ffmpeg  # noqa: F401  (imageio's mp4 writer needs it)
    except ImportError:
      path = os.path.splitext(path)[0] + ".gif"
    else:
      # imageio-ffmpeg starts ffmpeg with subprocess, whose fork-and-exec trips JAX's
      # at-fork warning. The child only execs ffmpeg (no Python, no JAX locks), so
      # the deadlock the warning is about cannot happen; silence exactly that warning.
      with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                category=RuntimeWarning)
        imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
      return path
  imageio.mimwrite(path, list(frames), duration=1000.0 / fps, loop=0)
  return path

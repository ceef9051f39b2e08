"""Decoded video -> frames, as diffusers' VideoProcessor does it."""

from __future__ import annotations

import numpy as np


def to_uint8_frames(video: np.ndarray) -> np.ndarray:
  """[B, 3, F, H, W] in [-1, 1] -> uint8 [B, F, H, W, 3] (x / 2 + 0.5, clamped, times
  255, rounded)."""
  x = np.clip(np.asarray(video, np.float32) / 2.0 + 0.5, 0.0, 1.0)
  return np.round(np.transpose(x, (0, 2, 3, 4, 1)) * 255.0).astype(np.uint8)

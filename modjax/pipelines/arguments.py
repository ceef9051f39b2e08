"""Checks of a pipeline call's arguments, shared by the text-to-video pipelines.

Each check raises ValueError naming the argument, what it got and what is
allowed, before anything is encoded or compiled. Sizes are diffusers' units:
pixels and frames of the output video.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import numpy as np


def positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def seed(value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"seed must be an int, got {value!r}")
  return int(value)


def guidance_scale(value) -> float:
  """Classifier-free guidance: >= 1 (1 disables it, as diffusers' `> 1` test)."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not value >= 1.0 or not math.isfinite(value)):
    raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {value!r}")
  return float(value)


def positive_float(name: str, value) -> float:
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0
      or not math.isfinite(value)):
    raise ValueError(f"{name} must be > 0 (a finite number), got {value!r}")
  return float(value)


def prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
  """(prompts, negative prompts), one of each per video; the negative prompt
  defaults to "" (diffusers' default), a str applies to every prompt."""
  if isinstance(prompt, str):
    positives = [prompt]
  elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
    positives = list(prompt)
  else:
    raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
  if negative_prompt is None:
    negatives = [""] * len(positives)
  elif isinstance(negative_prompt, str):
    negatives = [negative_prompt] * len(positives)
  elif (isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) == len(positives)
        and all(isinstance(p, str) for p in negative_prompt)):
    negatives = list(negative_prompt)
  else:
    raise ValueError(f"negative_prompt must be None, a str, or a list of {len(positives)} str, "
                     f"got {negative_prompt!r}")
  return positives, negatives


def video_size(height, width, num_frames, *, spatial: int, temporal: int,
               patch: int) -> tuple[int, int, int]:
  """(latent frames, latent height, latent width) of a video of num_frames frames of
  height x width pixels, for a VAE of `spatial` x `temporal` compression and a
  transformer of `patch` x `patch` spatial patches. Sizes diffusers would round
  (or silently crop) are refused: height and width must be multiples of
  spatial * patch, num_frames of the form temporal * k + 1."""
  for name, value in (("height", height), ("width", width), ("num_frames", num_frames)):
    positive_int(name, value)
  multiple = spatial * patch
  for name, value in (("height", height), ("width", width)):
    if value % multiple:
      raise ValueError(f"{name} must be a multiple of {multiple} pixels (VAE x{spatial}, "
                       f"patch {patch}), got {value}")
  if (num_frames - 1) % temporal:
    lo = (num_frames - 1) // temporal * temporal + 1
    raise ValueError(f"num_frames must be {temporal}k+1 (1, {temporal + 1}, "
                     f"{2 * temporal + 1}, ...), got {num_frames}; nearest: {lo} or "
                     f"{lo + temporal}")
  return (num_frames - 1) // temporal + 1, height // spatial, width // spatial


def latents(value, shape: Sequence[int], name: str = "latents") -> Optional[np.ndarray]:
  """None, or the given initial noise as float32 of exactly `shape`."""
  if value is None:
    return None
  array = host_array(name, value)
  if tuple(array.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(array.shape)}")
  return array.astype(np.float32)


def host_array(name: str, value) -> np.ndarray:
  """A numpy array of a numpy / jax array or a torch tensor (any dtype, any device)."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch, without importing it
    value = value.detach().cpu()
    if not value.dtype.is_floating_point:
      return np.asarray(value.numpy())
    return np.asarray(value.float().numpy())
  try:
    array = np.asarray(value)
  except Exception as e:
    raise ValueError(f"{name} must be an array, got {type(value).__name__}: {e}") from None
  if array.dtype == object:
    raise ValueError(f"{name} must be a numeric array, got {type(value).__name__}")
  return array


def embeddings(name: str, value, *, ndim: int, last: Union[int, None],
               batch: Optional[int] = None) -> np.ndarray:
  """A float32 array of `ndim` axes with `last` channels (and `batch` rows when given)."""
  array = host_array(name, value)
  axes = "[B, L, D]" if ndim == 3 else "[B, D]"
  if array.ndim != ndim or (last is not None and array.shape[-1] != last):
    raise ValueError(f"{name} must be {axes} with D={last}, got shape {tuple(array.shape)}")
  if batch is not None and array.shape[0] != batch:
    raise ValueError(f"{name} must have {batch} rows (one per prompt, as prompt_embeds), got "
                     f"shape {tuple(array.shape)}")
  if array.shape[0] < 1 or (ndim == 3 and array.shape[1] < 1):
    raise ValueError(f"{name} must not be empty, got shape {tuple(array.shape)}")
  if not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f"{name} must be floating point, got dtype {array.dtype}")
  if not np.isfinite(array).all():
    raise ValueError(f"{name} holds NaN or inf values")
  return array.astype(np.float32)

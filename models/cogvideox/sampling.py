"""What diffusers' CogVideoXPipeline does around the transformer, as pure helpers:
prompt embeddings, latent sizes (with CogVideoX 1.5's frame padding) and the
dynamic guidance scale. The denoising loop itself is modjax's sampler with
`CogVideoXFamily` and `modjax.schedulers.CogVideoXDPM` / `CogVideoXDDIM`.

diffusers' loop, for reference (pipeline_cogvideox.py, 0.42.1):
  latents = randn([B, F, 16, H/8, W/8]) * init_noise_sigma (= 1)
  for i, t in enumerate(timesteps):
    out = transformer(cat([latents] * 2), t, cat([negative, prompt]), rope(H, W, F))
    out = out_uncond + g_i (out_text - out_uncond)      # g_i = g, or the dynamic scale
    latents = scheduler.step(out, latents, ...)        # v -> x0 inside the step
  latents = latents[:, additional_frames:] -> VAE decode (latents / scaling_factor)
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np

from models.cogvideox.config import CogVideoXConfig
from models.text import T5EncoderConfig, Tokenizer, encode
from models.text.prompts import prompt_list

MAX_SEQUENCE_LENGTH = 226
VAE_TEMPORAL, VAE_SPATIAL = 4, 8


def encode_prompts(encoder_config: T5EncoderConfig, params, tokenizer: Tokenizer,
                   prompts: str | Sequence[str], *,
                   max_length: int = MAX_SEQUENCE_LENGTH) -> jax.Array:
  """prompts -> T5 embeddings [B, max_length, d_model] float32, with
  CogVideoXPipeline._get_t5_prompt_embeds' semantics: the raw prompt (no cleaning),
  padded / truncated to max_length with `</s>`, encoded WITHOUT an attention
  mask (the padding tokens are attended to and keep their embeddings). The
  negative prompt defaults to "" in diffusers and is encoded the same way."""
  ids, _ = tokenizer(prompt_list(prompts), max_length=max_length)
  return encode(encoder_config, params, ids)


def latent_frames(num_frames: int, config: CogVideoXConfig) -> tuple[int, int]:
  """(latent frames to denoise, leading padding frames to drop before decoding) for
  num_frames video frames: (num_frames - 1) // 4 + 1 latent frames, padded at the
  front to a multiple of patch_size_t for CogVideoX 1.5 (diffusers pads the noise
  and drops `latents[:, :additional]` after the loop)."""
  if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
    raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
  frames = (num_frames - 1) // VAE_TEMPORAL + 1
  additional = -frames % config.temporal_patch
  return frames + additional, additional


def latent_size(height: int, width: int, config: CogVideoXConfig) -> tuple[int, int]:
  """Latent (height, width) of a video of height x width pixels; ValueError unless
  they are multiples of 8 * patch_size (diffusers asks for multiples of 8 and then
  silently drops the odd latent row / column)."""
  multiple = VAE_SPATIAL * config.patch_size
  for name, value in (("height", height), ("width", width)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % multiple:
      raise ValueError(f"{name}={value!r} must be a positive multiple of {multiple} "
                       f"(VAE factor {VAE_SPATIAL} x patch_size {config.patch_size})")
  return height // VAE_SPATIAL, width // VAE_SPATIAL


def dynamic_guidance_scales(timesteps, num_inference_steps: int,
                            guidance_scale: float) -> np.ndarray:
  """float64 [steps]: the guidance scale of each step with use_dynamic_cfg=True.

  diffusers: g_i = 1 + g (1 - cos(pi ((n - t_i) / n) ** 5)) / 2 with t_i the integer
  timestep (999, 979, ...), not the step index, as diffusers writes it: the base is
  negative and far outside [0, 1], so the cosine's argument is huge and the
  scale jumps between 1 and 1 + g from step to step. Reproduced as is (the
  pipelines' behaviour), not the smooth schedule the formula suggests.
  """
  n = num_inference_steps
  return np.asarray([1 + guidance_scale * (1 - math.cos(math.pi * ((n - float(t)) / n) ** 5.0)) / 2
                     for t in np.asarray(timesteps)])

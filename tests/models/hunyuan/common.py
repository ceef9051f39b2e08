"""Shared inputs of the HunyuanVideo tests."""

import functools

import jax
import numpy as np

from models import hunyuan


def inputs(config, batch=2, latent=(3, 4, 6), text_len=7, lengths=None, seed=1):
  """(latents, timestep, context) in numpy; lengths: real tokens per row (None: no mask)."""
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((batch, config.in_channels, *latent)).astype(np.float32)
  timestep = rng.uniform(0.0, 1000.0, (batch,)).astype(np.float32)
  mask = None
  if lengths is not None:
    mask = (np.arange(text_len)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
  context = hunyuan.HunyuanVideoContext(
      text=rng.standard_normal((batch, text_len, config.text_dim)).astype(np.float32),
      pooled=rng.standard_normal((batch, config.pooled_dim)).astype(np.float32),
      text_mask=mask,
      guidance=(rng.uniform(1000.0, 8000.0, (batch,)).astype(np.float32)
                if config.guidance_embeds else None))
  return latents, timestep, context


@functools.cache
def forward(config):
  """One jitted forward per config (each new input structure traces once more)."""
  return jax.jit(lambda p, x, t, c, control=None: hunyuan.apply(config, p, x, t, c, control))

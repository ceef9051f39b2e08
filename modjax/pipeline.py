"""Named models for the CLI and notebooks: config, params and conditioning.

"demo"  the small pixel-space DiT trained on procedural videos (shipped);
"tiny"  a random-init model for smoke tests;
a path  a diffusers-format Wan transformer folder (config.json + safetensors).
No text encoder is shipped: random-weight and diffusers models get a seeded
random context; the demo model is conditioned on a class label.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

import models

DEMO_CHECKPOINT = os.path.join(os.path.dirname(models.__file__), "checkpoints", "demo.safetensors")
NAMED_MODELS = ("demo", "tiny")


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
  frames: int
  height: int
  width: int
  num_inference_steps: int
  guidance_scale: float
  shift: float
  block_size: int


@dataclasses.dataclass
class LoadedModel:
  name: str
  config: Any
  params: Any                        # the DiT's params
  defaults: ModelDefaults
  # (batch, key, label) -> (context, neg_context), each [batch, L, text_dim]
  make_context: Callable[..., tuple]
  pixel_space: bool


def _random_context(text_dim: int, text_len: int):
  def make(batch: int, key, label: Optional[int] = None):
    kc, kn = jax.random.split(key)
    ctx = jax.random.normal(kc, (batch, text_len, text_dim), jnp.float32)
    neg = jax.random.normal(kn, (batch, text_len, text_dim), jnp.float32)
    return ctx, neg
  return make


def load_model(name: str, *, seed: int = 0) -> LoadedModel:
  """A model by name ("demo", "tiny") or a diffusers folder path."""
  if name == "tiny":
    config = models.DiTConfig.tiny()
    d = ModelDefaults(frames=4, height=16, width=16, num_inference_steps=8,
                      guidance_scale=4.0, shift=3.0, block_size=64)
    params = models.init_params(config, jax.random.key(seed), d.frames, d.height, d.width, 8)
    return LoadedModel(name, config, params, d, _random_context(config.text_dim, 8), False)
  if name == "demo":
    from models import train
    if not os.path.exists(DEMO_CHECKPOINT):
      raise FileNotFoundError(f"demo checkpoint not found at {DEMO_CHECKPOINT!r}")
    return train.load_demo(DEMO_CHECKPOINT)
  if os.path.isdir(name):
    config, params = models.load_diffusers_transformer(name)
    d = ModelDefaults(frames=21, height=60, width=104, num_inference_steps=50,
                      guidance_scale=5.0, shift=5.0, block_size=128)
    return LoadedModel(os.path.basename(name), config, params, d,
                       _random_context(config.text_dim, 512), False)
  raise ValueError(f"--model must be one of {NAMED_MODELS} or a diffusers model folder, got {name!r}")

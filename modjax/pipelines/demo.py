"""Named small models for the CLI, notebooks and benchmarks: family, params, conditioning.

"demo"         the shipped pixel-space DiT trained on procedural videos,
               conditioned on a class label (models/demo/);
"tiny"         a random-init Wan-shaped model with a seeded random context (smoke tests);
PATH           a demo export (`python -m models.demo.train` writes one:
               DIR/demo.safetensors with demo.json and demo_labels.safetensors beside it).
Real Wan2.1 checkpoints go through `modjax.pipelines.WanPipeline` instead.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from models import wan
from models.demo import checkpoint as demo_checkpoint

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
  # The label and seed the CLI draws when none is given: a sample that shows the
  # labelled shapes (benchmarks/demo_shapes.py --pick-default writes them into an export).
  default_label: Optional[int] = None
  default_seed: Optional[int] = None


@dataclasses.dataclass
class LoadedModel:
  name: str
  family: Any                        # a models.family.Family
  params: Any
  defaults: ModelDefaults
  # (batch, key, label) -> (context, neg_context), each [batch, L, text_dim]
  make_context: Callable[..., tuple]
  pixel_space: bool
  num_labels: int = 0                # > 0: make_context takes a class label in [0, num_labels)

  def describe_label(self, label: int) -> str:
    if not self.num_labels:
      return "no label"
    from models.demo import data
    return data.describe_label(int(label))


def _random_context(text_dim: int, text_len: int):
  def make(batch: int, key, label: Optional[int] = None):
    if label is not None:
      raise ValueError("this model takes no label (only the demo model is label-conditioned)")
    kc, kn = jax.random.split(key)
    ctx = jax.random.normal(kc, (batch, text_len, text_dim), jnp.float32)
    neg = jax.random.normal(kn, (batch, text_len, text_dim), jnp.float32)
    return ctx, neg
  return make


def _optional_int(value) -> Optional[int]:
  return None if value is None else int(value)


def load_tiny(seed: int = 0) -> LoadedModel:
  config = wan.WanConfig.tiny()
  d = ModelDefaults(frames=4, height=16, width=16, num_inference_steps=8,
                    guidance_scale=4.0, shift=3.0, block_size=64)
  params = wan.init_params(config, jax.random.key(seed), d.frames, d.height, d.width, 8)
  return LoadedModel("tiny", wan.WanFamily(config), params, d,
                     _random_context(config.text_dim, 8), False)


def load_demo(path: str = demo_checkpoint.DEMO_CHECKPOINT) -> LoadedModel:
  """A demo export as a LoadedModel: bf16 compute on accelerators, f32 on CPU."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"demo checkpoint not found at {path!r}")
  dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  config, params, meta = demo_checkpoint.load_demo_params(path, dtype=dtype)
  defaults = ModelDefaults(frames=int(meta["frames"]), height=int(meta["height"]),
                           width=int(meta["width"]),
                           num_inference_steps=int(meta["num_inference_steps"]),
                           guidance_scale=float(meta["guidance_scale"]),
                           shift=float(meta["shift"]), block_size=int(meta["block_size"]),
                           default_label=_optional_int(meta.get("default_label")),
                           default_seed=_optional_int(meta.get("default_seed")))
  table = {"label_embedding": params["label_embedding"]}
  num_labels = demo_checkpoint.NUM_CLASSES

  def make_context(batch: int, key, label: Optional[int] = None):
    if label is None:
      labels = jax.random.randint(key, (batch,), 0, num_labels)
    else:
      if isinstance(label, bool) or not 0 <= int(label) < num_labels:
        raise ValueError(f"label must be an int in [0, {num_labels}), got {label!r}")
      labels = jnp.full((batch,), int(label), jnp.int32)
    ctx = demo_checkpoint.label_context(table, labels)
    neg = demo_checkpoint.label_context(
        table, jnp.full((batch,), demo_checkpoint.NULL_LABEL, jnp.int32))
    return ctx, neg

  name = "demo" if path == demo_checkpoint.DEMO_CHECKPOINT else os.path.basename(path)
  return LoadedModel(name, wan.WanFamily(config), params["dit"], defaults, make_context, True,
                     num_labels=num_labels)


def load_model(name: str, *, seed: int = 0) -> LoadedModel:
  """A model by name ("demo", "tiny") or the path of a demo export (.safetensors)."""
  if name == "tiny":
    return load_tiny(seed)
  if name == "demo":
    return load_demo()
  if name.endswith(".safetensors"):
    return load_demo(name)
  raise ValueError(f"--model must be one of {NAMED_MODELS} or the path of a demo export "
                   f"(.safetensors), got {name!r}; for a diffusers Wan2.1 folder use --checkpoint")

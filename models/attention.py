"""Attention as the models see it: dense attention, and the hook a sampler hands in.

A model never decides how its self-attention is computed. Every attention call
goes through `self_attention` / `cross_attention` here with the control object
the caller passed (one layer's slice of it under `nn.scan`). With no control,
attention is dense. A control is any object with the two methods of
`AttentionHook` (modjax's `AttentionControl` is one: MOD-DiT, the baselines and
dense backends); `models` never imports its implementation.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import jax
import jax.numpy as jnp

DENSE_IMPLEMENTATIONS = ("xla", "cudnn")


class AttentionHook(Protocol):
  """What a model calls for attention. q, k, v are [B, S, H, D] (after RoPE)."""

  def self_attention(self, q, k, v) -> tuple[jax.Array, dict]:
    """(out [B, S, H, D], per-layer stats dict: arrays stacked over layers by the scan)."""

  def cross_attention(self, q, k, v) -> jax.Array:
    """out [B, S, H, D] of attention to the text context."""


def default_implementation(dtype) -> str:
  """cuDNN for 16-bit inputs on GPU, else XLA."""
  on_gpu = jax.default_backend() == "gpu"
  return "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else "xla"


def check_control_layers(control, num_layers: int, count: Optional[str] = None) -> None:
  """ValueError unless every leaf of control has a leading axis of num_layers (named
  `count` in the error, default "num_layers=<n>")."""
  for leaf in jax.tree.leaves(control):
    if leaf.shape[:1] != (num_layers,):
      raise ValueError(
          f"control leaves need a leading layer axis of {count or f'num_layers={num_layers}'}, "
          f"got a leaf of shape {leaf.shape}")


def dense_attention(q, k, v, *, implementation: Optional[str] = None):
  """Full softmax attention, q/k/v [B, S, H, D] -> [B, S, H, D].

  implementation: "cudnn", "xla", or None (cuDNN for 16-bit inputs on GPU, else XLA).
  """
  if implementation is None:
    implementation = default_implementation(q.dtype)
  if implementation not in DENSE_IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {DENSE_IMPLEMENTATIONS}, got {implementation!r}")
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def self_attention(q, k, v, control: Optional[Any] = None) -> tuple[jax.Array, dict]:
  """One layer's self-attention through the control (dense without one)."""
  if control is None:
    return dense_attention(q, k, v), {}
  return control.self_attention(q, k, v)


def cross_attention(q, k, v, control: Optional[Any] = None) -> jax.Array:
  """One layer's attention to the text context through the control (dense without one)."""
  if control is None:
    return dense_attention(q, k, v)
  return control.cross_attention(q, k, v)

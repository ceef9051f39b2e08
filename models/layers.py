"""Layers the video transformers share: the sinusoidal timestep embedding, float32
norms, diffusers' two-layer embedder MLP and FeedForward, and per-layer tree helpers."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

f32 = jnp.float32


def timestep_embedding(timestep: jnp.ndarray, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: int = 0, max_period: float = 10000.0) -> jnp.ndarray:
  """diffusers' `Timesteps` / `get_timestep_embedding`: [B] -> [B, dim] float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=f32) / (half - freq_shift)
  angles = timestep.astype(f32)[:, None] * jnp.exp(exponent)[None, :]
  emb = [jnp.sin(angles), jnp.cos(angles)]
  return jnp.concatenate(emb[::-1] if flip_sin_to_cos else emb, axis=-1)


def gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


class FP32LayerNorm(nn.Module):
  """LayerNorm over the last axis in float32 (returns float32); affine is optional."""
  eps: float
  affine: bool = False
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x):
    x = x.astype(f32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    if self.affine:
      dim = x.shape[-1]
      y = y * self.param("scale", nn.initializers.ones, (dim,), self.param_dtype).astype(f32)
      y = y + self.param("bias", nn.initializers.zeros, (dim,), self.param_dtype).astype(f32)
    return y


class RMSNorm(nn.Module):
  """RMSNorm with a learned scale, computed in float32, returned in x.dtype."""
  eps: float
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    y = x.astype(f32)
    y = y * jax.lax.rsqrt(jnp.square(y).mean(-1, keepdims=True) + self.eps)
    return (y * scale.astype(f32)).astype(x.dtype)


class MLP(nn.Module):
  """linear_1 -> activation -> linear_2 (diffusers' TimestepEmbedding and
  PixArtAlphaTextProjection)."""
  features: int
  activation: Any
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    dense = lambda name: nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name=name)
    return dense("linear_2")(self.activation(dense("linear_1")(x)))


class FeedForward(nn.Module):
  """proj_in -> activation -> proj_out (diffusers' FeedForward: net.0.proj / net.2)."""
  hidden: int
  features: int
  activation: Any
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    return dense(self.features, "proj_out")(self.activation(dense(self.hidden, "proj_in")(x)))


def layer_slice(tree, i):
  """Layer i of a tree whose leaves have a leading layer axis."""
  return jax.tree.map(lambda a: a[i], tree)


def stack(trees):
  """Per-layer trees -> one tree with a leading layer axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)

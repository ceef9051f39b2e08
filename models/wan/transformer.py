"""Wan2.1 video DiT in Flax Linen, following diffusers' `WanTransformer3DModel`.

Submodules keep diffusers' names (patch_embedding, condition_embedder,
blocks.attn1.to_q, ...) so that weight conversion is a near-identity rename;
`models.wan.convert` holds the few exceptions. Mixed precision follows diffusers:
the residual stream and the matrix products run in `config.dtype`, while
LayerNorms, QK RMSNorms, the time embedder, the adaLN modulation and the gated
residual adds run in float32.

Attention goes through `models.attention` with one layer's slice of the
control the caller handed in (dense without one); the per-layer statistics of
self-attention come back stacked on a leading layer axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention
from models.family import AttentionLayout, ConfigFamily
from models.layers import (MLP, FeedForward, FP32LayerNorm, RMSNorm, gelu_tanh, layer_slice, stack,
                           timestep_embedding)
from models.wan.config import WanConfig
from models.wan.rope import apply_rope, rope_tables

f32 = jnp.float32


# ------------------------------------------------------------------ patches

def patchify(latents: jnp.ndarray, patch_size: tuple[int, int, int]) -> jnp.ndarray:
  """[B, C, F, H, W] -> tokens [B, S, pt*ph*pw*C], frame-major, then row, then column."""
  batch, channels, frames, height, width = latents.shape
  pt, ph, pw = patch_size
  x = latents.reshape(batch, channels, frames // pt, pt, height // ph, ph, width // pw, pw)
  x = x.transpose(0, 2, 4, 6, 3, 5, 7, 1)  # B, F', H', W', pt, ph, pw, C
  return x.reshape(batch, -1, pt * ph * pw * channels)


def unpatchify(tokens: jnp.ndarray, patch_size: tuple[int, int, int],
               grid: tuple[int, int, int]) -> jnp.ndarray:
  """Inverse of `patchify`: [B, S, pt*ph*pw*C] -> [B, C, F, H, W] (diffusers' output order)."""
  batch = tokens.shape[0]
  (pt, ph, pw), (gt, gh, gw) = patch_size, grid
  x = tokens.reshape(batch, gt, gh, gw, pt, ph, pw, -1)
  x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)  # B, C, F', pt, H', ph, W', pw
  return x.reshape(batch, -1, gt * pt, gh * ph, gw * pw)


# ------------------------------------------------------------------- layers

class WanConditionEmbedder(nn.Module):
  """Timestep -> (temb [B, dim], modulation [B, 6, dim]); text -> context [B, L, dim]."""
  config: WanConfig

  @nn.compact
  def __call__(self, timestep, text):
    cfg = self.config
    t = timestep_embedding(timestep, cfg.freq_dim)
    # diffusers keeps the time embedder in float32, then casts to the compute dtype.
    temb = MLP(cfg.dim, nn.silu, f32, cfg.param_dtype, name="time_embedder")(t).astype(cfg.dtype)
    modulation = nn.Dense(6 * cfg.dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                          name="time_proj")(nn.silu(temb))
    context = MLP(cfg.dim, gelu_tanh, cfg.dtype, cfg.param_dtype,
                  name="text_embedder")(text.astype(cfg.dtype))
    return temb, modulation.reshape(-1, 6, cfg.dim), context


class WanAttention(nn.Module):
  """Self-attention (with RoPE) when context is None, else cross-attention to the
  context; both through `models.attention` and the control. QK RMSNorm across heads."""
  config: WanConfig

  @nn.compact
  def __call__(self, x, context=None, rope=None, control=None):
    cfg = self.config
    dense = lambda name: nn.Dense(cfg.dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    kv_input = x if context is None else context
    q = RMSNorm(cfg.eps, cfg.param_dtype, name="norm_q")(dense("to_q")(x))
    k = RMSNorm(cfg.eps, cfg.param_dtype, name="norm_k")(dense("to_k")(kv_input))
    v = dense("to_v")(kv_input)
    heads = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, cfg.head_dim)
    q, k, v = heads(q), heads(k), heads(v)
    if context is None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
      out, stats = attention.self_attention(q, k, v, control)
    else:
      out, stats = attention.cross_attention(q, k, v, control), {}
    out = out.reshape(*x.shape[:2], cfg.dim)
    return dense("to_out")(out), stats


def _table_init(dim):
  return nn.initializers.normal(stddev=dim ** -0.5)


class WanTransformerBlock(nn.Module):
  """adaLN-modulated self-attention, cross-attention and FFN. Returns (x, stats)."""
  config: WanConfig

  @nn.compact
  def __call__(self, x, context, modulation, rope, control):
    cfg = self.config
    table = self.param("scale_shift_table", _table_init(cfg.dim), (1, 6, cfg.dim), cfg.param_dtype)
    shift, scale, gate, c_shift, c_scale, c_gate = jnp.split(
        table.astype(f32) + modulation.astype(f32), 6, axis=1)  # each [B, 1, dim]

    h = FP32LayerNorm(cfg.eps, name="norm1")(x) * (1 + scale) + shift
    out, stats = WanAttention(cfg, name="attn1")(h.astype(cfg.dtype), rope=rope, control=control)
    x = (x.astype(f32) + out.astype(f32) * gate).astype(cfg.dtype)

    h = x
    if cfg.cross_attn_norm:
      h = FP32LayerNorm(cfg.eps, affine=True, param_dtype=cfg.param_dtype, name="norm2")(x)
    out, _ = WanAttention(cfg, name="attn2")(h.astype(cfg.dtype), context=context, control=control)
    x = x + out

    h = FP32LayerNorm(cfg.eps, name="norm3")(x) * (1 + c_scale) + c_shift
    out = FeedForward(cfg.ffn_dim, cfg.dim, gelu_tanh, cfg.dtype, cfg.param_dtype, name="ffn")(
        h.astype(cfg.dtype))
    x = (x.astype(f32) + out.astype(f32) * c_gate).astype(cfg.dtype)
    return x, stats


# -------------------------------------------------------------------- model

class WanDiT(nn.Module):
  """The velocity model: (latents, timestep, text context, control) -> (velocity, stats).

  latents [B, C_in, F, H, W], timestep [B] (or a scalar) in 0..1000, context
  [B, L, text_dim]; control carries the per-layer attention choices with a
  leading layer axis (None: dense). Returns velocity [B, C_out, F, H, W] in
  config.dtype and the per-layer attention statistics stacked [L, ...]
  (an empty dict for dense attention).
  """
  config: WanConfig

  @nn.compact
  def __call__(self, latents, timestep, context,
               control: Optional[attention.AttentionHook] = None):
    cfg = self.config
    if latents.ndim != 5 or latents.shape[1] != cfg.in_channels:
      raise ValueError(
          f"latents must be [B, {cfg.in_channels}, F, H, W], got shape {latents.shape}")
    batch = latents.shape[0]
    timestep = jnp.asarray(timestep)
    if timestep.ndim == 0:
      timestep = jnp.broadcast_to(timestep, (batch,))
    if timestep.shape != (batch,):
      raise ValueError(f"timestep must be [B={batch}] or a scalar, got shape {timestep.shape}")
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.text_dim:
      raise ValueError(
          f"context must be [B={batch}, L, {cfg.text_dim}], got shape {context.shape}")

    attention.check_control_layers(control, cfg.num_layers)

    grid = cfg.grid(*latents.shape[2:])
    rope = rope_tables(grid, cfg.head_dim, max_seq_len=cfg.rope_max_seq_len)

    x = patchify(latents.astype(cfg.dtype), cfg.patch_size)
    x = nn.Dense(cfg.dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="patch_embedding")(x)
    temb, modulation, context = WanConditionEmbedder(cfg, name="condition_embedder")(
        timestep, context)

    block = WanTransformerBlock
    if cfg.remat:
      block = nn.remat(block, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                       length=cfg.num_layers)
      x, stats = blocks(cfg, name="blocks")(x, context, modulation, rope, control)
    else:
      per_layer = []
      for i in range(cfg.num_layers):
        x, layer_stats = block(cfg, name=f"blocks_{i}")(
            x, context, modulation, rope, layer_slice(control, i))
        per_layer.append(layer_stats)
      stats = stack(per_layer)

    table = self.param("scale_shift_table", _table_init(cfg.dim), (1, 2, cfg.dim), cfg.param_dtype)
    shift, scale = jnp.split(table.astype(f32) + temb.astype(f32)[:, None, :], 2, axis=1)
    x = FP32LayerNorm(cfg.eps, name="norm_out")(x) * (1 + scale) + shift
    x = nn.Dense(cfg.out_channels * math.prod(cfg.patch_size), dtype=cfg.dtype,
                 param_dtype=cfg.param_dtype, name="proj_out")(x.astype(cfg.dtype))
    return unpatchify(x, cfg.patch_size, grid), stats


# --------------------------------------------------------------- functional

def _dummy_inputs(config: WanConfig, frames: int, height: int, width: int, text_len: int):
  latents = jnp.zeros((1, config.in_channels, frames, height, width), config.dtype)
  return latents, jnp.zeros((1,), f32), jnp.zeros((1, text_len, config.text_dim), config.dtype)


def init_params(config: WanConfig, rng: jax.Array, frames: int, height: int, width: int,
                text_len: int):
  """Randomly initialised params for latents [*, C, frames, height, width] and
  text [*, text_len, text_dim] (the params themselves do not depend on the sizes)."""
  inputs = _dummy_inputs(config, frames, height, width, text_len)
  return jax.jit(WanDiT(config).init)(rng, *inputs)["params"]


def param_shapes(config: WanConfig):
  """The params pytree as `jax.ShapeDtypeStruct`s, without allocating anything."""
  pt, ph, pw = config.patch_size
  inputs = _dummy_inputs(config, pt, ph, pw, 1)
  return jax.eval_shape(WanDiT(config).init, jax.random.key(0), *inputs)["params"]


def apply(config: WanConfig, params, latents, timestep, context,
          control: Optional[attention.AttentionHook] = None):
  """Pure forward: returns (velocity [B, C_out, F, H, W], stats stacked [L, ...])."""
  return WanDiT(config).apply({"params": params}, latents, timestep, context, control)


# ------------------------------------------------------------------- family

@dataclasses.dataclass(frozen=True)
class WanFamily(ConfigFamily):
  """Wan2.1 behind the `models.family.Family` protocol: self-attention over the
  video tokens alone (text enters through cross-attention), velocity output."""
  config: WanConfig
  name: str = "wan"

  def attention_layout(self, frames: int, height: int, width: int) -> AttentionLayout:
    cfg = self.config
    tokens = cfg.tokens(frames, height, width)
    return AttentionLayout(num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                           head_dim=cfg.head_dim, seq_len=tokens, video_start=0,
                           video_tokens=tokens,
                           tokens_per_frame=cfg.tokens_per_frame(height, width))

  def apply(self, params, latents, timestep, context, control=None):
    return apply(self.config, params, latents, timestep, context, control)

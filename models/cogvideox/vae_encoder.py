"""The CogVideoX video VAE encoder (diffusers' `AutoencoderKLCogVideoX.encode`) in Flax.

Video [B, in_channels, F, H, W] in [-1, 1] -> the latent Gaussian's (mean,
logvar) [B, latent_channels, F_lat, H/8, W/8]. Chunked in time as diffusers'
`_encode`: the first chunk holds the first 8 + F % 8 frames (all of them when
F < 8), every later chunk 8, the conv cache carried between them (one
`jax.lax.scan` over the later chunks). As in the decoder (models.cogvideox.vae,
whose layers this reuses), the chunking is part of the math: group norms see
one chunk, and the time downsampling (average of frame pairs) keeps an odd
chunk's first frame apart. So F = 49 (9 + 5 x 8) gives 3 + 5 x 2 = 13 latent
frames. diffusers' pipelines multiply a sample (or the mean) by
config.scaling_factor to get the DiT's latents.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.cogvideox.vae import (
    CausalConv3d,
    CogVideoXVAEConfig,
    Conv,
    GroupNorm,
    ResnetBlock3D,
    _chunks,
    channels_last,
    run_chunked,
    f32,
)

SAMPLE_FRAMES_PER_CHUNK = 8  # diffusers' num_sample_frames_batch_size
_NORM_OUT_EPS = 1e-6         # the encoder's norm_out eps (fixed, whatever norm_eps says)
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


def _downsampled_frames(t: int, blocks: int) -> int:
  for _ in range(blocks):
    t = 1 + (t - 1) // 2 if t % 2 else t // 2
  return t


def latent_frames(config: CogVideoXVAEConfig, frames: int) -> int:
  """Latent frames `encode` gives for a video of `frames` frames (49 -> 13)."""
  if frames < 1:
    raise ValueError(f"frames must be >= 1, got {frames}")
  first, later = _chunks(frames, SAMPLE_FRAMES_PER_CHUNK)
  blocks = config.time_upsampling_blocks
  return (_downsampled_frames(first, blocks)
          + later * _downsampled_frames(SAMPLE_FRAMES_PER_CHUNK, blocks))


class Downsample3D(nn.Module):
  """diffusers' CogVideoXDownsample3D: with compress_time, average frame pairs
  (an odd chunk's first frame kept as is), then pad right/bottom by one and a
  per-frame 3x3 stride-2 `conv`."""
  features: int
  compress_time: bool
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x):
    b, t, h, w, c = x.shape
    if self.compress_time:
      head, rest = (x[:, :1], x[:, 1:]) if t % 2 else (x[:, :0], x)
      if rest.shape[1]:
        pairs = rest.reshape(b, rest.shape[1] // 2, 2, h, w, c)
        pairs = pairs.astype(jnp.promote_types(x.dtype, f32))
        rest = ((pairs[:, :, 0] + pairs[:, :, 1]) / 2).astype(x.dtype)
      x = jnp.concatenate([head, rest], axis=1)
      t = x.shape[1]
    y = Conv(self.features, (3, 3), ((0, 1), (0, 1)), self.dtype, self.param_dtype, stride=2,
             name="conv")(x.reshape(b * t, h, w, c))
    return y.reshape(b, t, *y.shape[1:])


class DownBlock3D(nn.Module):
  """diffusers' CogVideoXDownBlock3D / CogVideoXMidBlock3D (encoder side, group
  norms): `num_layers` resnets, then `downsamplers_0` unless downsample is None
  (else it says whether time halves too)."""
  features: int
  num_layers: int
  groups: int
  eps: float
  downsample: Any = None
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x, first: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = ResnetBlock3D(self.features, self.groups, self.eps, name=f"resnets_{j}", **kw)(
          x, None, first)
    if self.downsample is not None:
      x = Downsample3D(self.features, self.downsample, name="downsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  """diffusers' CogVideoXEncoder3D: one video chunk [B, t, H, W, in_channels] ->
  [B, t', H/8, W/8, 2 latent_channels] (mean and logvar, unclamped)."""
  config: CogVideoXVAEConfig

  @nn.compact
  def __call__(self, x, first: bool):
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    groups, eps, chans = cfg.norm_num_groups, cfg.norm_eps, cfg.block_out_channels
    x = CausalConv3d(chans[0], 3, name="conv_in", **kw)(x, first)
    for i, c in enumerate(chans):
      downsample = i < cfg.time_upsampling_blocks if i < len(chans) - 1 else None
      x = DownBlock3D(c, cfg.layers_per_block, groups, eps, downsample, name=f"down_blocks_{i}",
                      **kw)(x, first)
    x = DownBlock3D(chans[-1], 2, groups, eps, name="mid_block", **kw)(x, first)
    x = nn.silu(GroupNorm(groups, _NORM_OUT_EPS, name="norm_out", **kw)(x))
    return CausalConv3d(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x, first)


@functools.partial(jax.jit, static_argnums=0)
def _init(config: CogVideoXVAEConfig, key) -> dict:
  x = jnp.zeros((1, 1, 8, 8, config.in_channels), config.dtype)
  return {"encoder": Encoder(config).init(key, x, True)["params"]}


@functools.lru_cache(maxsize=32)
def param_shapes(config: CogVideoXVAEConfig) -> dict:
  """{"encoder": ...} as jax.ShapeDtypeStruct leaves (no allocation); read-only."""
  return jax.eval_shape(_init, config, jax.random.key(0))


def encode(config: CogVideoXVAEConfig, params, video) -> tuple[jax.Array, jax.Array]:
  """Video [B, in_channels, F, H, W] in [-1, 1] -> (mean, logvar), float32
  [B, latent_channels, latent_frames(F), H/8, W/8], logvar clamped to [-30, 20]
  as diffusers' DiagonalGaussianDistribution. Not multiplied by scaling_factor.
  jit-able (config static); reads params["encoder"]."""
  x = channels_last(video, "video", config.in_channels, "F, H, W", config.dtype)
  y = run_chunked(Encoder(config), params["encoder"], x, SAMPLE_FRAMES_PER_CHUNK)
  h = jnp.transpose(y.astype(jnp.promote_types(config.dtype, f32)), (0, 4, 1, 2, 3))
  mean, logvar = jnp.split(h, 2, axis=1)
  return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

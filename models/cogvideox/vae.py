"""The CogVideoX video VAE decoder (diffusers' `AutoencoderKLCogVideoX`) in Flax Linen.

Latents [B, latent_channels, F, h, w] decode to video [B, out_channels, F', 8h, 8w]
(for CogVideoX's 4 blocks; 2^(blocks - 1) in general). The decoder runs chunk by
chunk in time, exactly as diffusers' `_decode`: the first chunk holds the first
2 + F % 2 latent frames (all of them when F < 2), every later chunk 2. A chunk
sees the past only through the conv cache: every causal conv with a temporal
kernel of 3 keeps the last two frames of its (padded) input; the first chunk
pads time by repeating its first frame twice instead. The later chunks run in
one `jax.lax.scan` carrying the cache, so the network is traced twice (first
chunk, later chunk) for any F.

The chunking is part of the math, not only a memory saving: group norms take
their statistics over one chunk's frames, and the zq-conditioned norms and the
time upsampling treat an odd chunk's first frame apart. With CogVideoX's two
time-doubling blocks an odd chunk of t frames gives 1 + 4 (t - 1) video frames
(t = 1: one), an even one 4t, so F = 13 latent frames give 9 + 5 * 8 = 49
frames (`video_frames`).

The config and the layers here are shared with the encoder
(models.cogvideox.vae_encoder).

Modules keep diffusers' names, a list index written `_i`
(`decoder.up_blocks_0.resnets_1.norm1.conv_y.conv` is
`decoder.up_blocks.0.resnets.1.norm1.conv_y.conv`), so conversion
(`models.cogvideox.vae_convert`) is a rename plus kernel transposes.
Activations are channels-last [B, T, H, W, C] inside. Mixed precision:
convolutions and residual adds run in `config.dtype`, group norms in float32;
the decoded video is float32 (float64 under dtype float64, which exists only to
check the port's exactness against diffusers in float64).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import validate

f32 = jnp.float32
DTYPES = ("float32", "bfloat16", "float64")  # float64: exactness tests only
LATENT_FRAMES_PER_CHUNK = 2  # diffusers' num_latent_frames_batch_size
_NORM_EPS = 1e-6  # CogVideoXSpatialNorm3D's GroupNorm eps (fixed, whatever norm_eps says)


def _dtype(name: str, value: Any) -> np.dtype:
  return validate.dtype("CogVideoXVAEConfig", name, value, DTYPES)


def _positive_int(name: str, value: Any) -> int:
  return validate.integer("CogVideoXVAEConfig", name, value)


@dataclasses.dataclass(frozen=True)
class CogVideoXVAEConfig:
  """The shape of a CogVideoX VAE (CogVideoX-2b, -5b and 1.5 share the defaults).

  block_out_channels: per encoder block; the decoder runs them reversed, each up
    block with layers_per_block + 1 resnets and a 2x upsample except the last.
  temporal_compression_ratio: 2^k; the first k up blocks also double time.
  scaling_factor: the pipeline divides the DiT's latents by it before `decode`.
  norm_eps is the encoder's; the decoder's norms use 1e-6 (as diffusers).
  dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 16
  block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
  layers_per_block: int = 3
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  temporal_compression_ratio: int = 4
  scaling_factor: float = 1.15258426
  invert_scale_latents: bool = False
  param_dtype: Any = "float32"
  dtype: Any = "float32"

  def __post_init__(self):
    for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block",
                 "norm_num_groups", "temporal_compression_ratio"):
      object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
    chans = self.block_out_channels
    if isinstance(chans, (str, bytes)) or not isinstance(chans, Sequence) or not chans:
      raise ValueError(f"CogVideoXVAEConfig.block_out_channels must be a non-empty sequence of "
                       f"positive ints, got {chans!r}")
    chans = tuple(_positive_int("block_out_channels", c) for c in chans)
    object.__setattr__(self, "block_out_channels", chans)
    bad = [c for c in chans if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"CogVideoXVAEConfig.block_out_channels {chans} must be multiples of "
                       f"norm_num_groups = {self.norm_num_groups}")
    ratio = self.temporal_compression_ratio
    if ratio & (ratio - 1):
      raise ValueError(f"CogVideoXVAEConfig.temporal_compression_ratio must be a power of 2, "
                       f"got {ratio}")
    for name in ("norm_eps", "scaling_factor"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"CogVideoXVAEConfig.{name} must be a number > 0, got {value!r}")
      object.__setattr__(self, name, float(value))
    object.__setattr__(self, "invert_scale_latents", bool(self.invert_scale_latents))
    object.__setattr__(self, "param_dtype", _dtype("param_dtype", self.param_dtype))
    object.__setattr__(self, "dtype", _dtype("dtype", self.dtype))

  @property
  def spatial_factor(self) -> int:
    """Pixels per latent pixel along H and W (8 for CogVideoX)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def time_upsampling_blocks(self) -> int:
    """How many up blocks double time (diffusers' compress_time; 2 for CogVideoX)."""
    level = int(np.log2(self.temporal_compression_ratio))
    return min(level, len(self.block_out_channels) - 1)


# ------------------------------------------------------------------ sizes

def _upsampled_frames(t: int, blocks: int) -> int:
  """Frames after `blocks` time-doubling upsamples of a t-frame chunk (odd: the
  first frame is not doubled; one frame stays one)."""
  for _ in range(blocks):
    t = t if t == 1 else (1 + 2 * (t - 1) if t % 2 else 2 * t)
  return t


def _chunks(frames: int, k: int = LATENT_FRAMES_PER_CHUNK) -> tuple[int, int]:
  """(frames of the first chunk, number of later chunks of k frames), as diffusers'
  `_decode` / `_encode` split them: the first takes the remainder F % k too."""
  first = min(frames, k + frames % k)
  return first, (frames - first) // k


def video_frames(config: CogVideoXVAEConfig, latent_frames: int) -> int:
  """Video frames `decode` gives for latent_frames (13 -> 49 for CogVideoX)."""
  if latent_frames < 1:
    raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
  first, later = _chunks(latent_frames)
  blocks = config.time_upsampling_blocks
  return (_upsampled_frames(first, blocks)
          + later * _upsampled_frames(LATENT_FRAMES_PER_CHUNK, blocks))


def video_shape(config: CogVideoXVAEConfig, latent_shape) -> tuple[int, ...]:
  """Shape of `decode`'s video for latents of latent_shape [B, C, F, h, w]."""
  b, _, frames, h, w = latent_shape
  s = config.spatial_factor
  return (b, config.out_channels, video_frames(config, frames), h * s, w * s)


# ------------------------------------------------------------------ layers

class Conv(nn.Module):
  """A plain N-d convolution on channels-last input, zero `padding` per spatial
  axis ((lo, hi) pairs), `stride` on every axis. Params `kernel`
  [*kernel_size, in, out] and `bias`."""
  features: int
  kernel_size: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  dtype: Any = f32
  param_dtype: Any = f32
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    n = len(self.kernel_size)
    spec = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}[n]
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (self.stride,) * n,
                                     self.padding, dimension_numbers=spec)
    return y + bias.astype(self.dtype)


class CausalConv3d(nn.Module):
  """diffusers' CogVideoXCausalConv3d (pad_mode "first"): zero spatial padding,
  and in time kt - 1 frames in front of the chunk: its first frame repeated on
  the first chunk, else the cache (the last kt - 1 frames of the previous
  chunk's padded input). Its conv is the child `conv`, as in diffusers."""
  features: int
  kernel_size: int = 3
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x, first: bool):
    k = self.kernel_size
    x = x.astype(self.dtype)
    if k > 1:
      b, _, h, w, c = x.shape
      cache = self.variable("cache", "history", jnp.zeros, (b, k - 1, h, w, c), self.dtype)
      front = jnp.repeat(x[:, :1], k - 1, axis=1) if first else cache.value
      x = jnp.concatenate([front, x], axis=1)
      cache.value = x[:, -(k - 1):]
    p = (k - 1) // 2
    return Conv(self.features, (k, k, k), ((0, 0), (p, p), (p, p)), self.dtype,
                self.param_dtype, name="conv")(x)


class GroupNorm(nn.Module):
  """torch GroupNorm on [B, T, H, W, C]: statistics per sample and channel group
  over (T, H, W, C / groups), in float32; params `weight`, `bias`."""
  groups: int
  eps: float
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    weight = self.param("weight", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    norm_dtype = jnp.promote_types(self.dtype, f32)
    g = x.astype(norm_dtype).reshape(*x.shape[:-1], self.groups, c // self.groups)
    axes = (1, 2, 3, 5)
    mean = jnp.mean(g, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * weight.astype(norm_dtype) + bias.astype(norm_dtype)).astype(self.dtype)


def _nearest(x, size: tuple[int, int, int]):
  """torch's F.interpolate(mode="nearest") of [B, T, H, W, C] to (T', H', W'):
  source index floor(i * n / n')."""
  for axis, m in zip((1, 2, 3), size):
    n = x.shape[axis]
    if m == n:
      continue
    if m % n == 0:
      x = jnp.repeat(x, m // n, axis=axis)
    else:
      x = jnp.take(x, (np.arange(m) * n) // m, axis=axis)
  return x


class SpatialNorm3D(nn.Module):
  """diffusers' CogVideoXSpatialNorm3D: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq
  resized (nearest) to f. When f has an odd number of frames > 1, zq's first
  frame is resized to f's first frame alone and the rest to the rest."""
  groups: int
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, f, zq, first: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    t, h, w = f.shape[1:4]
    if t > 1 and t % 2:
      zq = jnp.concatenate([_nearest(zq[:, :1], (1, h, w)),
                            _nearest(zq[:, 1:], (t - 1, h, w))], axis=1)
    else:
      zq = _nearest(zq, (t, h, w))
    c = f.shape[-1]
    y = CausalConv3d(c, 1, name="conv_y", **kw)(zq, first)
    b = CausalConv3d(c, 1, name="conv_b", **kw)(zq, first)
    return GroupNorm(self.groups, _NORM_EPS, name="norm_layer", **kw)(f) * y + b


class ResnetBlock3D(nn.Module):
  """diffusers' CogVideoXResnetBlock3D without time embedding:
  norm1-silu-conv1-norm2-silu-conv2 plus the input (through a 1x1x1
  `conv_shortcut` when the width changes). The norms are SpatialNorm3D on zq
  (the decoder's) or, when zq is None, GroupNorm of `eps` (the encoder's).
  Dropout is inference-off."""
  features: int
  groups: int
  eps: float = _NORM_EPS
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x, zq, first: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def norm(name, h):
      if zq is None:
        return GroupNorm(self.groups, self.eps, name=name, **kw)(h)
      return SpatialNorm3D(self.groups, name=name, **kw)(h, zq, first)

    h = CausalConv3d(self.features, 3, name="conv1", **kw)(nn.silu(norm("norm1", x)), first)
    h = CausalConv3d(self.features, 3, name="conv2", **kw)(nn.silu(norm("norm2", h)), first)
    if x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1, 1), ((0, 0),) * 3, name="conv_shortcut", **kw)(x)
    return h + x.astype(self.dtype)


class Upsample3D(nn.Module):
  """diffusers' CogVideoXUpsample3D: nearest 2x in H and W (and, with
  compress_time, in time, except a lone frame and an odd chunk's first frame),
  then a per-frame 3x3 `conv`."""
  features: int
  compress_time: bool
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x):
    b, t, h, w, c = x.shape
    if self.compress_time and t > 1:
      if t % 2:
        x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 2, axis=1)], axis=1)
      else:
        x = jnp.repeat(x, 2, axis=1)
      t = x.shape[1]
    x = jnp.broadcast_to(x[:, :, :, None, :, None, :], (b, t, h, 2, w, 2, c))
    x = x.reshape(b * t, 2 * h, 2 * w, c)
    y = Conv(self.features, (3, 3), ((1, 1), (1, 1)), self.dtype, self.param_dtype,
             name="conv")(x)
    return y.reshape(b, t, *y.shape[1:])


class UpBlock3D(nn.Module):
  """diffusers' CogVideoXMidBlock3D / CogVideoXUpBlock3D (decoder side):
  `num_layers` resnets to `features`, then `upsamplers_0` unless upsample is None
  (else it says whether time doubles too)."""
  features: int
  num_layers: int
  groups: int
  upsample: Any = None
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x, zq, first: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = ResnetBlock3D(self.features, self.groups, name=f"resnets_{j}", **kw)(x, zq, first)
    if self.upsample is not None:
      x = Upsample3D(self.features, self.upsample, name="upsamplers_0", **kw)(x)
    return x


class Decoder(nn.Module):
  """diffusers' CogVideoXDecoder3D: one latent chunk [B, t, h, w, latent_channels]
  -> video [B, t', 8h, 8w, out_channels] (see `video_frames`). `first`: the
  chunk has no past (time padding repeats its first frame)."""
  config: CogVideoXVAEConfig

  @nn.compact
  def __call__(self, z, first: bool):
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    groups = cfg.norm_num_groups
    chans = cfg.block_out_channels[::-1]
    z = z.astype(cfg.dtype)
    x = CausalConv3d(chans[0], 3, name="conv_in", **kw)(z, first)
    x = UpBlock3D(chans[0], 2, groups, name="mid_block", **kw)(x, z, first)
    for i, c in enumerate(chans):
      upsample = i < cfg.time_upsampling_blocks if i < len(chans) - 1 else None
      x = UpBlock3D(c, cfg.layers_per_block + 1, groups, upsample, name=f"up_blocks_{i}",
                    **kw)(x, z, first)
    x = nn.silu(SpatialNorm3D(groups, name="norm_out", **kw)(x, z, first))
    return CausalConv3d(cfg.out_channels, 3, name="conv_out", **kw)(x, first)


# --------------------------------------------------------------- parameters

@functools.partial(jax.jit, static_argnums=0)
def _init(config: CogVideoXVAEConfig, key) -> dict:
  z = jnp.zeros((1, 1, 1, 1, config.latent_channels), config.dtype)
  return {"decoder": Decoder(config).init(key, z, True)["params"]}


def init_params(config: CogVideoXVAEConfig, key) -> dict:
  """Fresh params {"decoder": ...} in param_dtype."""
  return _init(config, key)


@functools.lru_cache(maxsize=32)
def param_shapes(config: CogVideoXVAEConfig) -> dict:
  """The params tree as jax.ShapeDtypeStruct leaves (no allocation); read-only."""
  return jax.eval_shape(_init, config, jax.random.key(0))


# ------------------------------------------------------------------ decode

def channels_last(array, name: str, channels: int, axes: str, dtype) -> jax.Array:
  """[B, channels, F, H, W] (checked; ValueError names `name` and the shape) ->
  [B, F, H, W, channels] in dtype."""
  x = jnp.asarray(array)
  if x.ndim != 5 or x.shape[1] != channels:
    raise ValueError(f"{name} must be [B, {channels}, {axes}], got shape {tuple(x.shape)}")
  if min(x.shape) < 1:
    raise ValueError(f"{name} must have B, {axes} >= 1, got shape {tuple(x.shape)}")
  return jnp.transpose(x, (0, 2, 3, 4, 1)).astype(dtype)


def run_chunked(module: nn.Module, params, x, k: int) -> jax.Array:
  """The causal module over x [B, F, H, W, C] in time chunks as diffusers batches frames:
  the first `_chunks(F, k)[0]` frames (first=True), then chunks of k, the convolutions'
  cache carried from chunk to chunk (a lax.scan); outputs concatenated in time."""
  b, frames, h, w = x.shape[:4]
  n0, later = _chunks(frames, k)

  def chunk(cache, z, first: bool):
    variables = {"params": params} if cache is None else {"params": params, "cache": cache}
    y, state = module.apply(variables, z, first, mutable=["cache"])
    return y, state["cache"]

  y, cache = chunk(None, x[:, :n0], True)
  pieces = [y]
  if later:
    chunks = x[:, n0:].reshape(b, later, k, h, w, -1).swapaxes(0, 1)

    def step(cache, z):
      y, cache = chunk(cache, z, False)
      return cache, y

    _, ys = jax.lax.scan(step, cache, chunks)  # [later, B, t', H, W, C]
    pieces.append(ys.swapaxes(0, 1).reshape(b, -1, *ys.shape[3:]))
  return jnp.concatenate(pieces, axis=1)


def decode(config: CogVideoXVAEConfig, params, latents) -> jax.Array:
  """Latents [B, latent_channels, F, h, w], ALREADY divided by
  config.scaling_factor (diffusers' pipeline decodes `latents / scaling_factor`),
  -> video float32 [B, out_channels, video_frames(F), 8h, 8w] (float64 for
  dtype float64), nominally in [-1, 1] but not clamped (diffusers'
  `vae.decode(z).sample` is not; its video processor clamps). Chunked in time as diffusers' `_decode` (module docstring).
  jit-able (config static); reads params["decoder"]."""
  x = channels_last(latents, "latents", config.latent_channels, "F, h, w", config.dtype)
  video = run_chunked(Decoder(config), params["decoder"], x, LATENT_FRAMES_PER_CHUNK)
  video = video.astype(jnp.promote_types(config.dtype, f32))
  return jnp.transpose(video, (0, 4, 1, 2, 3))

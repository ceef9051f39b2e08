"""The Wan2.1 video VAE (diffusers' `AutoencoderKLWan`) in Flax Linen.

A video [B, 3, F, H, W] (F = 4k + 1) encodes to latents [B, z_dim, 1 + k, H/8, W/8]
and decodes back. Both directions run chunk by chunk, as diffusers does: the
encoder sees the first frame alone, then 4 frames at a time; the decoder one
latent frame at a time (the first gives 1 frame, every later one 4). A chunk
sees the past only through a temporal feature cache, so memory is one chunk's
activations plus the cache, whatever the length: that is what lets 81 frames
at 1280x720 decode on one GPU. After the first chunk (its own step), the
remaining chunks run in ONE `jax.lax.scan` whose carry is the whole cache, with
fixed shapes, so the network is traced once for any length.

The cache. Every causal conv with a temporal kernel of 3 keeps the last two
frames of its input ('history', zeros before the first chunk): it convolves
concat(history, x) with no other temporal padding, and keeps the last two
frames of that. This reproduces diffusers' `feat_cache` exactly: there the
first chunk pads two zero frames, and later ones concatenate the one or two
frames cached and zero-pad the rest. Two resampling convs differ:
  - upsample3d's time_conv does not run on the first decoder chunk (diffusers
    marks its cache "Rep"); its history stays zero, so the second chunk sees
    causal zero padding, as diffusers' `time_conv(x)` does.
  - downsample3d's time_conv (kernel 3, stride 2, unpadded) keeps one frame; on
    the first encoder chunk it only stores that frame (diffusers caches x and
    skips the conv).
The cache is the Flax variable collection 'cache'; its tree mirrors the
params' (`...conv1.history`).

Modules keep diffusers' names, with a list index written `_i`
(`decoder.up_blocks_0.upsamplers_0.resample_1` is
`decoder.up_blocks.0.upsamplers.0.resample.1`), so conversion
(`models.wan.vae_convert`) is a rename plus kernel transposes. Activations are
channels-last [B, T, H, W, C] inside; the public functions take and return
diffusers' [B, C, T, H, W]. Mixed precision: convolutions, attention products
and residual adds run in `config.dtype`; RMS norms and softmax in float32 (as
diffusers does for bf16); the decoded video is float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import validate
from models.weights import parse_config

f32 = jnp.float32
DTYPES = ("float32", "bfloat16")
CHUNK_FRAMES = 4  # video frames per encoder chunk after the first (diffusers' _encode)
_HISTORY = 2      # frames a temporal-kernel-3 causal conv keeps (diffusers' CACHE_T)
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp

# Wan2.1's latent statistics (the vae/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers
# and -14B-Diffusers; also AutoencoderKLWan's defaults).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# diffusers 0.42.1 AutoencoderKLWan.__init__ arguments and their defaults (every
# key its save_pretrained writes, besides the "_" bookkeeping ones).
_DIFFUSERS_DEFAULTS = {
    "base_dim": 96,
    "decoder_base_dim": None,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": list(WAN21_LATENTS_MEAN),
    "latents_std": list(WAN21_LATENTS_STD),
    "is_residual": False,
    "in_channels": 3,
    "out_channels": 3,
    "patch_size": None,
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 8,
}
_DIFFUSERS_CLASS = "AutoencoderKLWan"


_dtype = functools.partial(validate.dtype, "WanVAEConfig", allowed=DTYPES)
_positive_int = functools.partial(validate.integer, "WanVAEConfig")


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """The shape of a Wan2.1 video VAE (`AutoencoderKLWan` with is_residual=False).

  base_dim / decoder_base_dim: channels of the first encoder / last decoder
    stage (decoder_base_dim None = base_dim); stage i has dim * dim_mult[i].
  temporal_downsample: per encoder stage boundary, whether time halves there
    (diffusers' `temperal_downsample`); the decoder mirrors it. Exactly two, so
    the temporal factor is 4, which diffusers' 4-frame chunks assume.
  latents_mean / latents_std: per-channel statistics that `normalize_latents` /
    `denormalize_latents` use (the DiT works on normalized latents).
  dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """

  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = WAN21_LATENTS_STD
  decoder_base_dim: Optional[int] = None
  in_channels: int = 3
  out_channels: int = 3
  param_dtype: Any = "float32"
  dtype: Any = "float32"

  def __post_init__(self):
    for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
      object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
    if self.decoder_base_dim is None:
      object.__setattr__(self, "decoder_base_dim", self.base_dim)
    object.__setattr__(self, "decoder_base_dim",
                       _positive_int("decoder_base_dim", self.decoder_base_dim))
    if isinstance(self.dim_mult, (str, bytes)) or not isinstance(self.dim_mult, Sequence):
      raise ValueError(f"WanVAEConfig.dim_mult must be a sequence of positive ints, "
                       f"got {self.dim_mult!r}")
    mult = tuple(_positive_int("dim_mult", m) for m in self.dim_mult)
    if len(mult) < 3:
      raise ValueError(f"WanVAEConfig.dim_mult needs at least 3 stages (two temporal "
                       f"downsamples), got {self.dim_mult!r}")
    object.__setattr__(self, "dim_mult", mult)
    down = self.temporal_downsample
    if (isinstance(down, (str, bytes)) or not isinstance(down, Sequence)
        or not all(isinstance(d, (bool, np.bool_)) for d in down)):
      raise ValueError(f"WanVAEConfig.temporal_downsample must be a sequence of bools, "
                       f"got {down!r}")
    down = tuple(bool(d) for d in down)
    if len(down) != len(mult) - 1:
      raise ValueError(
          f"WanVAEConfig.temporal_downsample must have len(dim_mult) - 1 = {len(mult) - 1} "
          f"entries (one per stage boundary), got {len(down)}: {down}")
    if sum(down) != 2:
      raise ValueError(
          f"WanVAEConfig.temporal_downsample must halve time exactly twice (temporal "
          f"factor 4, which diffusers' 4-frame encoder chunks assume), got {down}")
    object.__setattr__(self, "temporal_downsample", down)
    for name in ("latents_mean", "latents_std"):
      values = getattr(self, name)
      try:
        values = tuple(float(v) for v in values)
      except (TypeError, ValueError):
        raise ValueError(f"WanVAEConfig.{name} must be {self.z_dim} floats, "
                         f"got {getattr(self, name)!r}") from None
      if len(values) != self.z_dim:
        raise ValueError(f"WanVAEConfig.{name} must have z_dim = {self.z_dim} entries, "
                         f"got {len(values)}")
      object.__setattr__(self, name, values)
    if not all(s > 0 for s in self.latents_std):
      raise ValueError(f"WanVAEConfig.latents_std must be > 0, got {self.latents_std}")
    object.__setattr__(self, "param_dtype", _dtype("param_dtype", self.param_dtype))
    object.__setattr__(self, "dtype", _dtype("dtype", self.dtype))

  # ---------------------------------------------------------------- presets

  @classmethod
  def wan2_1(cls, **overrides) -> WanVAEConfig:
    """The VAE of Wan2.1-T2V-1.3B and -14B (one and the same). float32 by default,
    as diffusers' Wan examples load it; pass dtype="bfloat16" to halve memory."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides) -> WanVAEConfig:
    """The real structure (4 stages, two temporal halvings, attention mid blocks)
    at base_dim 8 and z_dim 4: a CPU-fast stand-in."""
    return cls(**{**dict(base_dim=8, z_dim=4, num_res_blocks=1,
                         latents_mean=(0.1, -0.2, 0.3, -0.4),
                         latents_std=(1.5, 0.5, 2.0, 1.0)),
                  **overrides})

  # ------------------------------------------------------------ derived sizes

  @property
  def spatial_factor(self) -> int:
    """Pixels per latent pixel along H and W (8 for Wan2.1)."""
    return 2 ** (len(self.dim_mult) - 1)

  @property
  def temporal_factor(self) -> int:
    """Video frames per latent frame after the first (4)."""
    return 2 ** sum(self.temporal_downsample)

  def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple[int, ...]:
    """Shape of `encode`'s mean for a video [batch, in_channels, frames, height, width]."""
    _check_video_sizes(self, frames, height, width)
    f = self.spatial_factor
    return (batch, self.z_dim, 1 + (frames - 1) // self.temporal_factor, height // f, width // f)

  def video_shape(self, batch: int, frames: int, height: int, width: int) -> tuple[int, ...]:
    """Shape of `decode`'s video for latents [batch, z_dim, frames, height, width]."""
    f = self.spatial_factor
    return (batch, self.out_channels, 1 + self.temporal_factor * (frames - 1), height * f,
            width * f)

  # ------------------------------------------------------------- diffusers

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> WanVAEConfig:
    """From an `AutoencoderKLWan` config.json dict; overrides set our own fields
    (dtype, param_dtype). Wan2.2's options are refused with the supported value."""
    cfg = parse_config(config, _DIFFUSERS_DEFAULTS, where="diffusers VAE config",
                       class_names=(_DIFFUSERS_CLASS,))
    if cfg["is_residual"] is not False:
      raise ValueError(f"diffusers VAE config key 'is_residual'={cfg['is_residual']!r} "
                       f"(the Wan2.2 VAE) is not supported; only False is")
    if cfg["patch_size"] not in (None, 1):
      raise ValueError(f"diffusers VAE config key 'patch_size'={cfg['patch_size']!r} "
                       f"(the Wan2.2 VAE) is not supported; only None is")
    if list(cfg["attn_scales"] or []) != []:
      raise ValueError(f"diffusers VAE config key 'attn_scales'={cfg['attn_scales']!r} is "
                       f"not supported; only [] is (Wan2.1)")
    out = cls(
        base_dim=cfg["base_dim"],
        decoder_base_dim=cfg["decoder_base_dim"],
        z_dim=cfg["z_dim"],
        dim_mult=tuple(cfg["dim_mult"]),
        num_res_blocks=cfg["num_res_blocks"],
        temporal_downsample=tuple(cfg["temperal_downsample"]),
        latents_mean=tuple(cfg["latents_mean"]),
        latents_std=tuple(cfg["latents_std"]),
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        **overrides,
    )
    # dropout only acts in training; these two are derived sizes diffusers stores.
    for key, value in (("scale_factor_temporal", out.temporal_factor),
                       ("scale_factor_spatial", out.spatial_factor)):
      if cfg[key] is not None and cfg[key] != value:
        raise ValueError(f"diffusers VAE config key {key!r}={cfg[key]!r} does not match the "
                         f"architecture, which gives {value}")
    return out

  def to_diffusers_config(self) -> dict[str, Any]:
    """The `AutoencoderKLWan` config.json dict (without bookkeeping keys)."""
    return {
        "base_dim": self.base_dim,
        "decoder_base_dim": None if self.decoder_base_dim == self.base_dim
                            else self.decoder_base_dim,
        "z_dim": self.z_dim,
        "dim_mult": list(self.dim_mult),
        "num_res_blocks": self.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(self.temporal_downsample),
        "dropout": 0.0,
        "latents_mean": list(self.latents_mean),
        "latents_std": list(self.latents_std),
        "is_residual": False,
        "in_channels": self.in_channels,
        "out_channels": self.out_channels,
        "patch_size": None,
        "scale_factor_temporal": self.temporal_factor,
        "scale_factor_spatial": self.spatial_factor,
    }


# ------------------------------------------------------------------- layers

_DN3 = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")


class CausalConv3d(nn.Module):
  """diffusers' WanCausalConv3d on [B, T, H, W, C]: zero spatial padding
  `spatial_padding`, and in time either nothing (kernel 1) or `history` cached
  frames in front of the chunk (see the module docstring). With store_only the
  history is updated and nothing is computed (returns None)."""
  features: int
  kernel_size: tuple[int, int, int]
  spatial_padding: int = 0
  time_stride: int = 1
  history: int = 0
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x, store_only: bool = False):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x = x.astype(self.dtype)
    if self.history:
      b, _, h, w, c = x.shape
      cache = self.variable("cache", "history", jnp.zeros, (b, self.history, h, w, c),
                            self.dtype)
      x = jnp.concatenate([cache.value, x], axis=1)
      cache.value = x[:, -self.history:]
    if store_only:
      return None
    p = self.spatial_padding
    y = jax.lax.conv_general_dilated(x, kernel.astype(self.dtype), (self.time_stride, 1, 1),
                                     ((0, 0), (p, p), (p, p)), dimension_numbers=_DN3)
    return y + bias.astype(self.dtype)


class Conv2d(nn.Module):
  """A per-frame 2D convolution on [N, H, W, C] with explicit (low, high) padding."""
  features: int
  kernel_size: tuple[int, int]
  stride: int = 1
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype),
                                     (self.stride, self.stride), self.padding,
                                     dimension_numbers=_DN2)
    return y + bias.astype(self.dtype)


class RMSNorm(nn.Module):
  """diffusers' WanRMS_norm: x / max(||x||_2, 1e-12) over channels, times
  sqrt(C) * gamma, in float32, returned in dtype. (No bias: Wan2.1 has none.)"""
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    gamma = self.param("gamma", nn.initializers.ones, (c,), self.param_dtype)
    x = x.astype(f32)
    inv_norm = jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))
    return (x * inv_norm * (c ** 0.5) * gamma.astype(f32)).astype(self.dtype)


def _per_frame(fn, x):
  """Applies fn [N, H, W, C] -> [N, H', W', C'] to every frame of [B, T, H, W, C]."""
  b, t = x.shape[:2]
  y = fn(x.reshape(b * t, *x.shape[2:]))
  return y.reshape(b, t, *y.shape[1:])


class ResidualBlock(nn.Module):
  """diffusers' WanResidualBlock: norm1-silu-conv1-norm2-silu-conv2 plus a
  (1x1x1 conv when the width changes) shortcut. Dropout is inference-off."""
  features: int
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda name: CausalConv3d(self.features, (3, 3, 3), spatial_padding=1,
                                     history=_HISTORY, name=name, **kw)
    if x.shape[-1] == self.features:
      shortcut = x.astype(self.dtype)
    else:
      shortcut = CausalConv3d(self.features, (1, 1, 1), name="conv_shortcut", **kw)(x)
    x = conv("conv1")(nn.silu(RMSNorm(name="norm1", **kw)(x)))
    x = conv("conv2")(nn.silu(RMSNorm(name="norm2", **kw)(x)))
    return x + shortcut


class AttentionBlock(nn.Module):
  """diffusers' WanAttentionBlock: single-head self-attention within each frame
  (over its H*W pixels), 1x1 convs for qkv and the output, plus the input."""
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, h, w, c = x.shape
    y = RMSNorm(name="norm", **kw)(x)
    qkv = _per_frame(Conv2d(3 * c, (1, 1), name="to_qkv", **kw), y)
    q, k, v = jnp.split(qkv.reshape(b * t, h * w, 3 * c), 3, axis=-1)
    logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=f32) * (c ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("nqk,nkc->nqc", probs, v).reshape(b, t, h, w, c)
    return _per_frame(Conv2d(c, (1, 1), name="proj", **kw), out) + x.astype(self.dtype)


class MidBlock(nn.Module):
  """diffusers' WanMidBlock (num_layers=1): resnet, attention, resnet."""
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    x = ResidualBlock(c, name="resnets_0", **kw)(x)
    x = AttentionBlock(name="attentions_0", **kw)(x)
    return ResidualBlock(c, name="resnets_1", **kw)(x)


class Resample(nn.Module):
  """diffusers' WanResample. upsample2d/3d: nearest 2x, then a 3x3 conv to
  `features` channels; upsample3d first doubles time with time_conv (2C
  channels interleaved as frames 2j, 2j+1), except on the first chunk.
  downsample2d/3d: pad right/bottom by one, 3x3 stride-2 conv; downsample3d
  then halves time with a stride-2 causal time_conv (first chunk: store only)."""
  mode: str
  features: int
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x, first: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, h, w, c = x.shape
    if self.mode == "upsample3d" and not first:
      y = CausalConv3d(2 * c, (3, 1, 1), history=_HISTORY, name="time_conv", **kw)(x)
      x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
    if self.mode in ("upsample2d", "upsample3d"):
      def up(f):  # nearest 2x (diffusers' nearest-exact at scale 2), one materialization
        n, fh, fw, fc = f.shape
        f = jnp.broadcast_to(f[:, :, None, :, None, :], (n, fh, 2, fw, 2, fc))
        return f.reshape(n, 2 * fh, 2 * fw, fc)
      conv = Conv2d(self.features, (3, 3), padding=((1, 1), (1, 1)), name="resample_1", **kw)
      return _per_frame(lambda f: conv(up(f)), x)
    if self.mode not in ("downsample2d", "downsample3d"):
      raise ValueError(f"unknown resample mode {self.mode!r}")
    conv = Conv2d(self.features, (3, 3), stride=2, padding=((0, 1), (0, 1)), name="resample_1",
                  **kw)
    x = _per_frame(conv, x)
    if self.mode == "downsample3d":
      time_conv = CausalConv3d(self.features, (3, 1, 1), time_stride=2, history=1,
                               name="time_conv", **kw)
      if first:
        time_conv(x, store_only=True)
      else:
        x = time_conv(x)
    return x


class Encoder(nn.Module):
  """diffusers' WanEncoder3d (is_residual=False, no attention in the stages):
  one chunk of video [B, t, H, W, in_channels] -> [B, t', H/8, W/8, 2 z_dim]."""
  config: WanVAEConfig

  @nn.compact
  def __call__(self, x, first: bool):
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    x = CausalConv3d(dims[0], (3, 3, 3), spatial_padding=1, history=_HISTORY, name="conv_in",
                     **kw)(x)
    index = 0
    for stage, out_dim in enumerate(dims[1:]):
      for _ in range(cfg.num_res_blocks):
        x = ResidualBlock(out_dim, name=f"down_blocks_{index}", **kw)(x)
        index += 1
      if stage != len(cfg.dim_mult) - 1:
        mode = "downsample3d" if cfg.temporal_downsample[stage] else "downsample2d"
        x = Resample(mode, out_dim, name=f"down_blocks_{index}", **kw)(x, first)
        index += 1
    x = MidBlock(name="mid_block", **kw)(x)
    x = nn.silu(RMSNorm(name="norm_out", **kw)(x))
    return CausalConv3d(2 * cfg.z_dim, (3, 3, 3), spatial_padding=1, history=_HISTORY,
                        name="conv_out", **kw)(x)


class UpBlock(nn.Module):
  """diffusers' WanUpBlock: num_res_blocks + 1 resnets, then the resampler
  (to features // 2 channels) unless mode is None."""
  features: int
  num_res_blocks: int
  mode: Optional[str]
  dtype: Any = f32
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x, first: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_res_blocks + 1):
      x = ResidualBlock(self.features, name=f"resnets_{j}", **kw)(x)
    if self.mode is not None:
      x = Resample(self.mode, self.features // 2, name="upsamplers_0", **kw)(x, first)
    return x


class Decoder(nn.Module):
  """diffusers' WanDecoder3d (is_residual=False): one latent chunk
  [B, 1, h, w, z_dim] -> video [B, 1 (first) or 4, 8h, 8w, out_channels]."""
  config: WanVAEConfig

  @nn.compact
  def __call__(self, x, first: bool):
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    mult = cfg.dim_mult
    dims = [cfg.decoder_base_dim * m for m in (mult[-1], *mult[::-1])]
    temporal_upsample = cfg.temporal_downsample[::-1]
    x = CausalConv3d(dims[0], (3, 3, 3), spatial_padding=1, history=_HISTORY, name="conv_in",
                     **kw)(x)
    x = MidBlock(name="mid_block", **kw)(x)
    for i, out_dim in enumerate(dims[1:]):
      mode = None
      if i != len(mult) - 1:
        mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
      x = UpBlock(out_dim, cfg.num_res_blocks, mode, name=f"up_blocks_{i}", **kw)(x, first)
    x = nn.silu(RMSNorm(name="norm_out", **kw)(x))
    return CausalConv3d(cfg.out_channels, (3, 3, 3), spatial_padding=1, history=_HISTORY,
                        name="conv_out", **kw)(x)


def _pointwise(config: WanVAEConfig, features: int, name: str) -> CausalConv3d:
  """quant_conv / post_quant_conv: 1x1x1 convs."""
  return CausalConv3d(features, (1, 1, 1), dtype=config.dtype, param_dtype=config.param_dtype,
                      name=name)


# --------------------------------------------------------------- parameters

def _init_inputs(config: WanVAEConfig):
  f = config.spatial_factor
  video = jax.ShapeDtypeStruct((1, CHUNK_FRAMES, f, f, config.in_channels), config.dtype)
  latent = jax.ShapeDtypeStruct((1, 1, 1, 1, config.z_dim), config.dtype)
  return video, latent


@functools.partial(jax.jit, static_argnums=0)
def _init(config: WanVAEConfig, key) -> dict:
  video, latent = _init_inputs(config)
  keys = jax.random.split(key, 4)
  v, z = jnp.zeros(video.shape, video.dtype), jnp.zeros(latent.shape, latent.dtype)
  z2 = jnp.zeros((*latent.shape[:-1], 2 * config.z_dim), latent.dtype)
  return {
      "encoder": Encoder(config).init(keys[0], v, False)["params"],
      "quant_conv": _pointwise(config, 2 * config.z_dim, None).init(keys[1], z2)["params"],
      "post_quant_conv": _pointwise(config, config.z_dim, None).init(keys[2], z)["params"],
      "decoder": Decoder(config).init(keys[3], z, False)["params"],
  }


def init_params(config: WanVAEConfig, key) -> dict:
  """Fresh params {encoder, quant_conv, post_quant_conv, decoder} in param_dtype."""
  return _init(config, key)


@functools.lru_cache(maxsize=32)
def param_shapes(config: WanVAEConfig) -> dict:
  """The params tree as jax.ShapeDtypeStruct leaves (no allocation). Cached per
  config: treat the result as read-only."""
  return jax.eval_shape(_init, config, jax.random.key(0))


# ------------------------------------------------------------------ chunks

def _chunk_body(module: nn.Module, params, cache, x, first: bool):
  variables = {"params": params} if cache is None else {"params": params, "cache": cache}
  y, state = module.apply(variables, x, first, mutable=["cache"])
  return y, state["cache"]


def _decoder_chunk_body(config, params, cache, x, first):
  return _chunk_body(Decoder(config), params, cache, x, first)


def _encoder_chunk_body(config, params, cache, x, first):
  return _chunk_body(Encoder(config), params, cache, x, first)


# The networks are traced through these jits: inside `decode`'s scan their trace
# depends only on the chunk's shapes, so decoding another length reuses it.
@functools.partial(jax.jit, static_argnames=("config", "first"))
def _decoder_chunk(config, params, cache, x, first):
  return _decoder_chunk_body(config, params, cache, x, first)


@functools.partial(jax.jit, static_argnames=("config", "first"))
def _encoder_chunk(config, params, cache, x, first):
  return _encoder_chunk_body(config, params, cache, x, first)


def _zero_cache(chunk_fn, config, params, x_shape):
  """The full cache tree (every conv's history, zeros) for chunks of x_shape:
  the state a later chunk carries, which the first chunk starts from."""
  x = jax.ShapeDtypeStruct(x_shape, config.dtype)
  shapes = jax.eval_shape(lambda p, x: chunk_fn(config, p, None, x, first=False)[1], params, x)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decoder_cache_shapes(config: WanVAEConfig, batch: int, height: int, width: int):
  """The decoder's cache tree (ShapeDtypeStructs) for latents of height x width."""
  params = param_shapes(config)["decoder"]
  x = jax.ShapeDtypeStruct((batch, 1, height, width, config.z_dim), config.dtype)
  return jax.eval_shape(lambda p, x: _decoder_chunk(config, p, None, x, first=False)[1],
                        params, x)


def _check_video_sizes(config: WanVAEConfig, frames: int, height: int, width: int):
  if frames < 1 or (frames - 1) % config.temporal_factor:
    raise ValueError(
        f"video frames must be {config.temporal_factor}k + 1 (1, 5, 9, ..., 81), got {frames}")
  f = config.spatial_factor
  if height < f or width < f or height % f or width % f:
    raise ValueError(f"video height and width must be positive multiples of {f}, "
                     f"got {height}x{width}")


def _check_5d(name: str, x, channels: int, channel_name: str):
  if x.ndim != 5:
    raise ValueError(f"{name} must be [B, C, T, H, W], got shape {tuple(x.shape)}")
  if x.shape[1] != channels:
    raise ValueError(f"{name} must have {channel_name} = {channels} channels (axis 1), "
                     f"got shape {tuple(x.shape)}")


# ------------------------------------------------------------------ public

def encode(config: WanVAEConfig, params, video) -> tuple[jax.Array, jax.Array]:
  """Video [B, in_channels, F, H, W] in [-1, 1] (F = 4k + 1; H, W multiples of 8)
  -> (mean, logvar), float32 [B, z_dim, 1 + k, H/8, W/8], logvar clamped to
  [-30, 20] as diffusers' DiagonalGaussianDistribution. Chunks as diffusers'
  `_encode`: the first frame alone, then 4 frames per step of one lax.scan.
  jit-able; reads params["encoder"] and params["quant_conv"]."""
  video = jnp.asarray(video)
  _check_5d("video", video, config.in_channels, "in_channels")
  b, _, frames, height, width = video.shape
  _check_video_sizes(config, frames, height, width)
  x = jnp.transpose(video, (0, 2, 3, 4, 1)).astype(config.dtype)  # B, F, H, W, C
  n = (frames - 1) // CHUNK_FRAMES
  cache = _zero_cache(_encoder_chunk, config, params["encoder"],
                      (b, CHUNK_FRAMES, height, width, config.in_channels))
  first, cache = _encoder_chunk(config, params["encoder"], cache, x[:, :1], first=True)

  def step(cache, chunk):
    y, cache = _encoder_chunk(config, params["encoder"], cache, chunk, first=False)
    return cache, y

  chunks = x[:, 1:].reshape(b, n, CHUNK_FRAMES, *x.shape[2:]).swapaxes(0, 1)
  _, rest = jax.lax.scan(step, cache, chunks)  # [n, B, 1, h, w, 2z]
  rest = rest.swapaxes(0, 1).reshape(b, -1, *rest.shape[3:])
  h = jnp.concatenate([first, rest], axis=1)
  h = _pointwise(config, 2 * config.z_dim, None).apply({"params": params["quant_conv"]}, h)
  h = jnp.transpose(h.astype(f32), (0, 4, 1, 2, 3))
  mean, logvar = jnp.split(h, 2, axis=1)
  return mean, jnp.clip(logvar, *_LOGVAR_RANGE)


def decode(config: WanVAEConfig, params, z) -> jax.Array:
  """Latents [B, z_dim, T, h, w] (denormalized: see `denormalize_latents`) ->
  video float32 [B, out_channels, 1 + 4 (T - 1), 8h, 8w] clamped to [-1, 1], as
  diffusers' `_decode`: the first latent frame is its own step, the other T - 1
  run through one lax.scan carrying the feature cache and the output video
  (written in place chunk by chunk). jit-able; T = 1 works. Reads
  params["post_quant_conv"] and params["decoder"]."""
  z = jnp.asarray(z)
  _check_5d("latents", z, config.z_dim, "z_dim")
  b, _, t, h, w = z.shape
  if t < 1 or h < 1 or w < 1:
    raise ValueError(f"latents must have T, h, w >= 1, got shape {tuple(z.shape)}")
  x = jnp.transpose(z, (0, 2, 3, 4, 1)).astype(config.dtype)  # B, T, h, w, C
  x = _pointwise(config, config.z_dim, None).apply({"params": params["post_quant_conv"]}, x)
  cache = _zero_cache(_decoder_chunk, config, params["decoder"], (b, 1, h, w, config.z_dim))

  def to_video(y):  # [B, t, H, W, C] -> [B, C, t, H, W], float32, clamped
    return jnp.transpose(jnp.clip(y.astype(f32), -1.0, 1.0), (0, 4, 1, 2, 3))

  video = jnp.zeros(config.video_shape(b, t, h, w), f32)
  y, cache = _decoder_chunk(config, params["decoder"], cache, x[:, :1], first=True)
  video = jax.lax.dynamic_update_slice(video, to_video(y), (0, 0, 0, 0, 0))

  def step(carry, latent):
    cache, video, i = carry
    y, cache = _decoder_chunk(config, params["decoder"], cache, latent[:, None], first=False)
    start = 1 + config.temporal_factor * i
    video = jax.lax.dynamic_update_slice(video, to_video(y), (0, 0, start, 0, 0))
    return (cache, video, i + 1), None

  if t > 1:  # (a zero-length scan would still trace a 4-frame write into 1 frame)
    (_, video, _), _ = jax.lax.scan(step, (cache, video, jnp.int32(0)),
                                    x[:, 1:].swapaxes(0, 1))
  return video


def _latent_stats(config: WanVAEConfig, z):
  shape = (1, config.z_dim, 1, 1, 1)
  mean = jnp.asarray(config.latents_mean, f32).reshape(shape).astype(z.dtype)
  inv_std = (1.0 / jnp.asarray(config.latents_std, f32)).reshape(shape).astype(z.dtype)
  return mean, inv_std


def normalize_latents(config: WanVAEConfig, z) -> jax.Array:
  """VAE latents [B, z_dim, ...] -> the DiT's: (z - mean) * (1 / std), as diffusers'
  Wan pipelines (video2video) do after encoding."""
  z = jnp.asarray(z)
  _check_5d("latents", z, config.z_dim, "z_dim")
  mean, inv_std = _latent_stats(config, z)
  return (z - mean) * inv_std


def denormalize_latents(config: WanVAEConfig, z) -> jax.Array:
  """The DiT's latents -> the VAE's: z / (1 / std) + mean, as diffusers' WanPipeline
  does before decoding."""
  z = jnp.asarray(z)
  _check_5d("latents", z, config.z_dim, "z_dim")
  mean, inv_std = _latent_stats(config, z)
  return z / inv_std + mean


# ------------------------------------------------------------------ memory

# Calibration of the activation term (see decode_memory_bytes): XLA's buffer
# assignment on CPU keeps ~1.6x the single-op live set below (a conv's raw
# output beside its bias-added copy, norm outputs beside the concat).
_ACTIVATION_SLACK = 1.5


def _decoder_op_bytes(config: WanVAEConfig, batch: int, height: int, width: int,
                      itemsize: int) -> list[tuple[str, int]]:
  """(op, bytes live while it runs) for every heavy op of a later decoder chunk
  (the first chunk has fewer frames, so it is smaller): its materialized input
  (with the cached history), its output, and what the block holds across it
  (the residual input, the shortcut)."""
  def size(frames, h, w, c):
    return batch * frames * h * w * c * itemsize

  mult = config.dim_mult
  dims = [config.decoder_base_dim * m for m in (mult[-1], *mult[::-1])]
  temporal_upsample = config.temporal_downsample[::-1]
  t, h, w, c = 1, height, width, dims[0]
  ops = [("conv_in", size(t + _HISTORY, h, w, config.z_dim) + size(t, h, w, c))]

  def resnet(name, c_in, c_out):
    shortcut = size(t, h, w, c_out) if c_in != c_out else 0
    ops.append((f"{name}.conv1", size(t, h, w, c_in) + shortcut
                + size(t + _HISTORY, h, w, c_in) + size(t, h, w, c_out)))
    ops.append((f"{name}.conv2", 2 * size(t, h, w, c_out) + size(t + _HISTORY, h, w, c_out)))

  resnet("mid_block.resnets_0", c, c)
  # x, qkv; float32 logits and the probabilities, per frame over h*w pixels.
  ops.append(("mid_block.attentions_0", 4 * size(t, h, w, c)
              + batch * t * (h * w) ** 2 * (4 + itemsize)))
  resnet("mid_block.resnets_1", c, c)
  for i, c_out in enumerate(dims[1:]):
    for j in range(config.num_res_blocks + 1):
      resnet(f"up_blocks_{i}.resnets_{j}", c, c_out)
      c = c_out
    if i == len(mult) - 1:
      break
    name = f"up_blocks_{i}.upsamplers_0"
    if temporal_upsample[i]:
      ops.append((f"{name}.time_conv", size(t + _HISTORY, h, w, c) + 2 * size(t, h, w, 2 * c)))
      t *= 2
    # input, its nearest-2x copy, the conv's output (c // 2 channels).
    ops.append((f"{name}.resample_1", size(t, h, w, c) + size(t, 2 * h, 2 * w, c)
                + size(t, 2 * h, 2 * w, c // 2)))
    h, w, c = 2 * h, 2 * w, c // 2
  ops.append(("conv_out", size(t, h, w, c) + size(t + _HISTORY, h, w, c)
              + size(t, h, w, config.out_channels) * 2 + t * h * w * config.out_channels * 4))
  return ops


def decode_memory_terms(config: WanVAEConfig, latent_shape, dtype=None) -> dict[str, int]:
  """The terms `decode_memory_bytes` sums, in bytes: params, latents, cache,
  activations (already scaled by the calibration factor), video; and
  "peak_op", the op whose live set is the largest."""
  shape = tuple(latent_shape)
  if len(shape) != 5 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape):
    raise ValueError(f"latent_shape must be 5 positive ints [B, z_dim, T, h, w], "
                     f"got {latent_shape!r}")
  b, c, t, h, w = (int(s) for s in shape)
  if c != config.z_dim:
    raise ValueError(f"latent_shape must have z_dim = {config.z_dim} channels, got {shape}")
  item = _dtype("dtype", config.dtype if dtype is None else dtype).itemsize
  shapes = param_shapes(config)
  params = sum(math.prod(s.shape) * s.dtype.itemsize
               for key in ("post_quant_conv", "decoder") for s in jax.tree.leaves(shapes[key]))
  cache = sum(math.prod(s.shape) for s in jax.tree.leaves(decoder_cache_shapes(config, b, h, w)))
  ops = _decoder_op_bytes(config, b, h, w, item)
  peak_op, peak = max(ops, key=lambda op: op[1])
  return {
      "params": params,
      # the float32 argument, its channels-last copy, the post-quant output and the
      # scan's time-major copy
      "latents": b * c * t * h * w * (4 + 3 * item),
      "cache": cache * item,
      "activations": int(_ACTIVATION_SLACK * peak),
      "video": math.prod(config.video_shape(b, t, h, w)) * 4,
      "peak_op": peak_op,
  }


def decode_memory_bytes(config: WanVAEConfig, latent_shape, dtype=None) -> int:
  """Estimated peak device memory of `decode(config, params, z)` for latents of
  latent_shape [B, z_dim, T, h, w], computing in dtype (default config.dtype),
  with only params["post_quant_conv"] and params["decoder"] on the device.

  Derivation: the peak falls inside a later chunk of the scan, when these are
  live at once:
    params   every decoder param, in config.param_dtype;
    cache    the scan carry: every causal conv's history (the last 2 frames of
             its input) at its stage's resolution; exact, from the cache tree's
             shapes. The largest term at full size, and mostly the
             full-resolution stage (up_blocks_3 and conv_out: 57% for Wan2.1);
    video    the float32 output, written in place chunk by chunk;
    latents  the input and its copies (small);
    activations  the largest single-op live set of one chunk (input with
             history, output, residual held across it; see _decoder_op_bytes;
             for Wan2.1 the last upsample2d, whose nearest-2x copy is 4 frames
             x 192 channels at full resolution, tied with the full-resolution
             resnets), times 1.5: XLA keeps more than that minimal set
             (measured on CPU: ~1.6x).
  Checked against XLA's compiled memory_analysis on CPU for small configs
  (tests/models/wan/test_vae.py), where it lands within 0.8x-1.25x for T >= 3.
  For T = 2, XLA may unroll the one-step scan and overlap the two chunks, which
  needs less. GPU convolution workspace (cuDNN) is not included.
  """
  return sum(v for k, v in decode_memory_terms(config, latent_shape, dtype).items()
             if k != "peak_op")

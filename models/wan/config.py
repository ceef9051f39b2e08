"""`WanConfig`: the shape of a Wan-style video DiT, validated at construction.

Field names follow our model; `from_diffusers_config` / `to_diffusers_config`
translate to and from diffusers' `WanTransformer3DModel` config.json.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import numpy as np

from models import validate
from models.weights import parse_config

DTYPES = ("float32", "bfloat16", "float16")
QK_NORMS = ("rms_norm_across_heads",)

# diffusers' WanTransformer3DModel.__init__ arguments and their defaults: a key
# missing from a config.json takes the default, as in diffusers.
_DIFFUSERS_DEFAULTS = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}
# Image-to-video inputs (CLIP image tokens): known to diffusers, not built here.
_UNSUPPORTED_DIFFUSERS_KEYS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
_DIFFUSERS_CLASS = "WanTransformer3DModel"


_dtype = functools.partial(validate.dtype, "WanConfig", allowed=DTYPES)


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """A Wan2.1-style DiT. Sizes are in latent units (after the VAE).

  dtype is the compute dtype (bfloat16 on accelerators), param_dtype the
  storage dtype of the parameters; norms, modulation and RoPE always run in
  float32. scan_layers stacks the blocks under `nn.scan` (params get a leading
  layer axis); otherwise the blocks are separately named `blocks_0 ...`.
  """

  in_channels: int
  out_channels: int
  dim: int
  ffn_dim: int
  num_heads: int
  num_layers: int
  text_dim: int
  patch_size: tuple[int, int, int] = (1, 2, 2)
  freq_dim: int = 256
  eps: float = 1e-6
  cross_attn_norm: bool = True
  qk_norm: str = "rms_norm_across_heads"
  rope_max_seq_len: int = 1024
  param_dtype: Any = "float32"
  dtype: Any = "float32"
  scan_layers: bool = True
  remat: bool = False

  def __post_init__(self):
    for name in ("in_channels", "out_channels", "dim", "ffn_dim", "num_heads", "num_layers",
                 "text_dim", "freq_dim", "rope_max_seq_len"):
      object.__setattr__(self, name, validate.integer("WanConfig", name, getattr(self, name)))
    patch = tuple(self.patch_size)
    if len(patch) != 3 or not all(isinstance(p, (int, np.integer)) and p >= 1 for p in patch):
      raise ValueError(
          f"WanConfig.patch_size must be three positive ints (t, h, w), got {self.patch_size!r}")
    object.__setattr__(self, "patch_size", tuple(int(p) for p in patch))
    if self.dim % self.num_heads:
      raise ValueError(
          f"WanConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
    head_dim = self.dim // self.num_heads
    # Wan's 3D RoPE gives 2 * (head_dim // 6) channels to each of h and w and
    # the rest to t; every axis needs at least one rotation pair.
    if head_dim % 2 or head_dim < 6:
      raise ValueError(
          f"WanConfig head_dim = dim // num_heads must be even and >= 6 for the 3D RoPE, "
          f"got {head_dim} (dim={self.dim}, num_heads={self.num_heads})")
    if self.freq_dim % 2:
      raise ValueError(f"WanConfig.freq_dim must be even, got {self.freq_dim}")
    if not isinstance(self.eps, (float, int)) or not self.eps > 0:
      raise ValueError(f"WanConfig.eps must be a float > 0, got {self.eps!r}")
    object.__setattr__(self, "eps", float(self.eps))
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"WanConfig.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
    for name in ("cross_attn_norm", "scan_layers", "remat"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"WanConfig.{name} must be a bool, got {getattr(self, name)!r}")
    object.__setattr__(self, "param_dtype", _dtype("param_dtype", self.param_dtype))
    object.__setattr__(self, "dtype", _dtype("dtype", self.dtype))

  # ---------------------------------------------------------------- presets

  @classmethod
  def tiny(cls, **overrides) -> WanConfig:
    """Two small layers: a CPU-fast stand-in with every component of the real model."""
    return cls(**{**dict(in_channels=4, out_channels=4, dim=64, ffn_dim=128, num_heads=2,
                         num_layers=2, text_dim=32),
                  **overrides})

  @classmethod
  def wan2_1_1_3b(cls, **overrides) -> WanConfig:
    """Wan2.1-T2V-1.3B."""
    return cls(**{**dict(in_channels=16, out_channels=16, dim=1536, ffn_dim=8960, num_heads=12,
                         num_layers=30, text_dim=4096, dtype="bfloat16"),
                  **overrides})

  @classmethod
  def wan2_1_14b(cls, **overrides) -> WanConfig:
    """Wan2.1-T2V-14B."""
    return cls(**{**dict(in_channels=16, out_channels=16, dim=5120, ffn_dim=13824, num_heads=40,
                         num_layers=40, text_dim=4096, dtype="bfloat16"),
                  **overrides})

  # ------------------------------------------------------------ derived sizes

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def patch_features(self) -> int:
    """Values in one input patch: prod(patch_size) * in_channels."""
    return math.prod(self.patch_size) * self.in_channels

  def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Token grid (t, h, w) of a latent of shape [C, frames, height, width]."""
    for name, size, patch in zip(("frames", "height", "width"), (frames, height, width),
                                 self.patch_size):
      if size < 1 or size % patch:
        raise ValueError(
            f"latent {name}={size} must be a positive multiple of the patch size {patch} "
            f"(patch_size={self.patch_size})")
    pt, ph, pw = self.patch_size
    return frames // pt, height // ph, width // pw

  def tokens(self, frames: int, height: int, width: int) -> int:
    """Sequence length of the self-attention for a latent [C, frames, height, width]."""
    return math.prod(self.grid(frames, height, width))

  def tokens_per_frame(self, height: int, width: int) -> int:
    """Tokens in one (temporally patched) latent frame."""
    _, h, w = self.grid(self.patch_size[0], height, width)
    return h * w

  # ------------------------------------------------------------- diffusers

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> WanConfig:
    """From a `WanTransformer3DModel` config.json dict; overrides set our own fields
    (dtype, param_dtype, scan_layers, remat)."""
    cfg = parse_config(config, _DIFFUSERS_DEFAULTS, where="diffusers transformer config",
                       class_names=(_DIFFUSERS_CLASS,))
    for key in _UNSUPPORTED_DIFFUSERS_KEYS:
      if cfg[key] is not None:
        raise ValueError(
            f"diffusers config key {key!r}={cfg[key]!r} (image-to-video) is not supported; "
            f"only None is")
    if cfg["qk_norm"] not in QK_NORMS:
      raise ValueError(
          f"diffusers config qk_norm must be one of {QK_NORMS}, got {cfg['qk_norm']!r}")
    return cls(
        patch_size=tuple(cfg["patch_size"]),
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"] or cfg["in_channels"],
        dim=cfg["num_attention_heads"] * cfg["attention_head_dim"],
        ffn_dim=cfg["ffn_dim"],
        num_heads=cfg["num_attention_heads"],
        num_layers=cfg["num_layers"],
        text_dim=cfg["text_dim"],
        freq_dim=cfg["freq_dim"],
        eps=float(cfg["eps"]),
        cross_attn_norm=bool(cfg["cross_attn_norm"]),
        qk_norm=cfg["qk_norm"],
        rope_max_seq_len=cfg["rope_max_seq_len"],
        **overrides,
    )

  def to_diffusers_config(self) -> dict[str, Any]:
    """The `WanTransformer3DModel` config.json dict (without bookkeeping keys)."""
    return {
        "patch_size": list(self.patch_size),
        "num_attention_heads": self.num_heads,
        "attention_head_dim": self.head_dim,
        "in_channels": self.in_channels,
        "out_channels": self.out_channels,
        "text_dim": self.text_dim,
        "freq_dim": self.freq_dim,
        "ffn_dim": self.ffn_dim,
        "num_layers": self.num_layers,
        "cross_attn_norm": self.cross_attn_norm,
        "qk_norm": self.qk_norm,
        "eps": self.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": self.rope_max_seq_len,
        "pos_embed_seq_len": None,
    }

  # ------------------------------------------------------------ our own json

  def to_dict(self) -> dict[str, Any]:
    """All fields, json-ready (dtypes as names)."""
    return validate.to_dict(self)

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any], **overrides) -> WanConfig:
    return validate.from_dict(cls, fields, overrides)

"""`CogVideoXConfig`: the shape of a CogVideoX transformer, validated at construction.

Field names follow our model; `from_diffusers_config` / `to_diffusers_config`
translate to and from diffusers' `CogVideoXTransformer3DModel` config.json.

Three position schemes exist in the released checkpoints, all supported:

  CogVideoX-2b     3D sin-cos position embedding added to the video tokens
                   (use_rotary=False), Conv2d patches of 2x2
  CogVideoX-5b     3D RoPE on the video tokens' q and k, crop-interpolated to the
                   sample grid (sample_height x sample_width latents)
  CogVideoX1.5-5b  3D RoPE with integer positions ("slice" grid, the video at most
                   sample_height x sample_width latents), Linear patches of 2x2x2

The image-to-video variants (learned position embeddings of CogVideoX-5b-I2V,
the "ofs" embedding of CogVideoX1.5-5b-I2V) are supported by the transformer;
their pipelines (image latents concatenated to the noise) are not in modjax.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import numpy as np

from models import validate
from models.weights import parse_config

DTYPES = ("float32", "bfloat16", "float16")
ACTIVATIONS = ("gelu-approximate", "gelu")
QK_NORM_EPS = 1e-6  # diffusers' CogVideoXBlock builds its attention with eps=1e-6, fixed

# diffusers' CogVideoXTransformer3DModel.__init__ arguments and their defaults
# (diffusers 0.42.1): a key missing from a config.json takes the default, as in diffusers.
_DIFFUSERS_DEFAULTS = {
    "num_attention_heads": 30,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embed_dim": 512,
    "ofs_embed_dim": None,
    "text_embed_dim": 4096,
    "num_layers": 30,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_width": 90,
    "sample_height": 60,
    "sample_frames": 49,
    "patch_size": 2,
    "patch_size_t": None,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 226,
    "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu",
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "spatial_interpolation_scale": 1.875,
    "temporal_interpolation_scale": 1.0,
    "use_rotary_positional_embeddings": False,
    "use_learned_positional_embeddings": False,
    "patch_bias": True,
}
_DIFFUSERS_CLASS = "CogVideoXTransformer3DModel"


_dtype = functools.partial(validate.dtype, "CogVideoXConfig", allowed=DTYPES)
_positive_int = functools.partial(validate.integer, "CogVideoXConfig")
_positive_float = functools.partial(validate.positive_float, "CogVideoXConfig")


@dataclasses.dataclass(frozen=True)
class CogVideoXConfig:
  """A CogVideoX-style joint-attention DiT. Sizes are in latent units (after the VAE).

  dim = num_heads * head_dim. patch_size is the spatial patch (p x p);
  patch_size_t None means CogVideoX 1.0 (no temporal patching, Conv2d patch
  weights), an int the 1.5 temporal patch (Linear patch weights). use_rotary
  selects the 3D RoPE on the video tokens (5b, 1.5) over the fixed 3D sin-cos
  embedding added to them (2b). sample_height / sample_width / sample_frames are
  diffusers' sample sizes (latent height and width, pixel frames): the RoPE base
  grid and the learned embedding's size. max_text_seq_length is the text length
  the learned embedding was trained with; the sequence itself may hold any
  number of text tokens (the family fixes it, 226 by default).

  dtype is the compute dtype (bfloat16 on accelerators), param_dtype the storage
  dtype of the parameters; LayerNorms, the time embedding, the adaptive
  modulation, RoPE and the gated residual adds run in float32. scan_layers
  stacks the blocks under `nn.scan` (params get a leading layer axis).
  """

  in_channels: int
  out_channels: int
  num_heads: int
  num_layers: int
  head_dim: int = 64
  text_dim: int = 4096
  time_embed_dim: int = 512
  ffn_dim: Optional[int] = None          # None: 4 * dim (diffusers' FeedForward)
  patch_size: int = 2
  patch_size_t: Optional[int] = None
  use_rotary: bool = True
  use_learned_positional_embeddings: bool = False
  ofs_embed_dim: Optional[int] = None
  attention_bias: bool = True
  patch_bias: bool = True
  norm_elementwise_affine: bool = True
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  activation: str = "gelu-approximate"
  sample_height: int = 60
  sample_width: int = 90
  sample_frames: int = 49
  temporal_compression_ratio: int = 4
  max_text_seq_length: int = 226
  spatial_interpolation_scale: float = 1.875
  temporal_interpolation_scale: float = 1.0
  param_dtype: Any = "float32"
  dtype: Any = "float32"
  scan_layers: bool = True
  remat: bool = False

  def __post_init__(self):
    for name in ("in_channels", "out_channels", "num_heads", "num_layers", "head_dim", "text_dim",
                 "time_embed_dim", "patch_size", "sample_height", "sample_width", "sample_frames",
                 "temporal_compression_ratio", "max_text_seq_length"):
      object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
    for name in ("ffn_dim", "patch_size_t", "ofs_embed_dim"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
    if self.ffn_dim is None:
      object.__setattr__(self, "ffn_dim", 4 * self.dim)
    if isinstance(self.freq_shift, bool) or not isinstance(self.freq_shift, (int, np.integer)):
      raise ValueError(f"CogVideoXConfig.freq_shift must be an int, got {self.freq_shift!r}")
    object.__setattr__(self, "freq_shift", int(self.freq_shift))
    for name in ("use_rotary", "use_learned_positional_embeddings", "attention_bias", "patch_bias",
                 "norm_elementwise_affine", "flip_sin_to_cos", "scan_layers", "remat"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ValueError(f"CogVideoXConfig.{name} must be a bool, got {getattr(self, name)!r}")
      object.__setattr__(self, name, bool(getattr(self, name)))
    for name in ("norm_eps", "spatial_interpolation_scale", "temporal_interpolation_scale"):
      object.__setattr__(self, name, _positive_float(name, getattr(self, name)))
    if self.activation not in ACTIVATIONS:
      raise ValueError(
          f"CogVideoXConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
    if self.dim % 2:
      raise ValueError(f"CogVideoXConfig: dim = num_heads * head_dim must be even (the sinusoidal "
                       f"timestep embedding has dim channels), got {self.dim}")
    if self.freq_shift >= self.dim // 2:
      raise ValueError(f"CogVideoXConfig.freq_shift must be < dim // 2 = {self.dim // 2}, "
                       f"got {self.freq_shift}")
    if self.use_rotary and self.head_dim % 16:
      # t gets head_dim // 4 channels, h and w head_dim // 8 * 3 each, every part even
      raise ValueError(f"CogVideoXConfig.head_dim must be a multiple of 16 for the 3D RoPE, "
                       f"got {self.head_dim}")
    if not self.use_rotary:
      if self.dim % 16:
        raise ValueError(f"CogVideoXConfig: dim = num_heads * head_dim must be a multiple of 16 "
                         f"for the 3D sin-cos position embedding, got {self.dim}")
      if self.patch_size_t is not None:
        raise ValueError("CogVideoXConfig: the sin-cos position embedding (use_rotary=False) "
                         "does not support temporal patches (patch_size_t must be None); "
                         "diffusers' embedding would not match the token count")
    if self.use_learned_positional_embeddings:
      if not self.use_rotary:
        raise ValueError("CogVideoXConfig: use_learned_positional_embeddings needs use_rotary=True "
                         "(as in diffusers: no such checkpoints exist)")
      if self.patch_size_t is not None:
        raise ValueError("CogVideoXConfig: use_learned_positional_embeddings does not support "
                         "temporal patches (patch_size_t must be None), as in diffusers")
      if self.sample_height % self.patch_size or self.sample_width % self.patch_size:
        raise ValueError(
            f"CogVideoXConfig: sample_height={self.sample_height} and sample_width="
            f"{self.sample_width} must be multiples of patch_size={self.patch_size} for the "
            f"learned position embedding")
    if self.ofs_embed_dim is not None and self.ofs_embed_dim != self.time_embed_dim:
      raise ValueError(f"CogVideoXConfig.ofs_embed_dim ({self.ofs_embed_dim}) must equal "
                       f"time_embed_dim ({self.time_embed_dim}): the ofs embedding is added to "
                       f"the time embedding")
    if self.ofs_embed_dim is not None and self.ofs_embed_dim % 2:
      raise ValueError(f"CogVideoXConfig.ofs_embed_dim must be even, got {self.ofs_embed_dim}")
    object.__setattr__(self, "param_dtype", _dtype("param_dtype", self.param_dtype))
    object.__setattr__(self, "dtype", _dtype("dtype", self.dtype))

  # ---------------------------------------------------------------- presets

  @classmethod
  def tiny(cls, **overrides) -> CogVideoXConfig:
    """Two small layers with RoPE: a CPU-fast stand-in with every component of 5b."""
    return cls(**{**dict(in_channels=4, out_channels=4, num_heads=2, head_dim=16, num_layers=2,
                         text_dim=24, time_embed_dim=32, sample_height=8, sample_width=12,
                         sample_frames=9, max_text_seq_length=6),
                  **overrides})

  @classmethod
  def cogvideox_2b(cls, **overrides) -> CogVideoXConfig:
    """THUDM/CogVideoX-2b: sin-cos position embedding, 30 layers of 30 heads."""
    return cls(**{**dict(in_channels=16, out_channels=16, num_heads=30, num_layers=30,
                         use_rotary=False, dtype="bfloat16"),
                  **overrides})

  @classmethod
  def cogvideox_5b(cls, **overrides) -> CogVideoXConfig:
    """THUDM/CogVideoX-5b: 3D RoPE, 42 layers of 48 heads."""
    return cls(**{**dict(in_channels=16, out_channels=16, num_heads=48, num_layers=42,
                         use_rotary=True, dtype="bfloat16"),
                  **overrides})

  @classmethod
  def cogvideox1_5_5b(cls, **overrides) -> CogVideoXConfig:
    """THUDM/CogVideoX1.5-5B: 2x2x2 Linear patches (no patch bias option: diffusers'
    Linear always has one), slice-grid RoPE up to 300x300 latents, 81 frames."""
    return cls(**{**dict(in_channels=16, out_channels=16, num_heads=48, num_layers=42,
                         use_rotary=True, patch_size_t=2, patch_bias=False, sample_height=300,
                         sample_width=300, sample_frames=81,
                         dtype="bfloat16"),
                  **overrides})

  # ------------------------------------------------------------ derived sizes

  @property
  def dim(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def temporal_patch(self) -> int:
    """Latent frames per token (1 for CogVideoX 1.0)."""
    return self.patch_size_t or 1

  @property
  def patch_features(self) -> int:
    """Values in one input patch: in_channels * pt * p * p."""
    return self.in_channels * self.temporal_patch * self.patch_size ** 2

  @property
  def has_patch_bias(self) -> bool:
    """diffusers: patch_bias applies to 1.0's Conv2d; 1.5's Linear always has a bias."""
    return self.patch_bias or self.patch_size_t is not None

  @property
  def sample_grid(self) -> tuple[int, int, int]:
    """Token grid (t, h, w) of diffusers' sample size (the learned embedding's size)."""
    frames = (self.sample_frames - 1) // self.temporal_compression_ratio + 1
    return frames, self.sample_height // self.patch_size, self.sample_width // self.patch_size

  def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Token grid (t, h, w) of a latent [C, frames, height, width]; ValueError naming
    the size when the model cannot take it."""
    patches = (self.temporal_patch, self.patch_size, self.patch_size)
    for name, size, patch in zip(("frames", "height", "width"), (frames, height, width), patches):
      if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1 \
          or size % patch:
        raise ValueError(
            f"latent {name}={size!r} must be a positive multiple of the patch size {patch} "
            f"(patch_size={self.patch_size}, patch_size_t={self.patch_size_t})")
    grid = (frames // self.temporal_patch, height // self.patch_size, width // self.patch_size)
    if self.use_rotary and self.patch_size_t is not None:
      max_h, max_w = self.sample_height // self.patch_size, self.sample_width // self.patch_size
      if grid[1] > max_h or grid[2] > max_w:
        raise ValueError(
            f"latent height={height}, width={width} exceed the RoPE grid of CogVideoX 1.5 "
            f"(at most sample_height={self.sample_height}, sample_width={self.sample_width} "
            f"latents)")
    if self.use_learned_positional_embeddings and grid[1:] != self.sample_grid[1:]:
      raise ValueError(
          f"latent height={height}, width={width}: the learned position embedding only takes "
          f"the sample size sample_height={self.sample_height}, sample_width={self.sample_width} "
          f"(as in diffusers)")
    return grid

  def tokens(self, frames: int, height: int, width: int) -> int:
    """Video tokens of a latent [C, frames, height, width]."""
    return math.prod(self.grid(frames, height, width))

  def tokens_per_frame(self, height: int, width: int) -> int:
    """Video tokens in one (temporally patched) latent frame."""
    _, h, w = self.grid(self.temporal_patch, height, width)
    return h * w

  # ------------------------------------------------------------- diffusers

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> CogVideoXConfig:
    """From a `CogVideoXTransformer3DModel` config.json dict; overrides set our own fields
    (dtype, param_dtype, scan_layers, remat). dropout is accepted and ignored (inference)."""
    cfg = parse_config(config, _DIFFUSERS_DEFAULTS, where="diffusers transformer config",
                       class_names=(_DIFFUSERS_CLASS,))
    if cfg["timestep_activation_fn"] != "silu":
      raise ValueError(f"diffusers config key 'timestep_activation_fn'="
                       f"{cfg['timestep_activation_fn']!r} is not supported; only 'silu'")
    if cfg["activation_fn"] not in ACTIVATIONS:
      raise ValueError(f"diffusers config key 'activation_fn'={cfg['activation_fn']!r} is not "
                       f"supported; supported: {list(ACTIVATIONS)}")
    if not cfg["use_rotary_positional_embeddings"] and cfg["use_learned_positional_embeddings"]:
      raise ValueError("diffusers config: use_learned_positional_embeddings=True needs "
                       "use_rotary_positional_embeddings=True (diffusers refuses it too)")
    fields = dict(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"] or cfg["in_channels"],
        num_heads=cfg["num_attention_heads"],
        head_dim=cfg["attention_head_dim"],
        num_layers=cfg["num_layers"],
        text_dim=cfg["text_embed_dim"],
        time_embed_dim=cfg["time_embed_dim"],
        patch_size=cfg["patch_size"],
        patch_size_t=cfg["patch_size_t"],
        use_rotary=cfg["use_rotary_positional_embeddings"],
        use_learned_positional_embeddings=cfg["use_learned_positional_embeddings"],
        ofs_embed_dim=cfg["ofs_embed_dim"] or None,
        attention_bias=cfg["attention_bias"],
        patch_bias=cfg["patch_bias"],
        norm_elementwise_affine=cfg["norm_elementwise_affine"],
        norm_eps=cfg["norm_eps"],
        flip_sin_to_cos=cfg["flip_sin_to_cos"],
        freq_shift=cfg["freq_shift"],
        activation=cfg["activation_fn"],
        sample_height=cfg["sample_height"],
        sample_width=cfg["sample_width"],
        sample_frames=cfg["sample_frames"],
        temporal_compression_ratio=cfg["temporal_compression_ratio"],
        max_text_seq_length=cfg["max_text_seq_length"],
        spatial_interpolation_scale=cfg["spatial_interpolation_scale"],
        temporal_interpolation_scale=cfg["temporal_interpolation_scale"],
    )
    try:
      return cls(**{**fields, **overrides})
    except ValueError as e:
      raise ValueError(f"diffusers transformer config: {e}") from None

  def to_diffusers_config(self) -> dict[str, Any]:
    """The `CogVideoXTransformer3DModel` config.json dict (without bookkeeping keys).
    ffn_dim must be 4 * dim (diffusers' model has no key for it)."""
    if self.ffn_dim != 4 * self.dim:
      raise ValueError(f"CogVideoXConfig.ffn_dim={self.ffn_dim}: diffusers' model only has "
                       f"4 * dim = {4 * self.dim}")
    return {
        "num_attention_heads": self.num_heads,
        "attention_head_dim": self.head_dim,
        "in_channels": self.in_channels,
        "out_channels": self.out_channels,
        "flip_sin_to_cos": self.flip_sin_to_cos,
        "freq_shift": self.freq_shift,
        "time_embed_dim": self.time_embed_dim,
        "ofs_embed_dim": self.ofs_embed_dim,
        "text_embed_dim": self.text_dim,
        "num_layers": self.num_layers,
        "dropout": 0.0,
        "attention_bias": self.attention_bias,
        "sample_width": self.sample_width,
        "sample_height": self.sample_height,
        "sample_frames": self.sample_frames,
        "patch_size": self.patch_size,
        "patch_size_t": self.patch_size_t,
        "temporal_compression_ratio": self.temporal_compression_ratio,
        "max_text_seq_length": self.max_text_seq_length,
        "activation_fn": self.activation,
        "timestep_activation_fn": "silu",
        "norm_elementwise_affine": self.norm_elementwise_affine,
        "norm_eps": self.norm_eps,
        "spatial_interpolation_scale": self.spatial_interpolation_scale,
        "temporal_interpolation_scale": self.temporal_interpolation_scale,
        "use_rotary_positional_embeddings": self.use_rotary,
        "use_learned_positional_embeddings": self.use_learned_positional_embeddings,
        "patch_bias": self.patch_bias,
    }

  # ------------------------------------------------------------ our own json

  def to_dict(self) -> dict[str, Any]:
    """All fields, json-ready (dtypes as names)."""
    return validate.to_dict(self)

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any], **overrides) -> CogVideoXConfig:
    return validate.from_dict(cls, fields, overrides)

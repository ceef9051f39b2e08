"""`HunyuanVideoConfig`: the shape of a HunyuanVideo DiT, validated at construction.

Field names follow our model; `from_diffusers_config` / `to_diffusers_config`
translate to and from diffusers' `HunyuanVideoTransformer3DModel` config.json.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Mapping


from models import validate
from models.weights import parse_config

DTYPES = ("float32", "bfloat16", "float16")
QK_NORMS = ("rms_norm",)
# diffusers fixes these (they are not config keys): every LayerNorm / RMSNorm eps,
# and the token refiner's MLP width ratio.
EPS = 1e-6
REFINER_MLP_RATIO = 4.0

# diffusers' HunyuanVideoTransformer3DModel.__init__ arguments and their defaults:
# a key missing from a config.json takes the default, as in diffusers.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "num_layers": 20,
    "num_single_layers": 40,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": 4096,
    "pooled_projection_dim": 768,
    "rope_theta": 256.0,
    "rope_axes_dim": (16, 56, 56),
    "image_condition_type": None,
}
_DIFFUSERS_CLASS = "HunyuanVideoTransformer3DModel"


_dtype = functools.partial(validate.dtype, "HunyuanVideoConfig", allowed=DTYPES)
_int = functools.partial(validate.integer, "HunyuanVideoConfig")
_positive_float = functools.partial(validate.positive_float, "HunyuanVideoConfig")


@dataclasses.dataclass(frozen=True)
class HunyuanVideoConfig:
  """A HunyuanVideo-style DiT: a token refiner over the text, `num_layers`
  dual-stream blocks (separate video / text weights, joint attention over
  [video; text]), then `num_single_layers` single-stream blocks over the
  concatenated sequence. Sizes are in latent units (after the VAE).

  dim = num_heads * head_dim. rope_axes_dim splits head_dim between the (t, h, w)
  axes of the 3D RoPE (applied to the video tokens only). guidance_embeds: the
  model takes an embedded guidance scale (the guidance-distilled HunyuanVideo).
  dtype is the compute dtype (bfloat16 on accelerators), param_dtype the storage
  dtype; norms, modulation, the condition embeddings and RoPE run in float32.
  scan_layers stacks each kind of block under `nn.scan` (params get a leading
  layer axis); otherwise blocks are named `transformer_blocks_0 ...`.
  """

  in_channels: int
  out_channels: int
  num_heads: int
  head_dim: int
  num_layers: int           # dual-stream blocks
  num_single_layers: int    # single-stream blocks
  text_dim: int             # LLM hidden states (4096: the Llama encoder)
  pooled_dim: int           # pooled CLIP projection (768)
  num_refiner_layers: int = 2
  mlp_ratio: float = 4.0
  patch_size: int = 2
  patch_size_t: int = 1
  rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
  rope_theta: float = 256.0
  guidance_embeds: bool = True
  qk_norm: str = "rms_norm"
  param_dtype: Any = "float32"
  dtype: Any = "float32"
  scan_layers: bool = True
  remat: bool = False

  def __post_init__(self):
    for name in ("in_channels", "out_channels", "num_heads", "head_dim", "text_dim",
                 "pooled_dim", "patch_size", "patch_size_t"):
      object.__setattr__(self, name, _int(name, getattr(self, name), 1))
    for name in ("num_layers", "num_single_layers", "num_refiner_layers"):
      object.__setattr__(self, name, _int(name, getattr(self, name), 0))
    if self.num_layers + self.num_single_layers < 1:
      raise ValueError("HunyuanVideoConfig needs at least one block: num_layers="
                       f"{self.num_layers}, num_single_layers={self.num_single_layers}")
    object.__setattr__(self, "mlp_ratio", _positive_float("mlp_ratio", self.mlp_ratio))
    if self.mlp_dim < 1:
      raise ValueError(f"HunyuanVideoConfig.mlp_ratio={self.mlp_ratio} gives an MLP of "
                       f"int(dim * mlp_ratio) = {self.mlp_dim} < 1 channels")
    object.__setattr__(self, "rope_theta", _positive_float("rope_theta", self.rope_theta))
    axes = self.rope_axes_dim
    if (isinstance(axes, (str, bytes)) or not hasattr(axes, "__len__") or len(axes) != 3
        or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 2
                   and d % 2 == 0 for d in axes)):
      raise ValueError(f"HunyuanVideoConfig.rope_axes_dim must be three even ints >= 2 "
                       f"(t, h, w), got {self.rope_axes_dim!r}")
    axes = tuple(int(d) for d in axes)
    if sum(axes) != self.head_dim:
      raise ValueError(f"HunyuanVideoConfig.rope_axes_dim {axes} must sum to head_dim="
                       f"{self.head_dim}, got {sum(axes)}")
    object.__setattr__(self, "rope_axes_dim", axes)
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"HunyuanVideoConfig.qk_norm must be one of {QK_NORMS}, got "
                       f"{self.qk_norm!r}")
    for name in ("guidance_embeds", "scan_layers", "remat"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"HunyuanVideoConfig.{name} must be a bool, got {getattr(self, name)!r}")
    object.__setattr__(self, "param_dtype", _dtype("param_dtype", self.param_dtype))
    object.__setattr__(self, "dtype", _dtype("dtype", self.dtype))

  # ---------------------------------------------------------------- presets

  @classmethod
  def tiny(cls, **overrides) -> HunyuanVideoConfig:
    """One block of each kind, small dims: a CPU-fast stand-in with every component."""
    return cls(**{**dict(in_channels=4, out_channels=4, num_heads=2, head_dim=16, num_layers=1,
                         num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, text_dim=24,
                         pooled_dim=12, rope_axes_dim=(4, 6, 6)),
                  **overrides})

  @classmethod
  def hunyuan_video(cls, **overrides) -> HunyuanVideoConfig:
    """HunyuanVideo 13B text-to-video (hunyuanvideo-community/HunyuanVideo)."""
    return cls(**{**dict(in_channels=16, out_channels=16, num_heads=24, head_dim=128,
                         num_layers=20, num_single_layers=40, num_refiner_layers=2,
                         mlp_ratio=4.0, text_dim=4096, pooled_dim=768,
                         rope_axes_dim=(16, 56, 56), guidance_embeds=True, dtype="bfloat16"),
                  **overrides})

  # ------------------------------------------------------------ derived sizes

  @property
  def dim(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def mlp_dim(self) -> int:
    """Hidden width of the blocks' MLPs: int(dim * mlp_ratio), as diffusers."""
    return int(self.dim * self.mlp_ratio)

  @property
  def refiner_mlp_dim(self) -> int:
    return int(self.dim * REFINER_MLP_RATIO)

  @property
  def num_attention_layers(self) -> int:
    """Self-attention layers that take a control: the dual blocks, then the single ones."""
    return self.num_layers + self.num_single_layers

  @property
  def patch(self) -> tuple[int, int, int]:
    """(pt, ph, pw)."""
    return self.patch_size_t, self.patch_size, self.patch_size

  def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Token grid (t, h, w) of a latent of shape [C, frames, height, width]."""
    for name, size, patch in zip(("frames", "height", "width"), (frames, height, width),
                                 self.patch):
      if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1 \
          or size % patch:
        raise ValueError(
            f"latent {name}={size!r} must be a positive multiple of the patch size {patch} "
            f"(patch_size_t={self.patch_size_t}, patch_size={self.patch_size})")
    pt, ph, pw = self.patch
    return frames // pt, height // ph, width // pw

  def tokens(self, frames: int, height: int, width: int) -> int:
    """Video tokens of a latent [C, frames, height, width]."""
    return math.prod(self.grid(frames, height, width))

  def tokens_per_frame(self, height: int, width: int) -> int:
    """Video tokens in one (temporally patched) latent frame."""
    _, h, w = self.grid(self.patch_size_t, height, width)
    return h * w

  # ------------------------------------------------------------- diffusers

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> HunyuanVideoConfig:
    """From a `HunyuanVideoTransformer3DModel` config.json dict; overrides set our own
    fields (dtype, param_dtype, scan_layers, remat). Image-to-video variants
    (image_condition_type "latent_concat" / "token_replace") are not supported."""
    cfg = parse_config(config, _DIFFUSERS_DEFAULTS, where="diffusers transformer config",
                       class_names=(_DIFFUSERS_CLASS,))
    if cfg["image_condition_type"] is not None:
      raise ValueError(
          f"diffusers config key 'image_condition_type'={cfg['image_condition_type']!r} "
          f"(image-to-video) is not supported; only None is")
    if cfg["qk_norm"] not in QK_NORMS:
      raise ValueError(f"diffusers config key 'qk_norm' must be one of {QK_NORMS}, got "
                       f"{cfg['qk_norm']!r}")
    rope_axes_dim = cfg["rope_axes_dim"]
    if isinstance(rope_axes_dim, (list, tuple)):
      rope_axes_dim = tuple(rope_axes_dim)
    try:
      return cls(
          in_channels=cfg["in_channels"],
          out_channels=cfg["out_channels"] or cfg["in_channels"],
          num_heads=cfg["num_attention_heads"],
          head_dim=cfg["attention_head_dim"],
          num_layers=cfg["num_layers"],
          num_single_layers=cfg["num_single_layers"],
          num_refiner_layers=cfg["num_refiner_layers"],
          mlp_ratio=cfg["mlp_ratio"],
          patch_size=cfg["patch_size"],
          patch_size_t=cfg["patch_size_t"],
          text_dim=cfg["text_embed_dim"],
          pooled_dim=cfg["pooled_projection_dim"],
          rope_theta=cfg["rope_theta"],
          rope_axes_dim=rope_axes_dim,
          guidance_embeds=cfg["guidance_embeds"],
          qk_norm=cfg["qk_norm"],
          **overrides,
      )
    except ValueError as e:
      raise ValueError(f"diffusers transformer config: {e}") from None

  def to_diffusers_config(self) -> dict[str, Any]:
    """The `HunyuanVideoTransformer3DModel` config.json dict (without bookkeeping keys)."""
    return {
        "in_channels": self.in_channels,
        "out_channels": self.out_channels,
        "num_attention_heads": self.num_heads,
        "attention_head_dim": self.head_dim,
        "num_layers": self.num_layers,
        "num_single_layers": self.num_single_layers,
        "num_refiner_layers": self.num_refiner_layers,
        "mlp_ratio": self.mlp_ratio,
        "patch_size": self.patch_size,
        "patch_size_t": self.patch_size_t,
        "qk_norm": self.qk_norm,
        "guidance_embeds": self.guidance_embeds,
        "text_embed_dim": self.text_dim,
        "pooled_projection_dim": self.pooled_dim,
        "rope_theta": self.rope_theta,
        "rope_axes_dim": list(self.rope_axes_dim),
        "image_condition_type": None,
    }

  # ------------------------------------------------------------ our own json

  def to_dict(self) -> dict[str, Any]:
    """All fields, json-ready (dtypes as names)."""
    return validate.to_dict(self)

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any], **overrides) -> HunyuanVideoConfig:
    return validate.from_dict(cls, fields, overrides)

"""CogVideoX video DiT in Flax Linen, following diffusers' `CogVideoXTransformer3DModel`.

One joint sequence [text tokens; video tokens] runs through every block: the
"expert" adaptive LayerNorm-Zero (one LayerNorm, separate shift/scale/gate for
the text and the video tokens, from the time embedding), self-attention over
the whole sequence with QK LayerNorm and 3D RoPE on the video tokens only, and
one feed-forward with the same expert modulation. There is no cross-attention.

Submodules keep diffusers' names (patch_embed.proj, time_embedding.linear_1,
transformer_blocks.norm1.linear, attn1.to_q, ff.proj_in, norm_out, ...) so that
weight conversion is a near-identity rename (`models.cogvideox.convert`).
Mixed precision as in `models.wan`: the residual stream and the matrix products
run in `config.dtype`; LayerNorms (QK norms included), the time embedding, the
adaptive modulation, RoPE, the position embedding add and the gated residual
adds run in float32.

Self-attention goes through `models.attention.self_attention(q, k, v, control)`
with one layer's slice of the control (dense without one). q, k, v are
[B, text_len + video_tokens, num_heads, head_dim], text first: the video tokens
are the run [text_len, text_len + video_tokens) in frame-major order, as
`CogVideoXFamily.attention_layout` reports.

Latents are [B, C, F, H, W] like every modjax family (diffusers' model takes
[B, F, C, H, W]; the converter and the tests handle the transpose).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention
from models.cogvideox import positions
from models.cogvideox.config import QK_NORM_EPS, CogVideoXConfig
from models.family import AttentionLayout, ConfigFamily
from models.layers import MLP, FeedForward, FP32LayerNorm, layer_slice, stack, timestep_embedding
from models.rope import apply_rope

f32 = jnp.float32
DEFAULT_TEXT_LEN = 226  # diffusers' CogVideoX pipelines: max_sequence_length=226
DEFAULT_OFS = 2.0       # diffusers' CogVideoXImageToVideoPipeline: ofs = 2.0


# ------------------------------------------------------------------ patches

def patchify(latents: jnp.ndarray, patch_size: int, patch_size_t: int = 1) -> jnp.ndarray:
  """[B, C, F, H, W] -> tokens [B, S, C*pt*p*p]: tokens frame-major, then row, then
  column; features channel-major (C, pt, ph, pw), diffusers' patch order."""
  batch, channels, frames, height, width = latents.shape
  p, pt = patch_size, patch_size_t
  x = latents.reshape(batch, channels, frames // pt, pt, height // p, p, width // p, p)
  x = x.transpose(0, 2, 4, 6, 1, 3, 5, 7)  # B, F', H', W', C, pt, ph, pw
  return x.reshape(batch, -1, channels * pt * p * p)


def unpatchify(tokens: jnp.ndarray, patch_size: int, patch_size_t: int,
               grid: tuple[int, int, int]) -> jnp.ndarray:
  """Inverse of `patchify`: [B, S, C*pt*p*p] -> [B, C, F, H, W]."""
  batch = tokens.shape[0]
  p, pt = patch_size, patch_size_t
  gt, gh, gw = grid
  x = tokens.reshape(batch, gt, gh, gw, -1, pt, p, p)
  x = x.transpose(0, 4, 1, 5, 2, 6, 3, 7)  # B, C, F', pt, H', ph, W', pw
  return x.reshape(batch, -1, gt * pt, gh * p, gw * p)


# ------------------------------------------------------------------- layers

def _per_token(text_value, video_value, text_len: int, seq_len: int):
  """[B, 1, D] per-segment values -> [B, S, D]: text_value on the first text_len tokens."""
  is_text = (jnp.arange(seq_len) < text_len)[None, :, None]
  return jnp.where(is_text, text_value, video_value)


class LayerNormZero(nn.Module):
  """diffusers' CogVideoXLayerNormZero on the joint sequence: one LayerNorm, the
  text and video tokens modulated by their own shift/scale from the time
  embedding. Returns (modulated x float32 [B, S, D], per-token gate float32 [B, S, D])."""
  config: CogVideoXConfig
  text_len: int

  @nn.compact
  def __call__(self, x, temb):
    cfg = self.config
    mod = nn.Dense(6 * cfg.dim, dtype=f32, param_dtype=cfg.param_dtype,
                   name="linear")(nn.silu(temb.astype(f32)))
    shift, scale, gate, enc_shift, enc_scale, enc_gate = jnp.split(mod[:, None, :], 6, axis=-1)
    seq = x.shape[1]
    tok = lambda text_v, video_v: _per_token(text_v, video_v, self.text_len, seq)
    h = FP32LayerNorm(cfg.norm_eps, cfg.norm_elementwise_affine, cfg.param_dtype, name="norm")(x)
    return h * (1 + tok(enc_scale, scale)) + tok(enc_shift, shift), tok(enc_gate, gate)


class CogVideoXAttention(nn.Module):
  """Joint self-attention: QK LayerNorm per head, 3D RoPE on the video tokens'
  q and k, attention through `models.attention` and the control."""
  config: CogVideoXConfig
  text_len: int

  @nn.compact
  def __call__(self, x, rope, control):
    cfg = self.config
    dense = lambda name, bias: nn.Dense(cfg.dim, use_bias=bias, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype, name=name)
    heads = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, cfg.head_dim)
    q = heads(dense("to_q", cfg.attention_bias)(x))
    k = heads(dense("to_k", cfg.attention_bias)(x))
    v = heads(dense("to_v", cfg.attention_bias)(x))
    q = FP32LayerNorm(QK_NORM_EPS, True, cfg.param_dtype, name="norm_q")(q).astype(cfg.dtype)
    k = FP32LayerNorm(QK_NORM_EPS, True, cfg.param_dtype, name="norm_k")(k).astype(cfg.dtype)
    if rope is not None:  # the text rows of the tables are the identity (cos 1, sin 0)
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out, stats = attention.self_attention(q, k, v, control)
    out = out.reshape(*x.shape[:2], cfg.dim)
    return dense("to_out", True)(out), stats


class CogVideoXBlock(nn.Module):
  """norm1 -> joint attention -> gated residual; norm2 -> FFN -> gated residual.
  Returns (x [B, S, D] in config.dtype, attention stats)."""
  config: CogVideoXConfig
  text_len: int

  @nn.compact
  def __call__(self, x, temb, rope, control):
    cfg = self.config
    h, gate = LayerNormZero(cfg, self.text_len, name="norm1")(x, temb)
    out, stats = CogVideoXAttention(cfg, self.text_len, name="attn1")(
        h.astype(cfg.dtype), rope, control)
    x = (x.astype(f32) + out.astype(f32) * gate).astype(cfg.dtype)
    h, gate = LayerNormZero(cfg, self.text_len, name="norm2")(x, temb)
    gelu = functools.partial(jax.nn.gelu, approximate=cfg.activation == "gelu-approximate")
    out = FeedForward(cfg.ffn_dim, cfg.dim, gelu, cfg.dtype, cfg.param_dtype, name="ff")(
        h.astype(cfg.dtype))
    x = (x.astype(f32) + out.astype(f32) * gate).astype(cfg.dtype)
    return x, stats


class CogVideoXPatchEmbed(nn.Module):
  """text_proj of the text embeddings; proj of the video patches; position
  embedding (sin-cos for 2b, learned for 5b-I2V, none with RoPE alone).
  Returns the joint sequence [B, text_len + video_tokens, D] in config.dtype."""
  config: CogVideoXConfig

  @nn.compact
  def __call__(self, latents, context, grid):
    cfg = self.config
    text = nn.Dense(cfg.dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    name="text_proj")(context.astype(cfg.dtype))
    tokens = patchify(latents.astype(cfg.dtype), cfg.patch_size, cfg.temporal_patch)
    video = nn.Dense(cfg.dim, use_bias=cfg.has_patch_bias, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, name="proj")(tokens)
    if cfg.use_learned_positional_embeddings:
      sample_t, sample_h, sample_w = cfg.sample_grid
      table = self.param("pos_embedding", nn.initializers.normal(0.02),
                         (1, cfg.max_text_seq_length + sample_t * sample_h * sample_w, cfg.dim),
                         cfg.param_dtype)
      if grid == cfg.sample_grid:  # diffusers adds its learned table at the sample size only
        if text.shape[1] != cfg.max_text_seq_length:
          raise ValueError(
              f"context length {text.shape[1]} must equal max_text_seq_length="
              f"{cfg.max_text_seq_length} for the learned position embedding")
        joint = jnp.concatenate([text, video], axis=1).astype(f32) + table.astype(f32)
        return joint.astype(cfg.dtype)
    if not cfg.use_rotary or cfg.use_learned_positional_embeddings:
      # the sin-cos table (diffusers: of the actual size; zeros on the text tokens)
      video = (video.astype(f32) + positions.sincos_embedding(cfg, grid)[None]).astype(cfg.dtype)
    return jnp.concatenate([text, video], axis=1)


# -------------------------------------------------------------------- model

class CogVideoXDiT(nn.Module):
  """The v-prediction model: (latents, timestep, text, control) -> (model output, stats).

  latents [B, C_in, F, H, W], timestep [B] (or a scalar) in 0..1000, context
  [B, text_len, text_dim] (any static text_len; the text tokens come first in
  the joint sequence); control carries the per-layer attention choices with a
  leading layer axis (None: dense). ofs: scalar or [B], only (and always) with
  config.ofs_embed_dim. Returns the output [B, C_out, F, H, W] in config.dtype
  and the per-layer attention statistics stacked [L, ...] (an empty dict for
  dense attention).
  """
  config: CogVideoXConfig

  @nn.compact
  def __call__(self, latents, timestep, context,
               control: Optional[attention.AttentionHook] = None, ofs=None):
    cfg = self.config
    if latents.ndim != 5 or latents.shape[1] != cfg.in_channels:
      raise ValueError(
          f"latents must be [B, {cfg.in_channels}, F, H, W], got shape {latents.shape}")
    batch = latents.shape[0]
    timestep = _per_row("timestep", timestep, batch)
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.text_dim:
      raise ValueError(
          f"context must be [B={batch}, L, {cfg.text_dim}], got shape {context.shape}")
    text_len = context.shape[1]
    attention.check_control_layers(control, cfg.num_layers)

    grid = cfg.grid(*latents.shape[2:])
    rope = None
    if cfg.use_rotary:  # video rows after text_len identity rows: RoPE on the video tokens only
      cos, sin = positions.rope_tables(cfg, grid)
      rope = (jnp.concatenate([jnp.ones((text_len, cos.shape[1]), cos.dtype), cos]),
              jnp.concatenate([jnp.zeros((text_len, sin.shape[1]), sin.dtype), sin]))

    temb = MLP(cfg.time_embed_dim, nn.silu, f32, cfg.param_dtype, name="time_embedding")(
        timestep_embedding(timestep, cfg.dim, cfg.flip_sin_to_cos, cfg.freq_shift))
    if cfg.ofs_embed_dim is not None:
      if ofs is None:
        raise ValueError(f"ofs is required: the config has ofs_embed_dim={cfg.ofs_embed_dim}")
      ofs = _per_row("ofs", ofs, batch)
      temb = temb + MLP(cfg.ofs_embed_dim, nn.silu, f32, cfg.param_dtype, name="ofs_embedding")(
          timestep_embedding(ofs, cfg.ofs_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift))
    elif ofs is not None:
      raise ValueError("ofs given, but the config has no ofs embedding (ofs_embed_dim=None)")

    x = CogVideoXPatchEmbed(cfg, name="patch_embed")(latents, context, grid)

    block = CogVideoXBlock
    if cfg.remat:
      block = nn.remat(block, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast, 0), length=cfg.num_layers)
      x, stats = blocks(cfg, text_len, name="transformer_blocks")(x, temb, rope, control)
    else:
      per_layer = []
      for i in range(cfg.num_layers):
        x, layer_stats = block(cfg, text_len, name=f"transformer_blocks_{i}")(
            x, temb, rope, layer_slice(control, i))
        per_layer.append(layer_stats)
      stats = stack(per_layer)

    video = x[:, text_len:]
    video = FP32LayerNorm(cfg.norm_eps, cfg.norm_elementwise_affine, cfg.param_dtype,
                      name="norm_final")(video)
    video = _NormOut(cfg, name="norm_out")(video, temb)
    out = nn.Dense(cfg.out_channels * cfg.temporal_patch * cfg.patch_size ** 2, dtype=cfg.dtype,
                   param_dtype=cfg.param_dtype, name="proj_out")(video.astype(cfg.dtype))
    return unpatchify(out, cfg.patch_size, cfg.temporal_patch, grid), stats


class _NormOut(nn.Module):
  """diffusers' AdaLayerNorm(chunk_dim=1): shift, scale from the time embedding."""
  config: CogVideoXConfig

  @nn.compact
  def __call__(self, x, temb):
    cfg = self.config
    mod = nn.Dense(2 * cfg.dim, dtype=f32, param_dtype=cfg.param_dtype,
                   name="linear")(nn.silu(temb.astype(f32)))
    shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
    x = FP32LayerNorm(cfg.norm_eps, cfg.norm_elementwise_affine, cfg.param_dtype, name="norm")(x)
    return x * (1 + scale) + shift


def _per_row(name: str, value, batch: int) -> jnp.ndarray:
  value = jnp.asarray(value)
  if value.ndim == 0:
    value = jnp.broadcast_to(value, (batch,))
  if value.shape != (batch,):
    raise ValueError(f"{name} must be [B={batch}] or a scalar, got shape {value.shape}")
  return value


# --------------------------------------------------------------- functional

def _dummy_inputs(config: CogVideoXConfig, frames: int, height: int, width: int, text_len: int):
  latents = jnp.zeros((1, config.in_channels, frames, height, width), config.dtype)
  ofs = None if config.ofs_embed_dim is None else jnp.zeros((1,), f32)
  return (latents, jnp.zeros((1,), f32), jnp.zeros((1, text_len, config.text_dim), config.dtype),
          None, ofs)


def _smallest_latent(config: CogVideoXConfig) -> tuple[int, int, int]:
  if config.use_learned_positional_embeddings:
    _, h, w = config.sample_grid
    return config.temporal_patch, h * config.patch_size, w * config.patch_size
  return config.temporal_patch, config.patch_size, config.patch_size


def init_params(config: CogVideoXConfig, rng: jax.Array, frames: Optional[int] = None,
                height: Optional[int] = None, width: Optional[int] = None, text_len: int = 1):
  """Randomly initialised params (the params themselves do not depend on the sizes;
  the default is the smallest latent the config takes)."""
  sizes = _smallest_latent(config)
  sizes = tuple(s if given is None else given for s, given in zip(sizes, (frames, height, width)))
  inputs = _dummy_inputs(config, *sizes, text_len)
  return jax.jit(CogVideoXDiT(config).init)(rng, *inputs)["params"]


def param_shapes(config: CogVideoXConfig):
  """The params pytree as `jax.ShapeDtypeStruct`s, without allocating anything."""
  inputs = _dummy_inputs(config, *_smallest_latent(config), 1)
  return jax.eval_shape(CogVideoXDiT(config).init, jax.random.key(0), *inputs)["params"]


def apply(config: CogVideoXConfig, params, latents, timestep, context,
          control: Optional[attention.AttentionHook] = None, ofs=None):
  """Pure forward: returns (model output [B, C_out, F, H, W], stats stacked [L, ...])."""
  return CogVideoXDiT(config).apply({"params": params}, latents, timestep, context, control, ofs)


# ------------------------------------------------------------------- family

@dataclasses.dataclass(frozen=True)
class CogVideoXFamily(ConfigFamily):
  """CogVideoX text-to-video behind the `models.family.Family` protocol.

  Joint self-attention over [text; video]: the layout puts the video tokens at
  [text_len, text_len + video_tokens), text_len static (226: diffusers'
  max_sequence_length; the context handed to `apply` must have that many
  tokens). The model output is a v-prediction (pair it with
  `modjax.schedulers.CogVideoXDPM` / `CogVideoXDDIM`). ofs is the constant of
  the 1.5 "ofs" embedding, used only when the config has one.
  """
  config: CogVideoXConfig
  text_len: int = DEFAULT_TEXT_LEN
  ofs: float = DEFAULT_OFS
  name: str = "cogvideox"

  def __post_init__(self):
    if isinstance(self.text_len, bool) or not isinstance(self.text_len, int) or self.text_len < 1:
      raise ValueError(f"CogVideoXFamily.text_len must be a positive int, got {self.text_len!r}")
    if self.config.in_channels != self.config.out_channels:
      raise ValueError(
          f"CogVideoXFamily is text-to-video: in_channels ({self.config.in_channels}) must equal "
          f"out_channels ({self.config.out_channels}); image-to-video checkpoints take image "
          f"latents beside the noise, which no modjax pipeline builds")

  def attention_layout(self, frames: int, height: int, width: int) -> AttentionLayout:
    cfg = self.config
    tokens = cfg.tokens(frames, height, width)
    return AttentionLayout(num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                           head_dim=cfg.head_dim, seq_len=self.text_len + tokens,
                           video_start=self.text_len, video_tokens=tokens,
                           tokens_per_frame=cfg.tokens_per_frame(height, width))

  def apply(self, params, latents, timestep, context, control=None):
    if context.ndim != 3 or context.shape[1] != self.text_len:
      raise ValueError(f"context must be [B, text_len={self.text_len}, text_dim], got shape "
                       f"{tuple(context.shape)} (the attention layout assumes text_len tokens)")
    ofs = self.ofs if self.config.ofs_embed_dim is not None else None
    return apply(self.config, params, latents, timestep, context, control, ofs)

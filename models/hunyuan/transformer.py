"""HunyuanVideo in Flax Linen, following diffusers' `HunyuanVideoTransformer3DModel`.

    latents --x_embedder--> video tokens [B, S_v, dim]           (frame-major)
    text ----context_embedder (token refiner)--> text tokens [B, L, dim]
    timestep, pooled CLIP, embedded guidance --time_text_embed--> temb [B, dim]
    num_layers dual-stream blocks: own norms / QKV / MLPs for video and text,
        one joint self-attention over [video; text]
    num_single_layers single-stream blocks over the concatenated [video; text]
    norm_out, proj_out on the video tokens -> velocity [B, C, F, H, W]

Submodules keep diffusers' names (x_embedder.proj, context_embedder.token_refiner.
refiner_blocks.attn.to_q, transformer_blocks.attn.add_q_proj, ...), so weight
conversion is a near-identity rename (`models.hunyuan.convert`). Mixed precision
follows models/wan: the residual streams and the matrix products run in
config.dtype; LayerNorms, QK RMSNorms, RoPE, the condition embeddings
(time / guidance / pooled text, in float32 here where diffusers uses the model
dtype), the adaLN modulation arithmetic and the gated residual adds run in float32.

The joint self-attention sequence is [video; text] (video first: video_start = 0),
S = S_v + L tokens, 3D RoPE on the video tokens only. It goes through
`models.attention.self_attention(q, k, v, control)` with one layer's slice of the
control. The control's leading layer axis has num_layers + num_single_layers
entries: the dual blocks first (0 .. num_layers - 1), then the single blocks
(the authors' layer_idx numbering); the model slices it into two parts, one per
scan, and the per-layer stats come back concatenated on the same axis.

Text padding. diffusers masks the padded text tokens as keys (every query attends
to the video tokens and the first sum(text_mask) text tokens) and the token refiner
masks them as queries and keys. The refiner is text-only and always runs dense here,
honouring the mask exactly. In the joint attention:
  - without a control, the mask is honoured exactly: dense attention through
    `jax.nn.dot_product_attention(..., key_value_seq_lengths=S_v + sum(text_mask))`
    (xla or cuDNN, as `models.attention.dense_attention` picks);
  - with a control, the context must carry no mask (text_mask=None, a static
    property of the pytree): the control's `self_attention(q, k, v)` takes no key
    mask, so a padded sequence would be attended wrongly, and the model raises a
    ValueError instead. `HunyuanVideoContext.trim_padding()` drops the padding on
    the host; that leaves the video prediction unchanged (padded tokens never reach
    a real one), so the family's static text length is then the real prompt length.
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
from models.hunyuan.config import EPS, HunyuanVideoConfig
from models.hunyuan.context import HunyuanVideoContext
from models.hunyuan.rope import apply_rope, rope_tables
from models.layers import (MLP, FeedForward, FP32LayerNorm, RMSNorm, gelu_tanh, layer_slice, stack,
                           timestep_embedding)
from models.wan.transformer import patchify

f32 = jnp.float32


def unpatchify(tokens: jnp.ndarray, patch_size: tuple[int, int, int],
               grid: tuple[int, int, int]) -> jnp.ndarray:
  """[B, S, C*pt*ph*pw] -> [B, C, F, H, W]; a token's features are ordered (C, pt, ph, pw),
  as diffusers' HunyuanVideo proj_out writes them (Wan's order is (pt, ph, pw, C))."""
  batch = tokens.shape[0]
  (pt, ph, pw), (gt, gh, gw) = patch_size, grid
  x = tokens.reshape(batch, gt, gh, gw, -1, pt, ph, pw)
  x = x.transpose(0, 4, 1, 5, 2, 6, 3, 7)  # B, C, F', pt, H', ph, W', pw
  return x.reshape(batch, -1, gt * pt, gh * ph, gw * pw)


def _dense(cfg: HunyuanVideoConfig, features: int, name: str, dtype=None):
  return nn.Dense(features, dtype=cfg.dtype if dtype is None else dtype,
                  param_dtype=cfg.param_dtype, name=name)


def _layer_norm(x):
  return FP32LayerNorm(EPS)(x)


def joint_attention(q, k, v, kv_lengths, control):
  """One layer's joint self-attention: through the control (dense without one) when
  every key is real; dense with the keys past kv_lengths [B] masked otherwise."""
  if kv_lengths is None:
    return attention.self_attention(q, k, v, control)
  if control is not None:  # HunyuanVideoDiT checks this before tracing a layer
    raise ValueError("an attention control cannot take a text padding mask")
  out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths,
                                     implementation=attention.default_implementation(q.dtype))
  return out, {}


# ------------------------------------------------------------------- layers

class AdaNorm(nn.Module):
  """linear(silu(temb)) split into `chunks` float32 [B, 1, dim] modulation vectors
  (diffusers' AdaLayerNormZero(Single) / Continuous / HunyuanVideoAdaNorm linear)."""
  config: HunyuanVideoConfig
  chunks: int

  @nn.compact
  def __call__(self, temb):
    cfg = self.config
    emb = _dense(cfg, self.chunks * cfg.dim, "linear")(nn.silu(temb).astype(cfg.dtype))
    return jnp.split(emb.astype(f32)[:, None, :], self.chunks, axis=-1)


class PatchEmbed(nn.Module):
  """Conv3d with stride = kernel = patch, as a Dense on patchified tokens."""
  config: HunyuanVideoConfig

  @nn.compact
  def __call__(self, latents):
    cfg = self.config
    return _dense(cfg, cfg.dim, "proj")(patchify(latents.astype(cfg.dtype), cfg.patch))


class ConditionEmbedding(nn.Module):
  """temb = timestep_embedder(t) [+ guidance_embedder(guidance)] + text_embedder(pooled),
  float32 [B, dim] (diffusers' HunyuanVideoConditionEmbedding and, without guidance,
  CombinedTimestepTextProjEmbeddings)."""
  config: HunyuanVideoConfig
  guidance_embeds: bool

  @nn.compact
  def __call__(self, timestep, pooled, guidance=None):
    cfg = self.config
    mlp = lambda name, act: MLP(cfg.dim, act, f32, cfg.param_dtype, name=name)
    temb = mlp("timestep_embedder", nn.silu)(timestep_embedding(timestep, 256))
    if self.guidance_embeds:
      temb = temb + mlp("guidance_embedder", nn.silu)(timestep_embedding(guidance, 256))
    return temb + mlp("text_embedder", nn.silu)(pooled.astype(f32))


def _heads(cfg: HunyuanVideoConfig, x):
  return x.reshape(*x.shape[:2], cfg.num_heads, cfg.head_dim)


class RefinerAttention(nn.Module):
  """The token refiner's self-attention over the text (dense, with its pairwise mask)."""
  config: HunyuanVideoConfig

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.config
    q, k, v = (_heads(cfg, _dense(cfg, cfg.dim, n)(x)) for n in ("to_q", "to_k", "to_v"))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                       implementation=attention.default_implementation(q.dtype))
    return _dense(cfg, cfg.dim, "to_out")(out.reshape(*x.shape[:2], cfg.dim))


class RefinerBlock(nn.Module):
  """diffusers' HunyuanVideoIndividualTokenRefinerBlock. (x, temb, mask, _) -> (x, {})."""
  config: HunyuanVideoConfig

  @nn.compact
  def __call__(self, x, temb, mask, control):
    del control  # the refiner is text-only: never under the attention control
    cfg = self.config
    norm = lambda name: FP32LayerNorm(EPS, affine=True, param_dtype=cfg.param_dtype, name=name)
    out = RefinerAttention(cfg, name="attn")(norm("norm1")(x).astype(cfg.dtype), mask)
    gate_msa, gate_mlp = AdaNorm(cfg, 2, name="norm_out")(temb)
    x = (x.astype(f32) + out.astype(f32) * gate_msa).astype(cfg.dtype)
    ff = FeedForward(cfg.refiner_mlp_dim, cfg.dim, nn.silu, cfg.dtype, cfg.param_dtype, name="ff")
    out = ff(norm("norm2")(x).astype(cfg.dtype))
    x = (x.astype(f32) + out.astype(f32) * gate_mlp).astype(cfg.dtype)
    return x, {}


class IndividualTokenRefiner(nn.Module):
  config: HunyuanVideoConfig

  @nn.compact
  def __call__(self, x, temb, mask):
    x, _ = _blocks(self.config, RefinerBlock, self.config.num_refiner_layers, "refiner_blocks",
                   x, (temb, mask), None)
    return x


class TokenRefiner(nn.Module):
  """diffusers' HunyuanVideoTokenRefiner: the LLM states -> text tokens [B, L, dim].

  Its conditioning is the timestep plus the masked mean of the raw LLM states; its
  attention mask is (query real) & (key real), with key 0 always allowed so that
  padded rows stay finite, as in diffusers.
  """
  config: HunyuanVideoConfig

  @nn.compact
  def __call__(self, text, timestep, text_mask):
    cfg = self.config
    states = text.astype(f32)
    if text_mask is None:
      pooled, mask = states.mean(axis=1), None
    else:
      weights = text_mask.astype(f32)[..., None]
      pooled = (states * weights).sum(axis=1) / weights.sum(axis=1)
      real = text_mask != 0
      mask = real[:, None, None, :] & real[:, None, :, None]  # [B, 1, L, L]
      mask = mask.at[..., 0].set(True)
    temb = ConditionEmbedding(cfg, guidance_embeds=False, name="time_text_embed")(
        timestep, pooled)
    x = _dense(cfg, cfg.dim, "proj_in")(text.astype(cfg.dtype))
    return IndividualTokenRefiner(cfg, name="token_refiner")(x, temb, mask)


class DualAttention(nn.Module):
  """Joint attention of a dual-stream block: video QKV (to_*, norm_q/k, RoPE) and
  text QKV (add_*_proj, norm_added_q/k), one attention over [video; text]."""
  config: HunyuanVideoConfig

  @nn.compact
  def __call__(self, x, text, rope, kv_lengths, control):
    cfg = self.config
    rms = lambda name: RMSNorm(EPS, cfg.param_dtype, name=name)
    proj = lambda name, h: _heads(cfg, _dense(cfg, cfg.dim, name)(h))
    q = apply_rope(rms("norm_q")(proj("to_q", x)), *rope)
    k = apply_rope(rms("norm_k")(proj("to_k", x)), *rope)
    v = proj("to_v", x)
    q_text = rms("norm_added_q")(proj("add_q_proj", text))
    k_text = rms("norm_added_k")(proj("add_k_proj", text))
    v_text = proj("add_v_proj", text)
    out, stats = joint_attention(jnp.concatenate([q, q_text], axis=1),
                                 jnp.concatenate([k, k_text], axis=1),
                                 jnp.concatenate([v, v_text], axis=1), kv_lengths, control)
    out = out.reshape(*out.shape[:2], cfg.dim)
    video_len = x.shape[1]
    return (_dense(cfg, cfg.dim, "to_out")(out[:, :video_len]),
            _dense(cfg, cfg.dim, "to_add_out")(out[:, video_len:]), stats)


class DualBlock(nn.Module):
  """diffusers' HunyuanVideoTransformerBlock. ((x, text), temb, rope, kv_lengths,
  control) -> ((x, text), stats)."""
  config: HunyuanVideoConfig

  @nn.compact
  def __call__(self, carry, temb, rope, kv_lengths, control):
    cfg = self.config
    x, text = carry
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = AdaNorm(cfg, 6, name="norm1")(temb)
    (c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp,
     c_gate_mlp) = AdaNorm(cfg, 6, name="norm1_context")(temb)

    h = _layer_norm(x) * (1 + scale) + shift
    h_text = _layer_norm(text) * (1 + c_scale) + c_shift
    out, out_text, stats = DualAttention(cfg, name="attn")(
        h.astype(cfg.dtype), h_text.astype(cfg.dtype), rope, kv_lengths, control)
    x = (x.astype(f32) + out.astype(f32) * gate).astype(cfg.dtype)
    text = (text.astype(f32) + out_text.astype(f32) * c_gate).astype(cfg.dtype)

    h = _layer_norm(x) * (1 + scale_mlp) + shift_mlp
    h_text = _layer_norm(text) * (1 + c_scale_mlp) + c_shift_mlp
    ff = lambda name: FeedForward(cfg.mlp_dim, cfg.dim, gelu_tanh, cfg.dtype, cfg.param_dtype,
                                  name=name)
    out, out_text = ff("ff")(h.astype(cfg.dtype)), ff("ff_context")(h_text.astype(cfg.dtype))
    x = (x.astype(f32) + out.astype(f32) * gate_mlp).astype(cfg.dtype)
    text = (text.astype(f32) + out_text.astype(f32) * c_gate_mlp).astype(cfg.dtype)
    return (x, text), stats


class SingleAttention(nn.Module):
  """QKV of a single-stream block over [video; text], RoPE on the video part; no
  output projection (diffusers' pre_only attention)."""
  config: HunyuanVideoConfig

  @nn.compact
  def __call__(self, h, rope, kv_lengths, control):
    cfg = self.config
    rms = lambda name: RMSNorm(EPS, cfg.param_dtype, name=name)
    proj = lambda name: _heads(cfg, _dense(cfg, cfg.dim, name)(h))
    video_len = rope[0].shape[0]

    def rotate(t):
      return jnp.concatenate([apply_rope(t[:, :video_len], *rope), t[:, video_len:]], axis=1)

    q = rotate(rms("norm_q")(proj("to_q")))
    k = rotate(rms("norm_k")(proj("to_k")))
    out, stats = joint_attention(q, k, proj("to_v"), kv_lengths, control)
    return out.reshape(*h.shape[:2], cfg.dim), stats


class SingleBlock(nn.Module):
  """diffusers' HunyuanVideoSingleTransformerBlock on the joint sequence [video; text].
  (xs, temb, rope, kv_lengths, control) -> (xs, stats)."""
  config: HunyuanVideoConfig

  @nn.compact
  def __call__(self, xs, temb, rope, kv_lengths, control):
    cfg = self.config
    shift, scale, gate = AdaNorm(cfg, 3, name="norm")(temb)
    h = (_layer_norm(xs) * (1 + scale) + shift).astype(cfg.dtype)
    mlp = gelu_tanh(_dense(cfg, cfg.mlp_dim, "proj_mlp")(h))
    out, stats = SingleAttention(cfg, name="attn")(h, rope, kv_lengths, control)
    out = _dense(cfg, cfg.dim, "proj_out")(jnp.concatenate([out, mlp], axis=-1))
    xs = (xs.astype(f32) + out.astype(f32) * gate).astype(cfg.dtype)
    return xs, stats


def _blocks(cfg: HunyuanVideoConfig, block_cls, n: int, name: str, carry, broadcast: tuple,
            control):
  """n blocks of block_cls on carry: block(carry, *broadcast, control slice) -> (carry,
  stats). Scanned (`name`, params with a leading axis) or looped (`name_0` ...); control
  leaves have a leading axis of n. Returns (carry, stats stacked [n, ...])."""
  if n == 0:
    return carry, {}
  block = block_cls
  if cfg.remat:
    block = nn.remat(block, prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast,) * len(broadcast) + (0,), length=n)
    return blocks(cfg, name=name)(carry, *broadcast, control)
  per_layer = []
  for i in range(n):
    carry, stats = block(cfg, name=f"{name}_{i}")(carry, *broadcast, layer_slice(control, i))
    per_layer.append(stats)
  return carry, stack(per_layer)


def _concat_stats(first, second, n_first: int, n_second: int):
  if n_first == 0:
    return second
  if n_second == 0:
    return first
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), first, second)


# -------------------------------------------------------------------- model

class HunyuanVideoDiT(nn.Module):
  """The velocity model: (latents, timestep, context, control) -> (velocity, stats).

  latents [B, C_in, F, H, W]; timestep [B] (or a scalar) in 0..1000, as diffusers'
  pipeline feeds it (scheduler timesteps, 1000 sigma); context a
  `HunyuanVideoContext` (text [B, L, text_dim], pooled [B, pooled_dim], text_mask
  [B, L] or None, guidance [B] iff config.guidance_embeds). control: per-layer
  attention choices with a leading axis of num_layers + num_single_layers (dual
  blocks first), or None for dense attention; it needs text_mask=None. Returns the
  velocity [B, C_out, F, H, W] in config.dtype and the per-layer self-attention
  stats stacked on the same leading axis (an empty dict for dense attention).
  """
  config: HunyuanVideoConfig

  @nn.compact
  def __call__(self, latents, timestep, context: HunyuanVideoContext,
               control: Optional[attention.AttentionHook] = None):
    cfg = self.config
    batch = _check_inputs(cfg, latents, timestep, context, control)
    timestep = jnp.broadcast_to(jnp.asarray(timestep), (batch,))
    grid = cfg.grid(*latents.shape[2:])
    video_len = math.prod(grid)
    rope = rope_tables(grid, cfg.rope_axes_dim, cfg.rope_theta)

    text_mask, kv_lengths = context.text_mask, None
    if text_mask is not None:
      text_mask = jnp.asarray(text_mask)
      real = jnp.sum(text_mask != 0, axis=1, dtype=jnp.int32)
      kv_lengths = video_len + real  # diffusers: keys past S_v + sum(mask) are masked

    temb = ConditionEmbedding(cfg, cfg.guidance_embeds, name="time_text_embed")(
        timestep, context.pooled, context.guidance)
    x = PatchEmbed(cfg, name="x_embedder")(latents)
    text = TokenRefiner(cfg, name="context_embedder")(context.text, timestep, text_mask)

    dual_control = jax.tree.map(lambda a: a[:cfg.num_layers], control)
    single_control = jax.tree.map(lambda a: a[cfg.num_layers:], control)
    (x, text), dual_stats = _blocks(cfg, DualBlock, cfg.num_layers, "transformer_blocks",
                                    (x, text), (temb, rope, kv_lengths), dual_control)
    xs = jnp.concatenate([x, text], axis=1)
    xs, single_stats = _blocks(cfg, SingleBlock, cfg.num_single_layers,
                               "single_transformer_blocks", xs, (temb, rope, kv_lengths),
                               single_control)
    stats = _concat_stats(dual_stats, single_stats, cfg.num_layers, cfg.num_single_layers)

    scale, shift = AdaNorm(cfg, 2, name="norm_out")(temb)
    x = _layer_norm(xs[:, :video_len]) * (1 + scale) + shift
    x = _dense(cfg, cfg.out_channels * math.prod(cfg.patch), "proj_out")(x.astype(cfg.dtype))
    return unpatchify(x, cfg.patch, grid), stats


def _check_inputs(cfg: HunyuanVideoConfig, latents, timestep, context, control) -> int:
  """Static checks (shapes and None-ness) with errors naming the input. Returns B."""
  if latents.ndim != 5 or latents.shape[1] != cfg.in_channels:
    raise ValueError(
        f"latents must be [B, {cfg.in_channels}, F, H, W], got shape {latents.shape}")
  batch = latents.shape[0]
  if jnp.ndim(timestep) not in (0, 1) or (jnp.ndim(timestep) == 1
                                         and jnp.shape(timestep) != (batch,)):
    raise ValueError(f"timestep must be [B={batch}] or a scalar, got shape {jnp.shape(timestep)}")
  if not isinstance(context, HunyuanVideoContext):
    raise ValueError(f"context must be a HunyuanVideoContext, got {type(context).__name__}")
  text = context.text
  if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != cfg.text_dim:
    raise ValueError(f"context.text must be [B={batch}, L, {cfg.text_dim}], got shape "
                     f"{text.shape}")
  if context.pooled.shape != (batch, cfg.pooled_dim):
    raise ValueError(f"context.pooled must be [B={batch}, {cfg.pooled_dim}], got shape "
                     f"{context.pooled.shape}")
  if context.text_mask is not None and jnp.shape(context.text_mask) != text.shape[:2]:
    raise ValueError(f"context.text_mask must be [B={batch}, L={text.shape[1]}], got shape "
                     f"{jnp.shape(context.text_mask)}")
  if cfg.guidance_embeds:
    if context.guidance is None or jnp.shape(context.guidance) != (batch,):
      got = None if context.guidance is None else jnp.shape(context.guidance)
      raise ValueError(f"this model has guidance_embeds: context.guidance must be [B={batch}] "
                       f"(guidance_scale * 1000), got {got}")
  elif context.guidance is not None:
    raise ValueError("this model has no guidance_embeds: context.guidance must be None")
  attention.check_control_layers(
      control, cfg.num_attention_layers,
      f"num_layers + num_single_layers = {cfg.num_attention_layers}")
  if control is not None and context.text_mask is not None:
    raise ValueError(
        "an attention control takes no key mask: pass a context without text padding "
        "(text_mask=None), e.g. HunyuanVideoContext.trim_padding() on the host")
  return batch


# --------------------------------------------------------------- functional

def _dummy_inputs(config: HunyuanVideoConfig, frames: int, height: int, width: int,
                  text_len: int):
  latents = jnp.zeros((1, config.in_channels, frames, height, width), config.dtype)
  context = HunyuanVideoContext(
      text=jnp.zeros((1, text_len, config.text_dim), config.dtype),
      pooled=jnp.zeros((1, config.pooled_dim), config.dtype),
      guidance=jnp.zeros((1,), f32) if config.guidance_embeds else None)
  return latents, jnp.zeros((1,), f32), context


def init_params(config: HunyuanVideoConfig, rng: jax.Array, frames: int, height: int,
                width: int, text_len: int):
  """Randomly initialised params (they do not depend on the sizes)."""
  inputs = _dummy_inputs(config, frames, height, width, text_len)
  return jax.jit(HunyuanVideoDiT(config).init)(rng, *inputs)["params"]


def param_shapes(config: HunyuanVideoConfig):
  """The params pytree as `jax.ShapeDtypeStruct`s, without allocating anything."""
  inputs = _dummy_inputs(config, *config.patch, 1)
  return jax.eval_shape(HunyuanVideoDiT(config).init, jax.random.key(0), *inputs)["params"]


def apply(config: HunyuanVideoConfig, params, latents, timestep, context: HunyuanVideoContext,
          control: Optional[attention.AttentionHook] = None):
  """Pure forward: (velocity [B, C_out, F, H, W], stats stacked [L + L_single, ...])."""
  return HunyuanVideoDiT(config).apply({"params": params}, latents, timestep, context, control)


# ------------------------------------------------------------------- family

@dataclasses.dataclass(frozen=True)
class HunyuanVideoFamily(ConfigFamily):
  """HunyuanVideo behind the `models.family.Family` protocol.

  Self-attention is joint over [video; text]: video first (video_start = 0), then
  text_len text tokens (static: the family holds it; the context's text must have
  exactly this length). The layout's num_layers counts every self-attention layer,
  num_layers dual blocks then num_single_layers single blocks. context: a
  `HunyuanVideoContext` of precomputed prompt embeddings (the text encoders are not
  ported). The model predicts the flow velocity.
  """
  config: HunyuanVideoConfig
  text_len: int
  name: str = "hunyuan_video"

  def __post_init__(self):
    if isinstance(self.text_len, bool) or not isinstance(self.text_len, int) or self.text_len < 1:
      raise ValueError(f"HunyuanVideoFamily.text_len must be an int >= 1, got {self.text_len!r}")

  def attention_layout(self, frames: int, height: int, width: int) -> AttentionLayout:
    cfg = self.config
    video = cfg.tokens(frames, height, width)
    return AttentionLayout(num_layers=cfg.num_attention_layers, num_heads=cfg.num_heads,
                           head_dim=cfg.head_dim, seq_len=video + self.text_len,
                           video_start=0, video_tokens=video,
                           tokens_per_frame=cfg.tokens_per_frame(height, width))

  def apply(self, params, latents, timestep, context: HunyuanVideoContext, control=None):
    if context.text.shape[1] != self.text_len:
      raise ValueError(f"context.text has {context.text.shape[1]} tokens, but this family's "
                       f"text_len is {self.text_len}")
    return apply(self.config, params, latents, timestep, context, control)

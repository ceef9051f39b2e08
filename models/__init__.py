"""Flax video diffusion models, one subpackage per family, and what they share.

  models.wan      Wan2.1: transformer, config, VAE, diffusers conversion
  models.cogvideox CogVideoX: transformer, config, positions, diffusers conversion
  models.hunyuan  HunyuanVideo: transformer, config, context, diffusers conversion
  models.text     T5 encoders, tokenizer and prompt embeddings
  models.demo     the small pixel-space demo model: data, training, checkpoint
  models.family   the protocol the sampler sees (AttentionLayout, Family)
  models.attention dense attention and the control hook models call
  models.weights  safetensors folders and allow-listed configs
  models.convert_common  layer layouts and diffusers names the converters share
  models.validate  the config dataclasses' field checks and json round trip
  models.layers   layers the transformers share (norms, MLPs, timestep embedding)
  models.rope     the 3D rotary position embedding tables and rotation

Nothing here imports modjax: models know attention only through the control
object they are handed.
"""

from models.attention import AttentionHook, dense_attention
from models.family import AttentionLayout, Family

__all__ = ["AttentionHook", "AttentionLayout", "Family", "dense_attention"]

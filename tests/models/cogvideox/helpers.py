"""Shared helpers of the CogVideoX tests: the seeded diffusers oracle."""

import numpy as np


# A small diffusers CogVideoXTransformer3DModel: 2 layers, head_dim 16 (the RoPE
# needs a multiple of 16), sample grid 4 x 6 tokens.
TINY_DIFFUSERS = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                      time_embed_dim=24, text_embed_dim=20, num_layers=2, sample_width=12,
                      sample_height=8, sample_frames=9, max_text_seq_length=5, patch_size=2)


def seeded_diffusers_model(**kwargs):
  """The tiny diffusers model with `kwargs` changed, seeded, norms away from their init."""
  import torch
  from diffusers import CogVideoXTransformer3DModel

  torch.manual_seed(0)
  model = CogVideoXTransformer3DModel(**{**TINY_DIFFUSERS, **kwargs}).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.5 * torch.randn_like(p))
    if kwargs.get("use_learned_positional_embeddings"):  # a persistent buffer, text part too
      model.patch_embed.pos_embedding.copy_(torch.randn_like(model.patch_embed.pos_embedding))
  return model


def diffusers_rope(model, frames, height, width):
  """What diffusers' CogVideoXPipeline hands the transformer as image_rotary_emb, at
  latent sizes (the pipeline's `_prepare_rotary_positional_embeddings`)."""
  from diffusers.models.embeddings import get_3d_rotary_pos_embed
  from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

  cfg = model.config
  if not cfg.use_rotary_positional_embeddings:
    return None
  p, pt = cfg.patch_size, cfg.patch_size_t
  grid_hw = (height // p, width // p)
  base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
  if pt is None:
    return get_3d_rotary_pos_embed(cfg.attention_head_dim,
                                   get_resize_crop_region_for_grid(grid_hw, base_w, base_h),
                                   grid_hw, frames)
  return get_3d_rotary_pos_embed(cfg.attention_head_dim, None, grid_hw, (frames + pt - 1) // pt,
                                 grid_type="slice", max_size=(base_h, base_w))


def diffusers_forward(model, latents, timestep, context, ofs=None):
  """The diffusers model on our layout: latents [B, C, F, H, W] -> output [B, C, F, H, W]."""
  import torch

  frames, height, width = latents.shape[2:]
  rope = diffusers_rope(model, frames, height, width)
  with torch.no_grad():
    out = model(torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 2, 1, 3, 4))),
                torch.from_numpy(context), torch.from_numpy(timestep),
                ofs=None if ofs is None else torch.from_numpy(ofs),
                image_rotary_emb=rope, return_dict=False)[0]
  return out.numpy().transpose(0, 2, 1, 3, 4)

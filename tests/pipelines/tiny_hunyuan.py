"""A tiny seeded HunyuanVideo pipeline folder, written by diffusers' own
HunyuanVideoPipeline (transformer with embedded guidance, FlowMatchEuler scheduler
with shift 7; the Llama / CLIP text encoders and the VAE left out, as modjax does
not run them), and precomputed prompt embeddings of the shapes diffusers'
encode_prompt gives. Built inside the tests (no hub); needs torch and diffusers."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

CHANNELS, TEXT_DIM, POOLED_DIM = 4, 24, 12
# hunyuanvideo-community/HunyuanVideo scheduler/scheduler_config.json
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False,
                 max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000, shift=7.0,
                 shift_terminal=None, use_beta_sigmas=False, use_dynamic_shifting=False,
                 use_exponential_sigmas=False, use_karras_sigmas=False)


def diffusers_transformer(seed: int = 0):
  from diffusers import HunyuanVideoTransformer3DModel

  torch.manual_seed(seed)
  model = HunyuanVideoTransformer3DModel(
      in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=16,
      num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2,
      patch_size_t=1, text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
      rope_axes_dim=(4, 6, 6), guidance_embeds=True).eval()
  with torch.no_grad():  # norm weights away from their trivial init (adaLN linears stay)
    for name, p in model.named_parameters():
      if "norm" in name and ".linear." not in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.5 * torch.randn_like(p))
  return model


@functools.lru_cache(maxsize=None)
def _built(root: str, seed: int):
  from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

  folder = Path(root) / f"tiny-hunyuan-{seed}"
  pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None,
                              transformer=diffusers_transformer(seed), vae=None,
                              scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
                              text_encoder_2=None, tokenizer_2=None)
  pipe.save_pretrained(str(folder))
  return folder, pipe


def tiny_hunyuan_folder(root, seed: int = 0) -> Path:
  """Writes (once per root and seed) and returns the folder."""
  return _built(str(root), seed)[0]


def tiny_hunyuan_diffusers(root, seed: int = 0):
  """The diffusers HunyuanVideoPipeline object that wrote the folder."""
  return _built(str(root), seed)[1]


def prompt_embeddings(lengths=(7,), text_len: int = 10, seed: int = 1) -> dict:
  """prompt_embeds [B, text_len, 24], prompt_attention_mask [B, text_len] (int64, right
  padded to text_len, `lengths` real tokens), pooled_prompt_embeds [B, 12] (float32
  numpy): the keyword arguments of both pipelines."""
  rng = np.random.default_rng(seed)
  batch = len(lengths)
  mask = (np.arange(text_len)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  return dict(
      prompt_embeds=rng.standard_normal((batch, text_len, TEXT_DIM)).astype(np.float32),
      prompt_attention_mask=mask,
      pooled_prompt_embeds=rng.standard_normal((batch, POOLED_DIM)).astype(np.float32))

"""Tiny seeded CogVideoX pipeline folders, written by diffusers' own CogVideoXPipeline
(transformer, T5 v1.1 text encoder, tokenizer, scheduler, and for "5b" a tiny VAE that
modjax does not run): what a user's THUDM/CogVideoX-*b folder looks like, at a size CI
can run. Built inside the tests (no hub); needs torch, diffusers, transformers and
tokenizers.

  "5b"   CogVideoX-5b's layout: 3D RoPE crop-interpolated to the sample grid, 2x2
         Conv2d patches, CogVideoXDDIMScheduler (deterministic), a VAE folder.
  "1.5"  CogVideoX1.5-5B's: 2x2x2 Linear patches (latent frames padded to even),
         slice-grid RoPE, no patch bias, CogVideoXDPMScheduler (stochastic); no VAE.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tests.models.text import oracles

# THUDM/CogVideoX-5b scheduler/scheduler_config.json (1.5-5B's is the same with the
# DPM class).
SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                 clip_sample=False, clip_sample_range=1.0, num_train_timesteps=1000,
                 prediction_type="v_prediction", rescale_betas_zero_snr=True,
                 sample_max_value=1.0, set_alpha_to_one=True, snr_shift_scale=3.0,
                 steps_offset=0, timestep_spacing="trailing", trained_betas=None)
CHANNELS = 4
TEXT_DIM = 32
VARIANTS = ("5b", "1.5")
_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, in_channels=CHANNELS,
                    out_channels=CHANNELS, time_embed_dim=24, text_embed_dim=TEXT_DIM,
                    num_layers=2, use_rotary_positional_embeddings=True)
_VARIANT = {
    "5b": dict(sample_width=12, sample_height=8, sample_frames=9),
    "1.5": dict(sample_width=32, sample_height=32, sample_frames=17, patch_size_t=2,
                patch_bias=False),
}


def _perturb_norms(model, scale=0.3):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and p.ndim == 1:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + scale * torch.randn_like(p))


def diffusers_components(variant: str, seed: int = 0):
  """(transformer, vae or None, text_encoder, scheduler), float32 and in eval mode."""
  from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler,
                         CogVideoXTransformer3DModel)

  torch.manual_seed(seed)
  transformer = CogVideoXTransformer3DModel(**_TRANSFORMER, **_VARIANT[variant]).eval()
  _perturb_norms(transformer)
  vae = None
  if variant == "5b":  # 4 blocks: x8 spatial, as the real VAE (the pipeline reads it)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=CHANNELS,
                                 layers_per_block=1, norm_num_groups=4,
                                 scaling_factor=0.7).eval()
  text_encoder = oracles.hf_encoder("t5", seed=seed, d_model=TEXT_DIM)
  scheduler_class = CogVideoXDDIMScheduler if variant == "5b" else CogVideoXDPMScheduler
  return transformer, vae, text_encoder, scheduler_class(**SCHEDULER)


@functools.lru_cache(maxsize=None)
def _built(root: str, variant: str, seed: int):
  import transformers
  from diffusers import CogVideoXPipeline

  folder = Path(root) / f"tiny-cogvideox-{variant}-{seed}"
  transformer, vae, text_encoder, scheduler = diffusers_components(variant, seed)
  tokenizer_dir = oracles.t5_tokenizer_folder(Path(root) / f"tokenizer-{variant}-{seed}")
  tokenizer = transformers.T5TokenizerFast.from_pretrained(str(tokenizer_dir))
  pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                           transformer=transformer, scheduler=scheduler)
  pipe.save_pretrained(str(folder))
  return folder, pipe


def tiny_cogvideox_folder(root, variant: str = "5b", seed: int = 0) -> Path:
  """Writes (once per root, variant and seed) and returns the folder."""
  return _built(str(root), variant, seed)[0]


def tiny_cogvideox_diffusers(root, variant: str = "5b", seed: int = 0):
  """The diffusers CogVideoXPipeline object that wrote the folder."""
  return _built(str(root), variant, seed)[1]

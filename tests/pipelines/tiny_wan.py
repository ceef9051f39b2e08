"""A tiny seeded Wan2.1 pipeline folder, written by diffusers' own WanPipeline
(transformer, VAE, UMT5 text encoder, tokenizer, UniPC scheduler): what a user's
Wan2.1-T2V-*-Diffusers folder looks like, at a size CI can run. Built inside the
tests (no hub); needs torch, diffusers, transformers and tokenizers."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tests.models.text import oracles

# Wan2.1-T2V-1.3B-Diffusers/scheduler/scheduler_config.json (diffusers' UniPC for Wan).
WAN_SCHEDULER = dict(
    beta_end=0.02, beta_schedule="linear", beta_start=0.0001, disable_corrector=[],
    dynamic_thresholding_ratio=0.995, final_sigmas_type="zero", flow_shift=3.0,
    lower_order_final=True, num_train_timesteps=1000, predict_x0=True,
    prediction_type="flow_prediction", rescale_betas_zero_snr=False, sample_max_value=1.0,
    solver_order=2, solver_p=None, solver_type="bh2", steps_offset=0, thresholding=False,
    timestep_spacing="linspace", trained_betas=None, use_beta_sigmas=False,
    use_exponential_sigmas=False, use_flow_sigmas=True, use_karras_sigmas=False)
Z_DIM = 4
TEXT_DIM = 32


def _perturb_norms(model, scale=0.2):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and p.ndim == 1:
        p.copy_(1 + scale * torch.randn_like(p))


def diffusers_pipeline(seed: int = 0):
  """The tiny diffusers WanPipeline (float32, eval mode)."""
  from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline,
                         WanTransformer3DModel)
  import transformers

  torch.manual_seed(seed)
  transformer = WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=Z_DIM,
      out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48, num_layers=2,
      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
  vae = AutoencoderKLWan(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                         attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0,
                         latents_mean=[0.1, -0.2, 0.05, 0.3], latents_std=[1.5, 0.7, 2.0, 1.1])
  text_encoder = oracles.hf_encoder("umt5", seed=seed, d_model=TEXT_DIM)
  for module in (transformer, vae):
    _perturb_norms(module)
    module.eval()
  return transformer, vae, text_encoder, UniPCMultistepScheduler(**WAN_SCHEDULER), transformers, WanPipeline


@functools.lru_cache(maxsize=None)
def _built(root: str, seed: int):
  folder = Path(root) / f"tiny-wan-{seed}"
  transformer, vae, text_encoder, scheduler, transformers, WanPipeline = diffusers_pipeline(seed)
  tokenizer_dir = oracles.t5_tokenizer_folder(Path(root) / f"tokenizer-{seed}")
  tokenizer = transformers.T5TokenizerFast.from_pretrained(str(tokenizer_dir))
  pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                     vae=vae, scheduler=scheduler)
  pipe.save_pretrained(str(folder))
  # The layout of the big checkpoints (Wan2.1-14B, UMT5-XXL): every component in shards
  # listed by an index json.
  pipe.save_pretrained(str(Path(root) / f"tiny-wan-{seed}-sharded"), max_shard_size="40KB")
  return folder, pipe


def tiny_wan_sharded_folder(root, seed: int = 0) -> Path:
  """The same weights as `tiny_wan_folder`, every component saved in shards."""
  _built(str(root), seed)
  return Path(root) / f"tiny-wan-{seed}-sharded"


def tiny_wan_folder(root, seed: int = 0) -> Path:
  """Writes (once per root and seed) and returns the folder."""
  return _built(str(root), seed)[0]


def tiny_wan_diffusers(root, seed: int = 0):
  """The diffusers WanPipeline object that wrote `tiny_wan_folder(root, seed)` (its
  from_pretrained would need accelerate for the transformer's float32 modules)."""
  return _built(str(root), seed)[1]

"""CogVideoX (text-to-video): the joint-attention transformer, its config, its
positions (3D RoPE / sin-cos), diffusers conversion, the pipeline's helpers
(prompt embeddings, latent sizes, dynamic guidance) and the VAE decoder."""

from models.cogvideox.config import CogVideoXConfig
from models.cogvideox.convert import (
    diffusers_tensor_shapes,
    load_diffusers_transformer,
    load_params,
    save_diffusers_transformer,
    save_params,
    stack_blocks,
    unstack_blocks,
)
from models.cogvideox.positions import rope_tables, sincos_embedding
from models.cogvideox.sampling import (
    dynamic_guidance_scales,
    encode_prompts,
    latent_frames,
    latent_size,
)
from models.cogvideox.transformer import (
    DEFAULT_TEXT_LEN,
    CogVideoXDiT,
    CogVideoXFamily,
    apply,
    init_params,
    param_shapes,
    patchify,
    unpatchify,
)
from models.cogvideox.vae import CogVideoXVAEConfig, decode, video_frames, video_shape
from models.cogvideox.vae_convert import load_diffusers_vae
from models.cogvideox.vae_encoder import encode

__all__ = [
    "DEFAULT_TEXT_LEN", "CogVideoXConfig", "CogVideoXDiT", "CogVideoXFamily", "CogVideoXVAEConfig",
    "apply", "decode", "encode",
    "diffusers_tensor_shapes", "dynamic_guidance_scales", "encode_prompts", "init_params",
    "latent_frames", "latent_size", "load_diffusers_transformer", "load_diffusers_vae",
    "load_params",
    "param_shapes", "patchify", "rope_tables", "save_diffusers_transformer", "save_params",
    "sincos_embedding", "stack_blocks", "unpatchify", "unstack_blocks", "video_frames",
    "video_shape",
]

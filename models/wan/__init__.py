"""Wan2.1 (text-to-video): the transformer, its config, the video VAE and diffusers
conversion."""

from models.wan.config import WanConfig
from models.wan.convert import (
    load_diffusers_transformer,
    load_params,
    save_diffusers_transformer,
    save_params,
    stack_blocks,
    unstack_blocks,
)
from models.wan.rope import apply_rope, rope_tables
from models.wan.transformer import (
    WanDiT,
    WanFamily,
    apply,
    init_params,
    param_shapes,
    patchify,
    unpatchify,
)
from models.wan.vae import (
    WanVAEConfig,
    decode,
    decode_memory_bytes,
    denormalize_latents,
    encode,
    normalize_latents,
)
from models.wan.vae_convert import load_diffusers_vae, save_diffusers_vae

__all__ = [
    "WanConfig", "WanDiT", "WanFamily", "apply", "apply_rope", "init_params",
    "load_diffusers_transformer", "load_params", "param_shapes", "patchify", "rope_tables",
    "save_diffusers_transformer", "save_params", "stack_blocks", "unpatchify", "unstack_blocks",
    # the video VAE
    "WanVAEConfig", "decode", "decode_memory_bytes", "denormalize_latents", "encode",
    "load_diffusers_vae", "normalize_latents", "save_diffusers_vae",
]

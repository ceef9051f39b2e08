"""Flax video DiT (Wan2.1-style), its config, and diffusers weight conversion."""

from models.attention import AttentionControl, self_attention
from models.config import DiTConfig
from models.loading import (
    load_diffusers_transformer,
    load_params,
    save_diffusers_transformer,
    save_params,
    stack_blocks,
    unstack_blocks,
)
from models.rope import apply_rope, rope_tables
from models.wan import WanDiT, apply, init_params, param_shapes, patchify, unpatchify

__all__ = [
    "AttentionControl",
    "DiTConfig",
    "WanDiT",
    "apply",
    "apply_rope",
    "init_params",
    "load_diffusers_transformer",
    "load_params",
    "param_shapes",
    "patchify",
    "rope_tables",
    "save_diffusers_transformer",
    "save_params",
    "self_attention",
    "stack_blocks",
    "unpatchify",
    "unstack_blocks",
]

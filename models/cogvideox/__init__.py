"""CogVideoX (text-to-video): the joint-attention transformer, its config, its
positions (3D RoPE / sin-cos) and diffusers conversion."""

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

__all__ = [
    "DEFAULT_TEXT_LEN", "CogVideoXConfig", "CogVideoXDiT", "CogVideoXFamily", "apply",
    "diffusers_tensor_shapes", "init_params", "load_diffusers_transformer", "load_params",
    "param_shapes", "patchify", "rope_tables", "save_diffusers_transformer", "save_params",
    "sincos_embedding", "stack_blocks", "unpatchify", "unstack_blocks",
]

"""HunyuanVideo (text-to-video): the transformer with its token refiner, its config,
the text context it takes and diffusers conversion. The text encoders (LLaVA-Llama-3
and CLIP) are not ported: the model takes precomputed prompt embeddings."""

from models.hunyuan.config import HunyuanVideoConfig
from models.hunyuan.context import HunyuanVideoContext
from models.hunyuan.convert import (
    diffusers_shapes,
    load_diffusers_transformer,
    save_diffusers_transformer,
    to_loop_layout,
)
from models.hunyuan.rope import rope_tables
from models.hunyuan.transformer import (
    HunyuanVideoDiT,
    HunyuanVideoFamily,
    apply,
    init_params,
    param_shapes,
    unpatchify,
)

__all__ = [
    "HunyuanVideoConfig", "HunyuanVideoContext", "HunyuanVideoDiT", "HunyuanVideoFamily",
    "apply", "diffusers_shapes", "init_params", "load_diffusers_transformer", "param_shapes",
    "rope_tables", "save_diffusers_transformer", "to_loop_layout", "unpatchify",
]

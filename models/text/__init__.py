"""Text encoders of the video pipelines: T5-family encoders (UMT5 for Wan2.1,
T5 v1.1 for CogVideoX) in Flax, their transformers-format checkpoints, the
checkpoint's tokenizer, and prompt encoding with WanPipeline's semantics."""

from models.text.convert import load_text_encoder, save_text_encoder, transformers_tensor_shapes
from models.text.prompts import encode_prompts, prompt_clean
from models.text.t5 import T5Encoder, T5EncoderConfig, encode, init_params, param_shapes
from models.text.tokenizer import Tokenizer

__all__ = [
    "T5Encoder",
    "T5EncoderConfig",
    "Tokenizer",
    "encode",
    "encode_prompts",
    "init_params",
    "load_text_encoder",
    "param_shapes",
    "prompt_clean",
    "save_text_encoder",
    "transformers_tensor_shapes",
]

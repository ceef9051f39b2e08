"""From inputs people have (a label, a prompt, a checkpoint folder) to videos."""

from modjax.pipelines.cogvideox import CogVideoXOutput, CogVideoXPipeline
from modjax.pipelines.demo import LoadedModel, ModelDefaults, load_model
from modjax.pipelines.hunyuan import HunyuanVideoOutput, HunyuanVideoPipeline
from modjax.pipelines.wan import WanOutput, WanPipeline

__all__ = ["CogVideoXOutput", "CogVideoXPipeline", "HunyuanVideoOutput", "HunyuanVideoPipeline",
           "LoadedModel", "ModelDefaults", "WanOutput", "WanPipeline", "load_model"]

"""From inputs people have (a label, a prompt, a checkpoint folder) to videos."""

from modjax.pipelines.demo import LoadedModel, ModelDefaults, load_model

__all__ = ["LoadedModel", "ModelDefaults", "load_model"]

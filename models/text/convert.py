"""transformers-format T5 encoder checkpoints <-> our params.

A folder holds config.json (model_type "umt5", "t5" or "mt5") plus either
model.safetensors or shards listed in model.safetensors.index.json, as
`UMT5EncoderModel` / `T5EncoderModel.save_pretrained` write them (a pipeline
folder with a text_encoder/ subfolder works too). Tensor names map to our
params as follows (i: layer; our per-layer params are stacked under "block"):

  shared.weight | encoder.embed_tokens.weight          <-> embed_tokens
  encoder.block.{i}.layer.0.layer_norm.weight           <-> block.attention_norm.scale[i]
  encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight
                                                         <-> block.attention.{q,k,v,o}.kernel[i]
  encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight
                        per_layer (UMT5)                 <-> block.attention.relative_attention_bias[i]
                        shared (T5; layer 0 only)        <-> relative_attention_bias
  encoder.block.{i}.layer.1.layer_norm.weight           <-> block.ffn_norm.scale[i]
  encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wi,wo}.weight
                                                         <-> block.ffn.{...}.kernel[i]
  encoder.final_layer_norm.weight                       <-> final_layer_norm.scale

Linear weights [out, in] are transposed to Flax kernels [in, out].

The embedding is tied in transformers: a checkpoint may hold `shared.weight`,
`encoder.embed_tokens.weight` or both (then `shared.weight` is read, as
transformers ties the encoder's table to it; the two are not compared).
Decoder and LM-head tensors of a full T5 checkpoint (`decoder.*`, `lm_head.*`)
are skipped, as `T5EncoderModel` itself ignores them; any other tensor we do
not expect is an error. Every name and shape is checked before any data is read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from models import weights
from models.text.t5 import T5EncoderConfig, param_shapes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")
SKIPPED_PREFIXES = ("decoder.", "lm_head.")

_LAYER = "encoder.block.{i}."
# Our path inside "block" -> the transformers name after "encoder.block.{i}.".
_BLOCK_NAMES = {
    ("attention_norm", "scale"): "layer.0.layer_norm.weight",
    ("attention", "relative_attention_bias"): "layer.0.SelfAttention.relative_attention_bias.weight",
    **{("attention", n, "kernel"): f"layer.0.SelfAttention.{n}.weight" for n in "qkvo"},
    ("ffn_norm", "scale"): "layer.1.layer_norm.weight",
    **{("ffn", n, "kernel"): f"layer.1.DenseReluDense.{n}.weight"
       for n in ("wi", "wi_0", "wi_1", "wo")},
}
_TOP_NAMES = {
    ("embed_tokens",): EMBEDDING_NAMES[0],
    ("relative_attention_bias",): "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ("final_layer_norm", "scale"): "encoder.final_layer_norm.weight",
}


@dataclasses.dataclass(frozen=True)
class _Entry:
  name: str                    # transformers tensor name
  path: tuple[str, ...]        # our param path
  layer: int | None            # index into the stacked "block" axis, None at the top
  shape: tuple[int, ...]       # the transformers tensor's shape
  transpose: bool              # Linear weight <-> Flax kernel


def _entries(config: T5EncoderConfig) -> Iterator[_Entry]:
  """Every tensor of the transformers encoder with our param it maps to (the
  embedding once, as shared.weight)."""
  for path, leaf in traverse_util.flatten_dict(param_shapes(config)).items():
    transpose = path[-1] == "kernel"
    if path[0] == "block":
      shape = leaf.shape[1:][::-1] if transpose else leaf.shape[1:]
      for i in range(config.num_layers):
        yield _Entry(_LAYER.format(i=i) + _BLOCK_NAMES[path[1:]], path, i, tuple(shape), transpose)
    else:
      yield _Entry(_TOP_NAMES[path], path, None, tuple(leaf.shape), transpose)


def transformers_tensor_shapes(config: T5EncoderConfig) -> dict[str, tuple[int, ...]]:
  """Name -> shape of every tensor in the state_dict of the transformers encoder
  with this config (both names of the tied embedding), computed without
  allocating any weight."""
  shapes = {e.name: e.shape for e in _entries(config)}
  shapes[EMBEDDING_NAMES[1]] = shapes[EMBEDDING_NAMES[0]]
  return shapes


def encoder_dir(path) -> Path:
  """The folder with config.json: path itself or its text_encoder/ subfolder."""
  return weights.model_dir(path, "text_encoder", "text encoder")


def load_text_encoder(path, **overrides) -> tuple[T5EncoderConfig, Any]:
  """Reads a transformers UMT5 / T5 / mT5 encoder folder (or a pipeline folder
  with a text_encoder/ subfolder). overrides set our own config fields (dtype,
  param_dtype, wo_float32). Returns (config, params), params in
  config.param_dtype, each tensor cast as it is read."""
  folder = encoder_dir(path)
  config_file = folder / CONFIG_NAME
  config = T5EncoderConfig.from_transformers_config(weights.read_json(config_file),
                                                    where=str(config_file), **overrides)
  files = weights.weight_files(folder, WEIGHTS_NAME, INDEX_NAME)
  # Read the embedding from shared.weight when present, else from its alias.
  embedding = next((n for n in EMBEDDING_NAMES if n in files), EMBEDDING_NAMES[0])
  entries = [dataclasses.replace(e, name=embedding) if e.name == EMBEDDING_NAMES[0] else e
             for e in _entries(config)]
  expected = {e.name: e.shape for e in entries}
  expected.update({n: expected[embedding] for n in EMBEDDING_NAMES if n in files})
  skip = lambda name: name.startswith(SKIPPED_PREFIXES)
  with weights.open_checked(files, expected, str(folder), skip=skip) as tensors:
    return config, _read_params(config, entries, tensors.get)


def _read_params(config: T5EncoderConfig, entries, read: Callable[[str], np.ndarray]):
  """Params in config.param_dtype: stacked layers are written straight into
  their array, so the host holds one copy of the model."""
  shapes = traverse_util.flatten_dict(param_shapes(config))
  flat = {path: np.empty(leaf.shape, leaf.dtype) for path, leaf in shapes.items()}
  for e in entries:
    array = read(e.name)
    array = array.T if e.transpose else array
    if e.layer is None:
      flat[e.path][...] = array
    else:
      flat[e.path][e.layer] = array
  return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))


def save_text_encoder(config: T5EncoderConfig, params, path, *,
                      max_shard_size: int = 5 * 2**30) -> None:
  """Writes config.json and the weights as transformers' `save_pretrained` lays
  them out (`shared.weight` for the tied embedding), sharded with an index json
  beyond max_shard_size bytes. Weights keep their dtype."""
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  weights.check_params(traverse_util.flatten_dict(param_shapes(config)), flat, "params")
  tensors = {}
  for e in _entries(config):
    array = flat[e.path] if e.layer is None else flat[e.path][e.layer]
    tensors[e.name] = array.T if e.transpose else array
  weights.save_model_folder(path, config.to_transformers_config(), tensors, WEIGHTS_NAME,
                            INDEX_NAME, max_shard_size=max_shard_size)

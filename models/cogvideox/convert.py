"""Weights in and out: diffusers `CogVideoXTransformer3DModel` checkpoints and our own.

A diffusers transformer folder holds config.json plus either
diffusion_pytorch_model.safetensors or shards listed in
diffusion_pytorch_model.safetensors.index.json. Tensor names map to our params
almost by identity (our modules keep diffusers' names):

  transformer_blocks.{i}.X     <-> transformer_blocks_{i}.X (loop layout) or
                                   transformer_blocks.X[i] (scanned)
  *.attn1.to_out.0             <-> *.attn1.to_out
  *.ff.net.0.proj / *.ff.net.2 <-> *.ff.proj_in / *.ff.proj_out
  *.weight of a Linear         <-> *.kernel, transposed
  *.weight of a LayerNorm      <-> *.scale
  patch_embed.proj.weight      <-> patch_embed.proj.kernel [C*pt*p*p, dim]: CogVideoX 1.0's
                                   Conv2d [dim, C, p, p] or 1.5's Linear [dim, C*pt*p*p],
                                   both flattened channel-major (our patch order)
  patch_embed.pos_embedding    <-> patch_embed.pos_embedding (learned embedding only; the
                                   sin-cos table of 2b is not stored, as in diffusers)

Every tensor's name and shape is checked against the config before any data is
read; errors name the tensor and the file. Our own checkpoints (`save_params` /
`load_params`) are one safetensors file of flat dotted param paths plus a json
file of the `CogVideoXConfig` beside it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from models import convert_common as common
from models.cogvideox.config import CogVideoXConfig
from models.cogvideox.transformer import param_shapes
from models.convert_common import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME  # noqa: F401

BLOCKS = "transformer_blocks"


def _patch_shape(shape: tuple[int, ...], config: CogVideoXConfig) -> tuple[int, ...]:
  if config.patch_size_t is None:  # Conv2d [dim, C, p, p]
    return (shape[1], config.in_channels, config.patch_size, config.patch_size)
  return tuple(shape[::-1])  # Linear [dim, C*pt*p*p]


def _patch_to_diffusers(array: np.ndarray, config: CogVideoXConfig) -> np.ndarray:
  return array.T.reshape(_patch_shape(array.shape, config))


def _patch_from_diffusers(array: np.ndarray, config: CogVideoXConfig) -> np.ndarray:
  return array.reshape(array.shape[0], -1).T


LAYOUT = common.DiffusersTransformer(
    config_cls=CogVideoXConfig,
    param_shapes=param_shapes,
    stacked={(BLOCKS,): "num_layers"},
    # Our module path (suffix) -> diffusers module path.
    renames=(("attn1.to_out", "attn1.to_out.0"), ("ff.proj_in", "ff.net.0.proj"),
             ("ff.proj_out", "ff.net.2")),
    bookkeeping={"_class_name": "CogVideoXTransformer3DModel", "_diffusers_version": "0.42.1"},
    patch_kernel=("patch_embed", "proj", "kernel"),
    patch_shape=_patch_shape,
    patch_to_diffusers=_patch_to_diffusers,
    patch_from_diffusers=_patch_from_diffusers,
)


def stack_blocks(params: Mapping[str, Any], num_layers: int) -> dict:
  """Loop layout (transformer_blocks_0 ...) -> scanned layout (transformer_blocks, leading L axis)."""
  return common.stack_blocks(params, num_layers, BLOCKS)


def unstack_blocks(params: Mapping[str, Any], num_layers: int) -> dict:
  """Scanned layout (transformer_blocks, leading L axis) -> loop layout (transformer_blocks_i)."""
  return common.unstack_blocks(params, num_layers, BLOCKS)


def diffusers_tensor_shapes(config: CogVideoXConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor of the diffusers checkpoint of this config: name -> shape."""
  return LAYOUT.diffusers_shapes(config)


def load_diffusers_transformer(path, **overrides) -> tuple[CogVideoXConfig, Any]:
  """Reads a diffusers `CogVideoXTransformer3DModel` folder (or a pipeline folder
  with a transformer/ subfolder). overrides set our own config fields (dtype,
  param_dtype, scan_layers, remat). Returns (config, params) with params in
  config.param_dtype and in the layer layout config.scan_layers asks for."""
  return LAYOUT.load(path, **overrides)


def save_diffusers_transformer(config: CogVideoXConfig, params, path, *,
                               max_shard_size: int = 10 * 2**30) -> None:
  """Writes config.json and the weights as diffusers lays them out, sharded (with
  an index json) when they exceed max_shard_size bytes. Weights keep their dtype."""
  LAYOUT.save(config, params, path, max_shard_size=max_shard_size)


def save_params(config: CogVideoXConfig, params, path) -> None:
  """Writes params as path (safetensors, flat dotted keys, loop layout) and the
  config as the .json file beside it."""
  LAYOUT.save_params(config, params, path)


def load_params(path, **overrides) -> tuple[CogVideoXConfig, Any]:
  """Reads a `save_params` checkpoint; overrides replace config fields (e.g.
  scan_layers, dtype). Returns (config, params) in config.param_dtype and layout."""
  return LAYOUT.load_params(path, **overrides)

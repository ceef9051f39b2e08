"""Weights in and out: diffusers `WanTransformer3DModel` checkpoints and our own.

A diffusers transformer folder holds config.json plus either
diffusion_pytorch_model.safetensors or shards listed in
diffusion_pytorch_model.safetensors.index.json. Tensor names map to our params
almost by identity (our modules keep diffusers' names):

  blocks.{i}.X               <-> blocks_{i}.X (loop layout) or blocks.X[i] (scanned)
  *.to_out.0                 <-> *.to_out
  blocks.{i}.ffn.net.0.proj  <-> ffn.proj_in
  blocks.{i}.ffn.net.2       <-> ffn.proj_out
  *.weight of a Linear       <-> *.kernel, transposed
  *.weight of a norm         <-> *.scale
  patch_embedding.weight     <-> patch_embedding.kernel: Conv3d [dim, C, pt, ph, pw]
                                 <-> Dense [pt*ph*pw*C, dim] (our patch order)

Our own checkpoints (`save_params` / `load_params`) are one safetensors file of
flat dotted param paths plus a json file of the `WanConfig` beside it.
"""

from __future__ import annotations

from typing import Any, Mapping

from models import convert_common as common
from models.convert_common import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME  # noqa: F401
from models.wan.config import WanConfig
from models.wan.transformer import param_shapes

BLOCKS = "blocks"
# diffusers itself ignores these on load (`_keys_to_ignore_on_load_unexpected`).
_IGNORED_UNEXPECTED = ("norm_added_q",)

LAYOUT = common.DiffusersTransformer(
    config_cls=WanConfig,
    param_shapes=param_shapes,
    stacked={(BLOCKS,): "num_layers"},
    # Our module path (suffix) -> diffusers module path.
    renames=(("to_out", "to_out.0"), ("ffn.proj_in", "ffn.net.0.proj"),
             ("ffn.proj_out", "ffn.net.2")),
    bookkeeping={"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0"},
    patch_kernel=("patch_embedding", "kernel"),
    patch_shape=lambda shape, c: common.conv3d_shape(shape, c.patch_size, c.in_channels),
    patch_to_diffusers=lambda a, c: common.conv3d_from_dense(a, c.patch_size, c.in_channels),
    patch_from_diffusers=lambda a, c: common.dense_from_conv3d(a),
    ignored=_IGNORED_UNEXPECTED,
)


def stack_blocks(params: Mapping[str, Any], num_layers: int) -> dict:
  """Loop layout (blocks_0 ... blocks_{L-1}) -> scanned layout (blocks, leading L axis)."""
  return common.stack_blocks(params, num_layers, BLOCKS)


def unstack_blocks(params: Mapping[str, Any], num_layers: int) -> dict:
  """Scanned layout (blocks, leading L axis) -> loop layout (blocks_0 ... blocks_{L-1})."""
  return common.unstack_blocks(params, num_layers, BLOCKS)


def diffusers_tensor_shapes(config: WanConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor of the diffusers checkpoint of this config: name -> shape."""
  return LAYOUT.diffusers_shapes(config)


def load_diffusers_transformer(path, **overrides) -> tuple[WanConfig, Any]:
  """Reads a diffusers `WanTransformer3DModel` folder (or a pipeline folder with a
  transformer/ subfolder). overrides set our own config fields (dtype,
  param_dtype, scan_layers, remat). Returns (config, params) with params in
  config.param_dtype and in the layer layout config.scan_layers asks for."""
  return LAYOUT.load(path, **overrides)


def save_diffusers_transformer(config: WanConfig, params, path, *,
                               max_shard_size: int = 10 * 2**30) -> None:
  """Writes config.json and the weights as diffusers lays them out, sharded (with
  an index json) when they exceed max_shard_size bytes. Weights keep their dtype."""
  LAYOUT.save(config, params, path, max_shard_size=max_shard_size)


def save_params(config: WanConfig, params, path) -> None:
  """Writes params as path (safetensors, flat dotted keys, loop layout) and the
  config as the .json file beside it."""
  LAYOUT.save_params(config, params, path)


def load_params(path, **overrides) -> tuple[WanConfig, Any]:
  """Reads a `save_params` checkpoint; overrides replace config fields (e.g.
  scan_layers, dtype). Returns (config, params) in config.param_dtype and layout."""
  return LAYOUT.load_params(path, **overrides)

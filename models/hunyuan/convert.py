"""Weights in and out: diffusers `HunyuanVideoTransformer3DModel` checkpoints.

A diffusers transformer folder holds config.json plus either
diffusion_pytorch_model.safetensors or shards listed in
diffusion_pytorch_model.safetensors.index.json (the 13B model: 6 shards). Tensor
names map to our params almost by identity (our modules keep diffusers' names):

  transformer_blocks.{i}.X          <-> transformer_blocks_{i}.X (loop layout) or
                                        transformer_blocks.X[i] (scanned); the same for
                                        single_transformer_blocks and
                                        context_embedder.token_refiner.refiner_blocks
  *.attn.to_out.0                   <-> *.attn.to_out
  *.ff.net.0.proj / *.ff.net.2      <-> *.ff.proj_in / *.ff.proj_out (and ff_context)
  *.weight of a Linear              <-> *.kernel, transposed
  *.weight of a norm                <-> *.scale
  x_embedder.proj.weight            <-> x_embedder.proj.kernel: Conv3d [dim, C, pt, ph, pw]
                                        <-> Dense [pt*ph*pw*C, dim] (our patch order)

Every name and shape is checked against the config before any tensor is read;
errors name the tensor and the file.
"""

from __future__ import annotations

from typing import Any

from models import convert_common as common
from models.convert_common import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME  # noqa: F401
from models.hunyuan.config import HunyuanVideoConfig
from models.hunyuan.transformer import param_shapes


LAYOUT = common.DiffusersTransformer(
    config_cls=HunyuanVideoConfig,
    param_shapes=param_shapes,
    # Scanned param subtree -> the config field of its layers (0 layers: no params).
    stacked={("transformer_blocks",): "num_layers",
             ("single_transformer_blocks",): "num_single_layers",
             ("context_embedder", "token_refiner", "refiner_blocks"): "num_refiner_layers"},
    # Our module path (suffix) -> diffusers module path.
    renames=(("attn.to_out", "attn.to_out.0"),
             ("ff.proj_in", "ff.net.0.proj"), ("ff.proj_out", "ff.net.2"),
             ("ff_context.proj_in", "ff_context.net.0.proj"),
             ("ff_context.proj_out", "ff_context.net.2")),
    bookkeeping={"_class_name": "HunyuanVideoTransformer3DModel", "_diffusers_version": "0.42.1"},
    patch_kernel=("x_embedder", "proj", "kernel"),
    patch_shape=lambda shape, c: common.conv3d_shape(shape, c.patch, c.in_channels),
    patch_to_diffusers=lambda a, c: common.conv3d_from_dense(a, c.patch, c.in_channels),
    patch_from_diffusers=lambda a, c: common.dense_from_conv3d(a),
)


def to_loop_layout(params, config: HunyuanVideoConfig) -> dict[tuple[str, ...], Any]:
  """params in either layout -> flat {loop-layout path: leaf}; scanned leaves are split
  along their leading layer axis (views, no copies), checked against the layer counts."""
  return LAYOUT.to_loop_layout(params, config)


def diffusers_name(path: tuple[str, ...]) -> str:
  """Our loop-layout param path -> diffusers tensor name."""
  return LAYOUT.diffusers_name(path)


def diffusers_shape(path, shape: tuple[int, ...], config: HunyuanVideoConfig) -> tuple[int, ...]:
  """The diffusers tensor shape of our loop-layout param `path` of `shape`."""
  return LAYOUT.diffusers_shape(path, shape, config)


def diffusers_shapes(config: HunyuanVideoConfig) -> dict[str, tuple[int, ...]]:
  """Every diffusers tensor name of this config and its shape (nothing allocated)."""
  return LAYOUT.diffusers_shapes(config)


def load_diffusers_transformer(path, **overrides) -> tuple[HunyuanVideoConfig, Any]:
  """Reads a diffusers `HunyuanVideoTransformer3DModel` folder (or a pipeline folder
  with a transformer/ subfolder). overrides set our own config fields (dtype,
  param_dtype, scan_layers, remat). Returns (config, params), params in
  config.param_dtype and in the layer layout config.scan_layers asks for."""
  return LAYOUT.load(path, **overrides)


def save_diffusers_transformer(config: HunyuanVideoConfig, params, path, *,
                               max_shard_size: int = 10 * 2**30) -> None:
  """Writes config.json and the weights as diffusers lays them out (params in either
  layout), sharded with an index json past max_shard_size bytes. Weights keep their
  dtype."""
  LAYOUT.save(config, params, path, max_shard_size=max_shard_size)

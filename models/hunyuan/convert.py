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

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from models.hunyuan.config import HunyuanVideoConfig
from models.hunyuan.transformer import param_shapes
from models.weights import (check_names, check_shape, open_tensors, read_json, save_tensors,
                            weight_files)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_DIFFUSERS_BOOKKEEPING = {"_class_name": "HunyuanVideoTransformer3DModel",
                          "_diffusers_version": "0.42.1"}
# Our module path (suffix) -> diffusers module path.
_MODULE_RENAMES = (("attn.to_out", "attn.to_out.0"),
                   ("ff.proj_in", "ff.net.0.proj"), ("ff.proj_out", "ff.net.2"),
                   ("ff_context.proj_in", "ff_context.net.0.proj"),
                   ("ff_context.proj_out", "ff_context.net.2"))
_STACKED = ("transformer_blocks", "single_transformer_blocks", "refiner_blocks")
_LOOP_BLOCK = re.compile(rf"^({'|'.join(_STACKED)})_(\d+)$")
_PATCH_KERNEL = ("x_embedder", "proj", "kernel")


# ------------------------------------------------------------ layer layouts

def _stacks(config: HunyuanVideoConfig) -> dict[tuple[str, ...], int]:
  """Scanned param subtree -> its number of layers (stacks of 0 layers have no params)."""
  return {("transformer_blocks",): config.num_layers,
          ("single_transformer_blocks",): config.num_single_layers,
          ("context_embedder", "token_refiner", "refiner_blocks"): config.num_refiner_layers}


def _stack_of(path: tuple[str, ...], config: HunyuanVideoConfig):
  for prefix, n in _stacks(config).items():
    if path[:len(prefix)] == prefix:
      return prefix, n
  return None, 0


def _loop_path(prefix: tuple[str, ...], i: int, rest: tuple[str, ...]) -> tuple[str, ...]:
  return (*prefix[:-1], f"{prefix[-1]}_{i}", *rest)


def to_loop_layout(params, config: HunyuanVideoConfig) -> dict[tuple[str, ...], Any]:
  """params in either layout -> flat {loop-layout path: leaf}; scanned leaves are split
  along their leading layer axis (views, no copies), checked against the layer counts."""
  flat = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    prefix, n = _stack_of(path, config)
    if prefix is None:
      flat[path] = leaf
      continue
    if np.shape(leaf)[:1] != (n,):
      raise ValueError(f"scanned param {'.'.join(path)!r} has shape {np.shape(leaf)}, expected "
                       f"a leading layer axis of {n}")
    for i in range(n):
      flat[_loop_path(prefix, i, path[len(prefix):])] = leaf[i]
  return flat


def _loop_layout_shapes(config: HunyuanVideoConfig) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(param_shapes(dataclasses.replace(config, scan_layers=False)))


# ----------------------------------------------------------- name mapping

def diffusers_name(path: tuple[str, ...]) -> str:
  """Our loop-layout param path -> diffusers tensor name."""
  *modules, leaf = path
  modules = [f"{m.group(1)}.{m.group(2)}" if (m := _LOOP_BLOCK.match(s)) else s for s in modules]
  module = ".".join(modules)
  for ours, theirs in _MODULE_RENAMES:
    if module == ours or module.endswith("." + ours):
      module = module[: len(module) - len(ours)] + theirs
      break
  leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  return f"{module}.{leaf}" if module else leaf


def _to_diffusers(path, array: np.ndarray, config: HunyuanVideoConfig) -> np.ndarray:
  if path == _PATCH_KERNEL:  # [pt*ph*pw*C, dim] -> [dim, C, pt, ph, pw]
    return array.reshape(*config.patch, config.in_channels, -1).transpose(4, 3, 0, 1, 2)
  if path[-1] == "kernel":
    return array.T
  return array


def _from_diffusers(path, array: np.ndarray) -> np.ndarray:
  if path == _PATCH_KERNEL:  # [dim, C, pt, ph, pw] -> [pt*ph*pw*C, dim]
    return array.transpose(2, 3, 4, 1, 0).reshape(-1, array.shape[0])
  if path[-1] == "kernel":
    return array.T
  return array


def diffusers_shape(path, shape: tuple[int, ...], config: HunyuanVideoConfig) -> tuple[int, ...]:
  """The diffusers tensor shape of our loop-layout param `path` of `shape`."""
  if path == _PATCH_KERNEL:
    return (shape[1], config.in_channels, *config.patch)
  if path[-1] == "kernel":
    return tuple(shape[::-1])
  return tuple(shape)


def diffusers_shapes(config: HunyuanVideoConfig) -> dict[str, tuple[int, ...]]:
  """Every diffusers tensor name of this config and its shape (nothing allocated)."""
  return {diffusers_name(p): diffusers_shape(p, s.shape, config)
          for p, s in _loop_layout_shapes(config).items()}


def _read_params(config: HunyuanVideoConfig, read: Callable[[tuple[str, ...]], np.ndarray]):
  """Params in config's layout and param_dtype from `read(loop_layout_path)`; each
  tensor is cast as it is read and scanned layers go straight into their stacked
  array, so the host holds one copy of the model in param_dtype."""
  flat = {}
  for path, leaf in traverse_util.flatten_dict(param_shapes(config)).items():
    prefix, n = _stack_of(path, config) if config.scan_layers else (None, 0)
    if prefix is not None:
      stacked = np.empty(leaf.shape, leaf.dtype)
      for i in range(n):
        stacked[i] = read(_loop_path(prefix, i, path[len(prefix):]))
      flat[path] = stacked
    else:
      flat[path] = np.asarray(read(path)).astype(leaf.dtype, copy=False)
  return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))


# -------------------------------------------------------------- diffusers

def _transformer_dir(path: Path) -> Path:
  if not path.exists():
    raise FileNotFoundError(f"no diffusers transformer at {str(path)!r}: path does not exist")
  if not (path / CONFIG_NAME).exists() and (path / "transformer" / CONFIG_NAME).exists():
    return path / "transformer"  # a pipeline folder
  if not (path / CONFIG_NAME).exists():
    raise FileNotFoundError(f"no {CONFIG_NAME} in {str(path)!r} (nor in its transformer/ folder)")
  return path


def load_diffusers_transformer(path, **overrides) -> tuple[HunyuanVideoConfig, Any]:
  """Reads a diffusers `HunyuanVideoTransformer3DModel` folder (or a pipeline folder
  with a transformer/ subfolder). overrides set our own config fields (dtype,
  param_dtype, scan_layers, remat). Returns (config, params), params in
  config.param_dtype and in the layer layout config.scan_layers asks for."""
  folder = _transformer_dir(Path(path))
  config = HunyuanVideoConfig.from_diffusers_config(read_json(folder / CONFIG_NAME), **overrides)
  shapes = _loop_layout_shapes(config)
  names = {diffusers_name(p): p for p in shapes}
  files = weight_files(folder, WEIGHTS_NAME, INDEX_NAME)
  check_names(names, files, str(folder))

  with open_tensors(files) as tensors:
    for name, p in names.items():  # all shapes first: fail before reading any data
      check_shape(name, diffusers_shape(p, shapes[p].shape, config), tensors.shape(name),
                  tensors.where(name))
    return config, _read_params(config, lambda p: _from_diffusers(p, tensors.get(diffusers_name(p))))


def save_diffusers_transformer(config: HunyuanVideoConfig, params, path, *,
                               max_shard_size: int = 10 * 2**30) -> None:
  """Writes config.json and the weights as diffusers lays them out (params in either
  layout), sharded with an index json past max_shard_size bytes. Weights keep their
  dtype."""
  flat = to_loop_layout(jax.tree.map(np.asarray, params), config)
  shapes = _loop_layout_shapes(config)
  dotted = lambda p: ".".join(p)
  check_names({dotted(p) for p in shapes}, {dotted(p) for p in flat}, "params")
  for p, leaf in flat.items():
    check_shape(dotted(p), shapes[p].shape, np.shape(leaf), "params")
  tensors = {diffusers_name(p): np.ascontiguousarray(_to_diffusers(p, np.asarray(leaf), config))
             for p, leaf in flat.items()}
  folder = Path(path)
  save_tensors(folder, tensors, WEIGHTS_NAME, INDEX_NAME, max_shard_size=max_shard_size,
               metadata={"format": "pt"})
  (folder / CONFIG_NAME).write_text(
      json.dumps({**_DIFFUSERS_BOOKKEEPING, **config.to_diffusers_config()}, indent=2) + "\n")

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

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from models.cogvideox.config import CogVideoXConfig
from models.cogvideox.transformer import param_shapes
from models.weights import (check_names, check_shape, open_tensors, read_json, save_tensors,
                            weight_files)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_DIFFUSERS_BOOKKEEPING = {"_class_name": "CogVideoXTransformer3DModel",
                          "_diffusers_version": "0.42.1"}
BLOCKS = "transformer_blocks"
# Our module path (suffix) -> diffusers module path.
_MODULE_RENAMES = (("attn1.to_out", "attn1.to_out.0"), ("ff.proj_in", "ff.net.0.proj"),
                   ("ff.proj_out", "ff.net.2"))
_BLOCK = re.compile(rf"^{BLOCKS}_(\d+)$")
_PATCH_KERNEL = ("patch_embed", "proj", "kernel")


# ------------------------------------------------------------ layer layouts

def _stack(*layers):
  # Host arrays stay on the host (checkpoint loading); device arrays stay on device.
  if all(isinstance(a, np.ndarray) for a in layers):
    return np.stack(layers)
  return jnp.stack(layers)


def stack_blocks(params: Mapping[str, Any], num_layers: int) -> dict:
  """Loop layout (transformer_blocks_0 ...) -> scanned layout (transformer_blocks, leading L axis)."""
  names = [f"{BLOCKS}_{i}" for i in range(num_layers)]
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(f"params lack the per-layer subtrees {missing} (num_layers={num_layers})")
  out = {k: v for k, v in params.items() if not _BLOCK.match(k)}
  out[BLOCKS] = jax.tree.map(_stack, *(params[n] for n in names))
  return out


def unstack_blocks(params: Mapping[str, Any], num_layers: int) -> dict:
  """Scanned layout (transformer_blocks, leading L axis) -> loop layout (transformer_blocks_i)."""
  if BLOCKS not in params:
    raise ValueError(f"params lack the scanned {BLOCKS!r} subtree")
  for path, leaf in traverse_util.flatten_dict(params[BLOCKS]).items():
    if np.shape(leaf)[:1] != (num_layers,):
      raise ValueError(f"scanned param '{BLOCKS}.{'.'.join(path)}' has shape {np.shape(leaf)}, "
                       f"expected a leading layer axis of num_layers={num_layers}")
  out = {k: v for k, v in params.items() if k != BLOCKS}
  for i in range(num_layers):
    out[f"{BLOCKS}_{i}"] = jax.tree.map(lambda a: a[i], params[BLOCKS])
  return out


def _to_layout(params: Mapping[str, Any], config: CogVideoXConfig, scan_layers: bool) -> dict:
  if (BLOCKS in params) == scan_layers:
    return dict(params)
  convert = stack_blocks if scan_layers else unstack_blocks
  return convert(params, config.num_layers)


# ----------------------------------------------------------- name mapping

def _diffusers_name(path: tuple[str, ...]) -> str:
  """Our loop-layout param path -> diffusers tensor name."""
  *modules, leaf = path
  if modules and (m := _BLOCK.match(modules[0])):
    modules[0] = f"{BLOCKS}.{m.group(1)}"
  module = ".".join(modules)
  for ours, theirs in _MODULE_RENAMES:
    if module.endswith("." + ours):
      module = module[: len(module) - len(ours)] + theirs
  leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  return f"{module}.{leaf}" if module else leaf


def _diffusers_shape(path: tuple[str, ...], shape: tuple[int, ...], config: CogVideoXConfig):
  if path == _PATCH_KERNEL and config.patch_size_t is None:  # Conv2d [dim, C, p, p]
    return (shape[1], config.in_channels, config.patch_size, config.patch_size)
  if path[-1] == "kernel":
    return tuple(shape[::-1])
  return tuple(shape)


def _to_diffusers(path: tuple[str, ...], array: np.ndarray, config: CogVideoXConfig) -> np.ndarray:
  if path[-1] == "kernel":
    return array.T.reshape(_diffusers_shape(path, array.shape, config))
  return array


def _from_diffusers(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return array.reshape(array.shape[0], -1).T
  return array


def _loop_layout_shapes(config: CogVideoXConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Loop-layout param shapes, from one trace of the scanned model (a trace of the
  loop layout takes seconds at full size)."""
  scanned = traverse_util.flatten_dict(param_shapes(dataclasses.replace(config, scan_layers=True)))
  out = {}
  for path, leaf in scanned.items():
    if path[0] != BLOCKS:
      out[path] = leaf
      continue
    for i in range(config.num_layers):
      out[(f"{BLOCKS}_{i}", *path[1:])] = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return out


def diffusers_tensor_shapes(config: CogVideoXConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor of the diffusers checkpoint of this config: name -> shape."""
  return {_diffusers_name(p): _diffusers_shape(p, s.shape, config)
          for p, s in _loop_layout_shapes(config).items()}


def _read_params(config: CogVideoXConfig, read: Callable[[tuple[str, ...]], np.ndarray]):
  """Builds params in config's layout and param_dtype from `read(loop_layout_path)`.

  Each tensor is cast as it is read and scanned layers are written straight into
  their stacked array, so the host holds one copy of the model in param_dtype.
  """
  flat = {}
  for path, leaf in traverse_util.flatten_dict(param_shapes(config)).items():
    if config.scan_layers and path[0] == BLOCKS:
      stacked = np.empty(leaf.shape, leaf.dtype)
      for i in range(config.num_layers):
        stacked[i] = read((f"{BLOCKS}_{i}", *path[1:]))
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


def load_diffusers_transformer(path, **overrides) -> tuple[CogVideoXConfig, Any]:
  """Reads a diffusers `CogVideoXTransformer3DModel` folder (or a pipeline folder
  with a transformer/ subfolder). overrides set our own config fields (dtype,
  param_dtype, scan_layers, remat). Returns (config, params) with params in
  config.param_dtype and in the layer layout config.scan_layers asks for."""
  folder = _transformer_dir(Path(path))
  config = CogVideoXConfig.from_diffusers_config(read_json(folder / CONFIG_NAME), **overrides)
  shapes = _loop_layout_shapes(config)
  names = {_diffusers_name(p): p for p in shapes}
  files = weight_files(folder, WEIGHTS_NAME, INDEX_NAME)
  check_names(names, files, str(folder))

  with open_tensors(files) as tensors:
    for name, p in names.items():  # all shapes first: fail before reading any data
      check_shape(name, _diffusers_shape(p, shapes[p].shape, config), tensors.shape(name),
                  tensors.where(name))
    return config, _read_params(
        config, lambda p: _from_diffusers(p, tensors.get(_diffusers_name(p))))


def _check_params(config: CogVideoXConfig, params, where: str) -> dict[tuple[str, ...], Any]:
  """params (either layout) -> flat loop layout on the host, validated against the config."""
  params = jax.tree.map(np.asarray, params)
  flat = traverse_util.flatten_dict(_to_layout(params, config, scan_layers=False))
  shapes = _loop_layout_shapes(config)
  dotted = lambda p: ".".join(p)
  check_names({dotted(p) for p in shapes}, {dotted(p) for p in flat}, where)
  for p, leaf in flat.items():
    check_shape(dotted(p), shapes[p].shape, np.shape(leaf), where)
  return flat


def save_diffusers_transformer(config: CogVideoXConfig, params, path, *,
                               max_shard_size: int = 10 * 2**30) -> None:
  """Writes config.json and the weights as diffusers lays them out, sharded (with
  an index json) when they exceed max_shard_size bytes. Weights keep their dtype."""
  folder = Path(path)
  flat = _check_params(config, params, "params")
  tensors = {_diffusers_name(p): _to_diffusers(p, np.asarray(leaf), config)
             for p, leaf in flat.items()}
  diffusers_config = config.to_diffusers_config()
  folder.mkdir(parents=True, exist_ok=True)
  (folder / CONFIG_NAME).write_text(
      json.dumps({**_DIFFUSERS_BOOKKEEPING, **diffusers_config}, indent=2) + "\n")
  save_tensors(folder, tensors, WEIGHTS_NAME, INDEX_NAME, max_shard_size=max_shard_size,
               metadata={"format": "pt"})


# ----------------------------------------------------------------- our own

def _checkpoint_paths(path) -> tuple[Path, Path]:
  path = Path(path)
  if path.suffix != ".safetensors":
    raise ValueError(f"checkpoint path must end in .safetensors, got {str(path)!r}")
  return path, path.with_suffix(".json")


def save_params(config: CogVideoXConfig, params, path) -> None:
  """Writes params as path (safetensors, flat dotted keys, loop layout) and the
  config as the .json file beside it."""
  weights, config_file = _checkpoint_paths(path)
  flat = _check_params(config, params, "params")
  weights.parent.mkdir(parents=True, exist_ok=True)
  save_file({".".join(p): np.ascontiguousarray(np.asarray(leaf)) for p, leaf in flat.items()},
            weights)
  config_file.write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def load_params(path, **overrides) -> tuple[CogVideoXConfig, Any]:
  """Reads a `save_params` checkpoint; overrides replace config fields (e.g.
  scan_layers, dtype). Returns (config, params) in config.param_dtype and layout."""
  weights, config_file = _checkpoint_paths(path)
  for file in (weights, config_file):
    if not file.exists():
      raise FileNotFoundError(f"checkpoint file {str(file)!r} does not exist")
  config = CogVideoXConfig.from_dict(json.loads(config_file.read_text()), **overrides)
  shapes = {".".join(p): s.shape for p, s in _loop_layout_shapes(config).items()}
  with safe_open(weights, framework="np") as f:
    check_names(shapes, f.keys(), str(weights))
    for name in f.keys():
      check_shape(name, shapes[name], f.get_slice(name).get_shape(), str(weights))
    return config, _read_params(config, lambda p: f.get_tensor(".".join(p)))

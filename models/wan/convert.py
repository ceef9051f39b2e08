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

from models.wan.config import WanConfig
from models.wan.transformer import param_shapes
from models.weights import check_names, check_shape, open_tensors, read_json, weight_files

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_DIFFUSERS_BOOKKEEPING = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0"}
# diffusers itself ignores these on load (`_keys_to_ignore_on_load_unexpected`).
_IGNORED_UNEXPECTED = ("norm_added_q",)
# Our module path (suffix) -> diffusers module path.
_MODULE_RENAMES = (("to_out", "to_out.0"), ("ffn.proj_in", "ffn.net.0.proj"),
                   ("ffn.proj_out", "ffn.net.2"))
_BLOCK = re.compile(r"^blocks_(\d+)$")


# ------------------------------------------------------------ layer layouts

def _stack(*layers):
  # Host arrays stay on the host (checkpoint loading); device arrays stay on device.
  if all(isinstance(a, np.ndarray) for a in layers):
    return np.stack(layers)
  return jnp.stack(layers)


def stack_blocks(params: Mapping[str, Any], num_layers: int) -> dict:
  """Loop layout (blocks_0 ... blocks_{L-1}) -> scanned layout (blocks, leading L axis)."""
  names = [f"blocks_{i}" for i in range(num_layers)]
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(f"params lack the per-layer subtrees {missing} (num_layers={num_layers})")
  out = {k: v for k, v in params.items() if not _BLOCK.match(k)}
  out["blocks"] = jax.tree.map(_stack, *(params[n] for n in names))
  return out


def unstack_blocks(params: Mapping[str, Any], num_layers: int) -> dict:
  """Scanned layout (blocks, leading L axis) -> loop layout (blocks_0 ... blocks_{L-1})."""
  if "blocks" not in params:
    raise ValueError("params lack the scanned 'blocks' subtree")
  for path, leaf in traverse_util.flatten_dict(params["blocks"]).items():
    if np.shape(leaf)[:1] != (num_layers,):
      raise ValueError(f"scanned param 'blocks.{'.'.join(path)}' has shape {np.shape(leaf)}, "
                       f"expected a leading layer axis of num_layers={num_layers}")
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(num_layers):
    out[f"blocks_{i}"] = jax.tree.map(lambda a: a[i], params["blocks"])
  return out


def _to_layout(params: Mapping[str, Any], config: WanConfig, scan_layers: bool) -> dict:
  is_scanned = "blocks" in params
  if is_scanned == scan_layers:
    return dict(params)
  convert = stack_blocks if scan_layers else unstack_blocks
  return convert(params, config.num_layers)


# ----------------------------------------------------------- name mapping

def _diffusers_name(path: tuple[str, ...]) -> str:
  """Our loop-layout param path -> diffusers tensor name."""
  *modules, leaf = path
  if modules and (m := _BLOCK.match(modules[0])):
    modules[0] = f"blocks.{m.group(1)}"
  module = ".".join(modules)
  for ours, theirs in _MODULE_RENAMES:
    if module == ours or module.endswith("." + ours):
      module = module[: len(module) - len(ours)] + theirs
  leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  return f"{module}.{leaf}" if module else leaf


def _to_diffusers(path: tuple[str, ...], array: np.ndarray, config: WanConfig) -> np.ndarray:
  if path == ("patch_embedding", "kernel"):  # [pt*ph*pw*C, dim] -> [dim, C, pt, ph, pw]
    return array.reshape(*config.patch_size, config.in_channels, -1).transpose(4, 3, 0, 1, 2)
  if path[-1] == "kernel":
    return array.T
  return array


def _from_diffusers(path: tuple[str, ...], array: np.ndarray, config: WanConfig) -> np.ndarray:
  if path == ("patch_embedding", "kernel"):  # [dim, C, pt, ph, pw] -> [pt*ph*pw*C, dim]
    return array.transpose(2, 3, 4, 1, 0).reshape(-1, array.shape[0])
  if path[-1] == "kernel":
    return array.T
  return array


def _diffusers_shape(path: tuple[str, ...], shape: tuple[int, ...], config: WanConfig):
  if path == ("patch_embedding", "kernel"):
    return (shape[1], config.in_channels, *config.patch_size)
  if path[-1] == "kernel":
    return tuple(shape[::-1])
  return tuple(shape)


def _loop_layout_shapes(config: WanConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  return traverse_util.flatten_dict(param_shapes(dataclasses.replace(config, scan_layers=False)))


def _read_params(config: WanConfig, read: Callable[[tuple[str, ...]], np.ndarray]):
  """Builds params in config's layout and param_dtype from `read(loop_layout_path)`.

  Each tensor is cast as it is read and scanned layers are written straight into
  their stacked array, so the host holds one copy of the model in param_dtype.
  """
  flat = {}
  for path, leaf in traverse_util.flatten_dict(param_shapes(config)).items():
    if config.scan_layers and path[0] == "blocks":
      stacked = np.empty(leaf.shape, leaf.dtype)
      for i in range(config.num_layers):
        stacked[i] = read((f"blocks_{i}", *path[1:]))
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


def load_diffusers_transformer(path, **overrides) -> tuple[WanConfig, Any]:
  """Reads a diffusers `WanTransformer3DModel` folder (or a pipeline folder with a
  transformer/ subfolder). overrides set our own config fields (dtype,
  param_dtype, scan_layers, remat). Returns (config, params) with params in
  config.param_dtype and in the layer layout config.scan_layers asks for."""
  folder = _transformer_dir(Path(path))
  config = WanConfig.from_diffusers_config(read_json(folder / CONFIG_NAME), **overrides)
  shapes = _loop_layout_shapes(config)
  names = {_diffusers_name(p): p for p in shapes}
  files = weight_files(folder, WEIGHTS_NAME, INDEX_NAME)
  found = [n for n in files if not any(ignored in n for ignored in _IGNORED_UNEXPECTED)]
  check_names(names, found, str(folder))

  with open_tensors(files) as tensors:
    for name, p in names.items():  # all shapes first: fail before reading any data
      check_shape(name, _diffusers_shape(p, shapes[p].shape, config), tensors.shape(name),
                  tensors.where(name))

    def read(p):
      return _from_diffusers(p, tensors.get(_diffusers_name(p)), config)

    return config, _read_params(config, read)


def _check_params(config: WanConfig, params, where: str) -> dict[tuple[str, ...], Any]:
  """params (either layout) -> flat loop layout on the host (layers are views of the
  stacked arrays), validated against the config."""
  params = jax.tree.map(np.asarray, params)
  flat = traverse_util.flatten_dict(_to_layout(params, config, scan_layers=False))
  shapes = _loop_layout_shapes(config)
  dotted = lambda p: ".".join(p)
  check_names({dotted(p) for p in shapes}, {dotted(p) for p in flat}, where)
  for p, leaf in flat.items():
    check_shape(dotted(p), shapes[p].shape, np.shape(leaf), where)
  return flat


def save_diffusers_transformer(config: WanConfig, params, path, *,
                               max_shard_size: int = 10 * 2**30) -> None:
  """Writes config.json and the weights as diffusers lays them out, sharded (with
  an index json) when they exceed max_shard_size bytes. Weights keep their dtype."""
  folder = Path(path)
  flat = _check_params(config, params, "params")
  tensors = {_diffusers_name(p): np.ascontiguousarray(_to_diffusers(p, np.asarray(leaf), config))
             for p, leaf in flat.items()}
  folder.mkdir(parents=True, exist_ok=True)
  (folder / CONFIG_NAME).write_text(
      json.dumps({**_DIFFUSERS_BOOKKEEPING, **config.to_diffusers_config()}, indent=2) + "\n")

  shards, size = [{}], 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_size:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  metadata = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], folder / WEIGHTS_NAME, metadata=metadata)
    return
  weight_map = {}
  for i, shard in enumerate(shards, start=1):
    file = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, folder / file, metadata=metadata)
    weight_map.update({name: file for name in shard})
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
           "weight_map": weight_map}
  (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------- our own

def _checkpoint_paths(path) -> tuple[Path, Path]:
  path = Path(path)
  if path.suffix != ".safetensors":
    raise ValueError(f"checkpoint path must end in .safetensors, got {str(path)!r}")
  return path, path.with_suffix(".json")


def save_params(config: WanConfig, params, path) -> None:
  """Writes params as path (safetensors, flat dotted keys, loop layout) and the
  config as the .json file beside it."""
  weights, config_file = _checkpoint_paths(path)
  flat = _check_params(config, params, "params")
  weights.parent.mkdir(parents=True, exist_ok=True)
  save_file({".".join(p): np.ascontiguousarray(np.asarray(leaf)) for p, leaf in flat.items()},
            weights)
  config_file.write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def load_params(path, **overrides) -> tuple[WanConfig, Any]:
  """Reads a `save_params` checkpoint; overrides replace config fields (e.g.
  scan_layers, dtype). Returns (config, params) in config.param_dtype and layout."""
  weights, config_file = _checkpoint_paths(path)
  for file in (weights, config_file):
    if not file.exists():
      raise FileNotFoundError(f"checkpoint file {str(file)!r} does not exist")
  config = WanConfig.from_dict(json.loads(config_file.read_text()), **overrides)
  shapes = {".".join(p): s.shape for p, s in _loop_layout_shapes(config).items()}
  with safe_open(weights, framework="np") as f:
    check_names(shapes, f.keys(), str(weights))
    for name in f.keys():
      check_shape(name, shapes[name], f.get_slice(name).get_shape(), str(weights))
    return config, _read_params(config, lambda p: f.get_tensor(".".join(p)))

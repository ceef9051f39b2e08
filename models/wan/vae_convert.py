"""The Wan2.1 VAE's weights in and out: diffusers `AutoencoderKLWan` folders.

A diffusers vae/ folder holds config.json plus diffusion_pytorch_model.safetensors
(or shards listed in diffusion_pytorch_model.safetensors.index.json). Our
modules keep diffusers' names (see models.wan.vae), so the mapping is:

  a list index       name_i                 <-> name.i
  Conv3d weight      kernel [kt, kh, kw, in, out] <-> weight [out, in, kt, kh, kw]
  Conv2d weight      kernel [kh, kw, in, out]     <-> weight [out, in, kh, kw]
  RMS norm gamma     gamma [C]              <-> gamma [C, 1, 1, 1] (video norms) or
                                                [C, 1, 1] (the attention norms)
  bias               bias [out]             <-> bias [out]

Every name and shape is checked before any tensor is read; each tensor is cast
to the config's param_dtype as it is read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from models.wan.vae import WanVAEConfig, param_shapes
from models.weights import check_names, check_shape, open_tensors, read_json, weight_files

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_DIFFUSERS_BOOKKEEPING = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.42.1"}
_INDEX = re.compile(r"^(.+)_(\d+)$")

_ParamPath = tuple[str, ...]


def _diffusers_name(path: _ParamPath) -> str:
  """Our param path -> diffusers tensor name."""
  *modules, leaf = path
  modules = [_INDEX.sub(r"\1.\2", m) for m in modules]
  return ".".join([*modules, {"kernel": "weight"}.get(leaf, leaf)])


def _diffusers_shape(path: _ParamPath, shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel":  # [..spatial.., in, out] -> [out, in, ..spatial..]
    return (shape[-1], shape[-2], *shape[:-2])
  if path[-1] == "gamma":
    attention = any(m.startswith("attentions_") for m in path[:-1])
    return (shape[0], 1, 1) if attention else (shape[0], 1, 1, 1)
  return tuple(shape)


def _from_diffusers(path: _ParamPath, array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    spatial = tuple(range(2, array.ndim))
    return array.transpose(*spatial, 1, 0)
  if path[-1] == "gamma":
    return array.reshape(-1)
  return array


def _to_diffusers(path: _ParamPath, array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    n = array.ndim
    return array.transpose(n - 1, n - 2, *range(n - 2))
  if path[-1] == "gamma":
    return array.reshape(_diffusers_shape(path, array.shape))
  return array


def _vae_dir(path: Path) -> Path:
  if not path.exists():
    raise FileNotFoundError(f"no diffusers VAE at {str(path)!r}: path does not exist")
  if not (path / CONFIG_NAME).exists() and (path / "vae" / CONFIG_NAME).exists():
    return path / "vae"  # a pipeline folder
  if not (path / CONFIG_NAME).exists():
    raise FileNotFoundError(f"no {CONFIG_NAME} in {str(path)!r} (nor in its vae/ folder)")
  return path


def load_diffusers_vae(folder, **overrides) -> tuple[WanVAEConfig, Any]:
  """Reads a diffusers `AutoencoderKLWan` folder (or a pipeline folder with a vae/
  subfolder). overrides set our own config fields (dtype, param_dtype). Returns
  (config, params) with params {encoder, quant_conv, post_quant_conv, decoder}
  in config.param_dtype."""
  folder = _vae_dir(Path(folder))
  config = WanVAEConfig.from_diffusers_config(read_json(folder / CONFIG_NAME), **overrides)
  shapes = traverse_util.flatten_dict(param_shapes(config))
  names = {_diffusers_name(p): p for p in shapes}
  files = weight_files(folder, WEIGHTS_NAME, INDEX_NAME)
  check_names(names, files, str(folder))

  flat = {}
  with open_tensors(files) as tensors:
    for name, p in names.items():  # every shape first: fail before reading any data
      check_shape(name, _diffusers_shape(p, shapes[p].shape), tensors.shape(name),
                  tensors.where(name))
    for name, p in names.items():
      array = _from_diffusers(p, tensors.get(name)).astype(shapes[p].dtype, copy=False)
      flat[p] = jnp.asarray(array)
  return config, traverse_util.unflatten_dict(flat)


def save_diffusers_vae(config: WanVAEConfig, params, folder, *,
                       max_shard_size: int = 10 * 2**30) -> None:
  """Writes config.json and the weights as diffusers lays them out, sharded (with
  an index json) past max_shard_size bytes. Weights keep their dtype."""
  shapes = traverse_util.flatten_dict(param_shapes(config))
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  dotted = lambda p: ".".join(p)
  check_names({dotted(p) for p in shapes}, {dotted(p) for p in flat}, "params")
  for p, leaf in flat.items():
    check_shape(dotted(p), shapes[p].shape, leaf.shape, "params")
  tensors = {_diffusers_name(p): np.ascontiguousarray(_to_diffusers(p, leaf))
             for p, leaf in flat.items()}

  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / CONFIG_NAME).write_text(
      json.dumps({**_DIFFUSERS_BOOKKEEPING, **config.to_diffusers_config()}, indent=2) + "\n")
  shards, size = [{}], 0
  for name in sorted(tensors):
    if shards[-1] and size + tensors[name].nbytes > max_shard_size:
      shards, size = shards + [{}], 0
    shards[-1][name] = tensors[name]
    size += tensors[name].nbytes
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

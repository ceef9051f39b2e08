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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from models import weights
from models.convert_common import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, indexed_module_name
from models.wan.vae import WanVAEConfig, param_shapes

_DIFFUSERS_BOOKKEEPING = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.42.1"}

_ParamPath = tuple[str, ...]


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


def load_diffusers_vae(folder, **overrides) -> tuple[WanVAEConfig, Any]:
  """Reads a diffusers `AutoencoderKLWan` folder (or a pipeline folder with a vae/
  subfolder). overrides set our own config fields (dtype, param_dtype). Returns
  (config, params) with params {encoder, quant_conv, post_quant_conv, decoder}
  in config.param_dtype."""
  folder = weights.model_dir(folder, "vae", "diffusers VAE")
  config = WanVAEConfig.from_diffusers_config(weights.read_json(folder / CONFIG_NAME), **overrides)
  shapes = traverse_util.flatten_dict(param_shapes(config))
  names = {indexed_module_name(p): p for p in shapes}
  expected = {name: _diffusers_shape(p, shapes[p].shape) for name, p in names.items()}
  files = weights.weight_files(folder, WEIGHTS_NAME, INDEX_NAME)
  flat = {}
  with weights.open_checked(files, expected, str(folder)) as tensors:
    for name, p in names.items():
      array = _from_diffusers(p, tensors.get(name)).astype(shapes[p].dtype, copy=False)
      flat[p] = jnp.asarray(array)
  return config, traverse_util.unflatten_dict(flat)


def save_diffusers_vae(config: WanVAEConfig, params, folder, *,
                       max_shard_size: int = 10 * 2**30) -> None:
  """Writes config.json and the weights as diffusers lays them out, sharded (with
  an index json) past max_shard_size bytes. Weights keep their dtype."""
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  weights.check_params(traverse_util.flatten_dict(param_shapes(config)), flat, "params")
  tensors = {indexed_module_name(p): _to_diffusers(p, leaf) for p, leaf in flat.items()}
  weights.save_model_folder(folder, {**_DIFFUSERS_BOOKKEEPING, **config.to_diffusers_config()},
                            tensors, WEIGHTS_NAME, INDEX_NAME, max_shard_size=max_shard_size)

"""What the transformer converters share: loop <-> scanned layer layouts, our
param paths <-> diffusers tensor names, and the checkpoint formats built on them.

A family describes its mapping once as a `DiffusersTransformer`; its convert
module calls it for the diffusers folder (load / save) and, where it has them,
our own checkpoints: one safetensors file of flat dotted loop-layout paths plus
the config's json beside it.
"""

from __future__ import annotations

import dataclasses
import functools
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

from models import weights

ParamPath = tuple[str, ...]
# Scanned param subtree -> its number of layers; its loop layout names the layers
# by suffixing the subtree's last key: ("a", "blocks") -> ("a", "blocks_0"), ...
Stacks = Mapping[ParamPath, int]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


# ------------------------------------------------------------ layer layouts

def _stack(*layers):
  # Host arrays stay on the host (checkpoint loading); device arrays stay on device.
  if all(isinstance(a, np.ndarray) for a in layers):
    return np.stack(layers)
  return jnp.stack(layers)


def stack_blocks(params: Mapping[str, Any], num_layers: int, name: str) -> dict:
  """Loop layout (name_0 ... name_{L-1}) -> scanned layout (name, leading L axis)."""
  names = [f"{name}_{i}" for i in range(num_layers)]
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(f"params lack the per-layer subtrees {missing} (num_layers={num_layers})")
  block = re.compile(rf"^{name}_(\d+)$")
  out = {k: v for k, v in params.items() if not block.match(k)}
  out[name] = jax.tree.map(_stack, *(params[n] for n in names))
  return out


def unstack_blocks(params: Mapping[str, Any], num_layers: int, name: str) -> dict:
  """Scanned layout (name, leading L axis) -> loop layout (name_0 ... name_{L-1})."""
  if name not in params:
    raise ValueError(f"params lack the scanned {name!r} subtree")
  for path, leaf in traverse_util.flatten_dict(params[name]).items():
    if np.shape(leaf)[:1] != (num_layers,):
      raise ValueError(f"scanned param '{name}.{'.'.join(path)}' has shape {np.shape(leaf)}, "
                       f"expected a leading layer axis of num_layers={num_layers}")
  out = {k: v for k, v in params.items() if k != name}
  for i in range(num_layers):
    out[f"{name}_{i}"] = jax.tree.map(lambda a: a[i], params[name])
  return out


def _stack_of(path: ParamPath, stacks: Stacks):
  for prefix, n in stacks.items():
    if path[:len(prefix)] == prefix:
      return prefix, n
  return None, 0


def _loop_path(prefix: ParamPath, i: int, rest: ParamPath) -> ParamPath:
  return (*prefix[:-1], f"{prefix[-1]}_{i}", *rest)


def to_loop_layout(params, stacks: Stacks, fields: Mapping[ParamPath, str] = {},
                   layer: Callable[[Any, int], Any] = lambda leaf, i: leaf[i]
                   ) -> dict[ParamPath, Any]:
  """params in either layout -> flat {loop-layout path: leaf}; scanned leaves are split
  along their leading layer axis by `layer(leaf, i)` (views, no copies, by default),
  checked against the layer counts (errors name a stack's count by its `fields`
  entry, the config field, if any)."""
  flat = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    prefix, n = _stack_of(path, stacks)
    if prefix is None:
      flat[path] = leaf
      continue
    shape = tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
    if shape[:1] != (n,):
      field = f" ({fields[prefix]}={n})" if prefix in fields else ""
      raise ValueError(f"scanned param {'.'.join(path)!r} has shape {shape}, expected "
                       f"a leading layer axis of {n}{field}")
    for i in range(n):
      flat[_loop_path(prefix, i, path[len(prefix):])] = layer(leaf, i)
  return flat


def loop_layout_shapes(scanned_shapes, stacks: Stacks) -> dict[ParamPath, jax.ShapeDtypeStruct]:
  """Flat loop-layout param shapes from the scanned layout's shape tree (a trace of
  the loop layout takes seconds at full size)."""
  return to_loop_layout(scanned_shapes, stacks,
                        layer=lambda s, i: jax.ShapeDtypeStruct(s.shape[1:], s.dtype))


def read_params(shapes, stacks: Stacks, read: Callable[[ParamPath], np.ndarray]):
  """Params shaped like the tree `shapes` (the layout it has, scanned under `stacks`;
  {} for the loop layout) and in its dtypes, from `read(loop_layout_path)`.

  Each tensor is cast as it is read and scanned layers are written straight into
  their stacked array, so the host holds one copy of the model.
  """
  flat = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    prefix, n = _stack_of(path, stacks)
    if prefix is not None:
      stacked = np.empty(leaf.shape, leaf.dtype)
      for i in range(n):
        stacked[i] = read(_loop_path(prefix, i, path[len(prefix):]))
      flat[path] = stacked
    else:
      flat[path] = np.asarray(read(path)).astype(leaf.dtype, copy=False)
  return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))


# ----------------------------------------------------------- name mapping

@functools.lru_cache(maxsize=None)
def _loop_block(stacked: tuple[str, ...]) -> re.Pattern:
  return re.compile(rf"^({'|'.join(stacked)})_(\d+)$")


def diffusers_name(path: ParamPath, stacked: tuple[str, ...],
                   renames: tuple[tuple[str, str], ...]) -> str:
  """Our loop-layout param path -> diffusers tensor name: layer `name_i` -> `name.i`
  (for the stacked names), the first (ours, theirs) module suffix in renames that
  matches is replaced, and kernel / scale leaves are diffusers' weight."""
  *modules, leaf = path
  block = _loop_block(stacked)
  modules = [f"{m.group(1)}.{m.group(2)}" if (m := block.match(s)) else s for s in modules]
  module = ".".join(modules)
  for ours, theirs in renames:
    if module == ours or module.endswith("." + ours):
      module = module[: len(module) - len(ours)] + theirs
      break
  leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  return f"{module}.{leaf}" if module else leaf


_INDEXED = re.compile(r"^(.+)_(\d+)$")


def indexed_module_name(path: ParamPath) -> str:
  """Our param path -> diffusers tensor name for modules that number every list
  entry (the VAEs): `name_i` -> `name.i` for every module, kernel leaves -> weight."""
  *modules, leaf = path
  modules = [_INDEXED.sub(r"\1.\2", m) for m in modules]
  return ".".join([*modules, {"kernel": "weight"}.get(leaf, leaf)])


def conv3d_shape(shape: tuple[int, ...], patch, in_channels: int) -> tuple[int, ...]:
  """Diffusers' Conv3d patch weight shape [dim, C, pt, ph, pw] of our Dense patch
  kernel [pt*ph*pw*C, dim]."""
  return (shape[1], in_channels, *patch)


def conv3d_from_dense(array: np.ndarray, patch, in_channels: int) -> np.ndarray:
  """Our Dense patch kernel [pt*ph*pw*C, dim] -> diffusers' Conv3d weight [dim, C, pt, ph, pw]."""
  return array.reshape(*patch, in_channels, -1).transpose(4, 3, 0, 1, 2)


def dense_from_conv3d(array: np.ndarray) -> np.ndarray:
  """Diffusers' Conv3d weight [dim, C, pt, ph, pw] -> our Dense patch kernel [pt*ph*pw*C, dim]."""
  return array.transpose(2, 3, 4, 1, 0).reshape(-1, array.shape[0])


# -------------------------------------------------------------- diffusers

@dataclasses.dataclass(frozen=True)
class DiffusersTransformer:
  """How one family's transformer params map to a diffusers checkpoint folder.

  Names come from `diffusers_name` (with the last keys of `stacked` and `renames`);
  a kernel is diffusers' Linear weight transposed, except the patch embedding's at
  `patch_kernel`, whose shape and conversion the three patch_* functions give. Tensors whose name contains one of `ignored`
  are skipped on load, as diffusers skips them.
  """

  config_cls: Any                              # from_diffusers_config / to_diffusers_config
  param_shapes: Callable[[Any], Any]           # config -> ShapeDtypeStruct tree in its layout
  stacked: Mapping[ParamPath, str]             # scanned subtree -> config field of its layers
  renames: tuple[tuple[str, str], ...]
  bookkeeping: Mapping[str, str]               # _class_name, _diffusers_version of config.json
  patch_kernel: ParamPath
  patch_shape: Callable[[tuple[int, ...], Any], tuple[int, ...]]
  patch_to_diffusers: Callable[[np.ndarray, Any], np.ndarray]
  patch_from_diffusers: Callable[[np.ndarray, Any], np.ndarray]
  ignored: tuple[str, ...] = ()

  def stacks(self, config) -> dict[ParamPath, int]:
    return {prefix: getattr(config, field) for prefix, field in self.stacked.items()}

  def to_loop_layout(self, params, config) -> dict[ParamPath, Any]:
    return to_loop_layout(params, self.stacks(config), self.stacked)

  def loop_layout_shapes(self, config) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    scanned = dataclasses.replace(config, scan_layers=True)
    return loop_layout_shapes(self.param_shapes(scanned), self.stacks(config))

  def diffusers_name(self, path: ParamPath) -> str:
    return diffusers_name(path, tuple(prefix[-1] for prefix in self.stacked), self.renames)

  def diffusers_shape(self, path: ParamPath, shape: tuple[int, ...], config) -> tuple[int, ...]:
    if path == self.patch_kernel:
      return tuple(self.patch_shape(shape, config))
    if path[-1] == "kernel":
      return tuple(shape[::-1])
    return tuple(shape)

  def diffusers_shapes(self, config) -> dict[str, tuple[int, ...]]:
    """Every diffusers tensor name of this config and its shape (nothing allocated)."""
    return {self.diffusers_name(p): self.diffusers_shape(p, s.shape, config)
            for p, s in self.loop_layout_shapes(config).items()}

  def _to_diffusers(self, path: ParamPath, array: np.ndarray, config) -> np.ndarray:
    if path == self.patch_kernel:
      return self.patch_to_diffusers(array, config)
    return array.T if path[-1] == "kernel" else array

  def _from_diffusers(self, path: ParamPath, array: np.ndarray, config) -> np.ndarray:
    if path == self.patch_kernel:
      return self.patch_from_diffusers(array, config)
    return array.T if path[-1] == "kernel" else array

  def _read_params(self, config, read: Callable[[ParamPath], np.ndarray]):
    stacks = self.stacks(config) if config.scan_layers else {}
    return read_params(self.param_shapes(config), stacks, read)

  def check_params(self, config, params, where: str = "params") -> dict[ParamPath, Any]:
    """params (either layout) -> flat loop layout on the host (layers are views of
    the stacked arrays), validated against the config."""
    flat = self.to_loop_layout(jax.tree.map(np.asarray, params), config)
    weights.check_params(self.loop_layout_shapes(config), flat, where)
    return flat

  def load(self, path, **overrides):
    """(config, params) from a diffusers transformer folder or a pipeline folder with a
    transformer/ subfolder; params in config.param_dtype and config's layer layout."""
    folder = weights.model_dir(path, "transformer", "diffusers transformer")
    raw = weights.read_json(folder / CONFIG_NAME)
    config = self.config_cls.from_diffusers_config(raw, **overrides)
    shapes = self.loop_layout_shapes(config)
    names = {self.diffusers_name(p): p for p in shapes}
    expected = {name: self.diffusers_shape(p, shapes[p].shape, config) for name, p in names.items()}
    files = weights.weight_files(folder, WEIGHTS_NAME, INDEX_NAME)
    skip = lambda name: any(ignored in name for ignored in self.ignored)
    with weights.open_checked(files, expected, str(folder), skip=skip) as tensors:
      return config, self._read_params(config, lambda p: self._from_diffusers(
          p, tensors.get(self.diffusers_name(p)), config))

  def save(self, config, params, path, *, max_shard_size: int) -> None:
    """config.json and the weights as diffusers lays them out (params in either
    layout), sharded with an index json past max_shard_size bytes; weights keep
    their dtype."""
    flat = self.check_params(config, params)
    tensors = {self.diffusers_name(p): self._to_diffusers(p, leaf, config)
               for p, leaf in flat.items()}
    weights.save_model_folder(path, {**self.bookkeeping, **config.to_diffusers_config()},
                              tensors, WEIGHTS_NAME, INDEX_NAME, max_shard_size=max_shard_size)

  # ----------------------------------------------------------------- our own

  def save_params(self, config, params, path) -> None:
    """params as path (safetensors, flat dotted keys, loop layout) and the config as
    the .json file beside it."""
    weights_file, config_file = _checkpoint_paths(path)
    flat = self.check_params(config, params)
    weights_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({".".join(p): np.ascontiguousarray(leaf) for p, leaf in flat.items()},
              weights_file)
    config_file.write_text(json.dumps(config.to_dict(), indent=2) + "\n")

  def load_params(self, path, **overrides):
    """(config, params) of a `save_params` checkpoint; overrides replace config
    fields. params in config.param_dtype and layout."""
    weights_file, config_file = _checkpoint_paths(path)
    for file in (weights_file, config_file):
      if not file.exists():
        raise FileNotFoundError(f"checkpoint file {str(file)!r} does not exist")
    config = self.config_cls.from_dict(json.loads(config_file.read_text()), **overrides)
    shapes = {".".join(p): s.shape for p, s in self.loop_layout_shapes(config).items()}
    with safe_open(weights_file, framework="np") as f:
      weights.check_names(shapes, f.keys(), str(weights_file))
      for name in f.keys():
        weights.check_shape(name, shapes[name], f.get_slice(name).get_shape(), str(weights_file))
      return config, self._read_params(config, lambda p: f.get_tensor(".".join(p)))


def _checkpoint_paths(path) -> tuple[Path, Path]:
  path = Path(path)
  if path.suffix != ".safetensors":
    raise ValueError(f"checkpoint path must end in .safetensors, got {str(path)!r}")
  return path, path.with_suffix(".json")

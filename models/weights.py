"""Reading external checkpoints: safetensors folders (single file or sharded) and
allow-listed json configs, with errors that name the file, tensor or key; and
writing safetensors folders in the same layout (`save_tensors`, `save_model_folder`).

Every family's converter (Wan transformer and VAE, T5 encoders, ...) reads its
folder through these, so a missing shard, an unknown config key or a tensor of
the wrong shape fails the same way, before any weight is read.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

_LIST_LIMIT = 20


def read_json(path) -> dict:
  """A json file as a dict; FileNotFoundError / ValueError name the file."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{str(path)!r} does not exist")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{str(path)!r} is not valid json: {e}") from None


def parse_config(raw: Mapping[str, Any], defaults: Mapping[str, Any], *, where: str,
                 class_names: Iterable[str] = (), ignored: Iterable[str] = ()) -> dict:
  """An external config.json dict checked against an allow-list.

  defaults: every key we understand, with the value a missing key takes (as the
    external library's own constructor would). Keys starting with "_" are
    bookkeeping (`_class_name`, `_diffusers_version`, ...): skipped, except that
    `_class_name`, when class_names is given, must be one of them. Keys in
    `ignored` are accepted and dropped (fields that do not change the math).
    Any other unknown key is an error naming it and the known keys.
  """
  class_names, ignored = tuple(class_names), set(ignored)
  out = dict(defaults)
  for key, value in raw.items():
    if key.startswith("_"):
      if key == "_class_name" and class_names and value not in class_names:
        raise ValueError(f"{where}: _class_name must be one of {list(class_names)}, got {value!r}")
      continue
    if key in ignored:
      continue
    if key not in defaults:
      raise ValueError(f"{where}: unknown config key {key!r}; known keys: {sorted(defaults)}")
    out[key] = value
  return out


def model_dir(path, subfolder: str, what: str) -> Path:
  """The folder holding config.json: path itself or, for a pipeline folder, its
  `subfolder`. FileNotFoundError names `what` was looked for and where."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no {what} at {str(path)!r}: path does not exist")
  if (path / "config.json").exists():
    return path
  if (path / subfolder / "config.json").exists():
    return path / subfolder  # a pipeline folder
  raise FileNotFoundError(f"no config.json in {str(path)!r} (nor in its {subfolder}/ folder)")


def weight_files(folder, weights_name: str, index_name: Optional[str] = None) -> dict[str, Path]:
  """Tensor name -> the safetensors file of `folder` that holds it.

  Reads the shard index `index_name` when present (every listed shard must
  exist), else the single file `weights_name`.
  """
  folder = Path(folder)
  if index_name and (folder / index_name).exists():
    weight_map = read_json(folder / index_name)["weight_map"]
    files = {name: folder / file for name, file in weight_map.items()}
    for file in sorted(set(files.values())):
      if not file.exists():
        raise FileNotFoundError(f"shard {str(file)!r} listed in {str(folder / index_name)!r} "
                                f"does not exist")
    return files
  if not (folder / weights_name).exists():
    wanted = f"{weights_name} or {index_name}" if index_name else weights_name
    raise FileNotFoundError(f"no {wanted} in {str(folder)!r}")
  with safe_open(folder / weights_name, framework="np") as f:
    return {name: folder / weights_name for name in f.keys()}


@contextlib.contextmanager
def open_tensors(files: Mapping[str, Path]):
  """Yields name -> a safetensors slice handle (`.get_shape()`, `[...]`), every
  file opened once, closed on exit."""
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(f, framework="np")) for f in set(files.values())}
    yield _Tensors(files, handles)


@contextlib.contextmanager
def open_checked(files: Mapping[str, Path], expected: Mapping[str, tuple[int, ...]], where: str,
                 skip: Callable[[str], bool] = lambda name: False):
  """`open_tensors(files)` once the names in files (less those `skip` accepts) equal
  those of `expected` and every expected tensor has its shape: a bad checkpoint
  fails before any data is read."""
  check_names(expected, [name for name in files if not skip(name)], where)
  with open_tensors(files) as tensors:
    for name, shape in expected.items():
      check_shape(name, shape, tensors.shape(name), tensors.where(name))
    yield tensors


class _Tensors:
  def __init__(self, files, handles):
    self._files, self._handles = files, handles

  def __contains__(self, name):
    return name in self._files

  def names(self):
    return list(self._files)

  def where(self, name) -> str:
    return str(self._files[name])

  def shape(self, name) -> tuple[int, ...]:
    return tuple(self._handles[self._files[name]].get_slice(name).get_shape())

  def get(self, name):
    """The tensor as a numpy array (bf16 as ml_dtypes.bfloat16)."""
    return self._handles[self._files[name]].get_tensor(name)


def save_tensors(folder, tensors: Mapping[str, np.ndarray], weights_name: str, index_name: str, *,
                 max_shard_size: int, metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes tensors as `folder/weights_name`, or, when they exceed max_shard_size
  bytes, as shards `<stem>-00001-of-0000N.safetensors` listed in
  `folder/index_name`: the layout transformers and diffusers write and read.
  Tensors keep their dtype; names are written in sorted order."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tensors = {name: np.ascontiguousarray(tensors[name]) for name in sorted(tensors)}
  shards, size = [{}], 0
  for name, array in tensors.items():
    if shards[-1] and size + array.nbytes > max_shard_size:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  metadata = dict(metadata or {})
  if len(shards) == 1:
    save_file(shards[0], folder / weights_name, metadata=metadata)
    return
  stem = weights_name.removesuffix(".safetensors")
  weight_map = {}
  for i, shard in enumerate(shards, start=1):
    file = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, folder / file, metadata=metadata)
    weight_map.update({name: file for name in shard})
  index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
           "weight_map": weight_map}
  (folder / index_name).write_text(json.dumps(index, indent=2) + "\n")


def save_model_folder(folder, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                      weights_name: str, index_name: str, *, max_shard_size: int) -> None:
  """`folder/config.json` and the tensors through `save_tensors` (metadata format
  "pt", as torch writes them)."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
  save_tensors(folder, tensors, weights_name, index_name, max_shard_size=max_shard_size,
               metadata={"format": "pt"})


def names_list(names) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
  return ", ".join(names[:_LIST_LIMIT]) + more


def check_names(expected, found, where: str) -> None:
  """Both sets equal, else one error listing the missing and the unexpected names."""
  missing, unexpected = set(expected) - set(found), set(found) - set(expected)
  if missing or unexpected:
    lines = [f"tensors of {where} do not match the model:"]
    if missing:
      lines.append(f"  missing ({len(missing)}): {names_list(missing)}")
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): {names_list(unexpected)}")
    raise ValueError("\n".join(lines))


def check_shape(name: str, expected, actual, where: str) -> None:
  if tuple(expected) != tuple(actual):
    raise ValueError(f"tensor {name!r} in {where}: expected shape {tuple(expected)}, "
                     f"got {tuple(actual)}")


def check_params(shapes: Mapping[tuple[str, ...], Any], flat: Mapping[tuple[str, ...], Any],
                 where: str) -> None:
  """Flat params {path: array} against flat shapes {path: ShapeDtypeStruct}: the same
  paths (named dotted in errors) and shapes."""
  dotted = lambda p: ".".join(p)
  check_names({dotted(p) for p in shapes}, {dotted(p) for p in flat}, where)
  for p, leaf in flat.items():
    check_shape(dotted(p), shapes[p].shape, np.shape(leaf), where)

"""A diffusers pipeline folder: its model_index.json, its component folders, the
dtype the pipeline loads in.

diffusers' `save_pretrained` writes model_index.json with `_class_name`, one
entry per component (["library", "Class"], or [null, null] for a component that
was None) and the pipeline's own config values; each component lives in the
subfolder of its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax

from models.weights import read_json

DTYPES = ("float32", "bfloat16")


def _is_empty(value) -> bool:
  return value is None or (isinstance(value, (list, tuple)) and all(v is None for v in value))


def check_model_index(folder: Path, class_name: str, *, required: Sequence[str],
                      optional: Sequence[str] = (), fixed: Mapping[str, tuple[Any, str]] = {},
                      must_be_empty: Mapping[str, str] = {}) -> dict:
  """Reads folder/model_index.json and checks it.

  required: components whose subfolder must exist; optional: components that may be
  null or absent (present or not, the pipeline does not need them); fixed: config
  entries -> (the only value the pipeline runs, what other values are); must_be_empty: components the
  pipeline cannot run, each with its reason (they must be null or absent). Any
  other entry is refused. FileNotFoundError for a missing file or folder.
  """
  index_file = folder / "model_index.json"
  if not index_file.exists():
    raise FileNotFoundError(
        f"{str(folder)!r} is not a diffusers pipeline folder: no model_index.json (expected "
        f"the subfolders {', '.join(required)})")
  index = read_json(index_file)
  if index.get("_class_name") != class_name:
    raise ValueError(f"{str(index_file)!r}: _class_name must be {class_name!r}, got "
                     f"{index.get('_class_name')!r}")
  known = set(required) | set(optional)
  for key, value in index.items():
    if key.startswith("_") or key in known:
      continue
    if key in fixed:
      allowed, reason = fixed[key]
      if value != allowed:
        raise ValueError(f"{str(index_file)!r}: {key}={value!r} is not supported ({reason}); "
                         f"only {allowed!r}")
    elif key in must_be_empty:
      if not _is_empty(value):
        raise ValueError(f"{str(index_file)!r}: {key} is not supported ({must_be_empty[key]})")
    else:
      raise ValueError(f"{str(index_file)!r}: unknown entry {key!r}; known: "
                       f"{sorted(known | set(fixed) | set(must_be_empty))}")
  empty = [c for c in required if c in index and _is_empty(index[c])]
  if empty:
    raise ValueError(f"{str(index_file)!r}: the components {empty} are null; {class_name} "
                     f"needs them")
  missing = [c for c in required if not (folder / c).is_dir()]
  if missing:
    raise FileNotFoundError(f"{str(folder)!r} lacks the component folders {missing}")
  return index


def component_config(folder: Path, component: str,
                     file: str = "config.json") -> Optional[dict]:
  """folder/component/file as a dict, or None when the component folder is absent."""
  path = folder / component / file
  if not (folder / component).is_dir():
    return None
  if not path.exists():
    raise FileNotFoundError(f"{str(folder / component)!r} has no {file}")
  return read_json(path)


def resolve_dtype(dtype: Optional[str]) -> str:
  """None -> float32 on CPU, bfloat16 on accelerators; else one of DTYPES."""
  if dtype is None:
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  return dtype


def pipeline_folder(folder, what: str) -> Path:
  """The folder as a Path; FileNotFoundError naming `what` when it is not a folder."""
  path = Path(folder)
  if not path.is_dir():
    raise FileNotFoundError(f"no {what} pipeline folder at {str(path)!r}")
  return path


def check_text_width(folder: Path, transformer_text_dim: int, encoder_d_model: int):
  """The transformer's text input width must be the text encoder's output width."""
  if transformer_text_dim != encoder_d_model:
    raise ValueError(f"{str(folder)!r}: the transformer takes text_dim={transformer_text_dim} "
                     f"but the text encoder gives d_model={encoder_d_model}")

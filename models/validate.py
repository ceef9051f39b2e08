"""Checks the config dataclasses share: dtype names, ints and positive floats, with
errors that name `Owner.field`; and their json round trip (`to_dict` / `from_dict`)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np


def dtype(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> np.dtype:
  """value (a name or dtype-like) as a numpy dtype whose name is one of allowed."""
  try:
    result = jnp.dtype(value)
  except TypeError:
    result = None
  if result is None or result.name not in allowed:
    raise ValueError(f"{owner}.{name} must be one of {allowed}, got {value!r}")
  return result


def integer(owner: str, name: str, value: Any, minimum: int = 1) -> int:
  """value as an int >= minimum (bools refused)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    need = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    raise ValueError(f"{owner}.{name} must be {need}, got {value!r}")
  return int(value)


def positive_float(owner: str, name: str, value: Any) -> float:
  """value as a finite float > 0 (bools refused)."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
      or value <= 0):
    raise ValueError(f"{owner}.{name} must be a finite number > 0, got {value!r}")
  return float(value)


def to_dict(config) -> dict[str, Any]:
  """A config dataclass's fields, json-ready: dtypes as names, tuples as lists."""
  out = dataclasses.asdict(config)
  for key, value in out.items():
    if isinstance(value, np.dtype):
      out[key] = value.name
    elif isinstance(value, tuple):
      out[key] = list(value)
  return out


def from_dict(cls, fields: Mapping[str, Any], overrides: Mapping[str, Any]):
  """cls(**fields, **overrides); an unknown field is an error naming the known ones."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
  return cls(**{**fields, **overrides})

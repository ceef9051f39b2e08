"""The shipped demo checkpoint: export after training, load for sampling.

A demo export is three files side by side:
  demo.safetensors + demo.json   the EMA DiT in bfloat16 (`models.wan.save_params`)
  demo_labels.safetensors        the label table label -> [TEXT_LEN, TEXT_DIM] context
                                 tokens (last row: the null label of classifier-free
                                 guidance), with the demo's video sizes, sampling
                                 defaults and data version as safetensors metadata;
                                 `benchmarks/demo_shapes.py --pick-default` adds
                                 default_label / default_seed (a CLI sample that
                                 shows its shapes) with `update_metadata`
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from models.demo import data
from models.wan import WanConfig, load_params, save_params

NUM_CLASSES = data.NUM_CLASSES
NULL_LABEL = NUM_CLASSES
TEXT_LEN = 4
TEXT_DIM = 64
LABELS_FILE = "demo_labels.safetensors"
DEMO_CHECKPOINT = os.path.join(os.path.dirname(__file__), "checkpoints", "demo.safetensors")
# Sampling defaults written into an export (the demo pipeline reads them back).
DEMO_SAMPLING = dict(num_inference_steps=25, guidance_scale=4.0, shift=2.0, block_size=128)


def label_context(params, labels):
  """Context tokens float32 [B, text_len, text_dim] of int labels [B] (NULL_LABEL for
  the unconditional branch of classifier-free guidance)."""
  return jnp.take(params["label_embedding"], labels, axis=0).astype(jnp.float32)


def export_demo(path, config: WanConfig, params, *, frames: int, height: int, width: int,
                extra_metadata: Optional[dict] = None) -> None:
  """Ships params = {"dit", "label_embedding"} in bfloat16: path (.safetensors) + its
  .json config + demo_labels.safetensors beside it."""
  path = Path(path)
  if path.suffix != ".safetensors":
    raise ValueError(f"export path must end in .safetensors, got {str(path)!r}")
  path.parent.mkdir(parents=True, exist_ok=True)
  bf16 = lambda tree: jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)), tree)
  # The shipped config computes in float32 (CPU-safe); the demo pipeline picks bf16
  # on accelerators.
  ship_config = dataclasses.replace(config, dtype="float32", param_dtype="float32")
  save_params(ship_config, bf16(params["dit"]), path)
  metadata = {"frames": frames, "height": height, "width": width,
              "num_classes": NUM_CLASSES, "null_label": NULL_LABEL,
              "data_version": data.DATA_VERSION,
              "text_len": int(params["label_embedding"].shape[1]),
              **DEMO_SAMPLING, **(extra_metadata or {})}
  save_file({"label_embedding": bf16(params["label_embedding"])}, path.parent / LABELS_FILE,
            metadata={k: json.dumps(v) for k, v in metadata.items()})


def load_demo_params(path, **overrides) -> tuple[WanConfig, dict, dict]:
  """(config, params {"dit", "label_embedding" float32}, metadata) of an export;
  overrides replace config fields (dtype, ...)."""
  path = Path(path)
  labels_file = path.parent / LABELS_FILE
  if not labels_file.exists():
    raise FileNotFoundError(f"demo label table {str(labels_file)!r} does not exist")
  config, dit = load_params(path, **overrides)
  with safe_open(labels_file, framework="np") as f:
    table = f.get_tensor("label_embedding")
    metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
  params = {"dit": dit, "label_embedding": jnp.asarray(table, jnp.float32)}
  return config, params, metadata


def update_metadata(path, updates: dict) -> dict:
  """Merge `updates` (json-able values) into the metadata of the label table beside
  the export `path`; returns the new metadata. The tensors are rewritten unchanged."""
  labels_file = Path(path).parent / LABELS_FILE
  if not labels_file.exists():
    raise FileNotFoundError(f"demo label table {str(labels_file)!r} does not exist")
  with safe_open(labels_file, framework="np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
  metadata.update(updates)
  tmp = labels_file.with_suffix(".tmp")
  save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in metadata.items()})
  os.replace(tmp, labels_file)
  return metadata

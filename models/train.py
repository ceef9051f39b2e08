"""Train the demo DiT: a small Wan-style model on procedural videos, in pixel space.

    python -m models.train --out DIR --minutes 8

Runs until --minutes of wall time (from process start, compile included) or
--total-steps, then checkpoints, exports the EMA params and renders a few
samples. Re-running with the same --out resumes from DIR (params, EMA, optimizer
state, step, rng, loss curve); the saved training config wins over the flags,
except --total-steps (to extend a run) and the time budget. So a long run is a
chain of short jobs.

Objective: rectified flow / flow matching with the convention of Wan and
diffusers' FlowMatchEulerDiscreteScheduler:
    x_t = (1 - t) x0 + t noise,  t in [0, 1] (t = sigma; 1 is pure noise)
    the model gets timestep = 1000 t and predicts velocity v = noise - x0
    sampling integrates from t = 1 to 0: x <- x + (t_next - t) v
t is drawn logit-normal (SD3): t = sigmoid(N(0, 1)). Labels are dropped to the
null label (NUM_CLASSES) 10% of the time for classifier-free guidance.

The "text" condition is a learned table: label -> [TEXT_LEN, TEXT_DIM] tokens,
stored beside the DiT params: params = {"dit": ..., "label_embedding":
[NUM_CLASSES + 1, TEXT_LEN, TEXT_DIM]} (last row: the null label).

DIR holds (flat, at most 9 files, each < 16 MiB, so it can travel to and from the
GPU machine; see --checkpoint-format):
  meta.json, state-<step>-<i>.npz     the train state (resume needs these + loss.json)
  loss.json (+ loss.png with matplotlib)
  demo.safetensors + demo.json         EMA DiT in bf16, `models.save_params` format
  demo_labels.safetensors              the label table in bf16, the demo's sizes and
                                       sampling defaults as metadata
  samples.png                          preview videos (rows), frames left to right
Ship: copy demo.safetensors, demo.json, demo_labels.safetensors to models/checkpoints/.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import signal
import struct as pystruct
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Optional

_T0 = time.time()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util

import models
from models import demo_data
from models.config import DiTConfig

NUM_CLASSES = demo_data.NUM_CLASSES
NULL_LABEL = NUM_CLASSES
TEXT_LEN = 4
TEXT_DIM = 64
DEMO_FRAMES, DEMO_HEIGHT, DEMO_WIDTH = 16, 32, 32
# Sampling defaults of the shipped model (modjax.pipeline reads them from the checkpoint).
DEMO_SAMPLING = dict(num_inference_steps=25, guidance_scale=4.0, shift=2.0, block_size=128)
LABELS_FILE = "demo_labels.safetensors"


def demo_config(**overrides) -> DiTConfig:
  """The demo DiT: pixel space (3 channels), patch (1, 2, 2), 6 layers of dim 128,
  2 heads of 64. At 16 x 32 x 32 pixels that is 16 * 16 * 16 = 4096 tokens
  (32 blocks of 128 / 64 blocks of 64 per side), ~1.8M params (3.5 MB in bf16)."""
  return DiTConfig(**{**dict(in_channels=3, out_channels=3, dim=128, ffn_dim=512, num_heads=2,
                             num_layers=6, text_dim=TEXT_DIM, patch_size=(1, 2, 2),
                             freq_dim=256),
                      **overrides})


def tiny_config(**overrides) -> DiTConfig:
  """A CPU-fast stand-in for tests and smoke runs."""
  return DiTConfig(**{**dict(in_channels=3, out_channels=3, dim=32, ffn_dim=64, num_heads=2,
                             num_layers=2, text_dim=16, patch_size=(1, 2, 2), freq_dim=32),
                      **overrides})


CONFIGS = {"demo": demo_config, "tiny": tiny_config}


# -------------------------------------------------------------- conditioning

def init_demo_params(config: DiTConfig, rng, frames: int, height: int, width: int,
                     text_len: int = TEXT_LEN):
  """{"dit": DiT params, "label_embedding": float32 [NUM_CLASSES + 1, text_len, text_dim]}."""
  k_dit, k_label = jax.random.split(rng)
  dit = models.init_params(config, k_dit, frames, height, width, text_len)
  # Zero-init the output projection (as DiT's adaLN-Zero): the model starts at v = 0.
  dit["proj_out"] = jax.tree.map(jnp.zeros_like, dit["proj_out"])
  table = jax.random.normal(k_label, (NUM_CLASSES + 1, text_len, config.text_dim), jnp.float32)
  return {"dit": dit, "label_embedding": table}


def label_context(params, labels):
  """Context tokens float32 [B, text_len, text_dim] of int labels [B] (NULL_LABEL for
  the unconditional branch of classifier-free guidance)."""
  return jnp.take(params["label_embedding"], labels, axis=0).astype(jnp.float32)


# ------------------------------------------------------------- flow matching

@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: str = "demo"
  batch_size: int = 32
  frames: int = DEMO_FRAMES
  height: int = DEMO_HEIGHT
  width: int = DEMO_WIDTH
  dtype: str = "bfloat16"          # compute dtype; params stay float32
  lr: float = 1e-3
  warmup_steps: int = 300
  total_steps: int = 20000         # length of the cosine schedule; training stops there
  end_lr_fraction: float = 0.05
  weight_decay: float = 0.01
  b2: float = 0.99
  grad_clip: float = 1.0
  ema_decay: float = 0.999
  label_dropout: float = 0.1
  t_sampling: str = "logit_normal"  # or "uniform"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.model not in CONFIGS:
      raise ValueError(f"TrainConfig.model must be one of {sorted(CONFIGS)}, got {self.model!r}")
    if self.t_sampling not in ("logit_normal", "uniform"):
      raise ValueError(f"TrainConfig.t_sampling must be 'logit_normal' or 'uniform', "
                       f"got {self.t_sampling!r}")
    for name in ("batch_size", "frames", "height", "width", "total_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")

  def dit_config(self) -> DiTConfig:
    return CONFIGS[self.model](dtype=self.dtype)


def sample_t(key, batch: int, tc: TrainConfig):
  """Noise levels t in (0, 1), logit-normal (SD3) or uniform."""
  if tc.t_sampling == "uniform":
    return jax.random.uniform(key, (batch,), minval=1e-3, maxval=1.0 - 1e-3)
  return jax.nn.sigmoid(tc.logit_mean + tc.logit_std * jax.random.normal(key, (batch,)))


def flow_matching_loss(config: DiTConfig, params, videos, labels, t, noise):
  """Mean squared velocity error at noise levels t [B] (no label dropout here)."""
  tt = t[:, None, None, None, None]
  x_t = (1.0 - tt) * videos + tt * noise
  target = noise - videos
  velocity, _ = models.apply(config, params["dit"], x_t, 1000.0 * t,
                             label_context(params, labels))
  return jnp.mean(jnp.square(velocity.astype(jnp.float32) - target))


@struct.dataclass
class TrainState:
  step: jax.Array       # int32 []
  params: Any           # float32 master params
  ema: Any
  opt_state: Any
  rng: jax.Array        # uint32 key data (a raw array, so every checkpointer takes it)


_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def make_optimizer(tc: TrainConfig):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, tc.lr, tc.warmup_steps, max(tc.total_steps, tc.warmup_steps + 1),
      end_value=tc.lr * tc.end_lr_fraction)
  # Decay the matrices only (not norms, biases, modulation tables, the label table).
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
  optimizer = optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.adamw(schedule, b1=0.9, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask))
  return optimizer, schedule


def init_state(tc: TrainConfig) -> TrainState:
  key = jax.random.key(tc.seed)
  k_init, k_train = jax.random.split(key)
  config = tc.dit_config()
  params = init_demo_params(config, k_init, tc.frames, tc.height, tc.width)
  optimizer, _ = make_optimizer(tc)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     ema=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params),
                     rng=jax.random.key_data(k_train))
  return _on_device(state)


def _on_device(tree):
  """Committed to the default device, however the arrays were made (fresh, npz, orbax),
  so a resumed state hits the same compiled step as a fresh one."""
  return jax.device_put(tree, jax.devices()[0])


def _update(tc: TrainConfig, state: TrainState, videos, labels, key):
  config = tc.dit_config()
  optimizer, schedule = make_optimizer(tc)
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  batch = videos.shape[0]
  t = sample_t(k_t, batch, tc)
  noise = jax.random.normal(k_noise, videos.shape, jnp.float32)
  labels = jnp.where(jax.random.bernoulli(k_drop, tc.label_dropout, (batch,)), NULL_LABEL, labels)
  loss, grads = jax.value_and_grad(
      lambda p: flow_matching_loss(config, p, videos, labels, t, noise))(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  # EMA with a warm-up (the average of the first steps is not dominated by the init).
  decay = jnp.minimum(tc.ema_decay, (1.0 + step) / (10.0 + step))
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
  metrics = {"loss": loss, "grad_norm": _global_norm(grads), "lr": schedule(state.step)}
  return dataclasses.replace(state, step=step, params=params, ema=ema,
                             opt_state=opt_state), metrics


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def train_step(tc: TrainConfig, state: TrainState):
  """One step on a fresh batch generated on the device from the state's rng."""
  key = jax.random.wrap_key_data(state.rng)
  key, k_data, k_step = jax.random.split(key, 3)
  videos, labels = demo_data.sample_batch(k_data, tc.batch_size, tc.frames, tc.height, tc.width)
  state, metrics = _update(tc, state, videos, labels, k_step)
  return dataclasses.replace(state, rng=jax.random.key_data(key)), metrics


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def train_step_on(tc: TrainConfig, state: TrainState, videos, labels):
  """One step on a given batch (tests: overfitting a fixed batch)."""
  key = jax.random.wrap_key_data(state.rng)
  key, k_step = jax.random.split(key)
  state, metrics = _update(tc, state, videos, labels, k_step)
  return dataclasses.replace(state, rng=jax.random.key_data(key)), metrics


@functools.partial(jax.jit, static_argnums=0)
def eval_loss(tc: TrainConfig, params, key):
  """Velocity loss on a fixed batch at t stratified over (0, 1): comparable across runs."""
  k_data, k_noise = jax.random.split(key)
  videos, labels = demo_data.sample_batch(k_data, tc.batch_size, tc.frames, tc.height, tc.width)
  t = (jnp.arange(tc.batch_size, dtype=jnp.float32) + 0.5) / tc.batch_size
  noise = jax.random.normal(k_noise, videos.shape, jnp.float32)
  return flow_matching_loss(tc.dit_config(), params, videos, labels, t, noise)


# ------------------------------------------------------------------ sampling

def flow_sigmas(steps: int, shift: float):
  """Shifted noise levels 1 -> 0, [steps + 1], as FlowMatchEulerDiscreteScheduler."""
  s = jnp.linspace(1.0, 0.0, steps + 1)
  return shift * s / (1.0 + (shift - 1.0) * s)


@functools.partial(jax.jit, static_argnames=("config", "frames", "height", "width", "steps"))
def sample(config: DiTConfig, params, labels, key, *, frames: int, height: int, width: int,
           steps: int = 25, guidance_scale: float = 4.0, shift: float = 2.0):
  """Euler flow sampler with classifier-free guidance (dense attention): videos
  float32 [B, 3, F, H, W] in [-1, 1]. A preview for training; modjax has the real one."""
  batch = labels.shape[0]
  x = jax.random.normal(key, (batch, config.in_channels, frames, height, width), jnp.float32)
  context = label_context(params, jnp.concatenate([labels, jnp.full_like(labels, NULL_LABEL)]))
  sigmas = flow_sigmas(steps, shift)

  def body(x, i):
    t = jnp.full((2 * batch,), sigmas[i] * 1000.0)
    v, _ = models.apply(config, params["dit"], jnp.concatenate([x, x]), t, context)
    v_cond, v_uncond = jnp.split(v.astype(jnp.float32), 2)
    v = v_uncond + guidance_scale * (v_cond - v_uncond)
    return x + (sigmas[i + 1] - sigmas[i]) * v, None

  x, _ = jax.lax.scan(body, x, jnp.arange(steps))
  return jnp.clip(x, -1.0, 1.0)


def write_png(path, image: np.ndarray) -> None:
  """uint8 [H, W, 3] -> PNG, with zlib only (no imaging package needed)."""
  image = np.ascontiguousarray(image, np.uint8)
  height, width, _ = image.shape
  raw = b"".join(b"\x00" + image[r].tobytes() for r in range(height))
  chunk = lambda kind, data: (pystruct.pack(">I", len(data)) + kind + data
                              + pystruct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  Path(path).write_bytes(b"\x89PNG\r\n\x1a\n"
                         + chunk(b"IHDR", pystruct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                         + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def video_grid(videos: np.ndarray, scale: int = 2) -> np.ndarray:
  """[B, 3, F, H, W] in [-1, 1] -> uint8 image, one row per video, frames left to right."""
  v = np.clip((np.asarray(videos, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
  b, c, f, h, w = v.shape
  v = np.pad(v, ((0, 0), (0, 0), (0, 0), (0, 1), (0, 1)), constant_values=255)
  grid = v.transpose(0, 3, 2, 4, 1).reshape(b * (h + 1), f * (w + 1), c)
  return np.repeat(np.repeat(grid, scale, 0), scale, 1)


# ------------------------------------------------------------- checkpointing

def _orbax():
  try:
    import orbax.checkpoint as ocp
    return ocp
  except ImportError:
    return None


def _state_dict(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "ema": state.ema,
          "opt_state": state.opt_state, "rng": state.rng}


SHARD_BYTES = 15 * 2**20  # files back from the GPU machine must stay under 16 MiB each
CHECKPOINT_FORMATS = ("npz", "orbax")


def save_checkpoint(out: Path, state: TrainState, tc: TrainConfig, history: dict,
                    fmt: str = "npz") -> str:
  """Writes the full train state, then meta.json (which commits it) and loss.json.

  "npz" (default): a few flat files state-<step>-<i>.npz of at most SHARD_BYTES each,
  so a run folder can travel to and from the GPU machine (few files, each < 16 MiB,
  no subfolders) and resume anywhere; shards of older checkpoints are removed.
  "orbax": an orbax StandardCheckpointer folder DIR/state (many files, nested).
  """
  if fmt not in CHECKPOINT_FORMATS:
    raise ValueError(f"checkpoint format must be one of {CHECKPOINT_FORMATS}, got {fmt!r}")
  out.mkdir(parents=True, exist_ok=True)
  step = int(state.step)
  tree = _state_dict(state)
  shards = []
  if fmt == "orbax":
    ocp = _orbax()
    if ocp is None:
      raise RuntimeError("checkpoint format 'orbax' asked for, but orbax is not importable")
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save((out / "state").absolute(), tree, force=True)
      checkpointer.wait_until_finished()
  else:
    groups, size = [[]], 0
    for i, leaf in enumerate(jax.tree.leaves(tree)):
      leaf = np.asarray(leaf)
      if groups[-1] and size + leaf.nbytes > SHARD_BYTES:
        groups.append([])
        size = 0
      groups[-1].append((i, leaf))
      size += leaf.nbytes
    for g, group in enumerate(groups):
      name = f"state-{step:07d}-{g}.npz"
      tmp = out / (name + ".tmp")
      with open(tmp, "wb") as f:
        np.savez(f, **{f"leaf_{i:04d}": leaf for i, leaf in group})
      os.replace(tmp, out / name)
      shards.append(name)
  meta = {"format": fmt, "step": step, "shards": shards, "train_config": dataclasses.asdict(tc),
          "dit_config": tc.dit_config().to_dict(), "jax": jax.__version__}
  _write_json(out / "meta.json", meta)
  _write_json(out / "loss.json", history)
  for old in out.glob("state-*.npz"):
    if old.name not in shards:
      old.unlink()
  return fmt


def load_checkpoint(out: Path) -> Optional[tuple[TrainState, TrainConfig, dict]]:
  """(state, train config, history) from DIR, or None when DIR has no checkpoint."""
  meta_file = out / "meta.json"
  if not meta_file.exists():
    return None
  meta = json.loads(meta_file.read_text())
  tc = TrainConfig(**meta["train_config"])
  template = _state_dict(jax.eval_shape(lambda: init_state(tc)))
  if meta["format"] == "orbax":
    ocp = _orbax()
    if ocp is None:
      raise RuntimeError(f"{out} holds an orbax checkpoint but orbax is not importable")
    with ocp.StandardCheckpointer() as checkpointer:
      tree = checkpointer.restore((out / "state").absolute(), template)
  else:
    arrays = {}
    for name in meta["shards"]:
      if not (out / name).exists():
        raise FileNotFoundError(f"checkpoint shard {str(out / name)!r} (listed in meta.json) "
                                f"does not exist")
      with np.load(out / name) as data:
        arrays.update({k: data[k] for k in data.files})
    shapes = jax.tree.leaves(template)
    if len(arrays) != len(shapes):
      raise ValueError(f"{out} holds {len(arrays)} state arrays, the state needs {len(shapes)}")
    leaves = [arrays[f"leaf_{i:04d}"] for i in range(len(shapes))]
    for i, (leaf, shape) in enumerate(zip(leaves, shapes)):
      if leaf.shape != shape.shape or leaf.dtype != shape.dtype:
        raise ValueError(f"{out}: state array {i} is {leaf.shape} {leaf.dtype} where the "
                         f"state needs {shape.shape} {shape.dtype}")
    tree = jax.tree.unflatten(jax.tree.structure(template), [jnp.asarray(x) for x in leaves])
  history_file = out / "loss.json"
  history = json.loads(history_file.read_text()) if history_file.exists() else _new_history()
  return _on_device(TrainState(**tree)), tc, history


def _new_history() -> dict:
  return {"step": [], "loss": [], "grad_norm": [], "lr": [], "time": [],
          "eval_step": [], "eval_loss": []}


def _write_json(path: Path, obj) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(obj, indent=1) + "\n")
  os.replace(tmp, path)


def plot_history(out: Path, history: dict) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(history["step"], history["loss"], label="train loss", lw=0.8)
  if history["eval_step"]:
    ax.plot(history["eval_step"], history["eval_loss"], "o-", label="eval loss (EMA)")
  ax.set_xlabel("step")
  ax.set_ylabel("velocity MSE")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "loss.png", dpi=100)
  plt.close(fig)


# -------------------------------------------------------------------- export

_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int32": "I32"}


def _write_safetensors(path: Path, tensors: dict, metadata: Optional[dict] = None) -> None:
  """Minimal safetensors writer (the format: u64 header size, json header, raw bytes),
  so the export works where the safetensors package is missing."""
  header, offset, blobs = {}, 0, []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    data = array.tobytes()
    header[name] = {"dtype": _ST_DTYPES[array.dtype.name], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(data)]}
    offset += len(data)
    blobs.append(data)
  if metadata:
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  with open(path, "wb") as f:
    f.write(pystruct.pack("<Q", len(encoded)) + encoded)
    for blob in blobs:
      f.write(blob)


def _read_safetensors(path: Path) -> tuple[dict, dict]:
  """(tensors as numpy, metadata) of a safetensors file (see _write_safetensors)."""
  import ml_dtypes
  dtypes = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "I32": np.int32}
  raw = Path(path).read_bytes()
  (size,) = pystruct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + size])
  metadata = header.pop("__metadata__", {})
  base = 8 + size
  tensors = {name: np.frombuffer(raw[base + s:base + e], dtypes[h["dtype"]]).reshape(h["shape"])
             for name, h in header.items() for s, e in [h["data_offsets"]]}
  return tensors, metadata


def _unstacked(config: DiTConfig, params) -> dict:
  """Flat {dotted name: array} in the loop layout (blocks_i.*), as models.save_params."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, leaf in flat.items():
    if config.scan_layers and path[0] == "blocks":
      for i in range(config.num_layers):
        out[".".join((f"blocks_{i}",) + path[1:])] = np.asarray(leaf[i])
    else:
      out[".".join(path)] = np.asarray(leaf)
  return out


def export_demo(path, config: DiTConfig, params, *, frames: int, height: int, width: int,
                extra_metadata: Optional[dict] = None) -> None:
  """Ships params = {"dit", "label_embedding"} in bfloat16: path (.safetensors, the DiT in
  the `models.save_params` format) + its .json config + demo_labels.safetensors beside it."""
  path = Path(path)
  if path.suffix != ".safetensors":
    raise ValueError(f"export path must end in .safetensors, got {str(path)!r}")
  path.parent.mkdir(parents=True, exist_ok=True)
  bf16 = lambda tree: jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)), tree)
  # The shipped config computes in float32 (CPU-safe); load_demo picks bf16 on accelerators.
  ship_config = dataclasses.replace(config, dtype="float32", param_dtype="float32")
  dit = bf16(params["dit"])
  try:
    from models.loading import save_params
  except ImportError:  # no safetensors package: same format through our own writer
    _write_safetensors(path, _unstacked(ship_config, dit))
    path.with_suffix(".json").write_text(json.dumps(ship_config.to_dict(), indent=2) + "\n")
  else:
    save_params(ship_config, dit, path)
  metadata = {"frames": frames, "height": height, "width": width,
              "num_classes": NUM_CLASSES, "null_label": NULL_LABEL,
              "text_len": int(params["label_embedding"].shape[1]),
              **{k: v for k, v in DEMO_SAMPLING.items()}, **(extra_metadata or {})}
  _write_safetensors(path.parent / LABELS_FILE,
                     {"label_embedding": bf16(params["label_embedding"])}, metadata)


def load_demo_params(path, **overrides) -> tuple[DiTConfig, dict, dict]:
  """(config, params {"dit", "label_embedding"} in float32, metadata) of an export."""
  path = Path(path)
  labels_file = path.parent / LABELS_FILE
  if not labels_file.exists():
    raise FileNotFoundError(f"demo label table {str(labels_file)!r} does not exist")
  from models.loading import load_params
  config, dit = load_params(path, **overrides)
  tensors, metadata = _read_safetensors(labels_file)
  params = {"dit": dit,
            "label_embedding": jnp.asarray(tensors["label_embedding"], jnp.float32)}
  meta = {k: (json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" else v) for k, v in metadata.items()}
  return config, params, meta


def load_demo(path):
  """The shipped demo model as a `modjax.pipeline.LoadedModel` (the CLI default)."""
  from modjax.pipeline import LoadedModel, ModelDefaults
  dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  config, params, meta = load_demo_params(path, dtype=dtype)
  defaults = ModelDefaults(frames=int(meta["frames"]), height=int(meta["height"]),
                           width=int(meta["width"]),
                           num_inference_steps=int(meta["num_inference_steps"]),
                           guidance_scale=float(meta["guidance_scale"]),
                           shift=float(meta["shift"]), block_size=int(meta["block_size"]))
  table = params["label_embedding"]

  def make_context(batch: int, key, label: Optional[int] = None):
    if label is None:
      labels = jax.random.randint(key, (batch,), 0, NUM_CLASSES)
    else:
      if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}")
      labels = jnp.full((batch,), int(label), jnp.int32)
    ctx = label_context({"label_embedding": table}, labels)
    neg = label_context({"label_embedding": table}, jnp.full((batch,), NULL_LABEL, jnp.int32))
    return ctx, neg

  return LoadedModel("demo", config, params["dit"], defaults, make_context, True)


# ---------------------------------------------------------------------- main

def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="run folder: checkpoints, logs, export")
  p.add_argument("--minutes", type=float, default=8.0,
                 help="wall-time budget of this process, compile and export included")
  p.add_argument("--checkpoint-every", type=int, default=1000)
  p.add_argument("--log-every", type=int, default=50)
  p.add_argument("--eval-every", type=int, default=500)
  p.add_argument("--checkpoint-format", default="npz", choices=CHECKPOINT_FORMATS,
                 help="npz: a few flat files < 16 MiB (travels to/from the GPU machine); "
                      "orbax: an orbax folder")
  p.add_argument("--export", default=None,
                 help="path of the exported .safetensors (default DIR/demo.safetensors)")
  p.add_argument("--num-samples", type=int, default=8, help="preview videos at the end (0: none)")
  defaults = TrainConfig()
  for field in dataclasses.fields(TrainConfig):
    p.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                   default=None, help=f"default {getattr(defaults, field.name)}" + (
                       "" if field.name == "total_steps" else " (new runs only)"))
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(argv)
  out = Path(args.out)
  budget = 60.0 * args.minutes
  stop = {"signal": None}
  signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))

  flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
           if getattr(args, f.name) is not None}
  restored = load_checkpoint(out)
  if restored is None:
    tc = TrainConfig(**flags)
    state, history = init_state(tc), _new_history()
    print(f"new run in {out}", flush=True)
  else:
    state, tc, history = restored
    if "total_steps" in flags and flags["total_steps"] != tc.total_steps:
      print(f"resuming: total_steps {tc.total_steps} -> {flags['total_steps']} "
            f"(the cosine schedule stretches)", flush=True)
      tc = dataclasses.replace(tc, total_steps=flags["total_steps"])
    ignored = {k: v for k, v in flags.items() if getattr(tc, k) != v}
    if ignored:
      print(f"resuming: the saved training config wins; ignoring flags {ignored}", flush=True)
    print(f"resumed {out} at step {int(state.step)}", flush=True)
  config = tc.dit_config()
  n_params = sum(x.size for x in jax.tree.leaves(state.params["dit"]))
  tokens = config.tokens(tc.frames, tc.height, tc.width)
  print(f"devices {jax.devices()} | jax {jax.__version__}", flush=True)
  print(f"model {tc.model}: {n_params / 1e6:.2f}M DiT params, {tokens} tokens "
        f"({tc.frames}x{tc.height}x{tc.width}), batch {tc.batch_size}, dtype {tc.dtype}", flush=True)
  print(f"train config {dataclasses.asdict(tc)}", flush=True)

  eval_key = jax.random.key(1234)
  fmt = args.checkpoint_format
  if restored is not None and json.loads((out / "meta.json").read_text())["format"] != fmt:
    fmt = json.loads((out / "meta.json").read_text())["format"]
  reserve = 20.0 + (60.0 if args.num_samples else 0.0)   # final checkpoint, export, samples
  last_ckpt_s = 2.0
  step = start_step = int(state.step)                     # host mirror of state.step
  pending, compiled_at, last_log = [], None, None

  def log(pending):
    fetched = jax.device_get(pending)
    now = time.time()
    mean = lambda name: float(np.mean([m[name] for m in fetched]))
    history["step"].append(step)
    history["loss"].append(mean("loss"))
    history["grad_norm"].append(mean("grad_norm"))
    history["lr"].append(float(fetched[-1]["lr"]))
    history["time"].append(now - _T0)
    return now

  while step < tc.total_steps and not stop["signal"]:
    state, metrics = train_step(tc, state)
    step += 1
    if compiled_at is None:
      jax.block_until_ready(metrics)
      compiled_at = time.time()
      last_log = (compiled_at, step)
      print(f"step {step:6d} loss {float(metrics['loss']):.4f} (first step, compile included: "
            f"{compiled_at - _T0:.1f}s since start)", flush=True)
      continue
    pending.append(metrics)
    if len(pending) < args.log_every and step < tc.total_steps:
      continue
    now = log(pending)
    rate = (step - last_log[1]) / max(now - last_log[0], 1e-9)
    print(f"step {step:6d} loss {history['loss'][-1]:.4f} grad_norm {history['grad_norm'][-1]:.3f} "
          f"lr {history['lr'][-1]:.2e} | {rate:.2f} steps/s {rate * tc.batch_size:.1f} samples/s "
          f"| {now - _T0:.0f}s", flush=True)
    crossed = lambda every: step // every > last_log[1] // every
    if crossed(args.eval_every):
      history["eval_step"].append(step)
      history["eval_loss"].append(float(eval_loss(tc, state.ema, eval_key)))
      print(f"step {step:6d} eval loss (EMA) {history['eval_loss'][-1]:.4f}", flush=True)
    if crossed(args.checkpoint_every):
      t = time.time()
      fmt = save_checkpoint(out, state, tc, history, fmt)
      last_ckpt_s = time.time() - t
      print(f"checkpoint step {step} ({fmt}, {last_ckpt_s:.1f}s)", flush=True)
    pending, last_log = [], (time.time(), step)
    if time.time() - _T0 + args.log_every / max(rate, 1e-9) + reserve + last_ckpt_s > budget:
      break
  if pending:
    log(pending)
  jax.block_until_ready(state)
  loop_end = time.time()
  history["eval_step"].append(step)
  history["eval_loss"].append(float(eval_loss(tc, state.ema, eval_key)))
  fmt = save_checkpoint(out, state, tc, history, fmt)
  plot_history(out, history)
  trained = step - start_step
  train_s = loop_end - (compiled_at or loop_end)
  print(f"stopped at step {step} ({trained} steps this run, eval loss {history['eval_loss'][-1]:.4f}); "
        f"checkpoint {fmt}", flush=True)
  if trained > 1 and train_s > 0:  # the first step of a run is the compile
    rate = (trained - 1) / train_s
    print(f"throughput {rate:.2f} steps/s, {rate * tc.batch_size:.1f} samples/s "
          f"(after compile, eval and checkpoints included)", flush=True)

  export = Path(args.export) if args.export else out / "demo.safetensors"
  export_demo(export, config, state.ema, frames=tc.frames, height=tc.height, width=tc.width,
              extra_metadata={"train_step": step, "eval_loss": history["eval_loss"][-1]})
  print(f"exported EMA params (bf16) to {export} (+ .json, {LABELS_FILE}): "
        f"{os.path.getsize(export) / 1e6:.2f} MB", flush=True)

  if args.num_samples and time.time() - _T0 < budget - 15:
    labels = jnp.arange(args.num_samples, dtype=jnp.int32) * 5 % NUM_CLASSES
    t = time.time()
    sample_config = config
    if jax.default_backend() == "cpu":  # bf16 matmuls are slow on CPU
      sample_config = dataclasses.replace(config, dtype="float32")
    videos = sample(sample_config, state.ema, labels, jax.random.key(0), frames=tc.frames,
                    height=tc.height, width=tc.width, steps=DEMO_SAMPLING["num_inference_steps"],
                    guidance_scale=DEMO_SAMPLING["guidance_scale"], shift=DEMO_SAMPLING["shift"])
    videos = np.asarray(videos)
    write_png(out / "samples.png", video_grid(videos))
    print(f"samples ({time.time() - t:.1f}s): {out / 'samples.png'}; labels "
          + "; ".join(f"{int(l)}={demo_data.describe_label(int(l))}" for l in labels), flush=True)
  files = sorted(p.name for p in out.iterdir() if p.is_file())
  print(f"{out}: {' '.join(files)}\n  resume needs meta.json loss.json state-*.npz; ship "
        f"{export.name} {export.with_suffix('.json').name} {LABELS_FILE}", flush=True)
  print(f"done in {time.time() - _T0:.0f}s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

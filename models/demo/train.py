"""Train the demo DiT: a small Wan-style model on procedural videos, in pixel space.

    python -m models.demo.train --out DIR --minutes 8

Runs until --minutes of wall time (from process start, compile included) or
--total-steps, then checkpoints and exports the EMA params. With --fit-schedule the
cosine learning-rate schedule is re-planned from the measured throughput so that
it ends when the time budget does (whatever the model size and the card), never
past --total-steps (render samples of
the export with `python -m modjax sample --model DIR/demo.safetensors`). Re-running with the same --out resumes from DIR (params, EMA, optimizer
state, step, rng, loss curve); the saved training config wins over the flags,
except --total-steps (to extend a run) and the time budget. So a long run is a
chain of short jobs. --init-from EXPORT starts a new run from an export's weights
instead (a warm restart: the optimizer state does not travel in an export); the
export it writes records the chain (init_chain, total_train_step,
total_train_seconds).

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

DIR holds (flat, at most 8 files, each < 16 MiB, so it can travel to and from the
GPU machine; see --checkpoint-format):
  meta.json, state-<step>-<i>.npz     the train state (resume needs these + loss.json)
  loss.json (+ loss.png with matplotlib)
  demo.safetensors + demo.json         EMA DiT in bf16 (`models.demo.checkpoint`)
  demo_labels.safetensors              the label table in bf16, the demo's sizes and
                                       sampling defaults as metadata
Ship: copy demo.safetensors, demo.json, demo_labels.safetensors to models/demo/checkpoints/.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

_T0 = time.time()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from models import wan
from models.demo import checkpoint, data
from models.demo.checkpoint import NULL_LABEL, NUM_CLASSES, TEXT_DIM, TEXT_LEN, label_context
from models.wan import WanConfig

DEMO_FRAMES, DEMO_HEIGHT, DEMO_WIDTH = 16, 32, 32


def demo_config(**overrides) -> WanConfig:
  """The demo DiT: pixel space (3 channels), patch (1, 2, 2), 8 layers of dim 192,
  3 heads of 64. At 16 x 32 x 32 pixels that is 16 * 16 * 16 = 4096 tokens
  (32 blocks of 128 / 64 blocks of 64 per side), ~5.1M params (10 MB in bf16).
  (The first demo, `demo_v1_config`, had 6 layers of dim 128: 1.8M params, too
  few to draw the shapes reliably.)"""
  return WanConfig(**{**dict(in_channels=3, out_channels=3, dim=192, ffn_dim=768, num_heads=3,
                             num_layers=8, text_dim=TEXT_DIM, patch_size=(1, 2, 2),
                             freq_dim=256),
                      **overrides})


def demo_v1_config(**overrides) -> WanConfig:
  """The first shipped demo DiT: 6 layers of dim 128, 2 heads of 64 (1.8M params)."""
  return demo_config(**{**dict(dim=128, ffn_dim=512, num_heads=2, num_layers=6), **overrides})


def tiny_config(**overrides) -> WanConfig:
  """A CPU-fast stand-in for tests and smoke runs."""
  return WanConfig(**{**dict(in_channels=3, out_channels=3, dim=32, ffn_dim=64, num_heads=2,
                             num_layers=2, text_dim=16, patch_size=(1, 2, 2), freq_dim=32),
                      **overrides})


CONFIGS = {"demo": demo_config, "demo_v1": demo_v1_config, "tiny": tiny_config}


# -------------------------------------------------------------- conditioning

def init_demo_params(config: WanConfig, rng, frames: int, height: int, width: int,
                     text_len: int = TEXT_LEN):
  """{"dit": DiT params, "label_embedding": float32 [NUM_CLASSES + 1, text_len, text_dim]}."""
  k_dit, k_label = jax.random.split(rng)
  dit = wan.init_params(config, k_dit, frames, height, width, text_len)
  # Zero-init the output projection (as DiT's adaLN-Zero): the model starts at v = 0.
  dit["proj_out"] = jax.tree.map(jnp.zeros_like, dit["proj_out"])
  table = jax.random.normal(k_label, (NUM_CLASSES + 1, text_len, config.text_dim), jnp.float32)
  return {"dit": dit, "label_embedding": table}


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

  def dit_config(self) -> WanConfig:
    return CONFIGS[self.model](dtype=self.dtype)


def sample_t(key, batch: int, tc: TrainConfig):
  """Noise levels t in (0, 1), logit-normal (SD3) or uniform."""
  if tc.t_sampling == "uniform":
    return jax.random.uniform(key, (batch,), minval=1e-3, maxval=1.0 - 1e-3)
  return jax.nn.sigmoid(tc.logit_mean + tc.logit_std * jax.random.normal(key, (batch,)))


def flow_matching_loss(config: WanConfig, params, videos, labels, t, noise):
  """Mean squared velocity error at noise levels t [B] (no label dropout here)."""
  tt = t[:, None, None, None, None]
  x_t = (1.0 - tt) * videos + tt * noise
  target = noise - videos
  velocity, _ = wan.apply(config, params["dit"], x_t, 1000.0 * t,
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


def learning_rate(tc: TrainConfig, step, schedule_steps):
  """Linear warm-up from 0 to tc.lr over tc.warmup_steps, then cosine decay to
  tc.lr * end_lr_fraction at `schedule_steps` (optax's warmup_cosine_decay_schedule
  with decay_steps = schedule_steps); step and schedule_steps may be traced."""
  step = jnp.asarray(step, jnp.float32)
  warm = float(max(tc.warmup_steps, 1))
  total = jnp.maximum(jnp.asarray(schedule_steps, jnp.float32), warm + 1.0)
  end = tc.lr * tc.end_lr_fraction
  frac = jnp.clip((step - warm) / (total - warm), 0.0, 1.0)
  cosine = end + (tc.lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  return jnp.where(step < warm, tc.lr * step / warm, cosine)


def make_optimizer(tc: TrainConfig):
  """AdamW without its learning rate (the update is scaled by `learning_rate` in
  `_update`, so the schedule's length can change without a recompile)."""
  # Decay the matrices only (not norms, biases, modulation tables, the label table).
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
  return optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.scale_by_adam(b1=0.9, b2=tc.b2),
      optax.add_decayed_weights(tc.weight_decay, mask=decay_mask),
      optax.scale(-1.0))


def init_state(tc: TrainConfig) -> TrainState:
  key = jax.random.key(tc.seed)
  k_init, k_train = jax.random.split(key)
  params = init_demo_params(tc.dit_config(), k_init, tc.frames, tc.height, tc.width)
  return _start_state(tc, params, k_train)


def _start_state(tc: TrainConfig, params, key) -> TrainState:
  """Step 0 at `params`: the EMA a copy of them, a fresh optimizer state."""
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     ema=jax.tree.map(jnp.copy, params), opt_state=make_optimizer(tc).init(params),
                     rng=jax.random.key_data(key))
  return _on_device(state)


def init_state_from_export(tc: TrainConfig, export) -> tuple[TrainState, dict]:
  """A new run that starts from a demo export's (bf16 EMA) weights: params and EMA
  both set to them in float32, a fresh optimizer state, step 0 (the learning-rate
  warm-up runs again). The optimizer state of the run that made the export is not
  in it, so this is a warm restart, not a resume. Returns (state, the export's
  metadata). The export must match tc's model and video size."""
  config, params, meta = checkpoint.load_demo_params(export)
  want = tc.dit_config()
  mismatched = {f.name: (getattr(config, f.name), getattr(want, f.name))
                for f in dataclasses.fields(WanConfig)
                if f.name not in ("dtype", "param_dtype")
                and getattr(config, f.name) != getattr(want, f.name)}
  if mismatched:
    raise ValueError(f"--init-from {str(export)!r} is not a {tc.model!r} model: "
                     f"(export, wanted) {mismatched}")
  sizes = {k: (meta.get(k), getattr(tc, k)) for k in ("frames", "height", "width")
           if meta.get(k) != getattr(tc, k)}
  if sizes:
    raise ValueError(f"--init-from {str(export)!r} was trained at other video sizes: "
                     f"(export, this run) {sizes}")
  fresh = jax.eval_shape(lambda: init_state(tc))
  params = jax.tree.map(lambda x, t: jnp.asarray(x, t.dtype), params, fresh.params)
  key = jax.random.fold_in(jax.random.key(tc.seed), int(meta.get("train_step", 0)))
  return _start_state(tc, params, key), meta


def _on_device(tree):
  """Committed to the default device, however the arrays were made (fresh, npz, orbax),
  so a resumed state hits the same compiled step as a fresh one."""
  return jax.device_put(tree, jax.devices()[0])


def _update(tc: TrainConfig, state: TrainState, videos, labels, key, schedule_steps):
  config = tc.dit_config()
  optimizer = make_optimizer(tc)
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  batch = videos.shape[0]
  t = sample_t(k_t, batch, tc)
  noise = jax.random.normal(k_noise, videos.shape, jnp.float32)
  labels = jnp.where(jax.random.bernoulli(k_drop, tc.label_dropout, (batch,)), NULL_LABEL, labels)
  loss, grads = jax.value_and_grad(
      lambda p: flow_matching_loss(config, p, videos, labels, t, noise))(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  lr = learning_rate(tc, state.step, schedule_steps)
  params = optax.apply_updates(state.params, jax.tree.map(lambda u: lr * u, updates))
  step = state.step + 1
  # EMA with a warm-up (the average of the first steps is not dominated by the init).
  decay = jnp.minimum(tc.ema_decay, (1.0 + step) / (10.0 + step))
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
  metrics = {"loss": loss, "grad_norm": _global_norm(grads), "lr": lr}
  return dataclasses.replace(state, step=step, params=params, ema=ema,
                             opt_state=opt_state), metrics


def train_step(tc: TrainConfig, state: TrainState, schedule_steps=None):
  """One step on a fresh batch generated on the device from the state's rng.
  schedule_steps: the cosine's length (default tc.total_steps); a traced int, so
  re-planning it does not recompile."""
  steps = tc.total_steps if schedule_steps is None else schedule_steps
  return _train_step(tc, state, jnp.asarray(steps, jnp.int32))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _train_step(tc: TrainConfig, state: TrainState, schedule_steps):
  key = jax.random.wrap_key_data(state.rng)
  key, k_data, k_step = jax.random.split(key, 3)
  videos, labels = data.sample_batch(k_data, tc.batch_size, tc.frames, tc.height, tc.width)
  state, metrics = _update(tc, state, videos, labels, k_step, schedule_steps)
  return dataclasses.replace(state, rng=jax.random.key_data(key)), metrics


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def train_step_on(tc: TrainConfig, state: TrainState, videos, labels):
  """One step on a given batch (tests: overfitting a fixed batch)."""
  key = jax.random.wrap_key_data(state.rng)
  key, k_step = jax.random.split(key)
  state, metrics = _update(tc, state, videos, labels, k_step, tc.total_steps)
  return dataclasses.replace(state, rng=jax.random.key_data(key)), metrics


@functools.partial(jax.jit, static_argnums=0)
def eval_loss(tc: TrainConfig, params, key):
  """Velocity loss on a fixed batch at t stratified over (0, 1): comparable across runs."""
  k_data, k_noise = jax.random.split(key)
  videos, labels = data.sample_batch(k_data, tc.batch_size, tc.frames, tc.height, tc.width)
  t = (jnp.arange(tc.batch_size, dtype=jnp.float32) + 0.5) / tc.batch_size
  noise = jax.random.normal(k_noise, videos.shape, jnp.float32)
  return flow_matching_loss(tc.dit_config(), params, videos, labels, t, noise)


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


# ---------------------------------------------------------------------- main

def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m models.demo.train", description=__doc__.split("\n")[0])
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
  p.add_argument("--init-from", default=None,
                 help="new runs only: start from this demo export's weights (a warm restart "
                      "with a fresh optimizer; the chain is kept in the history)")
  p.add_argument("--fit-schedule", action="store_true",
                 help="re-plan the cosine schedule from the measured throughput so it ends "
                      "with the --minutes budget (at most --total-steps)")
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
  if restored is None and args.init_from:
    tc = TrainConfig(**flags)
    state, init_meta = init_state_from_export(tc, args.init_from)
    history = _new_history()
    # What the weights had already been through, so the export can say its total.
    history["init_from"] = {"path": str(args.init_from),
                            **{k: init_meta[k] for k in ("train_step", "train_seconds",
                                                         "eval_loss", "init_chain")
                               if k in init_meta}}
    print(f"new run in {out}, from the weights of {args.init_from} "
          f"(trained {init_meta.get('train_step')} steps, {init_meta.get('train_seconds')} s)",
          flush=True)
  elif restored is None:
    tc = TrainConfig(**flags)
    state, history = init_state(tc), _new_history()
    print(f"new run in {out}", flush=True)
  else:
    if args.init_from:
      print(f"resuming {out}: --init-from is for new runs, ignored", flush=True)
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
  reserve = 20.0                                          # final checkpoint and export
  last_ckpt_s = 2.0
  step = start_step = int(state.step)                     # host mirror of state.step
  pending, compiled_at, last_log = [], None, None
  # The cosine's length: tc.total_steps, or (--fit-schedule) re-planned at each log
  # from the throughput so that it ends with the budget; kept in the history.
  planned = int(history.get("schedule_steps", tc.total_steps))

  def replan(rate, now):
    remaining = budget - (now - _T0) - reserve - last_ckpt_s - 5.0
    return int(min(tc.total_steps, max(step, step + rate * remaining)))

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

  while step < min(tc.total_steps, planned) and not stop["signal"]:
    state, metrics = train_step(tc, state, planned)
    step += 1
    if compiled_at is None:
      jax.block_until_ready(metrics)
      compiled_at = time.time()
      last_log = (compiled_at, step)
      print(f"step {step:6d} loss {float(metrics['loss']):.4f} (first step, compile included: "
            f"{compiled_at - _T0:.1f}s since start)", flush=True)
      continue
    pending.append(metrics)
    if len(pending) < args.log_every and step < min(tc.total_steps, planned):
      continue
    now = log(pending)
    rate = (step - last_log[1]) / max(now - last_log[0], 1e-9)
    if args.fit_schedule and step >= 2 * args.log_every:
      planned = replan(rate, now)
      history["schedule_steps"] = planned
    print(f"step {step:6d} loss {history['loss'][-1]:.4f} grad_norm {history['grad_norm'][-1]:.3f} "
          f"lr {history['lr'][-1]:.2e} | {rate:.2f} steps/s {rate * tc.batch_size:.1f} samples/s "
          f"| {now - _T0:.0f}s" + (f" | schedule ends at step {planned}" if args.fit_schedule else ""),
          flush=True)
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
      break  # the budget is a hard limit (a fitted schedule ends about here anyway)
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
  run_seconds = round(time.time() - _T0, 1)
  extra = {"train_step": step, "eval_loss": history["eval_loss"][-1], "model": tc.model,
           "train_seconds": run_seconds}
  if "init_from" in history:
    # The weights' whole history: every run of the chain (steps and wall seconds).
    before = history["init_from"]
    chain = before.get("init_chain") or [{"train_step": before.get("train_step"),
                                          "train_seconds": before.get("train_seconds")}]
    chain = chain + [{"train_step": step, "train_seconds": run_seconds}]
    extra.update(init_chain=chain,
                 total_train_step=sum(int(c["train_step"] or 0) for c in chain),
                 total_train_seconds=round(sum(float(c["train_seconds"] or 0) for c in chain), 1))
  checkpoint.export_demo(export, config, state.ema, frames=tc.frames, height=tc.height,
                         width=tc.width, extra_metadata=extra)
  print(f"exported EMA params (bf16) to {export} (+ .json, {checkpoint.LABELS_FILE}): "
        f"{os.path.getsize(export) / 1e6:.2f} MB", flush=True)
  files = sorted(p.name for p in out.iterdir() if p.is_file())
  print(f"{out}: {' '.join(files)}\n  resume needs meta.json loss.json state-*.npz; ship "
        f"{export.name} {export.with_suffix('.json').name} {checkpoint.LABELS_FILE}", flush=True)
  print(f"done in {time.time() - _T0:.0f}s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The jit-compiled flow-matching sampler: one `lax.scan` over denoising steps.

The scan carries the latent and the attention policy's state (empty for dense,
`MODState` for MOD-DiT). Per-step inputs (noise levels, step kind) are numpy
arrays computed before tracing, so the whole schedule -- warm-up, map steps,
sparse steps, refreshes -- compiles once and never syncs with the host, except
for the optional progress callback.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import models
from modjax import config as cfg_lib
from modjax import policies
from modjax.schedule import StepKind, flow_sigmas


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Static sampling settings (sizes are in the model's input space)."""
  frames: int
  height: int
  width: int
  num_inference_steps: int = 50
  guidance_scale: float = 5.0
  shift: float = 5.0
  attention: cfg_lib.AttentionConfig = cfg_lib.DenseConfig()
  progress: bool = False
  record_step_times: bool = False  # host timestamp after each step (benchmarks)
  record_recall: bool = False      # mask recall per step and layer (costs a dense pass)

  def __post_init__(self):
    for name in ("frames", "height", "width", "num_inference_steps"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
    if self.guidance_scale < 1.0:
      raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {self.guidance_scale}")

  @property
  def uses_guidance(self) -> bool:
    return self.guidance_scale != 1.0


@struct.dataclass
class SampleOutput:
  latents: jax.Array      # float32 [B, C, F, H, W]
  density: jax.Array      # float32 [steps, L]: fraction of blocks computed, per step and layer
  step_kinds: jax.Array   # int32 [steps]: StepKind of each step
  state: Any = None       # final attention-policy state (MODState for MOD-DiT)
  # float32 [steps, L] with record_recall: share of the dense attention mass of
  # that step inside the mask used (1 on dense steps); else None.
  mask_recall: Optional[jax.Array] = None


def geometry(model_config, settings: SamplerSettings, rows: int) -> policies.Geometry:
  """The attention problem of this model at these sizes."""
  block = getattr(settings.attention, "block_size", 128)
  return policies.Geometry(
      num_layers=model_config.num_layers, batch=rows, heads=model_config.num_heads,
      seq_len=model_config.tokens(settings.frames, settings.height, settings.width),
      tokens_per_frame=model_config.tokens_per_frame(settings.height, settings.width),
      block_size=block)


_PROGRESS = {}
_STEP_TIMES: list = []


def _record_step_time(step, _value):
  import time
  if int(step) == 0:
    _STEP_TIMES.clear()
  _STEP_TIMES.append(time.perf_counter())


def last_step_times() -> list:
  """Host perf_counter() after each step of the last run with record_step_times."""
  return list(_STEP_TIMES)


def _progress_update(step, total):
  from tqdm.auto import tqdm
  step, total = int(step), int(total)
  if step == 0 or "bar" not in _PROGRESS:
    _PROGRESS["bar"] = tqdm(total=total, desc="denoising", unit="step")
  _PROGRESS["bar"].update(1)
  if step == total - 1:
    _PROGRESS.pop("bar").close()


def _step_inputs(settings: SamplerSettings, policy):
  steps = settings.num_inference_steps
  sigmas = flow_sigmas(steps, settings.shift)
  kinds = policy.step_kinds(steps)
  used = sorted(set(int(k) for k in kinds))
  branch = np.searchsorted(np.asarray(used), kinds).astype(np.int32)
  xs = dict(sigma=sigmas[:-1], sigma_next=sigmas[1:], branch=branch,
            step=np.arange(steps, dtype=np.int32))
  return xs, [StepKind(k) for k in used], kinds


def make_step(model_config, settings: SamplerSettings, policy, used_kinds, params, context):
  """The body shared by the scan and the Python-loop modes:
  (carry, xs) -> (carry, (density [L], mask recall [L]))."""
  guidance = settings.uses_guidance
  steps = settings.num_inference_steps

  def branch_fn(kind: StepKind):
    def run(operand):
      x_in, t, state = operand
      control = policy.control(state, kind)
      if settings.record_recall:
        control = control.replace(record_recall=True)
      velocity, stats = models.apply(model_config, params, x_in, t, context, control)
      density = policy.density(state, kind)
      recall = (jnp.mean(stats["mask_recall"], axis=(1, 2)) if "mask_recall" in stats
                else jnp.ones((model_config.num_layers,), jnp.float32))
      return velocity.astype(jnp.float32), policy.update(state, stats, kind), (density, recall)
    return run

  branches = [branch_fn(k) for k in used_kinds]

  def step(carry, xs):
    latents, state = carry
    x_in = jnp.concatenate([latents, latents], axis=0) if guidance else latents
    t = jnp.full((x_in.shape[0],), xs["sigma"] * 1000.0, jnp.float32)
    operand = (x_in.astype(model_config.dtype), t, state)
    if len(branches) == 1:
      velocity, state, per_step = branches[0](operand)
    else:
      velocity, state, per_step = jax.lax.switch(xs["branch"], branches, operand)
    if guidance:
      v_cond, v_uncond = jnp.split(velocity, 2, axis=0)
      velocity = v_uncond + settings.guidance_scale * (v_cond - v_uncond)
    latents = latents + (xs["sigma_next"] - xs["sigma"]) * velocity
    if settings.progress:
      jax.debug.callback(_progress_update, xs["step"], steps, ordered=True)
    if settings.record_step_times:
      # depends on the new latents, so it fires when this step's work is done
      jax.debug.callback(_record_step_time, xs["step"], latents.ravel()[0], ordered=True)
    return (latents, state), per_step

  return step


def sample_fn(model_config, settings: SamplerSettings, *, loop: str = "scan") -> Callable:
  """A pure function (params, context, neg_context, key) -> SampleOutput.

  context, neg_context: [B, L, text_dim] (neg_context is ignored without
  guidance). Not jitted: `Sampler` jits it; tests wrap it to count traces.
  loop="python" runs the same step body in a Python loop, for debugging.
  """
  if loop not in ("scan", "python"):
    raise ValueError(f"loop must be 'scan' or 'python', got {loop!r}")
  patch = model_config.patch_size
  for name, size, p in (("frames", settings.frames, patch[0]), ("height", settings.height, patch[1]),
                        ("width", settings.width, patch[2])):
    if size % p:
      raise ValueError(f"{name}={size} must be divisible by the model's patch size {p}")

  def run(params, context, neg_context, key):
    batch = context.shape[0]
    rows = 2 * batch if settings.uses_guidance else batch
    policy = policies.make_policy(settings.attention, geometry(model_config, settings, rows))
    ctx = jnp.concatenate([context, neg_context], axis=0) if settings.uses_guidance else context
    shape = (batch, model_config.in_channels, settings.frames, settings.height, settings.width)
    latents = jax.random.normal(key, shape, jnp.float32)
    xs, used, kinds = _step_inputs(settings, policy)
    step = make_step(model_config, settings, policy, used, params, ctx)
    carry = (latents, policy.init())
    if loop == "scan":
      carry, (density, recall) = jax.lax.scan(step, carry, jax.tree.map(jnp.asarray, xs))
    else:
      jstep = jax.jit(step)
      per_step = []
      for i in range(settings.num_inference_steps):
        carry, d = jstep(carry, jax.tree.map(lambda a: jnp.asarray(a[i]), xs))
        per_step.append(d)
      density, recall = (jnp.stack(x) for x in zip(*per_step))
    latents, state = carry
    return SampleOutput(latents=latents, density=density, step_kinds=jnp.asarray(kinds),
                        state=state, mask_recall=recall if settings.record_recall else None)

  return run


class Sampler:
  """A compiled sampler for one model config and static settings.

  >>> sampler = Sampler(model_config, SamplerSettings(frames=16, height=32, width=32))
  >>> out = sampler(params, context, neg_context, jax.random.key(0))
  """

  def __init__(self, model_config, settings: SamplerSettings):
    self.model_config, self.settings = model_config, settings
    self._fn = jax.jit(sample_fn(model_config, settings))

  def __call__(self, params, context, neg_context, key) -> SampleOutput:
    return self._fn(params, context, neg_context, key)

  def lower(self, params, context, neg_context, key):
    return self._fn.lower(params, context, neg_context, key)


def sparsity(out: SampleOutput) -> float:
  """ALGORITHM.md: 1 - mean mask density over the sparse steps (0 if none)."""
  kinds = np.asarray(out.step_kinds)
  sparse = kinds == StepKind.SPARSE
  if not sparse.any():
    return 0.0
  return float(1.0 - np.asarray(out.density)[sparse].mean())

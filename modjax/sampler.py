"""The jit-compiled flow-matching sampler: one `lax.scan` over denoising steps.

The scan carries the latent, the scheduler's history and the attention
policy's state (empty for dense, `MODState` for MOD-DiT). Per-step inputs
(timesteps, scheduler coefficients, step kind) are numpy arrays computed before
tracing, so the whole schedule -- warm-up, map steps, sparse steps, refreshes --
compiles once and never syncs with the host, except for the optional
callbacks (`modjax.callbacks`).

The model is reached only through its family (`models.family.Family`): apply,
latent channels, compute dtype, and the attention layout at the latent sizes.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from modjax import config as cfg_lib
from modjax import policies, schedulers
from modjax import sharding as sharding_lib
from modjax.schedule import StepKind


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Static sampling settings (sizes in latent units, as the family's model takes them).

  scheduler: a `modjax.schedulers` stepper (e.g. `FlowUniPC`, diffusers' Wan
    default) for num_inference_steps steps; None means `FlowEuler` with `shift`.
  """
  frames: int
  height: int
  width: int
  num_inference_steps: int = 50
  guidance_scale: float = 5.0
  shift: float = 5.0
  attention: cfg_lib.AttentionConfig = cfg_lib.DenseConfig()
  scheduler: Optional[Any] = None
  record_recall: bool = False      # mask recall per step and layer (costs a dense pass)

  def __post_init__(self):
    for name in ("frames", "height", "width", "num_inference_steps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not self.guidance_scale >= 1.0:
      raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {self.guidance_scale}")
    if not self.shift > 0:
      raise ValueError(f"shift must be > 0, got {self.shift!r}")
    if self.scheduler is not None and self.scheduler.num_inference_steps != self.num_inference_steps:
      raise ValueError(
          f"scheduler is built for {self.scheduler.num_inference_steps} steps but "
          f"num_inference_steps={self.num_inference_steps}")

  def make_scheduler(self):
    if self.scheduler is not None:
      return self.scheduler
    return schedulers.FlowEuler(self.num_inference_steps, self.shift)

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
  # int32 [L, B, H] under head balancing (modjax.sharding): slot -> head, the
  # layout of `state`'s head axis (modjax.sharding.to_natural_order re-lays it).
  head_order: Optional[jax.Array] = None


def geometry(family, settings: SamplerSettings, rows: int) -> policies.Geometry:
  """The attention problem of this family at these sizes, for the policy."""
  layout = family.attention_layout(settings.frames, settings.height, settings.width)
  block = getattr(settings.attention, "block_size", 128)
  return policies.Geometry.from_layout(layout, batch=rows, block_size=block)


def _step_inputs(settings: SamplerSettings, policy, scheduler):
  steps = settings.num_inference_steps
  kinds = policy.step_kinds(steps)
  used = sorted(set(int(k) for k in kinds))
  branch = np.searchsorted(np.asarray(used), kinds).astype(np.int32)
  xs = dict(sched=scheduler.step_inputs(), branch=branch, step=np.arange(steps, dtype=np.int32))
  return xs, [StepKind(k) for k in used], kinds


def _host_callbacks(callbacks: Sequence[Callable[[int, int], None]]):
  def call(step, num_steps, _done):
    for fn in callbacks:
      fn(int(step), int(num_steps))
  return call


def make_step(family, settings: SamplerSettings, policy, scheduler, used_kinds, params, context,
              callbacks: Sequence[Callable] = (), par: Optional[sharding_lib.Parallel] = None):
  """The body shared by the scan and the Python-loop modes:
  (carry, xs) -> (carry, (density [L], mask recall [L])); carry = (latents, policy
  state, scheduler state). par: the mesh layout (None: no sharding constraints)."""
  guidance = settings.uses_guidance
  replicate = (lambda x: x) if par is None else (lambda x: par.constrain(x, sharding_lib.REPLICATED))
  by_rows = (lambda x: x) if par is None else (lambda x: par.constrain(x, sharding_lib.ROWS))
  # jax orders host callbacks only on one device
  ordered = par is None or par.size == 1
  steps = settings.num_inference_steps
  num_layers = policy.geom.num_layers
  notify = _host_callbacks(tuple(callbacks)) if callbacks else None

  def branch_fn(kind: StepKind):
    def run(operand):
      x_in, t, state = operand
      control = policy.control(state, kind)
      if settings.record_recall:
        control = control.replace(record_recall=True)
      velocity, stats = family.apply(params, x_in, t, context, control)
      density = policy.density(state, kind)
      recall = (jnp.mean(stats["mask_recall"], axis=(1, 2)) if "mask_recall" in stats
                else jnp.ones((num_layers,), jnp.float32))
      return velocity.astype(jnp.float32), policy.update(state, stats, kind), (density, recall)
    return run

  branches = [branch_fn(k) for k in used_kinds]

  def step(carry, xs):
    latents, state, sched_state = carry
    x_in = by_rows(jnp.concatenate([latents, latents], axis=0) if guidance else latents)
    t = jnp.full((x_in.shape[0],), xs["sched"]["timestep"], jnp.float32)
    operand = (x_in.astype(family.dtype), t, state)
    if len(branches) == 1:
      velocity, state, per_step = branches[0](operand)
    else:
      velocity, state, per_step = jax.lax.switch(xs["branch"], branches, operand)
    if guidance:
      v_cond, v_uncond = jnp.split(velocity, 2, axis=0)
      velocity = v_uncond + settings.guidance_scale * (v_cond - v_uncond)
    latents, sched_state = replicate(scheduler.step(sched_state, latents, velocity, xs["sched"]))
    if notify is not None:
      # depends on the new latents, so it fires when this step's work is done
      jax.debug.callback(notify, xs["step"], steps, latents.ravel()[0], ordered=ordered)
    return (latents, state, sched_state), per_step

  return step


def sample_fn(family, settings: SamplerSettings, *, loop: str = "scan",
              callbacks: Sequence[Callable[[int, int], None]] = (),
              mesh=None) -> Callable:
  """A pure function (params, context, neg_context, key, noise=None) -> SampleOutput.

  family: a `models.family.Family` (e.g. `models.wan.WanFamily(config)`).
  context, neg_context: [B, L, text_dim], or pytrees of arrays with the batch leading
  (neg_context is ignored without guidance). noise: optional initial latents float32 [B, C, F, H, W] (else a
  unit Gaussian drawn from key). callbacks: host functions fn(step, num_steps) called after each
  step (progress bars, step timers). Not jitted: `Sampler` jits it; tests wrap
  it to count traces. loop="python" runs the same step body in a Python loop,
  for debugging. mesh: a `jax.sharding.Mesh` from `modjax.sharding.make_mesh`
  (axes "cfg", "seq"), a `modjax.sharding.Parallel`, or None for the mesh of
  size 1 (the first device); see modjax.sharding for the layout.
  """
  if loop not in ("scan", "python"):
    raise ValueError(f"loop must be 'scan' or 'python', got {loop!r}")
  family.check_latent_size(settings.frames, settings.height, settings.width)
  check_schedule(family, settings)
  par = sharding_lib.resolve(mesh)
  layout = family.attention_layout(settings.frames, settings.height, settings.width)
  par.check(heads=layout.num_heads, what=f"{family.name} ({layout.num_heads} heads)")

  scheduler = settings.make_scheduler()

  def run(params, context, neg_context, key, noise=None):
    # A context is an array [B, L, D] or a pytree of them (e.g. HunyuanVideo's text
    # states, pooled projection and guidance): batch rows lead every leaf.
    batch = jax.tree.leaves(context)[0].shape[0]
    rows = 2 * batch if settings.uses_guidance else batch
    policy = policies.make_policy(settings.attention, geometry(family, settings, rows))
    policy = sharding_lib.MeshPolicy(policy, par, policy.step_kinds(settings.num_inference_steps))
    ctx = (jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), context, neg_context)
           if settings.uses_guidance else context)
    ctx = par.constrain(ctx, sharding_lib.ROWS)
    params = par.params_constraint(params)
    shape = (batch, family.latent_channels, settings.frames, settings.height, settings.width)
    if noise is None:
      latents = jax.random.normal(key, shape, jnp.float32)
    elif tuple(noise.shape) != shape:
      raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    else:
      latents = noise.astype(jnp.float32)
    latents = par.constrain(latents, sharding_lib.REPLICATED)
    xs, used, kinds = _step_inputs(settings, policy, scheduler)
    step = make_step(family, settings, policy, scheduler, used, params, ctx, callbacks, par)
    # Stochastic schedulers (CogVideoX's DPM) draw their step noise from the run's key.
    sched_state = (scheduler.init(latents, jax.random.fold_in(key, 1))
                   if getattr(scheduler, "stochastic", False) else scheduler.init(latents))
    carry = (latents, policy.init(), sched_state)
    if loop == "scan":
      carry, (density, recall) = jax.lax.scan(step, carry, jax.tree.map(jnp.asarray, xs))
    else:
      jstep = jax.jit(step)
      per_step = []
      for i in range(settings.num_inference_steps):
        carry, d = jstep(carry, jax.tree.map(lambda a: jnp.asarray(a[i]), xs))
        per_step.append(d)
      density, recall = (jnp.stack(x) for x in zip(*per_step))
    latents, state, _ = carry
    state, head_order = policy.output(state)
    return SampleOutput(latents=latents, density=density, step_kinds=jnp.asarray(kinds),
                        state=state, mask_recall=recall if settings.record_recall else None,
                        head_order=head_order)

  return run


class Sampler:
  """A jit-compiled sampler for one family and static settings; it compiles at
  the first call (or at `lower(...).compile()`).

  >>> sampler = Sampler(WanFamily(config), SamplerSettings(frames=16, height=32, width=32))
  >>> out = sampler(params, context, neg_context, jax.random.key(0))

  mesh: see `sample_fn` (None: the first device). Calls place their arguments on
  the mesh (`place`); a compiled `lower(...).compile()` takes placed arguments.
  """

  def __init__(self, family, settings: SamplerSettings, *,
               callbacks: Sequence[Callable[[int, int], None]] = (), mesh=None):
    self.family, self.settings = family, settings
    self.parallel = sharding_lib.resolve(mesh)
    self._fn = jax.jit(sample_fn(family, settings, callbacks=callbacks, mesh=self.parallel))

  def place(self, params, context, neg_context, key, noise=None) -> tuple:
    """The arguments on the mesh: params replicated (or FSDP), the rest replicated."""
    par = self.parallel
    rep = par.sharding(sharding_lib.REPLICATED)
    rest = jax.device_put((context, neg_context, key) + (() if noise is None else (noise,)), rep)
    return (par.place_params(params),) + tuple(rest)

  def __call__(self, params, context, neg_context, key, noise=None) -> SampleOutput:
    return self._fn(*self.place(params, context, neg_context, key, noise))

  def lower(self, params, context, neg_context, key, noise=None):
    """Lowered for these arguments, placed on the mesh; `.compile()` gives a function of
    the same arguments (noise included only when given here), placed by `place`."""
    return self._fn.lower(*self.place(params, context, neg_context, key, noise))


def _runs_sparse(kinds, attention) -> bool:
  if isinstance(attention, cfg_lib.DenseConfig):
    return True
  sparse = kinds == StepKind.SPARSE
  if getattr(attention, "refresh", "dense") == "sparse":
    sparse |= kinds == StepKind.REFRESH
  return bool(sparse.any())


def check_schedule(family, settings: SamplerSettings) -> None:
  """A sparse attention config must compute something sparsely: ValueError when its
  schedule never reaches a sparse step; a warning when its mask keeps every block."""
  attention = settings.attention
  if isinstance(attention, cfg_lib.DenseConfig):
    return
  policy = policies.make_policy(attention, geometry(family, settings, 1))
  steps = settings.num_inference_steps
  kinds = policy.step_kinds(steps)
  if not _runs_sparse(kinds, attention):
    what = type(attention).__name__
    fixes = ["more steps", "a shorter warm-up"]
    extra = ""
    if isinstance(attention, cfg_lib.MODConfig):
      extra = f", interval={attention.interval}, refresh={attention.refresh!r}"
      if attention.warmup_steps < steps:
        fixes.append("a longer interval")
        if attention.refresh == "dense":
          fixes.append("refresh='sparse'")
    raise ValueError(
        f"{what}(warmup_steps={attention.warmup_steps}{extra}) with num_inference_steps="
        f"{steps} never runs a sparse step (every step is dense, a map step or a dense "
        f"refresh); use {', '.join(fixes[:-1])} or {fixes[-1]}")
  if isinstance(policy, policies.MODPolicy):
    from modjax import predict
    n = policy.geom.num_blocks
    if policy.top_k >= predict.num_candidate_lines(n):
      warnings.warn(
          f"MODConfig(top_k={attention.top_k!r}) keeps all {predict.num_candidate_lines(n)} "
          f"candidate lines of an n={n} block map: every block is computed (sparsity 0%)",
          stacklevel=3)


def sparsity(out: SampleOutput) -> float:
  """docs/algorithm.md: 1 - mean mask density over the sparse steps (0 if none)."""
  kinds = np.asarray(out.step_kinds)
  sparse = kinds == StepKind.SPARSE
  if not sparse.any():
    return 0.0
  return float(1.0 - np.asarray(out.density)[sparse].mean())


def post_warmup_sparsity(out: SampleOutput) -> float:
  """1 - mean density over every step after the warm-up (dense refreshes count as
  dense): the share of attention work saved after the warm-up (0 if none)."""
  kinds = np.asarray(out.step_kinds)
  after = (kinds == StepKind.SPARSE) | (kinds == StepKind.REFRESH)
  if not after.any():
    return 0.0
  return float(1.0 - np.asarray(out.density)[after].mean())

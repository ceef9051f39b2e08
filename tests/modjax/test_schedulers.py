"""modjax.schedulers against diffusers (the oracle; modjax itself never imports it).

diffusers runs its own `scheduler.step` in a torch loop; ours runs inside one jitted
`lax.scan`. Both are fed the same fake model: a fixed random channel mix of the
latents plus a function of the model's timestep input, so that the outputs differ
per step, depend on the state and on the exact timestep the scheduler hands out.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import modjax
from modjax import schedulers as S
from modjax.schedule import flow_sigmas

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers (and 14B) scheduler/scheduler_config.json.
WAN21_SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

SHAPE = (2, 4, 2, 3, 4)  # [B, C, F, H, W]
_rng = np.random.default_rng(0)
_W = (_rng.normal(size=(SHAPE[1], SHAPE[1])) / np.sqrt(SHAPE[1])).astype(np.float32)
_PHASE = _rng.normal(size=(SHAPE[1],)).astype(np.float32)
_X0 = _rng.normal(size=SHAPE).astype(np.float32)


def _model_torch(x, t):
  w, phase = torch.from_numpy(_W).to(x.dtype), torch.from_numpy(_PHASE).to(x.dtype)
  return torch.einsum("ij,bj...->bi...", w, x) + torch.cos(t * 0.003 + phase)[None, :, None, None, None]


def _model_jax(x, t, extra):
  del extra
  return jnp.einsum("ij,bj...->bi...", _W, x) + jnp.cos(t * 0.003 + _PHASE)[None, :, None, None, None]


def _forced_model(x, t, extra):
  del x, t
  return extra["v"]


def _unipc_kwargs(sched: S.FlowUniPC) -> dict:
  return dict(flow_shift=sched.flow_shift, solver_order=sched.solver_order,
              solver_type=sched.solver_type, lower_order_final=sched.lower_order_final,
              disable_corrector=list(sched.disable_corrector),
              final_sigmas_type=sched.final_sigmas_type)


def _diffusers_unipc(n, **kwargs):
  sched = diffusers.UniPCMultistepScheduler.from_config(WAN21_SCHEDULER_CONFIG, **kwargs)
  sched.set_timesteps(n)
  sched.set_begin_index(0)  # as WanPipeline does (long schedules repeat timesteps)
  return sched


def _diffusers_run(sched, dtype=torch.float32, forced=None):
  """diffusers' own loop: latents after every step and the model outputs it was fed."""
  x = torch.from_numpy(_X0).to(dtype)
  if dtype == torch.float64:
    sched.sigmas = sched.sigmas.to(torch.float64)  # the same algorithm, float64 throughout
  path, outputs = [], []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for i, t in enumerate(sched.timesteps):
      v = _model_torch(x, t.to(dtype)) if forced is None else torch.from_numpy(forced[i])
      outputs.append(v.numpy())
      x = sched.step(v, t, x).prev_sample
      path.append(x.numpy())
  return np.stack(path), np.stack(outputs)


@functools.lru_cache(maxsize=None)
def _compiled(kind, solver_order, forced):
  """One jitted scan per step structure; each schedule's step inputs are arguments.

  FlowUniPC's traced step depends on the scheduler only through solver_order
  (test_step_structure_depends_only_on_solver_order), FlowEuler's on nothing.
  """
  proto = (S.FlowUniPC(1, flow_shift=1.0, solver_order=solver_order) if kind == "unipc"
           else S.FlowEuler(1, shift=1.0))
  model = _forced_model if forced else _model_jax
  return jax.jit(lambda x0, xs, extra: S.scan_schedule(proto, model, x0, xs=xs, extra_xs=extra))


def _run_ours(sched, forced=None):
  kind = "unipc" if isinstance(sched, S.FlowUniPC) else "euler"
  fn = _compiled(kind, getattr(sched, "solver_order", 0), forced is not None)
  _, path = fn(jnp.asarray(_X0), sched.step_inputs(), {} if forced is None else dict(v=forced))
  return np.asarray(path)


# --- schedule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [3.0, 5.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50, 1000])
def test_sigmas_and_timesteps_match_diffusers(steps, shift):
  ref = _diffusers_unipc(steps, flow_shift=shift)
  ours = S.FlowUniPC(steps, flow_shift=shift)
  assert ref.timesteps.dtype == torch.int64
  np.testing.assert_array_equal(ours.timesteps(), ref.timesteps.numpy().astype(np.float32))
  assert ours.timesteps().dtype == np.float32 and ours.timesteps().shape == (steps,)
  np.testing.assert_allclose(ours.sigmas(), ref.sigmas.numpy(), rtol=0, atol=1e-7)
  xs = ours.step_inputs()
  np.testing.assert_array_equal(xs["timestep"], ours.timesteps())
  np.testing.assert_array_equal(xs["sigma"], ours.sigmas()[:-1])
  for name, value in xs.items():
    assert value.shape[0] == steps, name


def test_unipc_timesteps_are_truncated_not_rounded():
  """diffusers feeds the transformer int64(N sigma), truncated toward zero."""
  s = S.FlowUniPC(3, flow_shift=3.0)
  np.testing.assert_array_equal(s.timesteps(), [999, 857, 600])
  assert s.sigmas()[2] * 1000 > 600.7
  t = S.FlowUniPC(1000, flow_shift=3.0).timesteps()
  assert len(np.unique(t)) == 731 and (t[:3] == 999).all()  # repeated at the start


def test_sigma_min_final_sigma_repeats_the_last_sigma():
  s = S.FlowUniPC(10, flow_shift=3.0, final_sigmas_type="sigma_min").sigmas()
  assert s[-1] == s[-2] > 0
  assert S.FlowUniPC(10, flow_shift=3.0).sigmas()[-1] == 0


# --- full runs against diffusers -------------------------------------------------------------

def _case(steps, order, solver_type="bh2", lof=True, final="zero", shift=3.0, disable=()):
  return pytest.param(
      S.FlowUniPC(steps, flow_shift=shift, solver_order=order, solver_type=solver_type,
                  lower_order_final=lof, final_sigmas_type=final, disable_corrector=disable),
      id=f"{steps=}_{order=}_{solver_type}_lof={lof}_{final}_{shift=}" + (f"_off={disable}" if disable else ""))


PARITY = (
    [_case(n, p) for n in (1, 2, 5, 20, 50) for p in (1, 2, 3)]
    + [_case(n, p, "bh1", final="sigma_min") for n in (2, 5, 20) for p in (1, 2, 3)]
    + [_case(n, 2, st, lof=False, final="sigma_min") for n in (2, 5, 20) for st in ("bh1", "bh2")]
    + [_case(5, 1, lof=False), _case(20, 3, lof=False, final="sigma_min")]
    + [_case(50, 2, shift=5.0), _case(20, 3, "bh1", final="sigma_min", shift=5.0)]
    + [_case(10, 2, disable=(0, 3, 7)), _case(10, 3, disable=(1, 2))]
)


@pytest.mark.parametrize("sched", PARITY)
def test_scan_matches_diffusers_every_step(sched):
  n = sched.num_inference_steps
  ref, _ = _diffusers_run(_diffusers_unipc(n, **_unipc_kwargs(sched)))
  ours = _run_ours(sched)
  chex.assert_shape(ours, (n,) + SHAPE)
  if sched.solver_order == 3 and not sched.lower_order_final:
    # diffusers solves its order-3 system with 0/0 on the zero-length last step
    # (final sigma = last sigma) and returns NaN; that step is the identity
    # (test_zero_length_last_step_is_the_identity_of_the_corrected_sample)
    assert np.isnan(ref[-1]).all()
    ref, ours = ref[:-1], ours[:-1]
  err = np.abs(ours - ref).max()
  assert np.isfinite(ours).all()
  # observed <= 2.4e-6 with |x| up to ~7: float32 rounding
  assert err < 1e-5, f"max abs error {err:.3g} vs diffusers (|x| ~ {np.abs(ref).max():.2f})"


def test_zero_length_last_step_is_the_identity_of_the_corrected_sample():
  sched = S.FlowUniPC(20, flow_shift=3.0, solver_order=3, lower_order_final=False,
                      final_sigmas_type="sigma_min")
  ref_sched = _diffusers_unipc(20, **_unipc_kwargs(sched))
  _diffusers_run(ref_sched)
  last = ref_sched.last_sample.numpy()  # diffusers' corrected sample at the last step
  np.testing.assert_allclose(_run_ours(sched)[-1], last, rtol=0, atol=2e-5)


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_bh1_into_sigma_zero_is_the_x0_prediction_where_diffusers_returns_nan(steps):
  sched = S.FlowUniPC(steps, flow_shift=3.0, solver_type="bh1")
  ref_sched = _diffusers_unipc(steps, **_unipc_kwargs(sched))
  ref, _ = _diffusers_run(ref_sched)
  assert np.isnan(ref[-1]).all()  # -inf * 0 in diffusers' last UniP-1 step
  ours = _run_ours(sched)
  np.testing.assert_allclose(ours[:-1], ref[:-1], rtol=0, atol=2e-5)
  x0 = ref_sched.model_outputs[-1].numpy()  # diffusers' x0 prediction of the last step
  np.testing.assert_allclose(ours[-1], x0, rtol=0, atol=2e-5)


def test_lower_order_final_off_into_zero_diverges_in_diffusers_and_is_refused():
  ref, _ = _diffusers_run(_diffusers_unipc(5, lower_order_final=False))
  assert np.isinf(ref[-1]).all() and np.isfinite(ref[:-1]).all()
  with pytest.raises(ValueError, match="lower_order_final=False"):
    S.FlowUniPC(5, flow_shift=3.0, lower_order_final=False)
  S.FlowUniPC(1, flow_shift=3.0, lower_order_final=False)  # order 1 at the only step: fine
  S.FlowUniPC(5, flow_shift=3.0, solver_order=1, lower_order_final=False)


@pytest.mark.parametrize("steps,order", [(50, 2), (20, 3), (1000, 2)])
def test_same_model_outputs_give_the_same_steps(steps, order):
  """Teacher forcing: our scan fed diffusers' recorded model outputs, step by step."""
  sched = S.FlowUniPC(steps, flow_shift=3.0, solver_order=order)
  ref, outputs = _diffusers_run(_diffusers_unipc(steps, **_unipc_kwargs(sched)))
  ours = _run_ours(sched, forced=outputs)
  err = np.abs(ours - ref).max()
  assert err < (5e-5 if steps > 100 else 1e-5), f"max abs error {err:.3g}"


@pytest.mark.parametrize("order", [2, 3])
def test_1000_steps_match_diffusers_float64_better_than_its_float32(order):
  """Against a float64 run of diffusers' own algorithm (sigmas, samples and model in
  float64): at 1000 steps diffusers' float32 loop drifts by ~2e-5, mostly because
  it adds its O(h^2) history terms to the sample one by one, below half an ulp;
  ours sums the O(h) increment first (~5e-6)."""
  sched = S.FlowUniPC(1000, flow_shift=3.0, solver_order=order)
  kw = _unipc_kwargs(sched)
  ref32, _ = _diffusers_run(_diffusers_unipc(1000, **kw))
  ref64, _ = _diffusers_run(_diffusers_unipc(1000, **kw), dtype=torch.float64)
  ours = _run_ours(sched)
  err32, err_ours = np.abs(ref32 - ref64).max(), np.abs(ours - ref64).max()
  assert np.abs(ours - ref32).max() < 1e-4
  assert err_ours < 1e-5 and err_ours < err32, (err_ours, err32)


def test_order_schedule_matches_diffusers_this_order():
  for order, lof, disable in ((3, True, ()), (3, False, (2,)), (2, True, (0, 5))):
    sched = S.FlowUniPC(8, flow_shift=3.0, solver_order=order, lower_order_final=lof,
                        final_sigmas_type="zero" if lof else "sigma_min", disable_corrector=disable)
    ref_sched = _diffusers_unipc(8, **_unipc_kwargs(sched))
    seen, x = [], torch.from_numpy(_X0)
    for t in ref_sched.timesteps:
      x = ref_sched.step(_model_torch(x, t.float()), t, x).prev_sample
      seen.append(ref_sched.this_order)
    p, c = sched.orders()
    assert list(p) == seen
    assert list(c) == [0] + [0 if i - 1 in disable else seen[i - 1] for i in range(1, 8)]


def test_unipc_order_1_without_corrector_is_euler():
  """UniP-1 in x0 form is DDIM, which for flow matching is exactly the Euler step:
  x + p_x x + p_m0 (x - sigma v) == x + (sigma_next - sigma) v."""
  n = 30
  sched = S.FlowUniPC(n, flow_shift=5.0, solver_order=1, disable_corrector=tuple(range(n)))
  xs, s = sched.step_inputs(), sched.sigmas().astype(np.float64)
  assert not xs["corrector"].any()
  np.testing.assert_allclose(xs["p_x"] + xs["p_m0"], 0.0, atol=1e-7)
  np.testing.assert_allclose(xs["p_m0"] * s[:-1], s[:-1] - s[1:], atol=1e-7)


# --- compilation ---------------------------------------------------------------------------------

def test_whole_schedule_compiles_once_without_control_flow():
  sched = S.FlowUniPC(20, flow_shift=3.0, solver_order=3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(latents):
    return S.scan_schedule(sched, _model_jax, latents)

  a, _ = run(jnp.asarray(_X0))
  b, _ = run(jnp.asarray(_X0) + 1.0)
  assert not np.allclose(a, b)
  c = S.FlowUniPC(20, flow_shift=3.0, solver_order=3)
  assert c == sched and hash(c) == hash(sched)  # an equal scheduler is the same static value

  carry = sched.init(jnp.asarray(_X0))
  chex.assert_shape(carry.history, (3,) + SHAPE)
  xs = jax.tree.map(lambda a: jnp.asarray(a[0]), sched.step_inputs())
  jaxpr = jax.make_jaxpr(sched.step)(carry, jnp.asarray(_X0), jnp.asarray(_X0), xs)
  prims = {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert not prims & {"cond", "while", "scan", "switch"}, prims
  new, new_carry = jax.eval_shape(sched.step, carry, jnp.asarray(_X0), jnp.asarray(_X0), xs)
  assert jax.tree.structure(new_carry) == jax.tree.structure(carry)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_carry, carry)
  assert new.dtype == jnp.float32


def test_step_structure_depends_only_on_solver_order():
  x = jnp.asarray(_X0)

  def jaxpr(sched):
    xs = jax.tree.map(lambda a: jnp.asarray(a[0]), sched.step_inputs())
    return str(jax.make_jaxpr(sched.step)(sched.init(x), x, x, xs))

  for order in (1, 2, 3):
    a = jaxpr(S.FlowUniPC(10, flow_shift=3.0, solver_order=order))
    b = jaxpr(S.FlowUniPC(10, flow_shift=5.0, solver_order=order, solver_type="bh1",
                          lower_order_final=False, final_sigmas_type="sigma_min",
                          disable_corrector=(1, 2), num_train_timesteps=500))
    assert a == b
  assert jaxpr(S.FlowUniPC(10, flow_shift=3.0, solver_order=2)) != a


def test_bf16_model_output_and_jit_static_scheduler():
  sched = S.FlowUniPC(4, flow_shift=3.0)
  step = jax.jit(lambda s, c, x, v, xs: s.step(c, x, v, xs), static_argnums=0)
  x = jnp.asarray(_X0)
  xs = jax.tree.map(lambda a: jnp.asarray(a[0]), sched.step_inputs())
  out, carry = step(sched, sched.init(x), x, x.astype(jnp.bfloat16), xs)
  assert out.dtype == jnp.float32 and carry.history.dtype == jnp.float32


# --- Euler ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _FakeFamily:
  """A `models.family.Family` whose "model" is a fixed function of (x, t): the sampler's
  wiring of schedulers, without a transformer."""
  name: str = "fake"
  latent_channels: int = 4
  dtype: Any = jnp.float32

  def check_latent_size(self, frames, height, width):
    pass

  def attention_layout(self, frames, height, width):
    from models.family import AttentionLayout
    n = frames * height * width
    return AttentionLayout(num_layers=1, num_heads=1, head_dim=8, seq_len=n, video_start=0,
                           video_tokens=n, tokens_per_frame=height * width)

  def apply(self, params, x, t, context, control=None):
    return _fake_velocity(x, t), {}


def _fake_velocity(x, t):
  t = jnp.reshape(t, (-1,) + (1,) * (x.ndim - 1))
  return 0.3 * x * (t * 0.002 - 1.0) + t * 0.004


@pytest.mark.parametrize("sched", [S.FlowEuler(6, shift=3.0), S.FlowUniPC(6, flow_shift=3.0)],
                         ids=["euler", "unipc"])
def test_sampler_runs_the_scheduler_it_is_given(sched):
  """modjax.Sampler with a scheduler equals scan_schedule on the same model: the sampler
  feeds the scheduler's own timesteps and its carry, step by step."""
  settings = modjax.SamplerSettings(frames=2, height=4, width=4, num_inference_steps=6,
                                    guidance_scale=1.0, scheduler=sched)
  key = jax.random.key(3)
  ctx = jnp.zeros((1, 8, 16))
  out = jax.jit(modjax.sample_fn(_FakeFamily(), settings))({}, ctx, ctx, key)
  latents = jax.random.normal(key, (1, 4, 2, 4, 4), jnp.float32)
  ours, _ = jax.jit(lambda x: S.scan_schedule(sched, lambda x, t, e: _fake_velocity(x, t), x))(
      latents)
  # not bit-equal: XLA:CPU contracts multiply-adds differently per fusion (a few ulps)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(out.latents), rtol=0, atol=2e-6)


def test_flow_euler_is_the_explicit_euler_step_on_flow_sigmas():
  sched = S.FlowEuler(6, shift=3.0)
  np.testing.assert_array_equal(sched.sigmas(), flow_sigmas(6, 3.0))
  x = np.random.default_rng(0).standard_normal((1, 4, 2, 4, 4)).astype(np.float32)
  ref = x.copy()
  sig = flow_sigmas(6, 3.0).astype(np.float64)
  for i in range(6):
    ref = ref + (sig[i + 1] - sig[i]) * np.asarray(_fake_velocity(ref, np.float32(1000 * sig[i])))
  ours, _ = jax.jit(lambda x: S.scan_schedule(sched, lambda x, t, e: _fake_velocity(x, t), x))(x)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-5)


def _diffusers_euler_run(sched, n):
  sched.set_begin_index(0)
  x, path = torch.from_numpy(_X0), []
  for t in sched.timesteps:
    x = sched.step(_model_torch(x, t), t, x).prev_sample
    path.append(x.numpy())
  return np.stack(path)


@pytest.mark.parametrize("steps,shift", [(1, 3.0), (7, 3.0), (50, 5.0)])
def test_flow_euler_diffusers_schedule_matches_flow_match_euler(steps, shift):
  ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
  ref.set_timesteps(steps)
  ours = S.FlowEuler(steps, shift=shift, sigma_schedule="diffusers")
  np.testing.assert_array_equal(ours.sigmas(), ref.sigmas.numpy())
  np.testing.assert_array_equal(ours.timesteps(), ref.timesteps.numpy())
  path = _run_ours(ours)
  np.testing.assert_allclose(path, _diffusers_euler_run(ref, steps), rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps,shift", [(1, 3.0), (7, 3.0), (50, 5.0)])
def test_flow_euler_is_flow_match_euler_on_our_sigmas(steps, shift):
  """Our default schedule is not diffusers' (it ends its linspace at 0, diffusers at
  shift(1/N) and shifts that end twice); diffusers fed our sigmas (shift=1, so it
  does not shift them again) takes the same steps."""
  ours = S.FlowEuler(steps, shift=shift)
  ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
  ref.set_timesteps(sigmas=list(ours.sigmas()[:-1]))
  np.testing.assert_array_equal(ours.sigmas(), ref.sigmas.numpy())
  np.testing.assert_array_equal(ours.timesteps(), ref.timesteps.numpy())
  np.testing.assert_allclose(_run_ours(ours), _diffusers_euler_run(ref, steps), rtol=0, atol=1e-5)
  if steps > 1:
    default = S.FlowEuler(steps, shift=shift, sigma_schedule="diffusers").sigmas()
    assert np.abs(default - ours.sigmas()).max() > 1e-3


def test_flow_euler_timestep_is_1000_sigma_in_float32():
  s = S.FlowEuler(10, shift=5.0)
  sig = flow_sigmas(10, 5.0)
  np.testing.assert_array_equal(s.timesteps(), np.asarray(jnp.asarray(sig[:-1]) * 1000.0))
  assert s.init(jnp.zeros(SHAPE)) == ()


# --- configs and validation ----------------------------------------------------------------------

def test_wan21_config_builds_the_wan_unipc():
  sched = S.from_diffusers_config(WAN21_SCHEDULER_CONFIG, 50)
  assert sched == S.FlowUniPC(50, flow_shift=3.0, solver_order=2, solver_type="bh2",
                              lower_order_final=True, final_sigmas_type="zero")
  assert S.from_diffusers_config(WAN21_SCHEDULER_CONFIG, 50, flow_shift=5.0).flow_shift == 5.0
  # every key diffusers itself writes (later versions add use_dynamic_shifting, sigma_min, ...)
  written = json.loads(
      diffusers.UniPCMultistepScheduler.from_config(WAN21_SCHEDULER_CONFIG).to_json_string())
  assert set(written) > set(WAN21_SCHEDULER_CONFIG) - {"_diffusers_version"}
  assert S.from_diffusers_config(written, 50) == sched
  listed = dict(WAN21_SCHEDULER_CONFIG, disable_corrector=[0, 2], solver_type="midpoint")
  sched = S.from_diffusers_config(listed, 10, solver_order=3)
  assert sched.disable_corrector == (0, 2) and sched.solver_type == "bh2" and sched.solver_order == 3
  hash(sched)


def test_flow_match_euler_config_builds_flow_euler():
  written = json.loads(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).to_json_string())
  assert written["_class_name"] == "FlowMatchEulerDiscreteScheduler"
  sched = S.from_diffusers_config(written, 30)
  assert sched == S.FlowEuler(30, shift=3.0, sigma_schedule="diffusers")
  assert S.from_diffusers_config(written, 30, flow_shift=5.0).shift == 5.0
  assert S.from_diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler"}, 4).shift == 1.0


@pytest.mark.parametrize("change,match", [
    (dict(foo=1), "unknown config key 'foo'"),
    (dict(solver_type="bh3"), "solver_type must be one of"),
    (dict(_class_name="DDIMScheduler"), "_class_name must be one of"),
    (dict(_class_name=None), "_class_name must be one of"),
    (dict(prediction_type="epsilon"), "prediction_type='epsilon' is not supported"),
    (dict(use_flow_sigmas=False), "use_flow_sigmas=False is not supported"),
    (dict(solver_order=4), "solver_order must be one of"),
    (dict(thresholding=True), "thresholding=True"),
    (dict(use_karras_sigmas=True), "use_karras_sigmas=True"),
    (dict(use_dynamic_shifting=True), "use_dynamic_shifting=True"),
    (dict(solver_p="DPMSolverMultistepScheduler"), "solver_p="),
    (dict(final_sigmas_type="last"), "final_sigmas_type must be one of"),
    (dict(timestep_spacing="uniform"), "timestep_spacing='uniform'"),
    (dict(predict_x0=False), "predict_x0 must be True"),
    (dict(lower_order_final=False), "lower_order_final=False"),
    (dict(flow_shift=0.0), "flow_shift must be"),
    (dict(disable_corrector="0"), "disable_corrector must be"),
])
def test_unsupported_unipc_configs_raise(change, match):
  with pytest.raises(ValueError, match=match):
    S.from_diffusers_config({**WAN21_SCHEDULER_CONFIG, **change}, 10)


@pytest.mark.parametrize("change,match", [
    (dict(stochastic_sampling=True), "stochastic_sampling=True"),
    (dict(invert_sigmas=True), "invert_sigmas=True"),
    (dict(shift_terminal=0.1), "shift_terminal=0.1"),
    (dict(flow_shift=1.0), "unknown config key 'flow_shift'"),
    (dict(shift=-1.0), "shift must be"),
])
def test_unsupported_euler_configs_raise(change, match):
  config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, **change}
  with pytest.raises(ValueError, match=match):
    S.from_diffusers_config(config, 10)


def test_constructors_validate_their_arguments():
  for bad in (0, -1, 1.5, True, None):
    with pytest.raises(ValueError, match="num_inference_steps"):
      S.FlowUniPC(bad, flow_shift=3.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
      S.FlowEuler(bad, shift=3.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
      S.from_diffusers_config(WAN21_SCHEDULER_CONFIG, bad)
  for bad in (0.0, -2.0, float("nan"), float("inf"), "3"):
    with pytest.raises(ValueError, match="flow_shift"):
      S.FlowUniPC(10, flow_shift=bad)
    with pytest.raises(ValueError, match="shift"):
      S.FlowEuler(10, shift=bad)
  with pytest.raises(ValueError, match="solver_order"):
    S.FlowUniPC(10, flow_shift=3.0, solver_order=2.0)
  with pytest.raises(ValueError, match="sigma_schedule"):
    S.FlowEuler(10, shift=3.0, sigma_schedule="karras")
  with pytest.raises(ValueError, match="num_train_timesteps"):
    S.FlowUniPC(10, flow_shift=3.0, num_train_timesteps=1)
  assert S.FlowUniPC(np.int64(10), flow_shift=3, solver_order=np.int32(3)).num_inference_steps == 10

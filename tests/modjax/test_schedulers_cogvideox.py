"""CogVideoXDDIM / CogVideoXDPM against diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler.

diffusers runs its own `scheduler.step` in a torch loop; ours runs inside one jitted
`lax.scan`, compiled once for every schedule of a step count. Both are fed the same
fake model (a fixed multiple of the latents plus a per-step random field plus a term in
the model's timestep input), so the outputs depend on the state and on the exact
timestep handed out. The DPM's noise is ours (normal(fold_in(key, i))): diffusers'
`randn_tensor` is patched to return it, both draws of a step.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax import schedulers as S

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# THUDM/CogVideoX-2b and -5b scheduler/scheduler_config.json.
COGVIDEOX_SCHEDULER_CONFIG = {
    "_class_name": "CogVideoXDDIMScheduler",
    "_diffusers_version": "0.31.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 3.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}
SHAPE = (2, 4, 3, 4, 6)  # [B, C, F, H, W]
CLASSES = {"ddim": ("CogVideoXDDIMScheduler", S.CogVideoXDDIM),
           "dpm": ("CogVideoXDPMScheduler", S.CogVideoXDPM)}
# Same step count, different schedules: one compile per class serves them all.
VARIANTS = {
    "cogvideox_config": {},
    "leading_epsilon_offset": dict(timestep_spacing="leading", prediction_type="epsilon",
                                   rescale_betas_zero_snr=False, steps_offset=1),
    "linspace_sample_linear_betas": dict(timestep_spacing="linspace", prediction_type="sample",
                                         beta_schedule="linear", set_alpha_to_one=False),
    "trailing_cosine_no_shift": dict(beta_schedule="squaredcos_cap_v2", snr_shift_scale=1.0,
                                     rescale_betas_zero_snr=False,
                                     prediction_type="v_prediction"),
}
KEY = 3


def _diffusers(class_name, config, n):
  cls = getattr(diffusers, class_name)
  sched = cls.from_config(config)
  sched.set_timesteps(n)
  return sched


def _fake_inputs(n):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  field = rng.standard_normal((n,) + SHAPE).astype(np.float32)
  return x, field


def _noise(n):
  key = jax.random.key(KEY)
  return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32))
                   for i in range(n)])


def _diffusers_path(sched, class_name, x, field, noise):
  """diffusers' loop as CogVideoXPipeline runs it: latents after every step."""
  ts = sched.timesteps
  lat, old, step = torch.from_numpy(x), None, [0]
  fake_randn = lambda *args, **kwargs: torch.from_numpy(noise[step[0]])
  path = []
  with mock.patch("diffusers.schedulers.scheduling_dpm_cogvideox.randn_tensor", fake_randn):
    for i, t in enumerate(ts):
      step[0] = i
      out = 0.3 * lat + torch.from_numpy(field[i]) + 1e-3 * t.float()
      if class_name == "CogVideoXDPMScheduler":
        lat, old = sched.step(out, old, t, ts[i - 1] if i > 0 else None, lat, return_dict=False)
      else:
        lat = sched.step(out, t, lat, return_dict=False)[0]
      path.append(lat.numpy())
  return np.stack(path)


def _scan_fn(scheduler):
  """A jitted scan over the schedule: (xs, x, field) -> latents after every step. One
  trace for every schedule of this class and step count (xs are arguments)."""
  chex.clear_trace_counter()  # the counter is per function code, shared by every `run`

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(xs, x, field):
    key = jax.random.key(KEY)
    init = scheduler.init(x, key) if isinstance(scheduler, S.CogVideoXDPM) else scheduler.init(x)

    def body(carry, inputs):
      lat, sc = carry
      out = 0.3 * lat + inputs["field"] + 1e-3 * inputs["sched"]["timestep"]
      lat, sc = scheduler.step(sc, lat, out, inputs["sched"])
      return (lat, sc), lat

    return jax.lax.scan(body, (x, init), dict(sched=xs, field=field))[1]
  return run


@pytest.mark.parametrize("kind", list(CLASSES))
def test_parity_with_diffusers_in_one_compiled_scan(kind, record_property):
  class_name, cls = CLASSES[kind]
  n = 12
  x, field = _fake_inputs(n)
  noise = _noise(n)
  run = None
  for variant, change in VARIANTS.items():
    config = {**COGVIDEOX_SCHEDULER_CONFIG, **change}
    ours = S.from_diffusers_config(config, n, class_name=class_name)
    assert type(ours) is cls
    reference = _diffusers(class_name, config, n)
    np.testing.assert_array_equal(ours.int_timesteps(), reference.timesteps.numpy())
    np.testing.assert_allclose(ours.alphas_cumprod(), reference.alphas_cumprod.numpy(),
                               **(dict(rtol=1e-6, atol=2e-7) if ours.alphas_cumprod().dtype == np.float32
                                  else dict(rtol=1e-13)))
    run = run or _scan_fn(ours)  # reads only the class from the scheduler it closes over
    path = np.asarray(run(jax.tree.map(jnp.asarray, ours.step_inputs()), x, field))
    expected = _diffusers_path(reference, class_name, x, field, noise)
    err = float(np.abs(path - expected).max())
    record_property(f"{variant}_max_abs_error", err)
    print(f"\n{kind} {variant}: max |ours - diffusers| over {n} steps = {err:.3g} "
          f"(scale {np.abs(expected).max():.3g})")
    np.testing.assert_allclose(path, expected, atol=5e-6 * max(1.0, np.abs(expected).max()),
                               rtol=1e-5, err_msg=variant)


@pytest.mark.parametrize("kind", list(CLASSES))
@pytest.mark.parametrize("n", [50, 30, 1])
def test_parity_at_the_pipeline_step_counts(kind, n):
  class_name, _ = CLASSES[kind]
  ours = S.from_diffusers_config(COGVIDEOX_SCHEDULER_CONFIG, n, class_name=class_name)
  x, field = _fake_inputs(n)
  path = np.asarray(_scan_fn(ours)(jax.tree.map(jnp.asarray, ours.step_inputs()), x, field))
  expected = _diffusers_path(_diffusers(class_name, COGVIDEOX_SCHEDULER_CONFIG, n), class_name,
                             x, field, _noise(n))
  np.testing.assert_allclose(path, expected, atol=5e-6 * np.abs(expected).max(), rtol=1e-5)


def test_the_dpm_lands_on_x0_without_noise_and_starts_first_order():
  xs = S.CogVideoXDPM(50).step_inputs()
  assert xs["m_noise"][-1] == 0 and xs["m_sample"][-1] == 0 and xs["m_denoised"][-1] == -1
  assert not xs["second_order"][0] and not xs["second_order"][-1] and xs["second_order"][1:-1].all()
  assert (xs["d_new"][0], xs["d_old"][0]) == (1, 0)
  assert (xs["m_noise"][:-1] > 0).all()  # the SDE noise is on at every other step
  np.testing.assert_array_equal(xs["index"], np.arange(50))
  np.testing.assert_array_equal(xs["timestep"][[0, 1, -1]], [999, 979, 19])


def test_dpm_noise_follows_the_key():
  sched = S.CogVideoXDPM(4)
  x = jnp.asarray(_fake_inputs(1)[0])
  xs = jax.tree.map(lambda a: jnp.asarray(a[1]), sched.step_inputs())
  run = lambda key: sched.step(sched.init(x, key), x, x, xs)[0]
  a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  chex.assert_trees_all_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 0.1
  chex.assert_trees_all_equal(sched.step(sched.init(x), x, x, xs)[0], run(jax.random.key(0)))
  assert S.CogVideoXDPM.stochastic and not getattr(S.CogVideoXDDIM(4), "stochastic", False)
  assert "stochastic" not in {f.name for f in dataclasses.fields(S.CogVideoXDPM)}


def test_schedulers_are_static_and_model_sees_integer_timesteps():
  for cls in (S.CogVideoXDDIM, S.CogVideoXDPM):
    sched = cls(50)
    assert hash(sched) == hash(cls(50)) and sched == cls(50)
    ts = sched.timesteps()
    assert ts.dtype == np.float32 and (ts == np.round(ts)).all()
    assert S.from_diffusers_config(COGVIDEOX_SCHEDULER_CONFIG, 50,
                                   class_name=f"{cls.__name__}Scheduler") == sched


def test_defaults_are_the_cogvideox_config_and_missing_keys_take_diffusers_defaults():
  assert S.from_diffusers_config(COGVIDEOX_SCHEDULER_CONFIG, 50) == S.CogVideoXDDIM(50)
  bare = S.from_diffusers_config({"_class_name": "CogVideoXDPMScheduler"}, 50)
  assert (bare.prediction_type, bare.timestep_spacing, bare.rescale_betas_zero_snr) == (
      "epsilon", "leading", False)
  reference = _diffusers("CogVideoXDPMScheduler", {}, 50)
  np.testing.assert_array_equal(bare.int_timesteps(), reference.timesteps.numpy())


def test_trained_betas_from_a_config():
  betas = list(np.linspace(1e-4, 2e-2, 1000))
  config = {**COGVIDEOX_SCHEDULER_CONFIG, "trained_betas": betas}
  ours = S.from_diffusers_config(config, 20)
  reference = _diffusers("CogVideoXDDIMScheduler", config, 20)
  np.testing.assert_allclose(ours.alphas_cumprod(), reference.alphas_cumprod.numpy(), rtol=1e-6,
                             atol=2e-7)


@pytest.mark.parametrize("n", [61, 103])
def test_step_counts_where_diffusers_trailing_schedule_breaks_are_refused(n):
  reference = _diffusers("CogVideoXDDIMScheduler", COGVIDEOX_SCHEDULER_CONFIG, n)
  assert len(reference.timesteps) == n + 1 and int(reference.timesteps[-1]) == -1
  with pytest.raises(ValueError, match=f"{n + 1} of them"):
    S.CogVideoXDDIM(n)


@pytest.mark.parametrize("change,match", [
    (dict(thresholding=True), "unknown config key 'thresholding'"),
    (dict(prediction_type="flow_prediction"), "prediction_type must be one of"),
    (dict(timestep_spacing="karras"), "timestep_spacing must be one of"),
    (dict(beta_schedule="sigmoid"), "beta_schedule must be one of"),
    (dict(steps_offset=100, timestep_spacing="leading"), "not 10 in \\[0, 999\\]"),
    (dict(prediction_type="epsilon"), "not finite"),  # eps at zero terminal SNR: x0 = x / 0
    (dict(num_train_timesteps=8), "cannot exceed num_train_timesteps=8"),
    (dict(trained_betas=[0.5] * 10), "trained_betas must be None or num_train_timesteps"),
], ids=["unknown_key", "prediction", "spacing", "betas", "offset_past_end", "eps_zero_snr",
        "too_many_steps", "trained_betas_length"])
def test_config_errors_name_the_key(change, match):
  with pytest.raises(ValueError, match=match):
    S.from_diffusers_config({**COGVIDEOX_SCHEDULER_CONFIG, **change}, 10,
                            class_name="CogVideoXDPMScheduler")


def test_unknown_class_lists_every_class():
  with pytest.raises(ValueError, match="CogVideoXDPMScheduler"):
    S.from_diffusers_config({"_class_name": "DDIMScheduler"}, 10)
  with pytest.raises(ValueError, match="_class_name must be one of"):
    S.from_diffusers_config(COGVIDEOX_SCHEDULER_CONFIG, 10, class_name="UniPCMultistepScheduler")


def test_ignored_keys_do_not_change_the_schedule():
  config = {**COGVIDEOX_SCHEDULER_CONFIG, "clip_sample": True, "clip_sample_range": 0.5,
            "sample_max_value": 2.0}
  assert S.from_diffusers_config(config, 50) == S.CogVideoXDDIM(50)


def test_scan_schedule_runs_the_dpm():
  sched = S.CogVideoXDPM(5)
  x = jnp.asarray(_fake_inputs(1)[0])
  final, path = S.scan_schedule(sched, lambda lat, t, extra: 0.3 * lat, x)
  chex.assert_shape(path, (5,) + SHAPE)
  chex.assert_tree_all_finite(final)
  assert dataclasses.is_dataclass(sched)

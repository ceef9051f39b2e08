"""HunyuanVideo's scheduler: diffusers' FlowMatchEulerDiscreteScheduler driven by the
pipeline's own sigmas (`HunyuanVideoPipeline` calls `retrieve_timesteps(scheduler,
steps, sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])`), against diffusers."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from modjax import schedulers as S

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# hunyuanvideo-community/HunyuanVideo scheduler/scheduler_config.json (shift 7.0: the
# original repository's --flow-shift default for text-to-video).
HUNYUAN_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.32.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 7.0,
    "shift_terminal": None,
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
STEPS = [1, 2, 7, 50]


def _pipeline_schedule(steps, config=HUNYUAN_SCHEDULER_CONFIG):
  """The scheduler as HunyuanVideoPipeline.__call__ leaves it after step 4."""
  from diffusers import FlowMatchEulerDiscreteScheduler
  from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import retrieve_timesteps

  scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
  sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
  timesteps, n = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas)
  assert n == steps
  return scheduler, timesteps


@pytest.mark.parametrize("steps", STEPS, ids=lambda n: f"{n=}")
def test_sigmas_and_timesteps_equal_the_pipeline(steps):
  ref, timesteps = _pipeline_schedule(steps)
  ours = S.hunyuan_video_scheduler(HUNYUAN_SCHEDULER_CONFIG, steps)
  assert ours == S.FlowEulerLinspace(steps, shift=7.0)
  np.testing.assert_array_equal(ours.sigmas(), ref.sigmas.numpy())
  np.testing.assert_array_equal(ours.timesteps(), timesteps.numpy())
  # Within 2 ulp of FlowEuler's float64 "modjax" schedule (the same formula).
  np.testing.assert_array_max_ulp(ours.sigmas(), S.FlowEuler(steps, 7.0).sigmas(), maxulp=2)


def test_from_diffusers_config_alone_is_set_timesteps_not_the_pipeline():
  """from_diffusers_config reproduces set_timesteps(steps), which HunyuanVideo's
  pipeline does not call: its schedule ends elsewhere."""
  from diffusers import FlowMatchEulerDiscreteScheduler

  generic = S.from_diffusers_config(HUNYUAN_SCHEDULER_CONFIG, 50)
  ref = FlowMatchEulerDiscreteScheduler.from_config(HUNYUAN_SCHEDULER_CONFIG)
  ref.set_timesteps(50)
  np.testing.assert_array_equal(generic.sigmas(), ref.sigmas.numpy())
  pipeline = S.hunyuan_video_scheduler(HUNYUAN_SCHEDULER_CONFIG, 50)
  assert np.abs(generic.sigmas() - pipeline.sigmas()).max() > 0.05


def test_flow_shift_override_and_defaults():
  assert S.hunyuan_video_scheduler(HUNYUAN_SCHEDULER_CONFIG, 30, flow_shift=17.0).shift == 17.0
  minimal = {"_class_name": "FlowMatchEulerDiscreteScheduler"}
  assert S.hunyuan_video_scheduler(minimal, 30) == S.FlowEulerLinspace(30, shift=1.0)


def test_whole_schedule_equals_diffusers_step_loop():
  steps = 7
  ref, timesteps = _pipeline_schedule(steps)
  rng = np.random.default_rng(0)
  mix = rng.standard_normal((4, 4)).astype(np.float32) * 0.5
  x0 = rng.standard_normal((1, 4, 2, 3, 3)).astype(np.float32)

  def velocity(x, t):  # depends on the state and on the exact timestep input
    return np.einsum("ij,bj...->bi...", mix, x) + np.sin(t / 100.0)

  x = torch.from_numpy(x0)
  for t in timesteps:
    v = torch.from_numpy(velocity(x.numpy(), t.numpy()).astype(np.float32))
    x = ref.step(v, t, x, return_dict=False)[0]

  sched = S.hunyuan_video_scheduler(HUNYUAN_SCHEDULER_CONFIG, steps)
  model = lambda x, t, _: jnp.einsum("ij,bj...->bi...", mix, x) + jnp.sin(t / 100.0)
  ours, _ = S.scan_schedule(sched, model, x0)
  chex.assert_trees_all_close(ours, x.numpy(), atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("config,match", [
    ({"_class_name": "UniPCMultistepScheduler"}, "FlowMatchEulerDiscreteScheduler"),
    ({**HUNYUAN_SCHEDULER_CONFIG, "use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({**HUNYUAN_SCHEDULER_CONFIG, "flux_shift": 1.0}, "flux_shift"),
    ({**HUNYUAN_SCHEDULER_CONFIG, "shift": 0.0}, "shift"),
], ids=["unipc", "dynamic_shifting", "unknown_key", "shift=0"])
def test_unsupported_configs_raise_naming_the_key(config, match):
  with pytest.raises(ValueError, match=match):
    S.hunyuan_video_scheduler(config, 50)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="num_inference_steps"):
    S.FlowEulerLinspace(0, shift=7.0)
  with pytest.raises(ValueError, match="shift"):
    S.FlowEulerLinspace(10, shift=-1.0)

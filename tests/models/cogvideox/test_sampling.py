"""CogVideoX around the transformer: the whole denoising loop (transformer + CFG +
CogVideoXDPM in one scan) against diffusers' loop, modjax's sampler driving the family,
prompt embeddings against CogVideoXPipeline, and the pipeline's size rules."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import cogvideox
from models.cogvideox import CogVideoXConfig, CogVideoXFamily, sampling
from modjax import schedulers as S
from tests.models.cogvideox.helpers import diffusers_forward, seeded_diffusers_model

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHEDULER_CONFIG = {"_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                    "clip_sample": False, "num_train_timesteps": 1000,
                    "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                    "set_alpha_to_one": True, "snr_shift_scale": 3.0, "steps_offset": 0,
                    "timestep_spacing": "trailing"}


STEPS, GUIDANCE, LATENT = 4, 6.0, (1, 4, 3, 6, 10)


RUN_KEY = jax.random.key(1)
# The DPM step-noise key modjax's Sampler derives from its run key.
NOISE_KEY = jax.random.fold_in(RUN_KEY, 1)


@pytest.fixture(scope="module")
def loop_reference(tmp_path_factory):
  """diffusers' CogVideoXPipeline denoising loop (DPM, CFG 6, the [negative; prompt]
  batch) on a seeded tiny transformer, with our DPM noise normal(fold_in(NOISE_KEY, i))."""
  folder = tmp_path_factory.mktemp("cogvideox")
  reference = seeded_diffusers_model(use_rotary_positional_embeddings=True)
  reference.save_pretrained(folder)
  rng = np.random.default_rng(2)
  x = rng.standard_normal(LATENT).astype(np.float32)
  prompt = rng.standard_normal((1, 5, 20)).astype(np.float32)
  negative = rng.standard_normal((1, 5, 20)).astype(np.float32)
  key = NOISE_KEY
  noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), LATENT))
                    for i in range(STEPS)])

  sched = diffusers.CogVideoXDPMScheduler.from_config(SCHEDULER_CONFIG)
  sched.set_timesteps(STEPS)
  ts = sched.timesteps
  lat, old, step = torch.from_numpy(x), None, [0]
  context = np.concatenate([negative, prompt])
  with mock_randn(lambda *args, **kwargs: torch.from_numpy(noise[step[0]])):
    for i, t in enumerate(ts):
      step[0] = i
      both = np.concatenate([lat.numpy()] * 2)
      out = torch.from_numpy(diffusers_forward(reference, both, np.full((2,), float(t), np.float32),
                                               context))
      uncond, text = out.chunk(2)
      lat, old = sched.step(uncond + GUIDANCE * (text - uncond), old, t,
                            ts[i - 1] if i > 0 else None, lat, return_dict=False)
  config, params = cogvideox.load_diffusers_transformer(folder)
  return dict(config=config, params=params, x=x, prompt=prompt, negative=negative,
              expected=lat.numpy())


def _report(name, got, expected, record_property):
  err = float(np.abs(np.asarray(got) - expected).max())
  record_property("max_abs_error", err)
  print(f"\n{name}: max |ours - diffusers| = {err:.3g} (scale {np.abs(expected).max():.3g})")
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)


def test_denoising_loop_matches_diffusers(loop_reference, record_property):
  """family.apply + CFG + CogVideoXDPM.step in one jitted scan vs diffusers' loop."""
  ref = loop_reference
  family = CogVideoXFamily(ref["config"], text_len=5)
  sched = S.from_diffusers_config(SCHEDULER_CONFIG, STEPS, class_name="CogVideoXDPMScheduler")

  @jax.jit
  def ours(params, x, prompt, negative, xs):
    def body(carry, xs):
      lat, sc = carry
      out, _ = family.apply(params, jnp.concatenate([lat, lat]),
                            jnp.full((2,), xs["timestep"]), jnp.concatenate([negative, prompt]))
      uncond, text = jnp.split(out.astype(jnp.float32), 2)
      lat, sc = sched.step(sc, lat, uncond + GUIDANCE * (text - uncond), xs)
      return (lat, sc), None
    return jax.lax.scan(body, (x, sched.init(x, NOISE_KEY)), xs)[0][0]

  got = ours(ref["params"], ref["x"], ref["prompt"], ref["negative"],
             jax.tree.map(jnp.asarray, sched.step_inputs()))
  _report(f"{STEPS}-step DPM + CFG loop", got, ref["expected"], record_property)


def mock_randn(fn):
  from unittest import mock
  return mock.patch("diffusers.schedulers.scheduling_dpm_cogvideox.randn_tensor", fn)


def test_modjax_sampler_matches_diffusers(loop_reference, record_property):
  """modjax's Sampler (dense attention, CFG, the DPM noise key it derives from the run key) driving
  CogVideoXFamily vs diffusers' loop."""
  from modjax import sampler as sampler_lib

  ref = loop_reference
  family = CogVideoXFamily(ref["config"], text_len=5)
  frames, height, width = LATENT[2:]
  sched = S.from_diffusers_config(SCHEDULER_CONFIG, STEPS, class_name="CogVideoXDPMScheduler")
  settings = sampler_lib.SamplerSettings(frames=frames, height=height, width=width,
                                         num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                         scheduler=sched)
  out = sampler_lib.Sampler(family, settings)(ref["params"], jnp.asarray(ref["prompt"]),
                                              jnp.asarray(ref["negative"]), RUN_KEY,
                                              jnp.asarray(ref["x"]))
  _report("modjax Sampler, DPM + CFG", out.latents, ref["expected"], record_property)


def test_encode_prompts_matches_cogvideox_pipeline(tmp_path):
  transformers = pytest.importorskip("transformers")
  from models.text import Tokenizer, convert
  from tests.models.text import oracles

  model = oracles.hf_encoder("t5", seed=4, vocab_size=256, feed_forward_proj="gated-gelu")
  model.save_pretrained(tmp_path / "text_encoder")
  tokenizer_folder = oracles.t5_tokenizer_folder(tmp_path / "tok")
  pipe = diffusers.CogVideoXPipeline(
      tokenizer=transformers.AutoTokenizer.from_pretrained(tokenizer_folder), text_encoder=model,
      vae=None, transformer=None, scheduler=None)
  prompts = ["A red cat on the mat, in slow motion.", "", "  the   dog  runs ",
             " ".join(["a blue video of the cat"] * 10)]
  with torch.no_grad():
    expected = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=20,
                                          device=torch.device("cpu")).float().numpy()
  config, params = convert.load_text_encoder(tmp_path)
  ours = sampling.encode_prompts(config, params, Tokenizer.from_folder(tokenizer_folder), prompts,
                                 max_length=20)
  chex.assert_shape(ours, (4, 20, config.d_model))
  err = float(np.abs(np.asarray(ours) - expected).max())
  print(f"\nencode_prompts vs CogVideoXPipeline: max abs err {err:.2e}")
  chex.assert_trees_all_close(ours, expected, atol=2e-5, rtol=2e-5)
  assert np.all(np.any(np.asarray(ours)[1] != 0, axis=-1))  # padding is not zeroed


def test_latent_sizes_follow_the_pipeline():
  five, one_five = CogVideoXConfig.cogvideox_5b(), CogVideoXConfig.cogvideox1_5_5b()
  assert sampling.latent_frames(49, five) == (13, 0)
  assert sampling.latent_frames(81, one_five) == (22, 1)  # 21 latent frames padded to 22
  assert sampling.latent_frames(85, one_five) == (22, 0)
  assert sampling.latent_size(480, 720, five) == (60, 90)
  with pytest.raises(ValueError, match="height=488 must be a positive multiple of 16"):
    sampling.latent_size(488, 720, five)


def test_dynamic_guidance_scales_are_diffusers_formula():
  ts = S.CogVideoXDPM(50).int_timesteps()
  scales = sampling.dynamic_guidance_scales(ts, 50, 6.0)
  for t, g in zip(ts, scales):  # the pipeline's line, with t a torch scalar
    t = torch.tensor(int(t))
    assert g == 1 + 6.0 * ((1 - math.cos(math.pi * ((50 - t.item()) / 50) ** 5.0)) / 2)
  assert (scales >= 1).all() and (scales <= 7).all()

"""CogVideoXPipeline: tiny seeded CogVideoX folders written by diffusers go prompt ->
latents equal to diffusers' own CogVideoXPipeline(output_type="latent") fed the same
initial noise (and, for the DPM scheduler, the same step noise); bad input fails fast
naming the argument; one compile per static setup; MOD-DiT runs sparse on the joint
[text; video] sequence."""

import re
from unittest import mock

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import torch  # noqa: E402

import modjax  # noqa: E402
from modjax import memory  # noqa: E402
from modjax.cli import main  # noqa: E402
from modjax.pipelines import cogvideox as cogvideox_pipeline  # noqa: E402
from tests.pipelines.tiny_cogvideox import (CHANNELS, tiny_cogvideox_diffusers,
                                            tiny_cogvideox_folder)  # noqa: E402

PROMPT = "a red cat on the mat, slow motion"
NEGATIVE = "blurry video"
# 32 x 48 pixels, 9 frames: 3 latent frames of 4 x 6 (1.5: 4 frames, one of padding).
SMALL = dict(height=32, width=48, num_frames=9, num_inference_steps=4, guidance_scale=6.0)
# Measured max |ours - diffusers| on CPU (float32, diffusers 0.42.1, 4 steps, latents of
# scale ~3): 5b/DDIM 3.6e-6, 1.5/DPM 2.9e-6; the tolerance leaves a margin of ~5x.
ATOL = 2e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("cogvideox")


@pytest.fixture(scope="module")
def pipes(root):
  return {}


def _pipe(pipes, root, variant):
  if variant not in pipes:
    pipes[variant] = modjax.CogVideoXPipeline.from_pretrained(tiny_cogvideox_folder(root, variant))
  return pipes[variant]


@pytest.fixture(scope="module")
def pipe(pipes, root):
  return _pipe(pipes, root, "5b")


def _dpm_noise(seed, shape, steps):
  """The step noise of our DPM run with this seed: normal(fold_in(fold_in(key, 1), i))."""
  key = jax.random.fold_in(jax.random.key(seed), 1)
  return [np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape)) for i in range(steps)]


@pytest.mark.parametrize("variant", ["5b", "1.5"])
def test_latents_match_diffusers_cogvideox_pipeline(root, pipes, variant, record_property):
  """Same folder, same initial noise (and DPM step noise): diffusers' CogVideoXPipeline
  (torch, f32) and ours agree on the final latents. 5b: DDIM, a VAE folder; 1.5: DPM,
  temporal patches, one padding latent frame that both drop before decoding."""
  ours_pipe = _pipe(pipes, root, variant)
  theirs = tiny_cogvideox_diffusers(root, variant)
  frames, padding = (3, 0) if variant == "5b" else (4, 1)
  shape = (1, CHANNELS, frames, 4, 6)
  noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  seed = 7
  steps = SMALL["num_inference_steps"]
  step_noise = [torch.from_numpy(n.transpose(0, 2, 1, 3, 4).copy())
                for n in _dpm_noise(seed, shape, steps)]
  counter = [0]

  def advance(_pipe, i, _t, _kwargs):
    counter[0] = i + 1
    return {}

  with torch.no_grad(), mock.patch(
      "diffusers.schedulers.scheduling_dpm_cogvideox.randn_tensor",
      lambda *args, **kwargs: step_noise[counter[0]]):
    ref = theirs(PROMPT, NEGATIVE, **SMALL, output_type="latent",
                 latents=torch.from_numpy(noise.transpose(0, 2, 1, 3, 4).copy()),
                 callback_on_step_end=advance).frames
  ref = ref.numpy().transpose(0, 2, 1, 3, 4)[:, :, padding:]
  out = ours_pipe(PROMPT, NEGATIVE, **SMALL, latents=noise, seed=seed)
  if variant == "5b":  # its folder has a VAE: frames decoded (compared in the next test)
    assert out.frames.shape == (9, 32, 48, 3) and out.frames.dtype == np.uint8 and out.note is None
  else:
    assert out.frames is None and "no vae/" in out.note
  assert out.padding_frames == padding and out.latents.shape == ref.shape
  assert out.vae_scaling_factor == (0.7 if variant == "5b" else None)
  err = float(np.abs(out.latents - ref).max())
  record_property("max_abs_error", err)
  print(f"\nCogVideoX {variant} ({ours_pipe.scheduler_config['_class_name']}): "
        f"max |ours - diffusers| = {err:.2e} (scale {np.abs(ref).max():.3g})")
  np.testing.assert_allclose(out.latents, ref, atol=ATOL, rtol=0)
  assert np.abs(out.latents - noise[:, :, padding:]).max() > 0.1  # it did denoise
  if variant == "1.5":  # DPM's step noise comes from the seed: another seed, other latents
    other = ours_pipe(PROMPT, NEGATIVE, **SMALL, latents=noise, seed=seed + 1)
    assert np.abs(other.latents - ref).max() > 100 * ATOL


def test_seeded_call_is_deterministic_and_compiles_once(pipe):
  before = len(pipe._samplers)
  small = {**SMALL, "num_inference_steps": 3}
  a = pipe(PROMPT, **small, seed=3)
  b = pipe(PROMPT, **small, seed=3)
  c = pipe(PROMPT, **small, seed=4)
  assert len(pipe._samplers) == before + 1  # the seed is traced: one compile for all three
  np.testing.assert_array_equal(a.latents, b.latents)
  assert not np.array_equal(a.latents, c.latents)
  assert b.timings["compile"] == 0.0 and c.timings["compile"] == 0.0
  assert set(a.timings) == {"text_encode", "compile", "denoise", "vae_decode"}


def test_default_size_is_the_transformers_sample_size(pipe):
  assert pipe.default_size() == (64, 96, 9)  # sample 8 x 12 latents, 9 frames
  out = pipe(PROMPT, num_inference_steps=2, guidance_scale=1.0)
  assert out.latents.shape == (1, CHANNELS, 3, 8, 12)


def test_mod_attention_runs_sparse_through_the_pipeline(pipe):
  """128 x 128 pixels, 17 frames: 5 x 16 x 16 latents -> 320 video tokens after 226 text
  tokens; MOD-DiT predicts masks over the 5 whole video blocks of 64."""
  mod = modjax.MODConfig(block_size=64, warmup_steps=2, interval=2, top_k=2, refresh="sparse",
                         implementation="xla")
  out = pipe(PROMPT, height=128, width=128, num_frames=17, num_inference_steps=6,
             attention=mod, seed=1)
  assert out.latents.shape == (1, CHANNELS, 5, 16, 16)
  assert np.isfinite(out.latents).all()
  assert 0.0 < out.sparsity < 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_frames=8), "num_frames must be 4k+1"),
    (dict(height=40), "height must be a multiple of 16"),
    (dict(width=0), "width must be a positive int"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive int"),
    (dict(num_inference_steps=61), "num_inference_steps=61"),  # diffusers' trailing spacing breaks
    (dict(guidance_scale=0.5), "guidance_scale must be >= 1"),
    (dict(use_dynamic_cfg=True), "use_dynamic_cfg must be False"),
    (dict(max_sequence_length=0), "max_sequence_length must be a positive int"),
    (dict(seed="1"), "seed must be an int"),
    (dict(prompt=3), "prompt must be a str"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt must be None, a str, or a list of 1"),
    (dict(latents=np.zeros((1, CHANNELS, 4, 4, 6), np.float32)),
     "latents must have shape (1, 4, 3, 4, 6)"),
])
def test_bad_call_arguments_raise_clearly(pipe, kwargs, message):
  args = {**dict(prompt=PROMPT, **SMALL), **kwargs}
  with pytest.raises(ValueError, match=re.escape(message)):
    pipe(**args)


def test_memory_estimate_refuses_before_compiling(pipe, monkeypatch):
  monkeypatch.setattr(memory, "device_memory_bytes", lambda device=None: 1 << 20)
  compiled_before = len(pipe._samplers)
  with pytest.raises(memory.InsufficientMemoryError, match=r"needs about .* GiB"):
    pipe(PROMPT, **{**SMALL, "num_inference_steps": 7})
  assert len(pipe._samplers) == compiled_before  # refused before compiling anything
  small = pipe.memory_estimate(height=32, width=48, num_frames=9)
  large = pipe.memory_estimate(height=128, width=128, num_frames=17)
  assert large.total > small.total > memory.tree_bytes(pipe.transformer_params)
  assert set(small.stages) == {"text_encode", "denoise"}


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no CogVideoX pipeline folder"):
    modjax.CogVideoXPipeline.from_pretrained(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="no model_index.json"):
    modjax.CogVideoXPipeline.from_pretrained(tmp_path)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
  with pytest.raises(ValueError, match="_class_name must be 'CogVideoXPipeline'"):
    modjax.CogVideoXPipeline.from_pretrained(bad)


def test_the_note_says_what_is_missing():
  assert "no vae/" in cogvideox_pipeline.NO_VAE
  assert "scaling_factor" in cogvideox_pipeline.NO_VAE


def test_frames_match_diffusers_cogvideox_pipeline(root, pipes, record_property):
  """The 5b folder's VAE: same initial noise, DDIM, diffusers' pipeline decoding with
  its AutoencoderKLCogVideoX and VideoProcessor (output_type="np") against our frames."""
  ours_pipe = _pipe(pipes, root, "5b")
  theirs = tiny_cogvideox_diffusers(root, "5b")
  shape = (2, CHANNELS, 3, 4, 6)
  noise = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  with torch.no_grad():
    ref = theirs([PROMPT, NEGATIVE], **SMALL, output_type="np",
                 latents=torch.from_numpy(noise.transpose(0, 2, 1, 3, 4).copy())).frames
  ref = np.round(np.asarray(ref, np.float32) * 255.0)
  out = ours_pipe([PROMPT, NEGATIVE], **SMALL, latents=noise)
  assert out.frames.shape == ref.shape == (2, 9, 32, 48, 3)
  diff = np.abs(out.frames.astype(np.float32) - ref)
  record_property("max_abs_uint8", float(diff.max()))
  print(f"\nCogVideoX frames: max |ours - diffusers| = {diff.max():.0f} uint8 levels, "
        f"{(diff > 0).mean():.2%} of values differ")
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01   # rounding at the .5 boundary only
  assert out.frames.std() > 5                            # not a flat video
  assert "vae_decode" in out.timings


def _cli_error(args, capsys):
  capsys.readouterr()  # drop what building the tiny folder printed (transformers' progress)
  assert main(["sample", "--no-progress"] + args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:"), err
  return err[0]


def test_cli_prompt_to_video_or_latents(root, tmp_path, capsys, monkeypatch):
  """`python -m modjax sample --checkpoint` dispatches on model_index.json; a CogVideoX
  folder with vae/ writes the video (default sample.gif), or the latents with --out .npy;
  one without vae/ writes the latents (default sample.npy) and says why."""
  monkeypatch.chdir(tmp_path)
  common = ["--prompt", PROMPT, "--height", "32", "--width", "48", "--num-frames", "9",
            "--steps", "3", "--no-progress"]
  with_vae = str(tiny_cogvideox_folder(root, "5b"))
  assert main(["sample", "--checkpoint", with_vae] + common) == 0
  text = capsys.readouterr().out
  for stage in ("text encoding", "compiled", "denoised", "VAE decode", "wrote sample.gif"):
    assert stage in text, stage
  import imageio.v2 as imageio
  assert np.stack(imageio.mimread(tmp_path / "sample.gif")).shape[:3] == (9, 32, 48)
  assert main(["sample", "--checkpoint", with_vae, "--out", "z.npy"] + common) == 0
  assert "wrote latents to z.npy" in capsys.readouterr().out
  assert np.load(tmp_path / "z.npy").shape == (1, CHANNELS, 3, 4, 6)
  # 1.5: 3 latent frames, denoised with one of padding in front
  assert main(["sample", "--checkpoint", str(tiny_cogvideox_folder(root, "1.5"))] + common) == 0
  text = capsys.readouterr().out
  assert "wrote latents to sample.npy" in text and "no vae/" in text
  latents = np.load(tmp_path / "sample.npy")
  assert latents.shape[:3] == (1, CHANNELS, 3) and np.isfinite(latents).all()


@pytest.mark.parametrize("variant, args, message", [
    ("1.5", ["--out", "x.gif"], "--out must end in one of ('.npy',) (the CogVideoX folder has no vae/"),
    ("5b", ["--out", "x.avi"], "--out must end in one of ('.mp4', '.gif', '.npy')"),
    ("5b", ["--flow-shift", "3"], "--flow-shift does not apply to CogVideoX"),
    ("5b", ["--fps", "8", "--out", "x.npy"], "--fps: --out 'x.npy' writes latents"),
    ("5b", ["--prompt-embeds", "x.npz"], "--prompt-embeds applies to HunyuanVideo checkpoints"),
])
def test_cli_bad_arguments_give_one_clear_error_line(root, variant, args, message, capsys):
  folder = str(tiny_cogvideox_folder(root, variant))
  assert message in _cli_error(["--checkpoint", folder, "--prompt", PROMPT] + args, capsys)


def test_cli_refuses_other_pipeline_classes(tmp_path, capsys):
  (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
  line = _cli_error(["--checkpoint", str(tmp_path), "--prompt", PROMPT], capsys)
  assert "holds a 'FluxPipeline'; supported: WanPipeline, CogVideoXPipeline" in line

"""WanPipeline and `python -m modjax sample --checkpoint`: a tiny seeded Wan2.1 folder
written by diffusers goes prompt -> frames -> mp4, equal to diffusers' own WanPipeline
fed the same initial noise; bad input fails fast with one clear line."""

import re

import imageio.v2 as imageio
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import torch  # noqa: E402

import modjax  # noqa: E402
from modjax import memory  # noqa: E402
from modjax.cli import main  # noqa: E402
from modjax.pipelines import wan as wan_pipeline  # noqa: E402
from tests.pipelines.tiny_wan import (Z_DIM, tiny_wan_diffusers, tiny_wan_folder,
                                      tiny_wan_sharded_folder)  # noqa: E402

PROMPT = "a red cat on the mat, slow motion"
SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=3.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("wan")


@pytest.fixture(scope="module")
def folder(root):
  return tiny_wan_folder(root)


@pytest.fixture(scope="module")
def pipe(folder):
  return modjax.WanPipeline.from_pretrained(folder)


def _noise(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_frames_match_diffusers_wan_pipeline(root, folder, pipe):
  """Same folder, same initial noise: diffusers' WanPipeline (torch, f32) and ours agree
  on the final latents and the uint8 frames (UMT5, UniPC, the DiT and the VAE in one)."""
  theirs = tiny_wan_diffusers(root)
  latents = _noise((1, Z_DIM, 2, 4, 6))
  kwargs = dict(prompt=PROMPT, negative_prompt="blurry", **SMALL)
  with torch.no_grad():
    ref_latents = theirs(**kwargs, latents=torch.from_numpy(latents), output_type="latent").frames
    ref_video = theirs(**kwargs, latents=torch.from_numpy(latents), output_type="np").frames[0]
  out = pipe(PROMPT, "blurry", **SMALL, latents=latents)
  np.testing.assert_allclose(out.latents, ref_latents.numpy(), atol=2e-4, rtol=2e-4)
  assert out.frames.dtype == np.uint8 and out.frames.shape == (5, 32, 48, 3)
  expected = np.round(np.asarray(ref_video) * 255.0)
  assert np.abs(out.frames.astype(np.float64) - expected).max() <= 1.0
  assert out.frames.std() > 1.0  # not a constant video


def test_seeded_call_is_deterministic_and_compiles_once(pipe):
  a = pipe(PROMPT, **SMALL, seed=3)
  b = pipe(PROMPT, **SMALL, seed=3)
  c = pipe(PROMPT, **SMALL, seed=4)
  np.testing.assert_array_equal(a.frames, b.frames)
  assert not np.array_equal(a.frames, c.frames)
  assert b.timings["compile"] == 0.0 and set(a.timings) == {
      "text_encode", "compile", "denoise", "vae_decode"}


def test_sharded_folder_loads_to_the_same_pipeline(root, folder, pipe):
  """Wan2.1-14B's layout: transformer, text encoder (and here the VAE) in index-listed
  shards. Same weights, same frames."""
  sharded = tiny_wan_sharded_folder(root)
  indexes = sorted(p.parent.name for p in sharded.glob("*/*.safetensors.index.json"))
  assert indexes == ["text_encoder", "transformer", "vae"], indexes
  other = modjax.WanPipeline.from_pretrained(sharded)
  a = pipe(PROMPT, **SMALL, seed=5)
  b = other(PROMPT, **SMALL, seed=5)
  np.testing.assert_array_equal(a.frames, b.frames)


def test_mod_attention_runs_sparse_through_the_pipeline(pipe):
  """64 x 128 pixels, 17 frames: 5 x 8 x 16 latents -> 160 tokens, 3 blocks of 64."""
  mod = modjax.MODConfig(block_size=64, warmup_steps=2, interval=2, top_k=2, refresh="sparse",
                         implementation="xla")
  out = pipe(PROMPT, height=64, width=128, num_frames=17, num_inference_steps=6,
             attention=mod, seed=1)
  assert out.frames.shape == (17, 64, 128, 3)
  assert 0.0 < out.sparsity < 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_frames=80), "num_frames must be 4k+1"),
    (dict(height=40), "height must be a multiple of 16"),
    (dict(width=0), "width must be a positive int"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive int"),
    (dict(guidance_scale=0.5), "guidance_scale must be >= 1"),
    (dict(flow_shift=0.0), "flow_shift must be > 0"),
    (dict(prompt=3), "prompt must be a str"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt must be None, a str, or a list of 1"),
    (dict(latents=np.zeros((1, Z_DIM, 3, 4, 6), np.float32)), "latents must have shape"),
])
def test_bad_call_arguments_raise_clearly(pipe, kwargs, message):
  args = {**dict(prompt=PROMPT, **SMALL), **kwargs}
  with pytest.raises(ValueError, match=re.escape(message)):
    pipe(**args)


def test_memory_estimate_refuses_before_compiling(pipe, monkeypatch):
  monkeypatch.setattr(memory, "device_memory_bytes", lambda device=None: 1 << 20)
  compiled_before = len(pipe._samplers)
  with pytest.raises(memory.InsufficientMemoryError, match=r"needs about .* GiB .* has 0\.0 GiB"):
    pipe(PROMPT, **{**SMALL, "num_inference_steps": 7})
  assert len(pipe._samplers) == compiled_before  # refused before compiling anything


def test_memory_estimate_grows_with_the_video(pipe):
  small = pipe.memory_estimate(height=480, width=832, num_frames=81)
  large = pipe.memory_estimate(height=720, width=1280, num_frames=81)
  assert large.total > small.total > memory.tree_bytes(pipe.transformer_params)
  # XLA's dense attention on CPU materialises S x S scores: 480p needs far more than
  # a GPU's flash attention would.
  assert small.stages["denoise"] > 2 * 2 * 32760 ** 2 * 4


# reading the mp4 back (imageio-ffmpeg's subprocess) trips JAX's at-fork warning in the
# test itself; the CLI's write is checked to be silent in tests/modjax/test_cli.py
@pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")
def test_cli_prompt_to_mp4(folder, tmp_path, capsys):
  pytest.importorskip("imageio_ffmpeg")
  out = tmp_path / "cat.mp4"
  rc = main(["sample", "--checkpoint", str(folder), "--prompt", PROMPT, "--height", "32",
             "--width", "48", "--num-frames", "5", "--steps", "3", "--no-progress",
             "--out", str(out)])
  assert rc == 0
  text = capsys.readouterr().out
  for stage in ("text encoding", "compiled", "denoised", "VAE decode", "wrote"):
    assert stage in text, stage
  frames = np.stack(imageio.mimread(out))
  assert frames.shape == (5, 32, 48, 3)


def test_folder_errors(tmp_path, folder):
  with pytest.raises(FileNotFoundError, match="no model_index.json"):
    modjax.WanPipeline.from_pretrained(tmp_path)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
  with pytest.raises(ValueError, match="_class_name must be 'WanPipeline'"):
    modjax.WanPipeline.from_pretrained(bad)


def test_recommended_flow_shift():
  assert wan_pipeline.recommended_flow_shift(480, 832) == 3.0
  assert wan_pipeline.recommended_flow_shift(720, 1280) == 5.0

"""HunyuanVideoPipeline: a tiny seeded HunyuanVideo folder written by diffusers goes
precomputed prompt embeddings -> latents equal to diffusers' own
HunyuanVideoPipeline(output_type="latent") fed the same embeddings and initial noise
(padded text, embedded guidance, shift-7 Euler on the pipeline's sigmas); bad input
fails fast naming the argument; one compile per static setup; MOD-DiT runs sparse on
the joint [video; text] sequence."""

import re

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import torch  # noqa: E402

import modjax  # noqa: E402
from modjax import memory  # noqa: E402
from modjax.cli import main  # noqa: E402
from tests.pipelines.tiny_hunyuan import (CHANNELS, POOLED_DIM, TEXT_DIM, prompt_embeddings,
                                          tiny_hunyuan_diffusers, tiny_hunyuan_folder)  # noqa: E402

# 32 x 48 pixels, 9 frames: 3 latent frames of 4 x 6 -> 18 video tokens.
SMALL = dict(height=32, width=48, num_frames=9, num_inference_steps=4, guidance_scale=6.0)
LATENT = (3, 4, 6)
# Measured max |ours - diffusers| on CPU (float32, diffusers 0.42.1, 4 steps, latents of
# scale ~4): one prompt 5.4e-6, two prompts of 7 and 4 real tokens 5.5e-6; the tolerance
# leaves a margin of ~5x.
ATOL = 3e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("hunyuan")


@pytest.fixture(scope="module")
def pipe(root):
  return modjax.HunyuanVideoPipeline.from_pretrained(tiny_hunyuan_folder(root))


def _torch(embeddings):
  return {k: torch.from_numpy(v) for k, v in embeddings.items()}


@pytest.mark.parametrize("lengths", [(7,), (7, 4)], ids=["one_prompt", "two_lengths"])
def test_latents_match_diffusers_hunyuan_pipeline(root, pipe, lengths, record_property):
  """Same folder, embeddings and initial noise: diffusers' HunyuanVideoPipeline (torch,
  f32, the padding masked) and ours (the padding dropped; one sampler call per real
  length) agree on the final latents."""
  theirs = tiny_hunyuan_diffusers(root)
  embeddings = prompt_embeddings(lengths)
  noise = np.random.default_rng(0).standard_normal(
      (len(lengths), CHANNELS, *LATENT)).astype(np.float32)
  with torch.no_grad():
    ref = theirs(**_torch(embeddings), **SMALL, latents=torch.from_numpy(noise),
                 output_type="latent").frames.numpy()
  out = pipe(**embeddings, **SMALL, latents=noise)
  assert out.frames is None and "no HunyuanVideo VAE" in out.note
  assert out.text_lengths == tuple(dict.fromkeys(lengths)) and len(out.sampling) == len(lengths)
  assert out.flow_shift == 7.0 and out.vae_scaling_factor is None
  err = float(np.abs(out.latents - ref).max())
  record_property("max_abs_error", err)
  print(f"\nHunyuanVideo, real lengths {lengths}: max |ours - diffusers| = {err:.2e} "
        f"(scale {np.abs(ref).max():.3g})")
  np.testing.assert_allclose(out.latents, ref, atol=ATOL, rtol=0)
  assert np.abs(out.latents - noise).max() > 0.1  # it did denoise


def test_embedded_guidance_and_flow_shift_change_the_latents(pipe):
  embeddings = prompt_embeddings()
  small = {**SMALL, "num_inference_steps": 2}
  base = pipe(**embeddings, **small, seed=2).latents
  assert np.abs(pipe(**embeddings, **{**small, "guidance_scale": 1.0}, seed=2).latents
                - base).max() > 1e-3
  shifted = pipe(**embeddings, **small, seed=2, flow_shift=3.0)
  assert shifted.flow_shift == 3.0 and np.abs(shifted.latents - base).max() > 1e-3


def test_seeded_call_is_deterministic_and_compiles_once(pipe):
  embeddings = prompt_embeddings((5,))
  small = {**SMALL, "num_inference_steps": 3}
  before = len(pipe._samplers)
  a = pipe(**embeddings, **small, seed=3)
  b = pipe(**embeddings, **small, seed=3)
  c = pipe(**embeddings, **small, seed=4)
  assert len(pipe._samplers) == before + 1  # the seed is traced: one compile for all three
  np.testing.assert_array_equal(a.latents, b.latents)
  assert not np.array_equal(a.latents, c.latents)
  assert b.timings["compile"] == 0.0 and set(a.timings) == {"compile", "denoise"}


def test_torch_and_bool_inputs_are_accepted(pipe):
  embeddings = prompt_embeddings((6,))
  small = {**SMALL, "num_inference_steps": 2}
  a = pipe(**embeddings, **small, seed=1).latents
  given = _torch(embeddings)
  given["prompt_attention_mask"] = given["prompt_attention_mask"].bool()
  np.testing.assert_array_equal(pipe(**given, **small, seed=1).latents, a)


def test_mod_attention_runs_sparse_through_the_pipeline(pipe):
  """128 x 128 pixels, 17 frames: 5 x 16 x 16 latents -> 320 video tokens (5 blocks of
  64) before the 7 real text tokens."""
  mod = modjax.MODConfig(block_size=64, warmup_steps=2, interval=2, top_k=2, refresh="sparse",
                         implementation="xla")
  out = pipe(**prompt_embeddings(), height=128, width=128, num_frames=17,
             num_inference_steps=6, attention=mod, seed=1)
  assert out.latents.shape == (1, CHANNELS, 5, 16, 16)
  assert np.isfinite(out.latents).all()
  assert 0.0 < out.sparsity < 1.0


def _bad_mask():
  e = prompt_embeddings()
  e["prompt_attention_mask"] = e["prompt_attention_mask"][:, ::-1].copy()  # left padded
  return e


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt="a cat"), "prompt: the HunyuanVideo text encoders"),
    (dict(prompt_embeds=None), "prompt_embeds is required"),
    (dict(pooled_prompt_embeds=None), "pooled_prompt_embeds is required"),
    (dict(prompt_attention_mask=None), "prompt_attention_mask is required"),
    (dict(prompt_embeds=np.zeros((1, 10, TEXT_DIM + 1), np.float32)),
     f"prompt_embeds must be [B, L, D] with D={TEXT_DIM}"),
    (dict(pooled_prompt_embeds=np.zeros((2, POOLED_DIM), np.float32)),
     "pooled_prompt_embeds must have 1 rows"),
    (dict(prompt_attention_mask=np.ones((1, 9), np.int64)),
     "prompt_attention_mask must be [B, L] = (1, 10)"),
    (dict(prompt_attention_mask=np.full((1, 10), 2)), "must hold 0 (padding) and 1"),
    (dict(prompt_attention_mask=np.zeros((1, 10), np.int64)), "rows without any real token"),
    (dict(num_frames=8), "num_frames must be 4k+1"),
    (dict(height=40), "height must be a multiple of 16"),
    (dict(width=0), "width must be a positive int"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive int"),
    (dict(guidance_scale=-1.0), "guidance_scale must be > 0"),
    (dict(true_cfg_scale=4.0), "true_cfg_scale must be 1.0"),
    (dict(flow_shift=0.0), "flow_shift must be > 0"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(latents=np.zeros((1, CHANNELS, 4, 4, 6), np.float32)),
     "latents must have shape (1, 4, 3, 4, 6)"),
])
def test_bad_call_arguments_raise_clearly(pipe, kwargs, message):
  args = {**prompt_embeddings(), **SMALL, **kwargs}
  with pytest.raises(ValueError, match=re.escape(message)):
    pipe(**args)


def test_left_padded_mask_is_refused(pipe):
  with pytest.raises(ValueError, match="real tokens first"):
    pipe(**_bad_mask(), **SMALL)


def test_memory_estimate_refuses_before_compiling(pipe, monkeypatch):
  monkeypatch.setattr(memory, "device_memory_bytes", lambda device=None: 1 << 10)
  compiled_before = len(pipe._samplers)
  with pytest.raises(memory.InsufficientMemoryError, match=r"needs about .* GiB"):
    pipe(**prompt_embeddings(), **{**SMALL, "num_inference_steps": 7})
  assert len(pipe._samplers) == compiled_before  # refused before compiling anything
  small = pipe.memory_estimate(height=32, width=48, num_frames=9)
  large = pipe.memory_estimate(height=128, width=128, num_frames=17)
  assert large.total > small.total > memory.tree_bytes(pipe.transformer_params)


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no HunyuanVideo pipeline folder"):
    modjax.HunyuanVideoPipeline.from_pretrained(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="no model_index.json"):
    modjax.HunyuanVideoPipeline.from_pretrained(tmp_path)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
  with pytest.raises(ValueError, match="_class_name must be 'HunyuanVideoPipeline'"):
    modjax.HunyuanVideoPipeline.from_pretrained(bad)


def _cli_error(args, capsys):
  capsys.readouterr()  # drop what building the tiny folder printed (transformers' progress)
  assert main(["sample", "--no-progress"] + args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:"), err
  return err[0]


def test_cli_prompt_embeds_to_npy_latents(root, pipe, tmp_path, capsys):
  """`python -m modjax sample --checkpoint` with --prompt-embeds: the latents of the
  Python call, written to .npy."""
  embeds = tmp_path / "embeds.npz"
  np.savez(embeds, **prompt_embeddings())
  out = tmp_path / "latents.npy"
  rc = main(["sample", "--checkpoint", str(tiny_hunyuan_folder(root)), "--prompt-embeds",
             str(embeds), "--height", "32", "--width", "48", "--num-frames", "9", "--steps", "3",
             "--seed", "5", "--no-progress", "--out", str(out)])
  assert rc == 0
  text = capsys.readouterr().out
  for stage in ("compiled", "denoised", f"wrote latents to {out}", "no HunyuanVideo VAE"):
    assert stage in text, stage
  expected = pipe(**prompt_embeddings(), **{**SMALL, "num_inference_steps": 3}, seed=5).latents
  np.testing.assert_allclose(np.load(out), expected, atol=1e-6, rtol=0)


def test_cli_bad_arguments_give_one_clear_error_line(root, tmp_path, capsys):
  folder = str(tiny_hunyuan_folder(root))
  embeds = tmp_path / "embeds.npz"
  np.savez(embeds, **prompt_embeddings())
  partial = tmp_path / "partial.npz"
  np.savez(partial, prompt_embeds=np.zeros((1, 3, TEXT_DIM), np.float32))
  cases = [
      (["--prompt", "a cat"], "--prompt: HunyuanVideo's text encoders are not ported"),
      ([], "a HunyuanVideo --checkpoint needs --prompt-embeds FILE.npz"),
      (["--prompt-embeds", str(tmp_path / "none.npz")], "--prompt-embeds file does not exist"),
      (["--prompt-embeds", str(embeds), "--devices", "2", "--cfg-parallel"],
       "--cfg-parallel needs classifier-free guidance"),
      (["--prompt-embeds", str(embeds), "--out", "x.mp4"], "--out must end in one of ('.npy',)"),
      (["--prompt-embeds", str(partial), "--out", str(tmp_path / "x.npy")],
       "lacks the arrays ['prompt_attention_mask', 'pooled_prompt_embeds']"),
  ]
  for args, message in cases:
    assert message in _cli_error(["--checkpoint", folder] + args, capsys), args

"""`python -m modjax sample`: writes a playable video; every bad argument gives one clear
line before any model loads; no silent defaults."""

import warnings

import imageio.v2 as imageio
import numpy as np
import pytest

from modjax import cli, video
from modjax.cli import main

TINY_MOD = ["--model", "tiny", "--steps", "6", "--attention", "mod", "--warmup-steps", "2",
            "--interval", "2", "--refresh", "sparse", "--no-progress"]


def test_sample_writes_a_gif_with_the_tiny_model(tmp_path, capsys):
  out = tmp_path / "tiny.gif"
  assert main(["sample"] + TINY_MOD + ["--out", str(out)]) == 0
  frames = np.stack(imageio.mimread(out))
  assert frames.shape[0] == 4 and frames.shape[1:3] == (16, 16)
  assert frames.std() > 0  # not a blank video
  text = capsys.readouterr().out
  assert "compile" in text and "run" in text and str(out) in text
  sparsity = float(text.split("sparsity=")[1].split("%")[0])
  assert sparsity > 0  # MOD ran sparse steps


def _one_error_line(args, capsys, tmp_path):
  if "--out" not in args:
    args = args + ["--out", str(tmp_path / "x.gif")]
  assert main(["sample", "--no-progress"] + args) == 2
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:"), captured.err
  return err[0]


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "--model must be one of"),
    (["--model", "tiny", "--height", "15"], "height=15 must be a positive multiple"),
    (["--model", "tiny", "--out", "/nonexistent-folder/x.gif"], "folder does not exist"),
    (["--model", "tiny", "--out", "x.avi"], "--out must end in one of"),
    (["--model", "demo", "--label", "99"], "label must be an int in"),
    # were silent defaults or late crashes:
    (["--model", "tiny", "--steps", "0"], "--num-inference-steps: must be a positive int, got 0"),
    (["--model", "tiny", "--block-size", "0"], "--block-size: must be a positive int, got 0"),
    (["--model", "tiny", "--block-size", "96", "--attention", "mod"], "block_size must be one of"),
    (["--model", "tiny", "--fps", "0"], "--fps: must be a positive int, got 0"),
    (["--model", "tiny", "--attention", "mod", "--steps", "4", "--warmup-steps", "6"],
     "never runs a sparse step"),
    (["--model", "tiny", "--label", "3"], "takes no label"),
    (["--model", "tiny", "--prompt", "a cat"], "--prompt needs --checkpoint"),
    (["--checkpoint", "/nonexistent"], "--checkpoint needs --prompt"),
    (["--checkpoint", "/nonexistent", "--prompt", "a cat"], "no Wan2.1 pipeline folder"),
    (["--model", "tiny", "--guidance-scale", "0.5"], "--guidance-scale must be >= 1"),
    (["--model", "tiny", "--density", "1.5"], "--density must be in (0, 1]"),
])
def test_bad_arguments_give_one_clear_error_line(args, message, capsys, tmp_path):
  assert message in _one_error_line(args, capsys, tmp_path)


def test_fps_zero_fails_before_sampling(capsys, tmp_path, monkeypatch):
  """--fps 0 raised ZeroDivisionError after the whole sampling run."""
  monkeypatch.setattr(cli, "sample_demo", lambda args: pytest.fail("sampled with --fps 0"))
  _one_error_line(["--model", "tiny", "--fps", "0"], capsys, tmp_path)


def test_mod_keeping_every_line_warns(tmp_path, capsys):
  """A top_k that keeps all 3n-1 lines computes every block: say so."""
  with pytest.warns(UserWarning, match="keeps all 11 candidate lines"):
    assert main(["sample"] + TINY_MOD + ["--top-k", "0.999", "--out", str(tmp_path / "x.gif")]) == 0
  assert "sparsity=0.0%" in capsys.readouterr().out


def test_help_shows_defaults_and_units(capsys):
  assert main(["sample", "--help"]) == 0
  text = " ".join(capsys.readouterr().out.split())
  for fragment in ("pixels (Wan: multiple of 16, default 480", "frames (Wan: 4k+1, default 81",
                   "denoising steps (default 50 Wan, 25 demo)", "(default: dense)",
                   "(default: 0.25)", "(default: sample.gif)", "attention block size in tokens"):
    assert fragment in text, fragment
  assert "(default: None)" not in text


def test_mp4_writes_without_a_fork_warning(tmp_path):
  """imageio-ffmpeg's subprocess tripped JAX's os.fork() RuntimeWarning."""
  pytest.importorskip("imageio_ffmpeg")
  import jax  # noqa: F401  (importing JAX registers the at-fork hook that warned)
  frames = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    path = video.write_video(frames, str(tmp_path / "x.mp4"), fps=4)
  assert path.endswith(".mp4")
  with warnings.catch_warnings():  # reading starts ffmpeg too
    warnings.simplefilter("ignore", RuntimeWarning)
    assert len(imageio.mimread(path)) == 4


@pytest.mark.parametrize("fps", [0, -3, 2.5])
def test_write_video_rejects_bad_fps(tmp_path, fps):
  frames = np.zeros((2, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match="fps must be a positive int"):
    video.write_video(frames, str(tmp_path / "x.gif"), fps=fps)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  """A label-conditioned demo export of the tiny trainer config (random weights)."""
  import jax
  from models.demo import checkpoint, train
  config = train.tiny_config()
  params = train.init_demo_params(config, jax.random.key(0), 2, 8, 8)
  path = tmp_path_factory.mktemp("export") / "demo.safetensors"
  checkpoint.export_demo(path, config, params, frames=2, height=8, width=8)
  return path


def test_demo_without_label_prints_the_label_it_drew(tiny_export, tmp_path, capsys):
  args = ["sample", "--model", str(tiny_export), "--steps", "2", "--no-progress",
          "--out", str(tmp_path / "x.gif")]
  assert main(args + ["--seed", "4"]) == 0
  first = capsys.readouterr().out.splitlines()[0]
  assert first.startswith("label ") and first.endswith("seed 4"), first
  assert main(args + ["--seed", "4"]) == 0  # the same seed draws the same label
  assert capsys.readouterr().out.splitlines()[0] == first


def test_demo_default_label_and_seed_come_from_the_export(tiny_export, tmp_path, capsys):
  from models.demo import checkpoint
  checkpoint.update_metadata(tiny_export, {"default_label": 7, "default_seed": 3})
  try:
    out = str(tmp_path / "x.gif")
    assert main(["sample", "--model", str(tiny_export), "--steps", "2", "--no-progress",
                 "--out", out]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("label 7 (") and first.endswith("seed 3"), first
    # an explicit label keeps seed 0 unless --seed is given
    assert main(["sample", "--model", str(tiny_export), "--label", "2", "--steps", "2",
                 "--no-progress", "--out", out]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("label 2 (") and first.endswith("seed 0"), first
  finally:
    checkpoint.update_metadata(tiny_export, {"default_label": None, "default_seed": None})

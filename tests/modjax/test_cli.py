"""`python -m modjax sample`: writes a playable video; bad arguments give one clear line."""

import imageio.v2 as imageio
import numpy as np
import pytest

from modjax.cli import main


def test_sample_writes_a_gif_with_the_tiny_model(tmp_path, capsys):
  out = tmp_path / "tiny.gif"
  rc = main(["sample", "--model", "tiny", "--steps", "3", "--attention", "mod", "--no-progress",
             "--out", str(out)])
  assert rc == 0
  frames = np.stack(imageio.mimread(out))
  assert frames.shape[0] == 4 and frames.shape[1:3] == (16, 16)
  assert frames.std() > 0  # not a blank video
  text = capsys.readouterr().out
  assert "compile" in text and "run" in text and str(out) in text


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "--model must be one of"),
    (["--model", "tiny", "--height", "15"], "height=15 must be a positive multiple"),
    (["--model", "tiny", "--out", "/nonexistent-folder/x.gif"], "folder does not exist"),
    (["--model", "tiny", "--out", "x.avi"], "--out must end in one of"),
    (["--model", "demo", "--label", "99"], "label must be an int in"),
])
def test_bad_arguments_give_one_clear_error_line(args, message, capsys, tmp_path):
  if "--out" not in args:
    args = args + ["--out", str(tmp_path / "x.gif")]
  assert main(["sample", "--no-progress"] + args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and message in err[0]

"""benchmarks/e2e.py runs every family's denoiser (tiny configs, CPU): dense, MOD-DiT and
a fixed mask, with the joint text-video layouts of CogVideoX and HunyuanVideo."""

import json
import sys

import pytest

from benchmarks import e2e


@pytest.mark.parametrize("model", [pytest.param("wan2_1_1_3b", marks=pytest.mark.slow),
                                   "cogvideox1_5_5b", "hunyuan_video"])
def test_e2e_smoke_on_tiny_models(model, tmp_path, monkeypatch):
  out = tmp_path / "e2e.json"
  monkeypatch.setattr(sys, "argv", [
      "e2e.py", "--tiny", "--model", model, "--shapes", "tiny", "--steps", "10",
      "--modes", "dense_cudnn,mod_refresh_sparse,fixed_lines", "--out", str(out)])
  e2e.main()
  rows = json.loads(out.read_text())["rows"]
  assert [r["mode"] for r in rows] == ["dense_cudnn", "mod_refresh_sparse", "fixed_lines"]
  for r in rows:
    assert "error" not in r and r["finite"], r
  assert rows[1]["sparsity"] > 0.3 and rows[2]["sparsity"] > 0.5
  joint = model != "wan2_1_1_3b"
  assert (rows[0]["video_tokens"] < rows[0]["tokens"]) == joint

"""benchmarks/e2e.py runs every family's denoiser (tiny configs, CPU): dense, MOD-DiT and
a fixed mask, with the joint text-video layouts of CogVideoX and HunyuanVideo."""

import json
import sys

import pytest

from benchmarks import e2e


# CogVideoX's smoke is slow-marked: test_projection_and_precisions runs it in CI
@pytest.mark.parametrize("model", [pytest.param("wan2_1_1_3b", marks=pytest.mark.slow),
                                   pytest.param("cogvideox1_5_5b", marks=pytest.mark.slow),
                                   "hunyuan_video"])
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


def test_projection_and_precisions(tmp_path, monkeypatch):
  """--run-steps K projects the --steps run from per-kind step times; --precisions runs
  our modes quantized beside bf16 (cuDNN dense once, as the baseline)."""
  out = tmp_path / "e2e.json"
  monkeypatch.setattr(sys, "argv", [
      "e2e.py", "--tiny", "--model", "cogvideox1_5_5b", "--shapes", "tiny", "--steps", "50",
      "--run-steps", "5", "--modes", "dense_cudnn,mod_refresh_dense",
      "--precisions", "bf16,int8_fp8/fp8", "--out", str(out)])
  e2e.main()
  rows = json.loads(out.read_text())["rows"]
  assert [(r["mode"], r["precision"], r["dense_precision"]) for r in rows] == [
      ("dense_cudnn", "bf16", "bf16"), ("mod_refresh_dense", "bf16", "bf16"),
      ("mod_refresh_dense", "int8_fp8", "fp8")]
  for r in rows:
    assert "error" not in r and r["finite"] and r["run_steps"] == 5, r
  dense, mod = rows[0], rows[1]
  assert abs(dense["projected_total_s"] - 50 * dense["per_step_ms_by_kind"]["dense"] / 1e3) < 1e-9
  # MOD at 50 steps: warm-up 12 (10 dense + 2 map), refreshes at 21, 31, 41, the rest sparse
  t = mod["per_step_ms_by_kind"]
  want = (10 * t["dense"] + 2 * t["map"] + 3 * t["refresh"] + 35 * t["sparse"]) / 1e3
  assert abs(mod["projected_total_s"] - want) < 1e-9
  with pytest.raises(SystemExit, match="--precisions"):
    monkeypatch.setattr(sys, "argv", ["e2e.py", "--tiny", "--precisions", "int4", "--out", str(out)])
    e2e.main()

"""benchmarks/quality.py: the PSNR/SSIM metrics, and a smoke run of the sweep on the tiny model."""

import importlib.util
import json
import os

import numpy as np
import pytest

from benchmarks import quality
from modjax import pipelines


def _video(seed=0, shape=(2, 3, 4, 32, 32)):
  """Smooth random videos in [0, 1] (low-pass noise, like natural frames)."""
  rng = np.random.default_rng(seed)
  x = rng.random(shape)
  for axis in (-1, -2):
    x = (x + np.roll(x, 1, axis) + np.roll(x, 2, axis)) / 3.0
  return x


# ---------------------------------------------------------------------- metrics

def test_ssim_of_identical_videos_is_one():
  x = _video()
  np.testing.assert_allclose(quality.ssim(x, x), 1.0, atol=1e-12)


def test_ssim_decreases_with_noise_and_is_symmetric():
  x = _video()
  rng = np.random.default_rng(1)
  noise = rng.standard_normal(x.shape)
  values = [quality.ssim(np.clip(x + s * noise, 0, 1), x).mean() for s in (0.01, 0.05, 0.1, 0.3)]
  assert all(a > b for a, b in zip(values, values[1:])), values
  assert values[0] < 1.0 and values[-1] > -1.0
  y = np.clip(x + 0.1 * noise, 0, 1)
  np.testing.assert_allclose(quality.ssim(x, y), quality.ssim(y, x), rtol=1e-12)


def test_ssim_of_constant_frames_is_the_luminance_term():
  # constant frames: no variance, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1)
  a, b = 0.3, 0.6
  x, y = np.full((1, 3, 2, 16, 16), a), np.full((1, 3, 2, 16, 16), b)
  c1 = 0.01 ** 2
  np.testing.assert_allclose(quality.ssim(x, y), (2 * a * b + c1) / (a * a + b * b + c1), rtol=1e-10)


def test_ssim_per_video_and_small_frames():
  x = _video(shape=(3, 3, 2, 8, 8))  # frames smaller than the 11 x 11 window
  y = x.copy()
  y[1] = np.clip(y[1] + 0.2 * np.random.default_rng(2).standard_normal(y[1].shape), 0, 1)
  s = quality.ssim(y, x)
  assert s.shape == (3,)
  np.testing.assert_allclose(s[[0, 2]], 1.0, atol=1e-12)
  assert s[1] < 0.9


def test_gaussian_window():
  w = quality.gaussian_window(11, 1.5)
  np.testing.assert_allclose(w.sum(), 1.0)
  np.testing.assert_allclose(w, w[::-1])
  assert w.argmax() == 5


def test_psnr_known_values():
  x = np.zeros((2, 3, 2, 4, 4))
  y = x.copy()
  y[0] += 0.1                     # MSE 0.01 -> 20 dB at data range 1
  np.testing.assert_allclose(quality.psnr(y, x), [20.0, quality.PSNR_CAP])
  np.testing.assert_allclose(quality.psnr(2 * y, 2 * x, data_range=2.0)[0], 20.0)
  with pytest.raises(ValueError, match="shapes"):
    quality.psnr(x, x[:1])


def test_to_unit():
  v = np.array([-2.0, -1.0, 0.0, 1.0, 3.0])
  np.testing.assert_allclose(quality.to_unit(v, True), [0, 0, 0.5, 1, 1])
  np.testing.assert_allclose(quality.to_unit(v, False, reference=np.array([-1.0, 1.0])),
                             [-0.5, 0, 0.5, 1, 2])


def test_recall_by_kind():
  kinds = np.array([0, 1, 1, 2, 3, 2])
  recall = np.array([[1, 1], [1, 1], [1, 1], [0.5, 0.7], [0.9, 0.9], [0.7, 0.9]])
  r = quality.recall_by_kind(recall, kinds)
  np.testing.assert_allclose([r["sparse"], r["refresh"]], [0.7, 0.9])
  assert quality.recall_by_kind(recall[:4], kinds[:4]).keys() == {"sparse"}
  assert quality.recall_by_kind(None, kinds) == {}


def test_default_sweep_is_scaled_and_ordered():
  runs = quality.default_sweep(25, 128)
  assert (runs[0].top_k, runs[0].warmup_steps, runs[0].interval, runs[0].refresh) == (0.12, 6, 5, "dense")
  assert len(runs) == 10 and len(set(runs)) == 10
  base = quality.baselines_for(runs[0], 0.8)
  assert [b[0] for b in base] == ["oracle", "static_window", "warmup_reuse"]
  assert base[0][2].density == pytest.approx(0.2) and base[0][2].warmup_steps == 6
  assert quality.baselines_for(runs[1], 0.8012)[0][1] == base[0][1]   # shared by near-equal sparsity


# ---------------------------------------------------------------------- smoke

def test_run_quality_smoke_on_tiny(tmp_path):
  model = pipelines.load_model("tiny")
  setup = quality.Setup(frames=8, height=16, width=16, steps=4, guidance_scale=4.0, shift=3.0)
  run = quality.ModRun(top_k=0.3, warmup_steps=2, interval=2, refresh="dense", block_size=64)
  updates = []
  result = quality.run_quality(model, setup, [(0, 0), (1, 0)], [run], batch=2,
                               on_update=lambda r, v, final=False: updates.append(final),
                               log=lambda s: None)
  assert not result["errors"], result["errors"]
  assert result["complete"] and updates[-1] is True
  assert [r["family"] for r in result["rows"]] == [
      "mod_dense_refresh", "oracle", "static_window", "warmup_reuse"]
  for r in result["rows"]:
    assert r["seeds"] == 2 and len(r["psnr_per_seed"]) == 2
    assert np.isfinite(r["psnr"]) and -1.0 <= r["ssim"] <= 1.0
    assert 0.0 < r["sparsity"] < 1.0
    assert r["step_kinds"] in ("MMSR", "DDSS", "MMSS")
  mod = result["rows"][0]
  if result["mask_recall_recorded"]:
    assert set(mod["mask_recall"]) == {"sparse", "refresh"}
    assert mod["mask_recall"]["refresh"] == pytest.approx(1.0)   # dense refresh
    assert 0.0 < mod["mask_recall"]["sparse"] <= 1.0 + 1e-6
  oracle = result["rows"][1]
  assert oracle["density"] == pytest.approx(1.0 - mod["sparsity"], abs=0.0051)  # rounded to 0.01
  text = json.dumps(result)           # the JSON is plain (no NaN/inf)
  assert "NaN" not in text and "Infinity" not in text
  assert "oracle" in quality.table(result)


def test_cli_writes_json_plot_and_gif(tmp_path, capsys):
  rc = quality.main(["--model", "tiny", "--pairs", "2", "--batch", "1", "--steps", "4",
                     "--frames", "8", "--block-size", "64", "--top-k", "0.3", "--refresh", "dense",
                     "--no-variants", "--no-recall", "--out-dir", str(tmp_path)])
  assert rc == 0
  files = sorted(os.listdir(tmp_path))
  json_files = [f for f in files if f.startswith("quality-") and f.endswith(".json")]
  assert len(json_files) == 1, files
  with open(tmp_path / json_files[0]) as f:
    result = json.load(f)
  assert result["kind"] == "quality" and result["model"] == "tiny" and len(result["rows"]) == 4
  assert {"card", "jax", "date"} <= result.keys()
  assert "demo_dense_vs_mod.gif" in files
  if importlib.util.find_spec("matplotlib") is not None:
    assert "quality_sparsity_psnr.png" in files
  out = capsys.readouterr().out
  assert out.rstrip().splitlines()[-1].startswith("warm-up reuse")  # the table comes last

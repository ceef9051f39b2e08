"""benchmarks/quality.py: the PSNR/SSIM metrics, and a smoke run of the sweep on the tiny model."""

import dataclasses
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
  runs = quality.default_sweep(25, 128, 32)
  assert [(r.top_k, r.warmup_steps, r.interval, r.refresh, r.preset) for r in runs[:3]] == [
      (0.08, 6, 5, "sparse", "ours"), (0.05, 6, 5, "sparse", "ours"), (0.12, 6, 5, "sparse", "ours")]
  # README top_k 350 of 1619 lines at n = 540 -> 21 of 95 at n = 32; reference beside ours
  assert (runs[3].preset, runs[3].top_k, runs[3].refresh) == ("reference", 21, "dense")
  assert (runs[4].preset, runs[4].top_k) == ("ours", 21)
  assert isinstance(runs[3].config(), type(runs[4].config()))
  assert runs[3].config().first_mask == "last_map" and runs[4].config().first_mask == "extrapolate"
  # run_wan.sh: top_k 80 -> 5 lines, W 10/50 -> 5, T 15/50 -> 8, layer 0 dense
  wan = runs[5]
  assert (wan.preset, wan.top_k, wan.warmup_steps, wan.interval, wan.dense_layers) == (
      "reference", 5, 5, 8, 1)
  assert wan.config().dense_layers == 1 and "run_wan.sh" in wan.label
  assert len(runs) == 9 and len({r.label for r in runs}) == 9
  base = quality.baselines_for(runs[0], 0.8)
  assert [b[0] for b in base] == ["static_window", "warmup_reuse"]
  assert base[0][2].density == pytest.approx(0.2) and base[0][2].warmup_steps == 6
  assert base[1][2].refresh == "none" and base[1][2].top_k == 0.08
  assert quality.baselines_for(runs[1], 0.8012)[0][1] == base[0][1]   # shared by near-equal sparsity
  assert quality.scaled_top_k(350, 540) == 350 and quality.scaled_top_k(1, 32) == 1


def test_oracle_is_matched_per_row():
  row = dict(sparsity_post_warmup=0.785, block_size=128, warmup_steps=6, dense_layers=1)
  family, label, config, fields = quality.oracle_for(row, 32)
  assert family == "oracle" and fields["keep_per_row"] == 7 and config.density == 7 / 32
  assert config.dense_layers == 1 and "7/32" in label
  assert quality.oracle_keep(0.001, 32) == 1 and quality.oracle_keep(1.0, 32) == 32


def test_paired_statistics():
  a, b = np.array([10.0, 12.0, 11.0, 13.0]), np.array([9.0, 10.0, 10.5, 11.0])
  p = quality.paired(a, b)
  d = a - b
  assert p["n"] == 4 and p["mean"] == pytest.approx(d.mean())
  assert p["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / 2.0))
  assert p["diff_per_seed"] == [1.0, 2.0, 0.5, 2.0]
  assert quality.paired(a, a)["t"] == 0.0
  assert quality.paired(a + 1, a)["t"] == quality.T_UNBOUNDED
  assert quality.paired(b, a)["t"] < 0


def _row(method, family, psnr, post, **kw):
  return dict(method=method, family=family, psnr_per_seed=list(psnr), sparsity_post_warmup=post,
              warmup_steps=6, block_size=128, **kw)


def test_comparisons_and_verdicts():
  rng = np.random.default_rng(0)
  base = rng.normal(20, 2, size=16)
  mod = "mod k0.08 W6 T5 sparse-refresh"
  rows = [
      _row(mod, "mod_sparse_refresh", base + 1 + 0.1 * rng.normal(size=16), 0.78, top_k=0.08,
           interval=5, refresh="sparse"),
      _row("static window d0.22 W6", "static_window", base, 0.78, matched_to=mod),
      _row("warm-up reuse k0.08 W6 T5", "warmup_reuse", base + 0.5 + 0.1 * rng.normal(size=16), 0.78,
           matched_to=mod),
      _row("mass oracle 7/32 W6", "oracle", base + 3, 1 - 7 / 32, keep_per_row=7),
  ]
  comps = quality.compare(rows, 32)
  kinds = sorted(c["kind"] for c in comps)
  assert kinds == ["mod_vs_static_window", "mod_vs_warmup_reuse"] + ["oracle_vs_method"] * 3
  v = quality.verdicts(rows, comps)
  assert v["mod_beats_baselines"]["passed"] and v["oracle_upper_bound"]["passed"]
  text = "\n".join(quality.verdict_lines(dict(verdicts=v)))
  assert "beats both static window and warm-up reuse at matched sparsity with a paired t >= 2" in text
  assert "the mass oracle not below any other method at the same density beyond noise" in text
  assert text.count("PASS") == 2
  # a baseline that wins, and an oracle below a method: both verdicts fail
  rows[2]["psnr_per_seed"] = list(base + 2)
  rows[3]["psnr_per_seed"] = list(base + 0.5 + 0.1 * rng.normal(size=16))
  v = quality.verdicts(rows, quality.compare(rows, 32))
  assert not v["mod_beats_baselines"]["passed"] and not v["oracle_upper_bound"]["passed"]
  # below 75% sparsity a MOD run does not qualify: no run, no pass
  rows[0]["sparsity_post_warmup"] = 0.7
  v = quality.verdicts(rows, quality.compare(rows, 32))
  assert not v["mod_beats_baselines"]["passed"] and v["mod_beats_baselines"]["runs"] == []


# ---------------------------------------------------------------------- smoke

def test_run_quality_smoke_on_tiny(tmp_path):
  """The reference preset with layer 0 dense, its baselines and the mass oracles."""
  model = pipelines.load_model("tiny")
  setup = quality.Setup(frames=8, height=16, width=16, steps=4, guidance_scale=4.0, shift=3.0)
  ref = quality.ModRun(top_k=0.3, warmup_steps=2, interval=2, refresh="dense", block_size=64,
                       preset="reference", dense_layers=1)
  updates = []
  result = quality.run_quality(model, setup, [(0, 0), (1, 0)], [ref], batch=2,
                               record_recall=False,
                               on_update=lambda r, v, final=False: updates.append(final),
                               log=lambda s: None)
  assert not result["errors"], result["errors"]
  assert result["complete"] and updates[-1] is True
  families = [r["family"] for r in result["rows"]]
  assert families[:4] == ["reference_dense_refresh", "static_window", "warmup_reuse", "oracle"]
  for r in result["rows"]:
    assert r["seeds"] == 2 and len(r["psnr_per_seed"]) == 2
    assert np.isfinite(r["psnr"]) and -1.0 <= r["ssim"] <= 1.0
    assert 0.0 < r["sparsity_post_warmup"] < 1.0
    assert r["dense_layers"] == 1
  mod = result["rows"][0]
  assert mod["step_kinds"] == "DMSR"      # W-2 runs dense: their first fit is zero
  oracle = result["rows"][3]
  n = 8  # 512 tokens in blocks of 64
  assert oracle["keep_per_row"] == quality.oracle_keep(1 - mod["sparsity_post_warmup"], n)
  # layer 0 of 2 dense, the other at keep / n
  assert oracle["sparsity_post_warmup"] == pytest.approx(0.5 * (1 - oracle["keep_per_row"] / n))
  kinds = {c["kind"] for c in result["comparisons"]}
  assert {"mod_vs_static_window", "mod_vs_warmup_reuse", "oracle_vs_method"} <= kinds
  for c in result["comparisons"]:
    assert len(c["diff_per_seed"]) == 2
  assert set(result["verdicts"]) == {"mod_beats_baselines", "oracle_upper_bound"}
  assert result["verdicts"]["mod_beats_baselines"]["runs"] == []   # no ours-sparse run here
  text = json.dumps(result)           # the JSON is plain (no NaN/inf)
  assert "NaN" not in text and "Infinity" not in text
  assert "mass oracle" in quality.table(result)


def test_cli_writes_json_plot_gif_and_verdicts(tmp_path, capsys):
  rc = quality.main(["--model", "tiny", "--seeds", "2", "--batch", "2", "--steps", "4",
                     "--frames", "8", "--block-size", "64", "--top-k", "0.3", "--quick",
                     "--runs", "1", "--no-oracles", "--no-recall", "--out-dir", str(tmp_path)])
  assert rc == 0
  files = sorted(os.listdir(tmp_path))
  json_files = [f for f in files if f.startswith("quality-") and f.endswith(".json")]
  assert len(json_files) == 1, files
  with open(tmp_path / json_files[0]) as f:
    result = json.load(f)
  assert result["kind"] == "quality" and result["model"] == "tiny"
  assert [r["family"] for r in result["rows"]] == ["mod_sparse_refresh", "static_window",
                                                    "warmup_reuse"]
  assert {"card", "jax", "date", "comparisons", "verdicts"} <= result.keys()
  assert "demo_dense_vs_mod.gif" in files
  if importlib.util.find_spec("matplotlib") is not None:
    assert "quality_sparsity_psnr.png" in files
  out = capsys.readouterr().out.rstrip().splitlines()
  verdicts = [line for line in out if line.startswith("VERDICT")]
  assert len(verdicts) == 2 and all(v.endswith(("PASS", "FAIL")) for v in verdicts)


def test_quantized_twins_follow_our_sparse_refresh_runs():
  runs = quality.default_sweep(25, 128, 32, variants=True)
  twins = quality.with_quantized(runs, "int8_fp8", "fp8")
  ours_sparse = [r for r in runs if r.preset == "ours" and r.refresh == "sparse" and not r.dense_layers]
  assert len(twins) == len(runs) + 2 * len(ours_sparse)
  i = twins.index(ours_sparse[0])
  a, b = twins[i + 1], twins[i + 2]
  assert (a.precision, a.dense_precision) == ("int8_fp8", "bf16")
  assert (b.precision, b.dense_precision) == ("int8_fp8", "fp8")
  assert a.bf16() == ours_sparse[0] and a.family == "quantized_mod_sparse_refresh"
  cfg = b.config()
  assert (cfg.precision, cfg.dense_precision) == ("int8_fp8", "fp8")
  assert "int8_fp8 sparse, fp8 dense" in b.label and a.label != ours_sparse[0].label


def test_quantized_vs_bf16_comparison_and_verdict():
  rng = np.random.default_rng(1)
  run = quality.ModRun(0.08, 6, 5, "sparse", 128)
  q = dataclasses.replace(run, precision="int8_fp8")
  base = rng.normal(20, 2, size=16)
  def row(r, psnr):
    fields = {k: v for k, v in r.fields().items() if k not in ("warmup_steps", "block_size")}
    return _row(r.label, r.family, psnr, 0.78, run=dataclasses.asdict(r), **fields)
  close = [row(run, base), row(q, base - 0.1 + 0.05 * rng.normal(size=16))]
  comps = quality.compare(close, 32)
  c = next(c for c in comps if c["kind"] == "quantized_vs_bf16")
  assert c["a"] == q.label and c["b"] == run.label and abs(c["mean"] + 0.1) < 0.05
  assert not any(c["kind"].startswith("mod_vs_") and c["a"] == q.label for c in comps)
  assert quality.verdicts(close, comps)["quantized_within"]["passed"]
  far = [row(run, base), row(q, base - 0.6)]
  assert not quality.verdicts(far, quality.compare(far, 32))["quantized_within"]["passed"]
  assert "quantized_within" not in quality.verdicts(close[:1], quality.compare(close[:1], 32))

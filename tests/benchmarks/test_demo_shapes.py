"""benchmarks/demo_shapes.py: the judge on the generator's own videos (it must pass
them and fail broken ones), and a CPU smoke of the sweep on a tiny demo export."""

import json

import jax
import numpy as np
import pytest

from benchmarks import demo_shapes as D
from models.demo import checkpoint as C
from models.demo import data
from models.demo import train as T

F, H, W = 16, 32, 32
SPEC = D.ShapeSpec.for_version(2, F, H, W)
# one label per motion, one to three shapes
LABELS = [data.label_of(0, 0), data.label_of(3, 1), data.label_of(5, 2), data.label_of(6, 3),
          data.label_of(2, 3), data.label_of(4, 0)]


_render = jax.jit(data.render_scene, static_argnums=(1, 2, 3))


def _video(label, seed, **scene_changes):
  scene = data.scene_for_label(jax.random.key(500 + seed), label, F, H, W)
  if scene_changes:
    scene = scene.replace(**scene_changes)
  return np.asarray(_render(scene, F, H, W))


@pytest.mark.parametrize("label", LABELS, ids=data.describe_label)
def test_generator_videos_show_their_shapes(label):
  for seed in range(2):
    verdict = D.judge(_video(label, seed), label, SPEC)
    assert verdict["ok"], verdict["reason"]
    shape_set, _ = data.decode_label(label)
    assert verdict["shapes"] == [i for i, p in enumerate(data.shapes_present(shape_set).tolist()) if p]


def test_broken_videos_fail():
  rng = np.random.default_rng(0)
  for label in LABELS:
    shape_set, motion = data.decode_label(label)
    v = _video(label, 0)
    assert not D.judge(_video(label, 0, present=np.zeros(3, bool)), label, SPEC)["ok"]  # no shape
    assert not D.judge(v[:, rng.permutation(F)], label, SPEC)["ok"]        # frames jump about
    assert not D.judge(np.repeat(v[:, :1], F, axis=1), label, SPEC)["ok"]  # nothing moves
    other_shapes = data.label_of((shape_set + 1) % data.NUM_SHAPE_SETS, motion)
    assert not D.judge(v, other_shapes, SPEC)["ok"]                        # wrong shapes
    if data.MOTIONS[motion] in ("horizontal", "vertical"):
      other_motion = data.label_of(shape_set, 1 - motion)
      assert not D.judge(v, other_motion, SPEC)["ok"]                      # wrong motion
  # a shape in the wrong colour: the red circle painted green is not a circle
  label = data.label_of(0, 0)
  green = np.asarray(data.SHAPE_COLORS)[[1, 1, 2]]
  assert not D.judge(_video(label, 0, colors=green), label, SPEC)["ok"]
  # ... but the colour-agnostic rules of data version 1 accept it
  assert D.judge(_video(label, 0, colors=green), label, D.ShapeSpec.for_version(1, F, H, W))["ok"]


def test_spec_ranges_come_from_the_generator():
  r_lo, r_hi = SPEC.radius_px()
  assert (r_lo, r_hi) == (H * data.RADIUS[0], H * data.RADIUS[1])
  lo, hi = SPEC.area_range(0)
  assert lo < np.pi * r_lo ** 2 < np.pi * r_hi ** 2 < hi
  dy, dx = SPEC.max_step(0)
  assert dy == 0 and dx == pytest.approx(H * data.SPEED[1])
  with pytest.raises(ValueError, match="data_version"):
    D.ShapeSpec.for_version(3, F, H, W)


def test_seam_score():
  assert D.block_boundary_rows(32, 32, (1, 2, 2), 128) == [16]
  assert D.block_boundary_rows(32, 32, (1, 2, 2), 64) == [8, 16, 24]
  assert D.block_boundary_rows(32, 24, (1, 2, 2), 128) == []       # 12 tokens a row
  videos = np.stack([_video(label, 0) for label in LABELS])
  clean = D.seam_score(videos, [16])
  assert 0.5 < clean < 1.6
  seamed = videos.copy()
  seamed[..., 16:, :] += 0.15                                        # the lower block shifted
  assert D.seam_score(seamed, [16]) > 2 * clean
  assert D.seam_score(videos, []) is None


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  """A random-init tiny demo export: 4 frames of 16 x 16 (256 tokens, 2 blocks)."""
  path = tmp_path_factory.mktemp("tiny") / "demo.safetensors"
  config = T.tiny_config(text_dim=C.TEXT_DIM)
  params = T.init_demo_params(config, jax.random.key(0), 4, 16, 16)
  C.export_demo(path, config, params, frames=4, height=16, width=16)
  return path


def test_quick_sweep_on_a_tiny_export(tiny_export, tmp_path, capsys):
  out = tmp_path / "shapes.json"
  assert D.main(["--model", str(tiny_export), "--quick", "--out", str(out), "--pick-default",
                 "--pick-seeds", "1"]) == 0
  result = json.loads(out.read_text())
  assert result["kind"] == "demo_shapes" and result["data_version"] == data.DATA_VERSION
  assert set(result["modes"]) == {"dense", "mod"}
  for mode in result["modes"].values():
    assert mode["samples"] == 2 and 0.0 <= mode["share"] <= 1.0
    assert {v["label"] for v in mode["verdicts"]} == {0, 25}
  assert result["data_calibration"]["samples"] == 2
  assert "default" in result  # a random model shows no shapes: None, nothing written
  meta = C.load_demo_params(tiny_export)[2]
  assert ("default_label" in meta) == (result["default"] is not None)
  assert "show their shapes" in capsys.readouterr().out


def test_update_metadata(tiny_export):
  meta = C.update_metadata(tiny_export, {"default_label": 7, "default_seed": 3})
  loaded = C.load_demo_params(tiny_export)[2]
  assert loaded["default_label"] == 7 and loaded["default_seed"] == 3 and loaded == meta
  assert loaded["frames"] == 4 and loaded["data_version"] == data.DATA_VERSION
  with pytest.raises(FileNotFoundError):
    C.update_metadata(tiny_export.parent / "nowhere" / "demo.safetensors", {})


def test_best_setting_keeps_the_current_on_a_tie():
  rows = [dict(guidance_scale=3.0, shift=2.0, share=0.5), dict(guidance_scale=4.0, shift=2.0, share=0.5),
          dict(guidance_scale=6.0, shift=4.0, share=0.25)]
  assert D.best_setting(rows, (4.0, 2.0)) == (4.0, 2.0)
  assert D.best_setting(rows, (6.0, 4.0)) == (3.0, 2.0)
  rows[2]["share"] = 0.75
  assert D.best_setting(rows, (4.0, 2.0)) == (6.0, 4.0)


def test_grid_argument_is_checked():
  assert D._settings_list("4:2,3.5:1.5") == [(4.0, 2.0), (3.5, 1.5)]
  for bad in ("4", "4:x", "0.5:2", "4:0"):
    with pytest.raises(SystemExit):
      D._parser().parse_args(["--grid", bad])


def test_grid_sweep_runs_each_setting_and_uses_the_best(tiny_export, tmp_path, capsys):
  out = tmp_path / "grid.json"
  assert D.main(["--model", str(tiny_export), "--quick", "--modes", "dense", "--grid", "4:2,2:3",
                 "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert [(r["guidance_scale"], r["shift"]) for r in result["grid"]] == [(4.0, 2.0), (2.0, 3.0)]
  assert all(r["samples"] == 2 for r in result["grid"])
  # the main sweep ran with the grid's pick
  assert (result["guidance_scale"], result["shift"]) == D.best_setting(result["grid"], (4.0, 2.0))
  assert "best of the grid" in capsys.readouterr().out

"""benchmarks/kernels.py: the timing protocol and a CPU smoke run."""

import json

import pytest

from benchmarks import kernels


@pytest.mark.parametrize("one_call_s", [1e-6, 5e-5, 0.8e-3, 2e-3, 9.9e-3, 10e-3, 0.05])
def test_bursts_last_at_least_10ms_unless_capped(one_call_s):
  n = kernels.burst_length(one_call_s)
  assert 1 <= n <= 200
  assert n * one_call_s >= kernels.BURST_S or n == 200
  # Not longer than needed: one call fewer would fall short of the burst.
  assert n == 1 or (n - 1) * one_call_s < kernels.BURST_S


def test_quick_interpret_run_writes_rows(tmp_path):
  out = tmp_path / "k.json"
  kernels.main(["--quick", "--interpret", "--runs", "1", "--no-map", "--densities", "0.5",
                "--masks", "random", "--backends", "triton", "--out", str(out)])
  doc = json.loads(out.read_text())
  assert doc["kind"] == "kernel" and doc["rows"]
  row = next(r for r in doc["rows"] if r["impl"] == "ours_triton")
  assert row["time_ms"] > 0 and row["rel_err"] < 1e-2


@pytest.mark.parametrize("family,seq,heads,dim", [("cogvideox", 17550, 30, 64),
                                                  ("cogvideox1.5", 45106, 48, 64),
                                                  ("hunyuan720p", 119056, 24, 128)])
def test_family_shapes(family, seq, heads, dim):
  args = kernels.parse_args(["--family", family, "--out", "x.json"])
  assert (args.seq_lens, args.heads, args.head_dim) == ([seq], [heads], dim)
  # the "mod" masks lay their frame blocks out at the family's tokens per latent frame
  assert kernels.tokens_per_frame(seq) == kernels.FAMILIES[family][3]
  assert kernels.parse_args(["--cogvideo", "--out", "x.json"]).family == "cogvideox"


def test_family_video_tokens_match_the_models():
  """The presets' sequence lengths are the families' own layouts at those videos."""
  from benchmarks import e2e
  for family, model, shape in (("cogvideox1.5", "cogvideox1_5_5b", "cogvideox1.5"),
                               ("hunyuan720p", "hunyuan_video", "hunyuan720p")):
    m = e2e.build_model(model)
    layout = m.family.attention_layout(*m.latent(*e2e.SHAPES[shape]))
    assert layout.seq_len == kernels.FAMILIES[family][0]

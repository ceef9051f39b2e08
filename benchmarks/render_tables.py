"""Render the README's result tables from benchmarks/results/*.json.

Tables go between `<!-- results:KIND -->` and `<!-- /results:KIND -->` markers;
everything else in README.md is left alone. Run: python benchmarks/render_tables.py
"""

from __future__ import annotations

import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(kind):
  runs = []
  for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", f"{kind}-*.json"))):
    with open(path) as f:
      runs.append((os.path.basename(path), json.load(f)))
  return runs


def _fmt(x, spec):
  return "" if x is None else format(x, spec)


def _is_precision_run(run) -> bool:
  return any(r.get("precision", "bf16") != "bf16" for r in run["rows"])


def kernel_table(runs):
  """One row per (S, H, mask, density): baselines, each of our backends, ratios.

  Ratios are for the first of our backends (mosaic_gpu when present): speedup
  over cuDNN dense and FlexAttention, and "eff." = the share of cuDNN's dense
  throughput it reaches on the blocks it computes (t_cudnn * density / t).
  """
  lines = []
  for name, run in runs:
    if _is_precision_run(run):  # quantized runs have their own table
      continue
    rows = [r for r in run["rows"] if not r.get("sweep") and "time_ms" in r]
    dense = {}
    for r in rows:
      if r["mask"] == "dense":
        dense.setdefault((r["seq_len"], r["heads"]), {})[r["impl"]] = r
    cells = {}
    for r in rows:
      if r["mask"] == "dense":
        continue
      key = (r["seq_len"], r["heads"], r.get("mask", ""), round(r.get("density") or 1.0, 3))
      impl = r["impl"] + (":" + r["variant"] if r.get("variant") else "")
      cells.setdefault(key, {})[impl] = r
    ours = sorted({i for c in cells.values() for i in c if i.startswith("ours_")},
                  key=lambda i: (i != "ours_mosaic_gpu", i))
    has_fa3 = any(r["impl"] == "jax_fa3_dense" for r in rows)
    lines += [f"`{name}` ({run['card']}, jax {run['jax']}); map = sparsity-map pass given the "
              "row LSE, as a fraction of one cuDNN dense call", ""]
    if run.get("timing_note"):
      lines += [f"Timing: {run['timing_note']}", ""]
    head = ["S", "H", "mask", "density", "cuDNN dense ms"] + (["jax FA3 dense ms"] if has_fa3 else [])
    head += ["flex ms"] + [f"{i} ms" for i in ours] + ["vs cuDNN", "eff.", "vs flex", "rel err", "map"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t = lambda r: f"{r['time_ms']:.3f}" if r and r.get("time_ms") else ""
    for key in sorted(cells):
      c, base_rows = cells[key], dense.get(key[:2], {})
      base = base_rows.get("cudnn_dense", {}).get("time_ms")
      best = c.get(ours[0]) if ours else None
      flex = c.get("flex")
      smap = c.get("sparsity_map:given_lse")
      ok = best and best.get("time_ms")
      vs_c = f"{base / best['time_ms']:.2f}x" if ok and base else ""
      eff = f"{base * key[3] / best['time_ms']:.0%}" if ok and base else ""
      vs_f = f"{flex['time_ms'] / best['time_ms']:.2f}x" if ok and flex and flex.get("time_ms") else ""
      err = _fmt(best.get("rel_err") if best else None, ".1e")
      map_ratio = f"{smap['time_ms'] / base:.2f}" if smap and smap.get("time_ms") and base else ""
      cols = [str(key[0]), str(key[1]), key[2], f"{key[3]:.3f}", _fmt(base, ".3f")]
      if has_fa3:
        cols.append(t(base_rows.get("jax_fa3_dense")))
      cols += [t(flex)] + [t(c.get(i)) for i in ours] + [vs_c, eff, vs_f, err, map_ratio]
      lines.append("| " + " | ".join(cols) + " |")
    lines.append("")
  return lines


def e2e_table(runs):
  """One row per (mode, shape). Runs made with --run-steps K show the total of the
  --steps run projected from per-kind step times of that K-step run ("proj.")."""
  lines = []
  for name, run in runs:
    rows = [r for r in run["rows"] if "total_s" in r]
    total = lambda r: r.get("projected_total_s") or r["total_s"]
    base = {r["tokens"]: total(r) for r in rows if r["mode"] == "dense_cudnn"}
    lines += [f"`{name}` ({run['card']}, jax {run['jax']}, {run.get('model', '')})", "",
              "| mode | video | tokens | steps | total s | ms/step by kind | sparsity | peak GB | speedup |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
      kinds = ", ".join(f"{k} {v:.0f}" for k, v in r["per_step_ms_by_kind"].items())
      sp = f"{base[r['tokens']] / total(r):.2f}x" if r["tokens"] in base else ""
      proj = (f" (proj. from {r['run_steps']})" if r.get("projected_total_s") else "")
      prec = (r.get("precision", "bf16"), r.get("dense_precision", "bf16"))
      mode = r["mode"] + ("" if prec == ("bf16", "bf16") else f" ({prec[0]} sparse, {prec[1]} dense)")
      lines.append(f"| {mode} | {r['frames']}x{r['height']}x{r['width']} | {r['tokens']} | "
                   f"{r['steps']} | {total(r):.1f}{proj} | {kinds} | {r['sparsity']:.1%} | "
                   f"{r['peak_mem_gb']:.1f} | {sp} |")
    lines.append("")
  return lines


def overhead_table(runs):
  lines = []
  for name, run in runs:
    lines += [f"`{name}` ({run['card']}, jax {run['jax']})", "",
              "| S | what | time ms | x one dense attention |", "|---|---|---|---|"]
    for r in run["rows"]:
      lines.append(f"| {r['seq_len']} | {r['what']} | {r['time_ms']:.3f} | {r['ratio']:.3f} |")
    lines.append("")
  return lines


def quality_table(runs):
  """The newest quality run only (file names sort by date, then -a, -b, ...): it is
  the shipped demo's; earlier ones were of earlier demo models."""
  lines = []
  for name, run in runs[-1:]:
    lines += [f"`{name}` ({run['card']}, jax {run['jax']})", "",
              "| method | sparsity (sparse steps) | sparsity after warm-up | PSNR dB | SSIM | "
              "mask recall | seeds |", "|---|---|---|---|---|---|---|"]
    for r in run["rows"]:
      recall = r.get("mask_recall")
      if isinstance(recall, dict):
        recall = ", ".join(f"{k} {v:.3f}" for k, v in recall.items())
      elif recall is not None:
        recall = f"{recall:.3f}"
      post = r.get("sparsity_post_warmup")
      post = f"{post:.1%}" if post is not None else ""
      lines.append(f"| {r['method']} | {r['sparsity']:.1%} | {post} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                   f"{recall or ''} | {r['seeds']} |")
    lines.append("")
  return lines


PRECISION_ORDER = ("bf16", "int8_bf16", "int8_fp8", "fp8")


def precision_table(runs):
  """Quantized kernels beside bf16 (the public call, quantization included), per shape:
  time, the share of cuDNN bf16 dense throughput on the blocks computed, rel err."""
  lines = []
  for name, run in runs:
    if not _is_precision_run(run):
      continue
    rows = [r for r in run["rows"] if not r.get("sweep") and r.get("time_ms")]
    cudnn = {(r["seq_len"], r["heads"], r["head_dim"]): r for r in rows if r["impl"] == "cudnn_dense"}
    fp8 = {(r["seq_len"], r["heads"], r["head_dim"]): r for r in rows
           if r["impl"] == "cudnn_fp8_dense"}
    cells = {}
    for r in rows:
      if r["impl"] == "ours_mosaic_gpu" and r.get("variant") == "public_call":
        key = (r["seq_len"], r["heads"], r["head_dim"], r["mask"], round(r["density"], 3))
        cells.setdefault(key, {})[r["precision"]] = r
    if not cells:
      continue
    precisions = [p for p in PRECISION_ORDER if any(p in c for c in cells.values())]
    lines += [f"`{name}` ({run['card']}, jax {run['jax']}); ms of the whole call (quantization "
              "included), in brackets the share of cuDNN bf16 dense throughput on the blocks "
              "computed, then rel err vs float32", ""]
    head = ["S", "H", "D", "mask", "density", "cuDNN bf16 ms", "cuDNN fp8 ms"] + precisions
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(cells):
      base = cudnn.get(key[:3], {}).get("time_ms")
      f8 = fp8.get(key[:3], {}).get("time_ms")
      cols = [str(key[0]), str(key[1]), str(key[2]), key[3], f"{key[4]:.3f}", _fmt(base, ".3f"),
              _fmt(f8, ".3f")]
      for p in precisions:
        r = cells[key].get(p)
        if not r:
          cols.append("")
          continue
        eff = f" ({base * key[4] / r['time_ms']:.0%})" if base else ""
        cols.append(f"{r['time_ms']:.3f}{eff}, {_fmt(r.get('rel_err'), '.1e')}")
      lines.append("| " + " | ".join(cols) + " |")
    lines.append("")
  return lines


def pipeline_table(runs):
  """The Wan pipeline stage by stage (warm stage times, compile apart)."""
  lines = []
  for name, run in runs:
    rows = [r for r in run["rows"] if r.get("time_s") is not None]
    lines += [f"`{name}` ({run['card']}, jax {run['jax']}, {run.get('model', '')})", "",
              "| video | stage | impl | mode | time s | sparsity |", "|---|---|---|---|---|---|"]
    for r in rows:
      if r["stage"] in ("text_encode", "vae_decode") and r.get("first_call") is False:
        continue  # the warm rows below say the same without the compile question
      video = f"{r['frames']}x{r['height']}x{r['width']}"
      sparsity = f"{r['sparsity']:.1%}" if r["stage"] == "denoise" else ""
      stage = r["stage"] + (" (first call, compile included)" if r.get("first_call") and
                            r["stage"] in ("text_encode", "vae_decode") else "")
      lines.append(f"| {video} | {stage} | {r['impl']} | {r.get('mode', '')} | "
                   f"{r['time_s']:.2f} | {sparsity} |")
    lines.append("")
  return lines


def scaling_table(runs):
  lines = []
  for name, run in runs:
    lines += [f"`{name}` ({run['card']}, jax {run['jax']}, {run.get('device_count', '')} device(s))",
              "", "| model | video | tokens | devices | cfg x seq | mode | steps | total s | "
              "pre-mesh total s | mesh overhead | imbalance |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in run["rows"]:
      if "total_s" not in r:
        continue
      imb = r.get("imbalance") or {}
      imb = f"{imb.get('natural', 1):.2f} -> {imb.get('balanced', 1):.2f}" if imb else ""
      over = f"{r['mesh1_overhead']:+.2%}" if r.get("mesh1_overhead") is not None else ""
      base = _fmt(r.get("baseline_total_s"), ".2f")
      lines.append(f"| {r['model']} | {r['frames']}x{r['height']}x{r['width']} | {r['tokens']} | "
                   f"{r['devices']} | {r['cfg']} x {r['seq']} | {r['mode']} | {r['steps']} | "
                   f"{r['total_s']:.2f} | {base} | {over} | {imb} |")
    lines.append("")
  return lines


RENDERERS = {"kernel": kernel_table, "precision": precision_table, "e2e": e2e_table,
             "overhead": overhead_table, "quality": quality_table, "pipeline": pipeline_table,
             "scaling": scaling_table}
_FILES = {"precision": "kernel"}  # the precision table reads the kernel files


def render(readme: str) -> str:
  for kind, fn in RENDERERS.items():
    pattern = re.compile(rf"(<!-- results:{kind} -->\n).*?(<!-- /results:{kind} -->)", re.S)
    body = "\n".join(fn(_load(_FILES.get(kind, kind)))) or "(no results yet)"
    readme = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), readme)
  return readme


def main():
  path = os.path.join(ROOT, "README.md")
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(render(text))


if __name__ == "__main__":
  main()

"""Quality of MOD-DiT against dense attention on the shipped demo model.

For a set of (seed, label) pairs (default 32 seeds, label = seed % NUM_CLASSES)
the demo model is sampled once with dense attention, then with a sweep of
MOD-DiT runs (`default_sweep`): ours with sparse refresh at top_k fractions that
reach >= 75% sparsity, `MODConfig.reference()` (the authors' code) beside ours at
the README numbers scaled to the demo, the authors' run_wan.sh setting (top_k 80
scaled to n, warm-up 10/50, interval 15/50, layer 0 dense), and variants. Each
MOD run gets its baselines (ALGORITHM.md section 7) matched to its sparsity
counted over every post-warm-up step: the static window of the nearest density
and warm-up reuse (same preset, top_k and schedule, no refresh); then every
method gets the mass oracle (the blocks with the most softmax mass of each step,
per query-block row) at its density.

Every video is compared with the dense video of the same pair: PSNR and SSIM on
frames mapped to [0, 1] (per seed, kept in the JSON), the measured sparsity
("sparsity": sparse steps only; "sparsity_post_warmup": every step after the
warm-up, a dense refresh counting as dense) and the mask recall (share of the
true attention mass inside the mask). Then paired statistics over the same
seeds (per-seed PSNR differences, mean, paired t) -- MOD vs its static window and
warm-up reuse, the oracle vs every method at its density, ours vs reference --
and the two verdicts of the issue, printed last:
  MOD-DiT with sparse refresh, counting every post-warm-up step, at >= 75%
  sparsity, beats both static window and warm-up reuse at matched sparsity with
  a paired t >= 2 over the same seeds; the mass oracle is not below any other
  method at the same density beyond noise (paired t > -2).

All pairs run as one batch (or chunks of --batch) from one noise key, the same
for every method, so video i of every method starts from the same noise.

Writes a "quality" JSON (rewritten after every run, so a time-out loses
nothing), a sparsity-vs-PSNR plot and a dense | MOD-DiT GIF of the first pair.

  PYTHONPATH=. python benchmarks/quality.py                  # full sweep (GPU)
  PYTHONPATH=. python benchmarks/quality.py --quick          # CPU smoke, a few minutes
  PYTHONPATH=. python benchmarks/quality.py --out-dir /tmp/q --max-minutes 7
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import math

import jax
import jax.numpy as jnp
import numpy as np

import modjax
from modjax import config as config_lib
from modjax import pipelines
from modjax.schedule import StepKind
from pallas_kernels.quantize import PRECISIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------- metrics

PSNR_CAP = 100.0  # dB reported for identical videos (MSE 0)


def to_unit(video: np.ndarray, pixel_space: bool, reference: Optional[np.ndarray] = None) -> np.ndarray:
  """Videos [..., C, F, H, W] -> float64 in [0, 1] for the metrics.

  Pixel-space models: clip [-1, 1] and map linearly (what a viewer sees).
  Latent models: scale by the reference's min/max (no clipping), so the data
  range of the metrics is 1 either way.
  """
  video = np.asarray(video, np.float64)
  if pixel_space:
    return np.clip((video + 1.0) / 2.0, 0.0, 1.0)
  ref = video if reference is None else np.asarray(reference, np.float64)
  lo, hi = float(ref.min()), float(ref.max())
  return (video - lo) / max(hi - lo, 1e-12)


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float = 1.0) -> np.ndarray:
  """PSNR in dB per video: inputs [B, ...] -> [B] (mean squared error over all
  other axes); identical videos give PSNR_CAP."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if x.shape != ref.shape:
    raise ValueError(f"psnr: shapes differ, {x.shape} vs {ref.shape}")
  mse = np.mean((x - ref) ** 2, axis=tuple(range(1, x.ndim)))
  with np.errstate(divide="ignore"):
    value = 10.0 * np.log10(data_range ** 2 / mse)
  return np.minimum(value, PSNR_CAP)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """1-D normalised Gaussian (the 11 x 11 window of Wang et al. is its outer product)."""
  r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  w = np.exp(-(r ** 2) / (2.0 * sigma ** 2))
  return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Separable 'valid' filtering of the last two axes with the 1-D window w."""
  k = w.shape[0]
  h, wd = x.shape[-2] - k + 1, x.shape[-1] - k + 1
  rows = sum(w[i] * x[..., i:i + h, :] for i in range(k))
  return sum(w[i] * rows[..., :, i:i + wd] for i in range(k))


def ssim(x: np.ndarray, ref: np.ndarray, data_range: float = 1.0, *,
         win_size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """Mean SSIM per video: inputs [B, C, F, H, W] -> [B].

  SSIM of Wang et al. (2004) on every frame and channel (Gaussian 11 x 11
  window, sigma 1.5, K1 = 0.01, K2 = 0.03, valid region only), averaged over
  pixels, frames and channels. Frames smaller than the window use a window of
  the frame's smaller side (odd).
  """
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if x.shape != ref.shape:
    raise ValueError(f"ssim: shapes differ, {x.shape} vs {ref.shape}")
  if x.ndim < 3:
    raise ValueError(f"ssim: need [B, ..., H, W], got shape {x.shape}")
  side = min(x.shape[-2:])
  size = min(win_size, side if side % 2 else side - 1)
  w = gaussian_window(size, sigma)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_x, mu_y = _filter_valid(x, w), _filter_valid(ref, w)
  sxx = _filter_valid(x * x, w) - mu_x ** 2
  syy = _filter_valid(ref * ref, w) - mu_y ** 2
  sxy = _filter_valid(x * ref, w) - mu_x * mu_y
  s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
  return s.mean(axis=tuple(range(1, s.ndim)))


# ---------------------------------------------------------------------- sampling

@dataclasses.dataclass(frozen=True)
class Setup:
  """Static sizes and the sampling schedule shared by every method."""
  frames: int
  height: int
  width: int
  steps: int
  guidance_scale: float
  shift: float


def _supports_recall() -> bool:
  return "record_recall" in {f.name for f in dataclasses.fields(modjax.SamplerSettings)}


def recall_by_kind(mask_recall, step_kinds) -> dict:
  """Mean mask recall over the SPARSE and over the REFRESH steps (keys only for
  kinds that occur)."""
  if mask_recall is None:
    return {}
  recall = np.asarray(mask_recall, np.float64)
  recall = recall.reshape(recall.shape[0], -1).mean(axis=1)  # [steps]
  kinds = np.asarray(step_kinds)
  out = {}
  for name, kind in (("sparse", StepKind.SPARSE), ("refresh", StepKind.REFRESH)):
    if (kinds == kind).any():
      out[name] = float(recall[kinds == kind].mean())
  return out


class Runner:
  """Samples the (seed, label) pairs with one attention config at a time."""

  def __init__(self, model: pipelines.LoadedModel, setup: Setup, pairs, *, batch: int = 16,
               noise_seed: int = 0, record_recall: bool = True):
    self.model, self.setup, self.pairs = model, setup, list(pairs)
    self.record_recall = record_recall and _supports_recall()
    self.chunks = []
    for c, start in enumerate(range(0, len(self.pairs), batch)):
      chunk = self.pairs[start:start + batch]
      ctx, neg = zip(*(model.make_context(1, jax.random.fold_in(jax.random.key(seed), 1),
                                          label if model.num_labels else None)
                       for seed, label in chunk))
      key = jax.random.fold_in(jax.random.key(noise_seed), c)
      self.chunks.append((jnp.concatenate(ctx), jnp.concatenate(neg), key, len(chunk)))

  def sample(self, attention) -> tuple[np.ndarray, dict]:
    """(videos float32 [P, C, F, H, W], info: sparsity, mask_recall, timings)."""
    s = self.setup
    extra = dict(record_recall=True) if self.record_recall else {}
    settings = modjax.SamplerSettings(
        frames=s.frames, height=s.height, width=s.width, num_inference_steps=s.steps,
        guidance_scale=s.guidance_scale, shift=s.shift, attention=attention, **extra)
    sampler = modjax.Sampler(self.model.family, settings)
    videos, sparsities, post, recalls, weights = [], [], [], [], []
    compile_s = run_s = 0.0
    kinds = None
    compiled_by_size = {}
    for ctx, neg, key, size in self.chunks:
      t0 = time.perf_counter()
      if size not in compiled_by_size:
        compiled_by_size[size] = sampler.lower(self.model.params, ctx, neg, key).compile()
      compiled = compiled_by_size[size]
      t1 = time.perf_counter()
      out = compiled(self.model.params, ctx, neg, key)
      videos.append(np.asarray(jax.block_until_ready(out.latents), np.float32))
      t2 = time.perf_counter()
      compile_s, run_s = compile_s + t1 - t0, run_s + t2 - t1
      kinds = np.asarray(out.step_kinds)
      sparsities.append(modjax.sparsity(out))
      after = (kinds == StepKind.SPARSE) | (kinds == StepKind.REFRESH)
      density = np.asarray(out.density, np.float64)
      post.append(float(1.0 - density[after].mean()) if after.any() else 0.0)
      recalls.append(recall_by_kind(getattr(out, "mask_recall", None), kinds))
      weights.append(size)
    w = np.asarray(weights, np.float64) / sum(weights)
    recall = {k: float(sum(wi * r[k] for wi, r in zip(w, recalls))) for k in recalls[0]}
    info = dict(sparsity=float(np.dot(w, sparsities)), mask_recall=recall,
                sparsity_post_warmup=float(np.dot(w, post)),
                step_kinds="".join("DMSR"[int(k)] for k in kinds),
                compile_s=round(compile_s, 2), run_s=round(run_s, 2))
    return np.concatenate(videos), info


# ---------------------------------------------------------------------- the sweep

# The authors' Wan figures are for 69 frames at 768 x 1280: 18 x 48 x 80 = 69,120
# tokens, n = 540 blocks of 128, 3n - 1 = 1619 candidate lines; their top_k
# counts are scaled to another n as that share of the lines.
AUTHORS_N = 540
README_TOP_K = 350      # MODConfig.reference() (README / wan_test.py defaults)


def scaled_top_k(top_k_at_authors_n: int, n: int) -> int:
  """The authors' line count as the same share of the 3n - 1 lines at n blocks."""
  share = top_k_at_authors_n / (3 * AUTHORS_N - 1)
  return max(1, int(math.floor(share * (3 * n - 1) + 0.5)))


def scaled(steps: int, value_at_50: int, minimum: int) -> int:
  """A schedule length given for 50 steps, scaled to `steps`."""
  return max(minimum, int(math.floor(steps * value_at_50 / 50 + 0.5)))


@dataclasses.dataclass(frozen=True)
class ModRun:
  """One MOD-DiT configuration: `preset` "ours" (MODConfig defaults) or
  "reference" (MODConfig.reference(): the authors' first mask, float16 history,
  partial-frame block diagonal) with these schedule and budget fields."""
  top_k: Any
  warmup_steps: int
  interval: int
  refresh: str
  block_size: int
  preset: str = "ours"
  dense_layers: int = 0
  name: str = ""          # e.g. "run_wan.sh"
  precision: str = "bf16"          # kernel precision of sparse steps
  dense_precision: str = "bf16"    # ... of the warm-up, map and dense-refresh steps

  @property
  def quantized(self) -> bool:
    return (self.precision, self.dense_precision) != ("bf16", "bf16")

  @property
  def label(self) -> str:
    head = {"ours": "mod", "reference": "reference"}[self.preset]
    extra = f" L{self.dense_layers}-dense" if self.dense_layers else ""
    tag = f" ({self.name})" if self.name else ""
    quant = (f" [{self.precision} sparse, {self.dense_precision} dense]" if self.quantized else "")
    return (f"{head} k{self.top_k} W{self.warmup_steps} T{self.interval} {self.refresh}-refresh"
            f"{extra}{tag}{quant}")

  @property
  def family(self) -> str:
    head = ("reference_" if self.preset == "reference" else "mod_") + self.refresh + "_refresh"
    return ("quantized_" if self.quantized else "") + head

  def bf16(self) -> "ModRun":
    return dataclasses.replace(self, precision="bf16", dense_precision="bf16")

  def config(self, refresh: Optional[str] = None) -> modjax.MODConfig:
    fields = dict(block_size=self.block_size, warmup_steps=self.warmup_steps,
                  interval=self.interval, top_k=self.top_k, refresh=refresh or self.refresh,
                  dense_layers=self.dense_layers, precision=self.precision,
                  dense_precision=self.dense_precision)
    if self.preset == "reference":
      return modjax.MODConfig.reference(**fields)
    return modjax.MODConfig(**fields)

  def fields(self) -> dict:
    return dict(top_k=self.top_k, warmup_steps=self.warmup_steps, interval=self.interval,
                refresh=self.refresh, block_size=self.block_size, preset=self.preset,
                dense_layers=self.dense_layers, precision=self.precision,
                dense_precision=self.dense_precision)


def default_sweep(steps: int, block_size: int, n: int, *, top_ks=(0.08, 0.05, 0.12),
                  variants: bool = True) -> list:
  """MOD runs in priority order (a time budget drops the tail).

  1. ours, sparse refresh, at the top_k fractions (0.08 and 0.05 land at >= 75%
     sparsity on the demo), the reference schedule scaled to `steps` (W = 12/50,
     T = 10/50 of the steps): the runs of the must-show verdict;
  2. MODConfig.reference() beside ours at the same numbers (README top_k 350
     scaled to n, dense refresh): the three fidelity options' effect;
  3. the authors' run_wan.sh: top_k 80 scaled to n, W 10/50, T 15/50, layer 0
     dense, reference and ours;
  4. variants: ours with dense refresh, and ours with layer 0 dense.
  """
  w, t = scaled(steps, 12, 2), scaled(steps, 10, 1)
  runs = [ModRun(k, w, t, "sparse", block_size) for k in top_ks]
  k_readme = scaled_top_k(README_TOP_K, n)
  runs += [ModRun(k_readme, w, t, "dense", block_size, preset="reference"),
           ModRun(k_readme, w, t, "dense", block_size)]
  k_wan = scaled_top_k(config_lib.RUN_WAN_SH["top_k"], n)
  w_wan, t_wan = (scaled(steps, config_lib.RUN_WAN_SH["warmup_steps"], 2),
                  scaled(steps, config_lib.RUN_WAN_SH["interval"], 1))
  layers = config_lib.RUN_WAN_SH["dense_layers"]
  runs += [ModRun(k_wan, w_wan, t_wan, "dense", block_size, preset="reference",
                  dense_layers=layers, name="run_wan.sh"),
           ModRun(k_wan, w_wan, t_wan, "dense", block_size, dense_layers=layers,
                  name="run_wan.sh numbers")]
  if variants:
    runs += [ModRun(top_ks[0], w, t, "dense", block_size),
             ModRun(top_ks[0], w, t, "sparse", block_size, dense_layers=1)]
  return runs


def with_quantized(runs: list, precision: str, dense_precision: Optional[str]) -> list:
  """Each sparse-refresh run of ours followed by its quantized twins: `precision` on
  the sparse steps (bf16 warm-up), and with `dense_precision` also that on the
  warm-up, map and refresh steps. Same seeds and noise, so quantized_vs_bf16 pairs
  them seed by seed."""
  out = []
  for run in runs:
    out.append(run)
    if run.preset == "ours" and run.refresh == "sparse" and not run.dense_layers:
      out.append(dataclasses.replace(run, precision=precision))
      if dense_precision:
        out.append(dataclasses.replace(run, precision=precision, dense_precision=dense_precision))
  return out


def oracle_keep(density: float, n: int) -> int:
  """Blocks per row of the oracle nearest to `density` (at least 1)."""
  return max(1, min(n, int(math.floor(density * n + 0.5))))


def baselines_for(run: ModRun, post_sparsity: float) -> list:
  """(family, method label, config, fields) of the baselines matched to one MOD
  run's sparsity counted over every post-warm-up step: the static window of the
  nearest density, warm-up reuse (the same preset, top_k and schedule, no
  refresh). Density is rounded to 0.01, so MOD runs of nearly equal sparsity
  share their static-window run. (The oracles come after, one per density.)"""
  density = float(np.clip(round(1.0 - post_sparsity, 2), 0.01, 1.0))
  common = dict(block_size=run.block_size, warmup_steps=run.warmup_steps,
                dense_layers=run.dense_layers)
  layers = f" L{run.dense_layers}-dense" if run.dense_layers else ""
  reuse_head = "warm-up reuse" + (" (reference)" if run.preset == "reference" else "")
  return [
      ("static_window", f"static window d{density:.2f} W{run.warmup_steps}{layers}",
       modjax.StaticWindowConfig(density=density, **common),
       dict(density=density, matched_to=run.label, **common)),
      ("warmup_reuse", f"{reuse_head} k{run.top_k} W{run.warmup_steps} T{run.interval}{layers}",
       run.config(refresh="none"),
       dict(top_k=run.top_k, interval=run.interval, refresh="none", preset=run.preset,
            matched_to=run.label, **common)),
  ]


def oracle_for(row: dict, n: int) -> tuple:
  """(family, label, config, fields) of the mass oracle at a row's density (counted
  over every post-warm-up step), the same warm-up and dense layers."""
  keep = oracle_keep(1.0 - row["sparsity_post_warmup"], n)
  common = dict(block_size=row["block_size"], warmup_steps=row["warmup_steps"],
                dense_layers=row.get("dense_layers", 0))
  layers = f" L{common['dense_layers']}-dense" if common["dense_layers"] else ""
  return ("oracle", f"mass oracle {keep}/{n} W{common['warmup_steps']}{layers}",
          modjax.OracleConfig(density=keep / n, **common),
          dict(density=keep / n, keep_per_row=keep, **common))


def _stats(values: np.ndarray) -> tuple[float, float]:
  return float(np.mean(values)), float(np.std(values))


T_UNBOUNDED = 1e6
QUANT_DB = 0.3   # quantized vs bf16 MOD-DiT: mean PSNR within this, same seeds


def paired(a: np.ndarray, b: np.ndarray) -> dict:
  """Paired statistics of per-seed values a - b: mean, sample std, t = mean /
  (std / sqrt(N)) (+-T_UNBOUNDED when every difference is equal and nonzero, 0
  when all are zero), and the per-seed differences."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  n = d.size
  mean = float(d.mean())
  std = float(d.std(ddof=1)) if n > 1 else 0.0
  if std > 0:
    t = mean / (std / math.sqrt(n))
  else:  # every difference equal: t is unbounded (kept finite for the JSON)
    t = 0.0 if mean == 0 else math.copysign(T_UNBOUNDED, mean)
  return dict(n=n, mean=mean, std=std, t=t, diff_per_seed=[round(float(x), 3) for x in d])


def run_quality(model: pipelines.LoadedModel, setup: Setup, pairs, mod_runs, *,
                batch: int = 16, noise_seed: int = 0, baselines: bool = True,
                oracles: bool = True, record_recall: bool = True,
                deadline: Optional[float] = None,
                on_update: Optional[Callable[..., None]] = None,
                log: Callable[[str], None] = print) -> dict:
  """The benchmark's core: dense reference, then each MOD run, its matched
  baselines and the mass oracle at the density of each of them, then the paired
  comparisons and verdicts. Returns the result dict; `on_update(result, videos,
  final=False)` is called after every run and once more with final=True at the
  end (videos: {"dense": [P, C, F, H, W], method label: the first pair's video
  [C, F, H, W]}). Stops starting new runs once time.perf_counter() passes
  `deadline`.
  """
  start = time.perf_counter()
  runner = Runner(model, setup, pairs, batch=batch, noise_seed=noise_seed,
                  record_recall=record_recall)
  layout = model.family.attention_layout(setup.frames, setup.height, setup.width)
  result = dict(
      kind="quality", card=jax.devices()[0].device_kind, jax=jax.__version__,
      date=datetime.date.today().isoformat(), model=model.name, platform=jax.default_backend(),
      frames=setup.frames, height=setup.height, width=setup.width, steps=setup.steps,
      guidance_scale=setup.guidance_scale, shift=setup.shift,
      pairs=[list(p) for p in runner.pairs], noise_seed=noise_seed, batch=batch,
      noise="video i of chunk c: row i of the sampler's noise from fold_in(key(noise_seed), c), "
            "the same for every method",
      metrics_space="frames in [0, 1] (pixel models: clip [-1, 1]); PSNR data range 1; "
                    "SSIM Gaussian 11x11 sigma 1.5 per frame and channel",
      sparsity_note="sparsity: sparse steps only; sparsity_post_warmup: every step after the "
                    "warm-up (a dense refresh counts as dense) -- what baselines are matched to",
      mask_recall_recorded=runner.record_recall,
      rows=[], comparisons=[], verdicts={}, errors=[], skipped=[], complete=False)
  if model.name == "demo" or model.num_labels == 28:
    from models.demo import data as demo_data
    result["label_names"] = [demo_data.describe_label(label) for _, label in runner.pairs]
  videos = {}
  dense, info = runner.sample(modjax.DenseConfig())
  result["dense"] = dict(compile_s=info["compile_s"], run_s=info["run_s"])
  videos["dense"] = dense
  ref = to_unit(dense, model.pixel_space)
  log(f"dense: compile {info['compile_s']:.1f} s, run {info['run_s']:.1f} s")
  done = {}

  def measure(family, method, attention, fields):
    if method in done:  # the same baseline matched to another run of (nearly) equal sparsity
      if fields.get("matched_to") not in (None, done[method].get("matched_to")):
        done[method].setdefault("also_matched_to", []).append(fields["matched_to"])
      return done[method]
    if deadline is not None and time.perf_counter() > deadline:
      result["skipped"].append(method)
      log(f"time budget reached: skipping {method}")
      return None
    try:
      out, info = runner.sample(attention)
    except Exception as e:  # one failing config must not lose the others
      result["errors"].append(dict(method=method, error=repr(e)[:600]))
      log(f"{method}: ERROR {e!r}"[:300])
      return None
    x = to_unit(out, model.pixel_space, dense)
    p, s = psnr(x, ref), ssim(x, ref)
    if not np.isfinite(out).all():
      result["errors"].append(dict(method=method, error="non-finite video"))
    row = dict(method=method, family=family, sparsity=info["sparsity"],
               sparsity_post_warmup=info["sparsity_post_warmup"],
               psnr=_stats(p)[0], psnr_std=_stats(p)[1], ssim=_stats(s)[0], ssim_std=_stats(s)[1],
               mask_recall=info["mask_recall"], seeds=len(runner.pairs), **fields,
               steps=setup.steps, step_kinds=info["step_kinds"], compile_s=info["compile_s"],
               run_s=info["run_s"], psnr_per_seed=[round(float(v), 3) for v in p],
               ssim_per_seed=[round(float(v), 4) for v in s])
    result["rows"].append(row)
    videos[method] = out[0]
    done[method] = row
    recall = " ".join(f"{k} {v:.3f}" for k, v in row["mask_recall"].items())
    log(f"{method:52s} sparsity {row['sparsity']:6.1%} (post-W {row['sparsity_post_warmup']:6.1%})"
        f"  PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.4f}  recall [{recall}]"
        f"  ({info['compile_s']:.0f}+{info['run_s']:.0f} s)")
    if on_update:
      on_update(result, videos)
    return row

  n = -(-layout.seq_len // mod_runs[0].block_size) if mod_runs else 0
  for run in mod_runs:  # one group per MOD run, so a time limit drops whole groups
    row = measure(run.family, run.label, run.config(), run.fields())
    if row is None:
      continue
    row["run"] = dataclasses.asdict(run)
    group = [row]
    if run.quantized:  # compared with its bf16 twin only (quantized_vs_bf16)
      continue
    if baselines:
      for family, method, attention, bfields in baselines_for(run, row["sparsity_post_warmup"]):
        group.append(measure(family, method, attention, bfields))
    if oracles:  # the mass oracle at the density of every method of the group
      for r in group:
        if r is not None:
          measure(*oracle_for(r, n))
  result["comparisons"] = compare(result["rows"], n)
  result["verdicts"] = verdicts(result["rows"], result["comparisons"])
  result["complete"] = not result["skipped"] and not result["errors"]
  result["elapsed_s"] = round(time.perf_counter() - start, 1)
  if on_update:
    on_update(result, videos, final=True)
  return result


MOD_SPARSITY_FLOOR = 0.75   # the must-show regime: >= 75% sparsity after the warm-up
T_WIN, T_NOISE = 2.0, -2.0


def compare(rows: list, n: int) -> list:
  """Paired PSNR comparisons over the same seeds (per-seed differences a - b):
  every MOD run against its matched static window and warm-up reuse, every
  method against the mass oracle at its density, and reference vs ours at
  equal numbers."""
  out = []

  def add(kind, a, b):
    if a is None or b is None or len(a["psnr_per_seed"]) != len(b["psnr_per_seed"]):
      return
    stats = paired(a["psnr_per_seed"], b["psnr_per_seed"])
    out.append(dict(kind=kind, a=a["method"], b=b["method"],
                    a_sparsity_post_warmup=a["sparsity_post_warmup"],
                    b_sparsity_post_warmup=b["sparsity_post_warmup"], **stats))

  def matched(family, label):
    return [r for r in rows if r["family"] == family and
            label in [r.get("matched_to")] + r.get("also_matched_to", [])]

  for r in rows:
    if r["family"].startswith(("mod_", "reference_")):
      for b in matched("static_window", r["method"]) + matched("warmup_reuse", r["method"]):
        add(f"mod_vs_{b['family']}", r, b)
  oracles = {(r["keep_per_row"], r["warmup_steps"], r.get("dense_layers", 0)): r
             for r in rows if r["family"] == "oracle"}
  for r in rows:
    if r["family"] == "oracle":
      continue
    key = (oracle_keep(1.0 - r["sparsity_post_warmup"], n), r["warmup_steps"],
           r.get("dense_layers", 0))
    add("oracle_vs_method", oracles.get(key), r)
  ours = {(r["top_k"], r["warmup_steps"], r["interval"], r["refresh"], r.get("dense_layers", 0)): r
          for r in rows if r["family"].startswith("mod_")}
  for r in rows:
    if r["family"].startswith("reference_"):
      key = (r["top_k"], r["warmup_steps"], r["interval"], r["refresh"], r.get("dense_layers", 0))
      add("ours_vs_reference", ours.get(key), r)
  plain = {r["method"]: r for r in rows if not r["family"].startswith("quantized_")}
  for r in rows:
    if r["family"].startswith("quantized_"):
      add("quantized_vs_bf16", r, plain.get(ModRun(**r["run"]).bf16().label))
  return out


def verdicts(rows: list, comparisons: list) -> dict:
  """The issue's must-show, evaluated on the comparisons:
  mod_beats_baselines: every MOD-DiT run (ours) with sparse refresh at >= 75%
    sparsity counted over every post-warm-up step beats both its static window
    and its warm-up reuse with a paired t >= 2 (and at least one such run exists);
  oracle_upper_bound: no method beats the mass oracle at its density beyond noise
    (every paired t of oracle - method > -2);
  quantized_within (only with quantized runs): every quantized MOD-DiT run's mean
    PSNR is within QUANT_DB of its bf16 twin's, paired over the same seeds."""
  qualifying = [r for r in rows if r["family"] == "mod_sparse_refresh"
                and r["sparsity_post_warmup"] >= MOD_SPARSITY_FLOOR]
  per_run = []
  for r in qualifying:
    mine = [c for c in comparisons if c["a"] == r["method"] and c["kind"].startswith("mod_vs_")]
    kinds = {c["kind"]: c for c in mine}
    ok = all(k in kinds and kinds[k]["t"] >= T_WIN
             for k in ("mod_vs_static_window", "mod_vs_warmup_reuse"))
    per_run.append(dict(method=r["method"], sparsity_post_warmup=r["sparsity_post_warmup"],
                        t_vs_static_window=kinds.get("mod_vs_static_window", {}).get("t"),
                        t_vs_warmup_reuse=kinds.get("mod_vs_warmup_reuse", {}).get("t"),
                        passed=ok))
  oracle = [c for c in comparisons if c["kind"] == "oracle_vs_method"]
  worst = min(oracle, key=lambda c: c["t"]) if oracle else None
  quant = [c for c in comparisons if c["kind"] == "quantized_vs_bf16"]
  extra = {}
  if quant:
    extra["quantized_within"] = dict(
        passed=all(abs(c["mean"]) <= QUANT_DB for c in quant), db=QUANT_DB,
        runs=[dict(method=c["a"], mean=c["mean"], t=c["t"]) for c in quant])
  return dict(**extra,
      mod_beats_baselines=dict(passed=bool(per_run) and all(p["passed"] for p in per_run),
                               runs=per_run, floor=MOD_SPARSITY_FLOOR, t_min=T_WIN),
      oracle_upper_bound=dict(passed=bool(oracle) and all(c["t"] > T_NOISE for c in oracle),
                              compared=len(oracle), t_noise=T_NOISE,
                              worst=None if worst is None else
                              dict(method=worst["b"], oracle=worst["a"], t=worst["t"],
                                   mean=worst["mean"])))


def verdict_lines(result: dict) -> list:
  """The two must-show verdicts as printed lines."""
  v = result.get("verdicts") or {}
  lines = []
  mod = v.get("mod_beats_baselines")
  if mod is not None:
    lines.append("VERDICT MOD-DiT with sparse refresh, counting every post-warm-up step, at >= 75% "
                 "sparsity, beats both static window and warm-up reuse at matched sparsity with a "
                 f"paired t >= 2 over the same seeds: {'PASS' if mod['passed'] else 'FAIL'}")
    if not mod["runs"]:
      lines.append("  (no MOD-DiT sparse-refresh run reached 75% sparsity after the warm-up)")
    for r in mod["runs"]:
      fmt = lambda t: "n/a" if t is None else f"{t:+.2f}"
      lines.append(f"  {r['method']} at {r['sparsity_post_warmup']:.1%}: t vs static window "
                   f"{fmt(r['t_vs_static_window'])}, t vs warm-up reuse "
                   f"{fmt(r['t_vs_warmup_reuse'])} -> {'pass' if r['passed'] else 'fail'}")
  orc = v.get("oracle_upper_bound")
  if orc is not None:
    lines.append("VERDICT the mass oracle not below any other method at the same density beyond "
                 f"noise (paired t > -2): {'PASS' if orc['passed'] else 'FAIL'}")
    if orc["worst"] is not None:
      w = orc["worst"]
      lines.append(f"  {orc['compared']} methods compared; closest: {w['oracle']} - {w['method']} "
                   f"= {w['mean']:+.2f} dB, t {w['t']:+.2f}")
  quant = v.get("quantized_within")
  if quant is not None:
    lines.append(f"VERDICT quantized MOD-DiT within {quant['db']} dB of bf16 MOD-DiT in mean PSNR "
                 f"(same seeds): {'PASS' if quant['passed'] else 'FAIL'}")
    lines += [f"  {r['method']}: {r['mean']:+.3f} dB (t {r['t']:+.2f})" for r in quant["runs"]]
  return lines


# ---------------------------------------------------------------------- outputs

FAMILY_STYLE = {  # family: (legend, marker, color)
    "mod_dense_refresh": ("MOD-DiT (dense refresh)", "o", "C0"),
    "mod_sparse_refresh": ("MOD-DiT (sparse refresh)", "s", "C1"),
    "reference_dense_refresh": ("MODConfig.reference() (authors' code)", "P", "C5"),
    "oracle": ("mass oracle (top mass per row, each step)", "^", "C2"),
    "static_window": ("static window", "v", "C3"),
    "warmup_reuse": ("warm-up reuse", "D", "C4"),
}


def headline(result: dict) -> Optional[dict]:
  """The MOD run shown in the GIF: sparsity after the warm-up closest to 80%
  (the paper's regime), sparse refresh first."""
  rows = [r for r in result["rows"] if r["family"].startswith("mod_")]
  if not rows:
    return None
  return min(rows, key=lambda r: (abs(r["sparsity_post_warmup"] - 0.8), r["refresh"] != "sparse"))


def write_plot(result: dict, path: str) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot (pip install matplotlib)")
    return False
  fig, ax = plt.subplots(figsize=(8.6, 4.4), dpi=120)
  schedules = [(r["warmup_steps"], r["interval"]) for r in result["rows"] if r["family"].startswith("mod_")]
  main = max(set(schedules), key=schedules.count) if schedules else None
  variant = lambda r: main is not None and (r["warmup_steps"] != main[0] or r.get("interval", main[1]) != main[1])
  for family, (legend, marker, color) in FAMILY_STYLE.items():
    rows = [r for r in result["rows"] if r["family"] == family]
    for hollow in (False, True):
      sel = [r for r in rows if variant(r) == hollow]
      if sel:
        ax.plot([100 * r["sparsity_post_warmup"] for r in sel], [r["psnr"] for r in sel], marker=marker,
                color=color, linestyle="none", markersize=6, label=None if hollow else legend,
                markerfacecolor="none" if hollow else color)
  if main is not None and any(variant(r) for r in result["rows"]):
    ax.plot([], [], marker="o", color="gray", markerfacecolor="none", linestyle="none",
            label=f"hollow: schedule other than W{main[0]} T{main[1]}")
  ax.set_xlabel("sparsity over every post-warm-up step (%)")
  ax.set_ylabel("PSNR vs dense (dB)")
  ax.set_title(f"{result['model']} model, {result['steps']} steps, {len(result['pairs'])} videos"
               f" ({result['card']})", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return True


def _caption(frame: np.ndarray, text: str) -> np.ndarray:
  """A black strip with `text` above frame [H, W, 3] (PIL's default font if available)."""
  strip = np.zeros((14, frame.shape[1], 3), np.uint8)
  try:
    from PIL import Image, ImageDraw
    img = Image.fromarray(strip)
    ImageDraw.Draw(img).text((3, 1), text, fill=(255, 255, 255))
    strip = np.asarray(img)
  except Exception:  # no PIL or no default font: an uncaptioned strip
    pass
  return np.concatenate([strip, frame], axis=0)


def side_by_side(videos: list, captions: list, scale: int = 4, pixel_space: bool = True) -> np.ndarray:
  """uint8 [F, H', W', 3]: videos [C, F, H, W] next to each other, upscaled, captioned."""
  from modjax import video as video_lib
  value_range = (-1.0, 1.0)
  panels = []
  for v, cap in zip(videos, captions):
    frames = video_lib.to_frames(v, value_range=value_range) if pixel_space else video_lib.to_frames(v)
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    panels.append(np.stack([_caption(f, cap) for f in frames]))
  gap = np.full(panels[0].shape[:2] + (4, 3), 255, np.uint8)
  out = [panels[0]]
  for p in panels[1:]:
    out += [gap, p]
  return np.concatenate(out, axis=2)


def write_gif(result: dict, videos: dict, path: str, pixel_space: bool = True, fps: int = 8) -> Optional[str]:
  row = headline(result)
  if row is None or row["method"] not in videos:
    return None
  import imageio.v2 as imageio
  frames = side_by_side([videos["dense"][0], videos[row["method"]]],
                        ["dense", f"MOD-DiT {row['sparsity_post_warmup']:.0%} sparse"],
                        pixel_space=pixel_space)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  imageio.mimwrite(path, list(frames), duration=1000.0 / fps, loop=0)
  return path


def table(result: dict) -> str:
  lines = [f"{'method':58s} {'sparsity':>8s} {'post-W':>7s} {'PSNR':>6s} {'SSIM':>6s} "
           f"{'recall sp/ref':>14s} {'seeds':>5s}"]
  for r in result["rows"]:
    rec = r["mask_recall"]
    rec_s = "/".join(f"{rec[k]:.3f}" if k in rec else "-" for k in ("sparse", "refresh"))
    lines.append(f"{r['method']:58s} {r['sparsity']:8.1%} {r['sparsity_post_warmup']:7.1%} "
                 f"{r['psnr']:6.2f} {r['ssim']:6.3f} "
                 f"{rec_s:>14s} {r['seeds']:5d}")
  return "\n".join(lines)


def comparison_table(result: dict) -> str:
  """Paired PSNR differences a - b over the same seeds."""
  lines = [f"{'comparison':22s} {'a':58s} {'b':58s} {'mean dB':>8s} {'t':>7s} {'n':>3s}"]
  for c in result["comparisons"]:
    lines.append(f"{c['kind']:22s} {c['a']:58s} {c['b']:58s} {c['mean']:+8.2f} {c['t']:+7.2f} "
                 f"{c['n']:3d}")
  return "\n".join(lines)


def card_slug(card: str) -> str:
  return "-".join(card.lower().replace("_", " ").split())


# ---------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="demo")
  p.add_argument("--seeds", "--pairs", dest="pairs", type=int, default=None,
                 help="(seed, label) pairs: seed i, label i %% classes (32)")
  p.add_argument("--batch", type=int, default=16, help="videos per sampler call")
  p.add_argument("--steps", type=int, default=None, help="denoising steps (model default: 25)")
  p.add_argument("--frames", type=int, default=None)
  p.add_argument("--block-size", type=int, default=None)
  p.add_argument("--top-k", default=None,
                 help="comma-separated top_k fractions of our sparse-refresh runs (0.08,0.05,0.12)")
  p.add_argument("--no-variants", action="store_true",
                 help="skip ours with dense refresh and with layer 0 dense")
  p.add_argument("--runs", type=int, default=None,
                 help="only the first RUNS MOD runs of the sweep (priority order)")
  p.add_argument("--no-baselines", action="store_true", help="MOD runs only (no comparisons)")
  p.add_argument("--no-oracles", action="store_true")
  p.add_argument("--no-recall", action="store_true", help="do not record mask recall (faster)")
  p.add_argument("--quick", action="store_true",
                 help="CPU smoke: 2 pairs, 4 frames, 8 steps, block 64, three MOD runs (ours, "
                      "reference, run_wan.sh); outputs go to a temp folder unless given")
  p.add_argument("--precision", default=None, choices=[x for x in PRECISIONS if x != "bf16"],
                 help="add quantized twins of our sparse-refresh runs: this kernel precision "
                      "on sparse steps (quantized_vs_bf16 compares them, same seeds)")
  p.add_argument("--dense-precision", default=None, choices=[x for x in PRECISIONS if x != "bf16"],
                 help="with --precision: one more twin quantizing the warm-up, map and "
                      "refresh steps too")
  p.add_argument("--max-minutes", type=float, default=None,
                 help="start no new run after this many minutes (results so far are kept)")
  p.add_argument("--out-dir", default=None, help="put the JSON, plot and GIF (default names) here")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality-<card>-<date>.json)")
  p.add_argument("--plot", default=None, help="PNG path (default docs/quality_sparsity_psnr.png)")
  p.add_argument("--gif", default=None, help="GIF path (default docs/demo_dense_vs_mod.gif)")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  t_start = time.perf_counter()
  deadline = None if args.max_minutes is None else t_start + 60.0 * args.max_minutes
  model = pipelines.load_model(args.model)
  d = model.defaults
  quick = args.quick
  steps = args.steps or (8 if quick else d.num_inference_steps)
  frames = args.frames or (4 if quick else d.frames)
  block = args.block_size or (64 if quick else d.block_size)
  n_pairs = args.pairs or (2 if quick else 32)
  classes = _num_classes(model)
  pairs = [(i, i % classes) for i in range(n_pairs)]
  top_ks = [float(k) if float(k) < 1 else int(k) for k in args.top_k.split(",")] if args.top_k else (
      [0.12] if quick else [0.08, 0.05, 0.12])
  setup = Setup(frames=frames, height=d.height, width=d.width, steps=steps,
                guidance_scale=d.guidance_scale, shift=d.shift)
  layout = model.family.attention_layout(frames, d.height, d.width)
  n = -(-layout.seq_len // block)
  mod_runs = default_sweep(steps, block, n, top_ks=top_ks, variants=not (quick or args.no_variants))
  if quick:  # ours, the reference preset, run_wan.sh
    mod_runs = [mod_runs[0], mod_runs[len(top_ks)], mod_runs[len(top_ks) + 2]]
  if args.runs is not None:
    mod_runs = mod_runs[:max(args.runs, 0)]
  if args.dense_precision and not args.precision:
    raise SystemExit("--dense-precision needs --precision (the sparse steps' precision)")
  if args.precision:
    mod_runs = with_quantized(mod_runs, args.precision, args.dense_precision)

  card = card_slug(jax.devices()[0].device_kind)
  date = datetime.date.today().isoformat()
  folder = args.out_dir
  if quick and not folder:  # a smoke run never overwrites the committed results and figures
    import tempfile
    folder = os.path.join(tempfile.gettempdir(), "modjax-quality-quick")
  if folder:
    os.makedirs(folder, exist_ok=True)
  out = args.out or os.path.join(folder or os.path.join(ROOT, "benchmarks", "results"),
                                 f"quality-{card}-{date}{'-quick' if quick else ''}.json")
  plot = args.plot or os.path.join(folder or os.path.join(ROOT, "docs"), "quality_sparsity_psnr.png")
  gif = args.gif or os.path.join(folder or os.path.join(ROOT, "docs"), "demo_dense_vs_mod.gif")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  print(f"{model.name}: {n_pairs} videos {frames}x{d.height}x{d.width}, {steps} steps, block {block} "
        f"(n = {n}), {len(mod_runs)} MOD runs"
        f"{'' if args.no_baselines else ' + matched baselines and mass oracles'} on "
        f"{jax.devices()[0].device_kind} (jax {jax.__version__})", flush=True)
  if not _supports_recall() and not args.no_recall:
    print("note: this modjax has no SamplerSettings.record_recall: mask_recall left empty")

  last_media = [0.0]

  def on_update(result, videos, final=False):
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    with open(out + ".tmp", "w") as f:
      json.dump(result, f, indent=1)
    os.replace(out + ".tmp", out)
    if final or time.perf_counter() - last_media[0] > 30:  # plot and GIF: every 30 s and at the end
      try:
        write_plot(result, plot)
        write_gif(result, videos, gif, pixel_space=model.pixel_space)
      except Exception as e:  # media must never lose the numbers
        print(f"plot/GIF failed: {e!r}")
      last_media[0] = time.perf_counter()

  result = run_quality(model, setup, pairs, mod_runs, batch=args.batch,
                       baselines=not args.no_baselines, oracles=not args.no_oracles,
                       record_recall=not args.no_recall, deadline=deadline,
                       on_update=on_update, log=lambda s: print(s, flush=True))
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {out}")
  print(table(result))
  if result["comparisons"]:
    print(comparison_table(result))
  if result["errors"]:
    print(f"{len(result['errors'])} runs failed: " + "; ".join(e["method"] for e in result["errors"]))
  for line in verdict_lines(result):
    print(line)
  return 0


def _num_classes(model) -> int:
  return model.num_labels or 1


if __name__ == "__main__":
  sys.exit(main())

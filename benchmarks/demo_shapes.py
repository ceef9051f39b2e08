"""Does the demo model draw its labelled shapes, moving as the label says?

For every (label, seed) of a sweep the demo model is sampled with dense attention
and with MOD-DiT (default settings: `modjax.MODConfig()` with the schedule and
top_k the CLI uses), and each video is judged with the data generator's own
knowledge (models/demo/data.py: the shape colours, radius, speed and gravity
ranges, the motion directions):

  * pixels are assigned to the nearest shape colour (within COLOR_TOL, allowing
    the generator's shade range); per frame, the largest 4-connected blob of a
    colour is that colour's object, if it holds most of the colour's pixels and
    its area fits the shape's area range (occlusion allowed);
  * a colour *shows* when its object is there in >= 75% of the frames (a frame
    where it is missing because another shape covers its last position counts:
    the generator's shapes occlude each other) with a median area inside the
    shape's range;
  * its track (blob centres over frames) must move as the label's motion says --
    horizontal: y stays put, x travels; vertical: the converse; diagonal: both
    travel, about equally; gravity: x drifts and y bounces, travelling further
    than x -- and never jump
    further in one frame than the generator can move a shape (plus a slack for
    occlusion moving the visible centre);
  * the video shows its shapes when exactly the label's shapes show (their
    colours, in data version 2; in version 1, where colours were random, as many
    palette colours as the label has shapes) and every track moves right.

The share of (label, seed) samples that show their shapes is reported per
attention mode and per label; the JSON keeps every verdict and its reasons. Each
mode also gets a seam score: the mean pixel change across the rows where one
attention block of a frame ends and the next begins, over the median change
between other adjacent rows (1 = no seam; MOD-DiT's masks can give the blocks of
one frame different temporal context, which shows as a line there).
`--data` judges the generator's own videos instead (a calibration: ~100%).
`--pick-default` writes the first (label, seed) whose CLI sample (batch 1, noise
from split(key(seed))[1], exactly what `python -m modjax sample --seed S --label
L` draws) shows its shapes in both modes into the export's metadata
(default_label, default_seed).

  PYTHONPATH=. python benchmarks/demo_shapes.py                    # 28 labels x 4 seeds (GPU)
  PYTHONPATH=. python benchmarks/demo_shapes.py --quick            # CPU smoke (8 steps)
  PYTHONPATH=. python benchmarks/demo_shapes.py --data --seeds 8   # calibration on data
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from models.demo import checkpoint as demo_checkpoint
from models.demo import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COLOR_TOL = 0.35           # max per-channel distance to a (shaded) shape colour, in [-1, 1]
SHOWN_FRAMES = 0.75        # share of frames an object must be seen in
COHERENT = 0.6             # share of a colour's pixels its largest blob must hold
AREA_LOW, AREA_HIGH = 0.35, 1.6    # per-frame blob area vs the shape's range (occlusion, blur)
MEDIAN_LOW, MEDIAN_HIGH = 0.6, 1.4
TRAVEL = 0.5               # a moving axis covers >= this x its slowest possible path
ABSENT_FRAMES = 0.25       # a colour not in the label may show in at most this share of frames
# Diagonal vs gravity (both move on both axes): a diagonal's y / x path ratio and
# per-frame speed mismatch | |dy| - |dx| | stay near 1 and 0; a gravity arc's do
# not. On the generator's own videos the two overlap a little (see --data).
DIAGONAL_RATIO = (0.6, 1.7)
DIAGONAL_MISMATCH = 1.1
GRAVITY_MISMATCH = 0.45


def shape_area(shape: int, radius):
  """Area of SHAPES[shape] at `radius` (the generator's size convention)."""
  name = data.SHAPES[shape]
  if name == "circle":
    return math.pi * radius ** 2
  if name == "square":
    return (2 * 0.85 * radius) ** 2
  return math.sqrt(3) / 4 * (2 * 1.15 * radius) ** 2     # equilateral, half side 1.15 r


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
  """What the generator (of one data version) can produce at these sizes."""
  frames: int
  height: int
  width: int
  colors: tuple          # K RGB colours in [-1, 1]
  color_shape: tuple     # K: the shape index a colour belongs to, -1 = any (version 1)
  data_version: int

  @classmethod
  def for_version(cls, data_version: int, frames: int, height: int, width: int) -> "ShapeSpec":
    if data_version == 1:
      colors, owner = np.asarray(data.PALETTE), (-1,) * int(data.PALETTE.shape[0])
    elif data_version == 2:
      colors, owner = np.asarray(data.SHAPE_COLORS), tuple(range(data.NUM_SHAPES))
    else:
      raise ValueError(f"data_version must be 1 or 2, got {data_version!r}")
    return cls(frames, height, width, tuple(map(tuple, colors.tolist())), owner, data_version)

  @property
  def size(self) -> float:
    return float(min(self.height, self.width))

  def radius_px(self):
    return self.size * data.RADIUS[0], self.size * data.RADIUS[1]

  def area_range(self, shape: int):
    """(low, high) area of a fully visible shape (pixels), edge pixels half counted."""
    shapes = range(data.NUM_SHAPES) if shape < 0 else [shape]
    r_lo, r_hi = self.radius_px()
    return (min(shape_area(s, max(r_lo - 0.5, 0.5)) for s in shapes),
            max(shape_area(s, r_hi + 0.5) for s in shapes))

  def max_step(self, motion: int):
    """Largest centre displacement per frame (dy, dx) the generator makes."""
    v = self.size * data.SPEED[1]
    dy, dx = (abs(c) * v for c in data.DIRECTIONS[motion])
    if data.MOTIONS[motion] == "gravity":
      r_lo, _ = self.radius_px()
      apex = data.GRAVITY_APEX[1] * (self.height - 2 * r_lo)
      dy = 4.0 * apex / data.GRAVITY_PERIOD[0]      # the speed at the floor
    return dy, dx

  def min_travel(self, motion: int):
    """Smallest path length (dy, dx) over the video on each moving axis (0: fixed)."""
    v = self.size * data.SPEED[0] * (self.frames - 1)
    dy, dx = (abs(c) * v for c in data.DIRECTIONS[motion])
    if data.MOTIONS[motion] == "gravity":
      _, r_hi = self.radius_px()
      dy = data.GRAVITY_APEX[0] * (self.height - 2 * r_hi) * min(
          1.0, (self.frames - 1) / data.GRAVITY_PERIOD[1])
    return dy, dx

  def slack(self) -> float:
    """Centre shifts a partly occluded or blurred object shows without moving."""
    return 0.7 * self.radius_px()[1] + 1.0


def assign_colors(video: np.ndarray, spec: ShapeSpec) -> np.ndarray:
  """int [F, H, W]: the index of the nearest spec colour per pixel, -1 when none is
  within COLOR_TOL (per channel, after fitting the shade)."""
  x = np.moveaxis(np.asarray(video, np.float32), 0, -1)                  # [F, H, W, 3]
  colors = np.asarray(spec.colors, np.float32)                           # [K, 3]
  shade = np.einsum("fhwc,kc->fhwk", x, colors) / np.sum(colors ** 2, -1)
  shade = np.clip(shade, data.SHADE[0] - 0.1, 1.05)
  dist = np.abs(x[..., None, :] - shade[..., None] * colors).max(-1)     # [F, H, W, K]
  best = dist.argmin(-1)
  return np.where(dist.min(-1) < COLOR_TOL, best, -1)


def color_track(assigned: np.ndarray, k: int, spec: ShapeSpec, shape: int):
  """Per frame: (area, centre y, centre x) of colour k's object, or None."""
  lo, hi = spec.area_range(shape)
  out = []
  for frame in assigned:
    mask = frame == k
    total = int(mask.sum())
    if total == 0:
      out.append(None)
      continue
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    big = int(np.argmax(sizes)) + 1
    area = int(sizes[big - 1])
    if area < COHERENT * total or not AREA_LOW * lo <= area <= AREA_HIGH * hi:
      out.append(None)
      continue
    ys, xs = np.nonzero(labels == big)
    out.append((area, float(ys.mean()) + 0.5, float(xs.mean()) + 0.5))
  return out


def occluded_frames(track, assigned: np.ndarray, k: int, spec: ShapeSpec) -> int:
  """Frames where colour k's object is missing but another colour covers most of
  the disc around its last seen centre (it is behind another shape)."""
  r = spec.radius_px()[0]
  yy, xx = np.mgrid[:spec.height, :spec.width] + 0.5
  last, count = None, 0
  for f, t in enumerate(track):
    if t is not None:
      last = t
      continue
    if last is None:
      continue
    disc = (yy - last[1]) ** 2 + (xx - last[2]) ** 2 <= r * r
    other = (assigned[f] >= 0) & (assigned[f] != k)
    count += int(other[disc].mean() >= 0.5)
  return count


def judge_track(track, spec: ShapeSpec, motion: int, shape: int, occluded: int = 0) -> dict:
  """Whether one colour's track shows a shape moving as `motion` says, and why
  (`occluded`: frames where it is missing behind another shape)."""
  seen = [(f, t) for f, t in enumerate(track) if t is not None]
  info = dict(frames_seen=len(seen), frames_occluded=occluded, shows=False, moves=False)
  if len(seen) < 2 or len(seen) + occluded < math.ceil(SHOWN_FRAMES * spec.frames):
    info["reason"] = "not seen in enough frames"
    return info
  areas = np.array([t[0] for _, t in seen], np.float64)
  lo, hi = spec.area_range(shape)
  info["median_area"] = float(np.median(areas))
  if not MEDIAN_LOW * lo <= info["median_area"] <= MEDIAN_HIGH * hi:
    info["reason"] = f"median area {info['median_area']:.0f} outside [{lo:.0f}, {hi:.0f}]"
    return info
  info["shows"] = True
  f = np.array([s for s, _ in seen], np.float64)
  yx = np.array([t[1:] for _, t in seen], np.float64)
  gaps = np.diff(f)
  step = np.abs(np.diff(yx, axis=0)) / gaps[:, None]                    # per frame
  # median | |dy| - |dx| | per frame: ~0 on a diagonal, large on a gravity arc
  info["speed_mismatch"] = float(np.median(np.abs(step[:, 0] - step[:, 1])))
  path = np.abs(np.diff(yx, axis=0)).sum(0)                             # (y, x)
  span = yx.max(0) - yx.min(0)
  info.update(path_y=float(path[0]), path_x=float(path[1]), span_y=float(span[0]),
              span_x=float(span[1]), max_step_y=float(step[:, 0].max(initial=0.0)),
              max_step_x=float(step[:, 1].max(initial=0.0)))
  max_dy, max_dx = spec.max_step(motion)
  slack = spec.slack()
  if info["max_step_y"] > max_dy + slack or info["max_step_x"] > max_dx + slack:
    info["reason"] = "jumps"
    return info
  need_y, need_x = (TRAVEL * v * len(seen) / spec.frames for v in spec.min_travel(motion))
  name = data.MOTIONS[motion]
  ratio = info["path_y"] / max(info["path_x"], 1e-6)
  if name == "horizontal":
    ok = info["span_y"] <= slack and info["path_x"] >= need_x
  elif name == "vertical":
    ok = info["span_x"] <= slack and info["path_y"] >= need_y
  elif name == "diagonal":  # equal speeds on both axes
    ok = (info["path_x"] >= need_x and info["path_y"] >= need_y
          and DIAGONAL_RATIO[0] <= ratio <= DIAGONAL_RATIO[1]
          and info["speed_mismatch"] <= DIAGONAL_MISMATCH)
  else:  # gravity: a sideways drift, and a bounce at least as long whose speed varies
    ok = (info["path_x"] >= need_x and info["span_y"] >= need_y and ratio >= 1.0
          and (ratio >= DIAGONAL_RATIO[1] or info["speed_mismatch"] >= GRAVITY_MISMATCH))
  info["moves"] = bool(ok)
  if not ok:
    info["reason"] = f"does not move {name}"
  return info


def judge(video: np.ndarray, label: int, spec: ShapeSpec) -> dict:
  """{"ok": bool, "colors": per-colour judgements, "reason"} for one video [3, F, H, W]."""
  shape_set, motion = data.decode_label(int(label))
  wanted = [s for s, p in enumerate(np.asarray(data.shapes_present(shape_set)).tolist()) if p]
  assigned = assign_colors(video, spec)
  colors = {}
  for k, owner in enumerate(spec.color_shape):
    track = color_track(assigned, k, spec, owner)
    colors[k] = judge_track(track, spec, motion, owner, occluded_frames(track, assigned, k, spec))
  shown = {k for k, c in colors.items() if c["shows"]}
  moving = {k for k in shown if colors[k]["moves"]}
  if spec.data_version == 2:
    want = set(wanted)
    stray = {k for k, c in colors.items() if k not in want
             and c["frames_seen"] > ABSENT_FRAMES * spec.frames}
    ok = shown == want and moving == want and not stray
    reason = ("" if ok else f"wanted {sorted(want)}, shown {sorted(shown)}, moving "
              f"{sorted(moving)}, stray {sorted(stray)}")
  else:
    ok = len(shown) == len(wanted) and moving == shown
    reason = "" if ok else f"wanted {len(wanted)} shapes, shown {len(shown)}, moving {len(moving)}"
  return dict(ok=bool(ok), reason=reason, label=int(label), shapes=wanted,
              colors={str(k): c for k, c in colors.items() if c["frames_seen"]})


# ---------------------------------------------------------------------- sampling

def default_mod_config(steps: int, block_size: int):
  """The MOD-DiT the CLI runs by default (`--attention mod`): MODConfig() with the
  schedule scaled to `steps` (W = 12/50, T = 10/50) and top_k 0.15 of the lines."""
  import modjax
  return modjax.MODConfig(block_size=block_size, warmup_steps=max(2, round(steps * 12 / 50)),
                          interval=max(1, round(steps * 10 / 50)), top_k=0.15)


class DemoSampler:
  """Samples (label, seed) videos of a demo export with dense or MOD attention."""

  def __init__(self, model, *, frames: int, steps: int, guidance_scale: Optional[float] = None,
               shift: Optional[float] = None):
    import modjax
    self.model, self.frames, self.steps = model, frames, steps
    d = model.defaults
    self.guidance_scale = d.guidance_scale if guidance_scale is None else guidance_scale
    self.shift = d.shift if shift is None else shift
    self.settings = {
        mode: modjax.SamplerSettings(
            frames=frames, height=d.height, width=d.width, num_inference_steps=steps,
            guidance_scale=self.guidance_scale, shift=self.shift,
            attention=modjax.DenseConfig() if mode == "dense" else
            default_mod_config(steps, d.block_size))
        for mode in ("dense", "mod")}
    self._samplers = {m: modjax.Sampler(model.family, s) for m, s in self.settings.items()}

  def batch(self, mode: str, labels: Sequence[int], key) -> np.ndarray:
    """Videos [len(labels), 3, F, H, W]: one sampler call, noise rows from `key`."""
    ctx, neg = zip(*(self.model.make_context(1, jax.random.key(0), int(l)) for l in labels))
    out = self._samplers[mode](self.model.params, jnp.concatenate(ctx), jnp.concatenate(neg), key)
    return np.asarray(jax.block_until_ready(out.latents), np.float32)

  def cli_sample(self, mode: str, label: int, seed: int) -> np.ndarray:
    """[3, F, H, W] exactly as `python -m modjax sample --seed S --label L` draws it."""
    kctx, knoise = jax.random.split(jax.random.key(seed))
    ctx, neg = self.model.make_context(1, kctx, int(label))
    out = self._samplers[mode](self.model.params, ctx, neg, knoise)
    return np.asarray(jax.block_until_ready(out.latents), np.float32)[0]


def block_boundary_rows(height: int, width: int, patch: tuple, block_size: int) -> list:
  """Pixel rows where one attention block of a frame ends and the next begins
  (tokens are frame-major, then row, then column; empty when a block is not a
  whole number of token rows)."""
  _, ph, pw = patch
  per_row = width // pw
  if block_size % per_row:
    return []
  rows = block_size // per_row * ph
  return list(range(rows, height, rows))


def seam_score(videos: np.ndarray, rows: Sequence[int]) -> Optional[float]:
  """Mean |change| across the block-boundary rows over the median |change| between
  other adjacent rows, for videos [N, 3, F, H, W] (None without boundaries)."""
  if not rows:
    return None
  d = np.abs(np.diff(np.asarray(videos, np.float64), axis=-2)).mean(axis=(0, 1, 2, 4))  # [H-1]
  at = [r - 1 for r in rows]
  others = np.delete(d, at)
  return float(d[at].mean() / max(np.median(others), 1e-9))


def sweep(sampler: DemoSampler, spec: ShapeSpec, labels, seeds, modes, *, batch: int,
          noise_seed: int = 0, log=print) -> dict:
  """Judge every (label, seed) in every mode; seed s of label l is row (s, l) of the
  sweep's batches (noise from fold_in(key(noise_seed), chunk), the same per mode)."""
  pairs = [(l, s) for s in seeds for l in labels]
  d = sampler.model.defaults
  rows = block_boundary_rows(d.height, d.width, sampler.model.family.config.patch_size,
                             d.block_size)
  out = {}
  for mode in modes:
    t0 = time.perf_counter()
    verdicts, seams = [], []
    for c, start in enumerate(range(0, len(pairs), batch)):
      chunk = pairs[start:start + batch]
      videos = sampler.batch(mode, [l for l, _ in chunk],
                             jax.random.fold_in(jax.random.key(noise_seed), c))
      seams.append((seam_score(np.clip(videos, -1, 1), rows), len(chunk)))
      for (l, s), v in zip(chunk, videos):
        verdicts.append(dict(seed=s, **judge(v, l, spec)))
    out[mode] = summarize(verdicts, labels)
    out[mode]["seconds"] = round(time.perf_counter() - t0, 1)
    out[mode]["seam_rows"] = rows
    out[mode]["seam"] = (None if not rows else
                         float(sum(v * w for v, w in seams) / sum(w for _, w in seams)))
    seam = "" if out[mode]["seam"] is None else f", seam {out[mode]['seam']:.2f}"
    log(f"{mode:5s}: {out[mode]['share']:.1%} of {len(verdicts)} samples show their shapes"
        f"{seam} ({out[mode]['seconds']:.0f} s)")
  return out


def summarize(verdicts: list, labels) -> dict:
  per_label = {}
  for l in labels:
    mine = [v for v in verdicts if v["label"] == l]
    per_label[str(l)] = dict(name=data.describe_label(l), shows=sum(v["ok"] for v in mine),
                             samples=len(mine))
  share = float(np.mean([v["ok"] for v in verdicts])) if verdicts else 0.0
  return dict(share=share, shows=int(sum(v["ok"] for v in verdicts)), samples=len(verdicts),
              per_label=per_label, verdicts=verdicts)


def pick_default(sampler: DemoSampler, spec: ShapeSpec, result: dict, *, max_seed: int = 8,
                 log=print) -> Optional[dict]:
  """The first (label, seed) whose CLI samples show their shapes in both modes.
  Labels are tried from the best of the sweep (all seeds shown in both modes,
  most shapes first, then gravity/diagonal motions, then label order)."""
  def score(l):
    shows = sum(result[m]["per_label"][str(l)]["shows"] for m in ("dense", "mod"))
    shape_set, motion = data.decode_label(l)
    n_shapes = int(np.asarray(data.shapes_present(shape_set)).sum())
    return (-shows, -n_shapes, -motion, l)
  labels = sorted((int(l) for l in result["dense"]["per_label"]), key=score)
  for l in labels[:6]:
    for seed in range(max_seed):
      ok = all(judge(sampler.cli_sample(m, l, seed), l, spec)["ok"] for m in ("dense", "mod"))
      log(f"default candidate label {l} ({data.describe_label(l)}) seed {seed}: "
          f"{'shows' if ok else 'no'}")
      if ok:
        return dict(default_label=l, default_seed=seed, default_label_name=data.describe_label(l))
  return None


def grid_sweep(model, spec: ShapeSpec, labels, seeds, settings, *, frames: int, steps: int,
               batch: int, log=print) -> list:
  """Dense share for each (guidance_scale, shift) in `settings`, the same labels,
  seeds and noise for every setting (a paired comparison of the sampling knobs)."""
  rows = []
  for guidance_scale, shift in settings:
    sampler = DemoSampler(model, frames=frames, steps=steps, guidance_scale=guidance_scale,
                          shift=shift)
    r = sweep(sampler, spec, labels, seeds, ["dense"], batch=batch,
              log=lambda m: log(f"guidance {guidance_scale:g} shift {shift:g}: {m}"))["dense"]
    rows.append(dict(guidance_scale=guidance_scale, shift=shift, share=r["share"],
                     shows=r["shows"], samples=r["samples"], seconds=r["seconds"],
                     per_label={k: v["shows"] for k, v in r["per_label"].items()}))
  return rows


def best_setting(rows: list, current: tuple) -> tuple:
  """(guidance_scale, shift) of the grid row with the highest share; a tie keeps
  `current` when it is among the best, else the first best row."""
  top = max(r["share"] for r in rows)
  best = [(r["guidance_scale"], r["shift"]) for r in rows if r["share"] == top]
  return tuple(current) if tuple(current) in best else best[0]


def _settings_list(text: str) -> list:
  """'4:2,3:2' -> [(4.0, 2.0), (3.0, 2.0)] (guidance_scale:shift pairs)."""
  out = []
  for item in text.split(","):
    try:
      g, sh = (float(x) for x in item.split(":"))
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"--grid takes guidance_scale:shift pairs separated by commas (e.g. 4:2,3:2), "
          f"got {item!r}") from None
    if g < 1.0 or sh <= 0.0:
      raise argparse.ArgumentTypeError(
          f"--grid: guidance_scale must be >= 1 and shift > 0, got {item!r}")
    out.append((g, sh))
  return out


def data_sweep(spec: ShapeSpec, labels, seeds, seam_rows: Sequence[int] = ()) -> dict:
  """The generator's own videos judged (calibration)."""
  verdicts, videos = [], []
  for s in seeds:
    for l in labels:
      v = np.asarray(data.video_for_label(jax.random.key(10_000 + s), l, spec.frames,
                                          spec.height, spec.width))
      verdicts.append(dict(seed=s, **judge(v, l, spec)))
      videos.append(v)
  out = summarize(verdicts, labels)
  out["seam"] = seam_score(np.stack(videos), seam_rows) if seam_rows else None
  return out


# ---------------------------------------------------------------------- CLI

def _parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="demo", help="demo | path of a demo export (.safetensors)")
  p.add_argument("--labels", default=None, help="comma-separated labels (all 28)")
  p.add_argument("--seeds", type=int, default=None, help="seeds per label (4)")
  p.add_argument("--steps", type=int, default=None, help="denoising steps (the export's default)")
  p.add_argument("--frames", type=int, default=None)
  p.add_argument("--batch", type=int, default=None, help="videos per sampler call (112)")
  p.add_argument("--modes", default="dense,mod")
  p.add_argument("--data", action="store_true", help="judge the generator's videos (calibration)")
  p.add_argument("--data-version", type=int, default=None,
                 help="the rules to judge by (default: the export's data_version metadata, 1 if none)")
  p.add_argument("--guidance-scale", type=float, default=None,
                 help="classifier-free guidance scale (the export's default)")
  p.add_argument("--shift", type=float, default=None,
                 help="flow-matching sigma shift (the export's default)")
  p.add_argument("--grid", type=_settings_list, default=None,
                 help="guidance_scale:shift pairs (e.g. 3:2,4:2,4:4): a dense sweep per pair "
                      "first; the best pair then runs the main sweep (and --pick-default "
                      "writes it as the export's sampling default)")
  p.add_argument("--pick-default", action="store_true",
                 help="write default_label/default_seed into the export's label-table metadata")
  p.add_argument("--pick-seeds", type=int, default=8,
                 help="CLI seeds tried per candidate label for the default (8)")
  p.add_argument("--quick", action="store_true",
                 help="CPU smoke: labels 0 and 25, 1 seed, 8 steps (the fewest with a sparse MOD step)")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/demo-shapes-...)")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  labels = ([int(x) for x in args.labels.split(",")] if args.labels else
            ([0, 25] if args.quick else list(range(data.NUM_CLASSES))))
  seeds = list(range(args.seeds or (1 if args.quick else 4)))
  result = dict(kind="demo_shapes", card=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.date.today().isoformat(), labels=labels, seeds=len(seeds),
                rules=dict(color_tol=COLOR_TOL, shown_frames=SHOWN_FRAMES, coherent=COHERENT,
                           area=[AREA_LOW, AREA_HIGH], median_area=[MEDIAN_LOW, MEDIAN_HIGH],
                           travel=TRAVEL, absent_frames=ABSENT_FRAMES,
                           diagonal_ratio=list(DIAGONAL_RATIO),
                           diagonal_mismatch=DIAGONAL_MISMATCH,
                           gravity_mismatch=GRAVITY_MISMATCH))
  if args.data:
    frames = args.frames or 16
    version = args.data_version or data.DATA_VERSION
    spec = ShapeSpec.for_version(version, frames, 32, 32)
    result.update(model="data", data_version=version, frames=frames,
                  modes={"data": data_sweep(spec, labels, seeds)})
    print(f"data (version {version}): {result['modes']['data']['share']:.1%} of "
          f"{result['modes']['data']['samples']} videos show their shapes")
  else:
    from modjax import pipelines
    model = pipelines.load_model(args.model)
    path = demo_checkpoint.DEMO_CHECKPOINT if args.model == "demo" else args.model
    _, _, meta = demo_checkpoint.load_demo_params(path)
    d = model.defaults
    frames = args.frames or d.frames
    steps = args.steps or (8 if args.quick else d.num_inference_steps)
    version = args.data_version or int(meta.get("data_version", 1))
    spec = ShapeSpec.for_version(version, frames, d.height, d.width)
    batch = args.batch or (2 if args.quick else 112)
    current = (args.guidance_scale if args.guidance_scale is not None else d.guidance_scale,
               args.shift if args.shift is not None else d.shift)
    if args.grid:
      result["grid"] = grid_sweep(model, spec, labels, seeds, args.grid, frames=frames,
                                  steps=steps, batch=batch, log=lambda s: print(s, flush=True))
      current = best_setting(result["grid"], current)
      print(f"best of the grid: guidance {current[0]:g}, shift {current[1]:g}", flush=True)
    sampler = DemoSampler(model, frames=frames, steps=steps, guidance_scale=current[0],
                          shift=current[1])
    result.update(guidance_scale=current[0], shift=current[1])
    print(f"{model.name}: {len(labels)} labels x {len(seeds)} seeds, {frames}x{d.height}x{d.width}, "
          f"{steps} steps, data version {version} rules, on {jax.devices()[0].device_kind}", flush=True)
    rows = block_boundary_rows(d.height, d.width, model.family.config.patch_size, d.block_size)
    calibration = (data_sweep(spec, labels, seeds, rows) if version == data.DATA_VERSION
                   else None)
    if calibration is not None:
      print(f"data (the generator's own videos, same labels and seeds): "
            f"{calibration['share']:.1%} show their shapes", flush=True)
      calibration.pop("verdicts")
    result.update(model=model.name, path=os.path.relpath(path, ROOT) if path.startswith(ROOT) else path,
                  data_version=version, frames=frames, steps=steps, data_calibration=calibration,
                  train_step=meta.get("train_step"), mod=dataclasses.asdict(
                      default_mod_config(steps, d.block_size)),
                  modes=sweep(sampler, spec, labels, seeds, args.modes.split(","), batch=batch,
                              log=lambda s: print(s, flush=True)))
    if args.pick_default and {"dense", "mod"} <= set(result["modes"]):
      picked = pick_default(sampler, spec, result["modes"], max_seed=args.pick_seeds,
                            log=lambda s: print(s, flush=True))
      result["default"] = picked
      if picked is not None:
        if (current[0], current[1]) != (d.guidance_scale, d.shift):
          # the sweep ran (and the default was picked) with these: the export's new defaults
          picked.update(guidance_scale=current[0], shift=current[1])
        demo_checkpoint.update_metadata(path, picked)
        print(f"wrote default label {picked['default_label']} ({picked['default_label_name']}), "
              f"seed {picked['default_seed']} into {os.path.dirname(path)}/{demo_checkpoint.LABELS_FILE}")
      else:
        print("no (label, seed) showed its shapes in both modes: no default written")
  card = "-".join(result["card"].lower().replace("_", " ").split())
  out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                 f"demo-shapes-{card}-{result['date']}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {out}")
  for mode, r in result["modes"].items():
    bad = [f"{v['name']} {v['shows']}/{v['samples']}" for v in r["per_label"].values()
           if v["shows"] < v["samples"]]
    print(f"{mode}: {r['shows']}/{r['samples']} show their shapes ({r['share']:.1%})"
          + (f"; short: {', '.join(bad)}" if bad else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""End-to-end sampling speed of a model family's denoiser: MOD-DiT vs dense, one GPU.

Models (--model): Wan2.1-1.3B / 14B (text through cross-attention; CFG; 512 text tokens),
CogVideoX-1.5-5B (joint [226 text; video] attention, 48 heads of 64; CFG; its DPM
scheduler), HunyuanVideo (joint [video; 256 text] attention in dual- and single-stream
blocks; embedded guidance, no CFG; flow Euler with shift 7). Random bf16 weights (pass
--checkpoint for a diffusers Wan folder), 50 steps. Each mode is compiled once (compile
time reported apart), then run end to end once with a host timestamp after every step,
which gives the total and the per-step time of each step kind from the same run. Writes
an "e2e" JSON.

Random weights make MOD's predicted masks meaningless for quality, so the
"fixed_lines" mode runs a fixed MOD-shaped mask at the target density from
step 0 to isolate system speed. --tiny runs each family's tiny config on CPU.

--run-steps K (< --steps) runs only K steps of each mode (MOD with warm-up 3 and
interval 2, so that every step kind occurs) and projects the --steps run from the
per-kind median step times of that same run and the step kinds of the full
schedule: "projected_total_s". For shapes whose 50 dense steps take longer than a
device call (HunyuanVideo 720p, CogVideoX-1.5 768x1360).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from models import wan
import modjax
from modjax import callbacks, policies, sampler as sampler_lib
from modjax.schedule import StepKind
from pallas_kernels import quantize as pk_quantize

SHAPES = {  # name: (video frames, height, width) -> latent (F, H, W) with a 4x / 8x VAE
    "480p": (81, 480, 832),
    "720p": (69, 768, 1280),
    "720p81": (81, 720, 1280),
    "cogvideox1.5": (81, 768, 1360),
    "hunyuan720p": (129, 720, 1280),
    "tiny": (17, 128, 128),
}


def latent_size(frames, height, width):
  return (frames - 1) // 4 + 1, height // 8, width // 8


@dataclasses.dataclass(frozen=True)
class Model:
  """What e2e needs of a family: the family at a latent size, its params' shapes, the
  context (and negative) pytree, the scheduler, the guidance scale."""
  name: str
  family: Any
  param_shapes: Any
  context: Callable[[jax.Array], Any]      # key -> context pytree (batch 1)
  scheduler: Callable[[int], Any]          # steps -> scheduler
  guidance_scale: float
  latent: Callable[[int, int, int], tuple]


def _normal(key, shape, dtype=jnp.bfloat16):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def build_model(name: str, tiny: bool = False) -> Model:
  if name in ("wan2_1_1_3b", "wan2_1_14b"):
    config = (wan.WanConfig.tiny() if tiny else
              getattr(wan.WanConfig, name)(param_dtype="bfloat16"))
    text = 8 if tiny else 512
    return Model(name, wan.WanFamily(config), wan.param_shapes(config),
                 lambda k: _normal(k, (1, text, config.text_dim)),
                 lambda n: modjax.FlowUniPC(n, flow_shift=5.0), 5.0, latent_size)
  if name == "cogvideox1_5_5b":
    from models import cogvideox
    from models.cogvideox import sampling
    config = (cogvideox.CogVideoXConfig.tiny() if tiny else
              cogvideox.CogVideoXConfig.cogvideox1_5_5b(param_dtype="bfloat16", dtype="bfloat16"))
    text = 8 if tiny else 226
    family = cogvideox.CogVideoXFamily(config, text_len=text)

    def latent(frames, height, width):
      return (sampling.latent_frames(frames, config)[0],
              *sampling.latent_size(height, width, config))
    return Model(name, family, cogvideox.param_shapes(config),
                 lambda k: _normal(k, (1, text, config.text_dim)),
                 lambda n: modjax.schedulers.CogVideoXDPM(n), 6.0, latent)
  if name == "hunyuan_video":
    from models import hunyuan
    config = (hunyuan.HunyuanVideoConfig.tiny() if tiny else
              hunyuan.HunyuanVideoConfig.hunyuan_video(param_dtype="bfloat16"))
    text = 8 if tiny else 256
    family = hunyuan.HunyuanVideoFamily(config, text_len=text)

    def context(k):
      kt, kp = jax.random.split(k)
      return hunyuan.HunyuanVideoContext(
          text=_normal(kt, (1, text, config.text_dim)), pooled=_normal(kp, (1, config.pooled_dim)),
          guidance=jnp.full((1,), 6000.0, jnp.float32))
    return Model(name, family, hunyuan.param_shapes(config), context,
                 lambda n: modjax.schedulers.FlowEulerLinspace(n, shift=7.0), 1.0, latent_size)
  raise SystemExit(f"--model must be one of {MODELS}, got {name!r}")


MODELS = ("wan2_1_1_3b", "wan2_1_14b", "cogvideox1_5_5b", "hunyuan_video")


def random_params(shapes, key):
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype) if len(s.shape) > 1
      else jnp.ones(s.shape, s.dtype) for k, s in zip(keys, leaves)])


def mod_schedule(steps: int) -> dict:
  """MOD warm-up and interval for a `steps`-step run (12 and 10 at 50 steps)."""
  return dict(warmup_steps=max(2, round(12 * steps / 50)), interval=max(1, round(10 * steps / 50)))


def modes(n_blocks: int, target_density: float, steps: int = 50, short: bool = False):
  # Random weights give near-uniform maps: about half of the kept lines land in
  # a row (columns first, then short diagonals), so 2 x density x n lines.
  top_k = max(1, int(round(2 * target_density * n_blocks)))
  mod = dict(top_k=top_k, **(dict(warmup_steps=3, interval=2) if short else mod_schedule(steps)))
  return {
      "dense_cudnn": modjax.DenseConfig(implementation="cudnn"),
      "dense_pallas": modjax.StaticMaskConfig(density=1.0, pattern="lines", warmup_steps=0),
      "mod_refresh_dense": modjax.MODConfig(refresh="dense", **mod),
      "mod_refresh_sparse": modjax.MODConfig(refresh="sparse", **mod),
      "fixed_lines": modjax.StaticMaskConfig(density=target_density, pattern="lines", warmup_steps=0),
  }


def mode_label(row: dict) -> str:
  """The mode, with its precisions when quantized (sparse/dense)."""
  p = (row.get("precision", "bf16"), row.get("dense_precision", "bf16"))
  return row["mode"] + ("" if p == ("bf16", "bf16") else f" {p[0]}/{p[1]}")


def with_precision(attention, precision: str, dense_precision: str):
  """The mode at these kernel precisions (DenseConfig: dense_precision on every step,
  on our kernel; a cuDNN/XLA dense implementation gives way to it)."""
  if isinstance(attention, modjax.DenseConfig):
    return dataclasses.replace(attention, implementation=None, precision=dense_precision)
  fields = dict(precision=precision, dense_precision=dense_precision)
  if dense_precision != "bf16":
    fields["dense_implementation"] = None
  return dataclasses.replace(attention, **fields)


def full_step_kinds(attention, geom: policies.Geometry, steps: int) -> np.ndarray:
  """The step kinds of the full `steps`-step run of this mode (for projections)."""
  return np.asarray(policies.make_policy(attention, geom).step_kinds(steps))


def project(by_kind: dict, kinds: np.ndarray) -> float | None:
  """Seconds of a run with these step kinds at the measured per-kind step times
  (None when a kind of the full run was not measured)."""
  names = [StepKind(k).name.lower() for k in kinds]
  if any(n not in by_kind for n in names):
    return None
  return sum(by_kind[n] for n in names) / 1e3


def run_mode(model: Model, params, context, neg, latent, attention, steps):
  settings = modjax.SamplerSettings(frames=latent[0], height=latent[1], width=latent[2],
                                    num_inference_steps=steps,
                                    guidance_scale=model.guidance_scale,
                                    scheduler=model.scheduler(steps), attention=attention)
  timer = callbacks.StepTimer()
  sampler = modjax.Sampler(model.family, settings, callbacks=(timer,))
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = sampler.lower(params, context, neg, key).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = compiled(params, context, neg, key)
  jax.block_until_ready(out.latents)
  total = time.perf_counter() - t0
  stamps = np.asarray(timer.times)
  per_step = np.diff(np.concatenate([[t0], stamps])) * 1e3
  kinds = np.asarray(out.step_kinds)
  by_kind = {StepKind(k).name.lower(): float(np.median(per_step[kinds == k])) for k in np.unique(kinds)}
  finite = bool(np.isfinite(np.asarray(out.latents)).all())
  return dict(compile_s=compile_s, total_s=total, per_step_ms=float(np.median(per_step)),
              per_step_ms_by_kind=by_kind, sparsity=sampler_lib.sparsity(out), finite=finite)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--shapes", default="480p,720p")
  ap.add_argument("--modes", default="dense_cudnn,mod_refresh_dense,mod_refresh_sparse,fixed_lines,dense_pallas")
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--density", type=float, default=0.2)
  ap.add_argument("--model", default="wan2_1_1_3b", choices=MODELS)
  ap.add_argument("--checkpoint", default=None, help="diffusers Wan transformer folder")
  ap.add_argument("--tiny", action="store_true", help="the family's tiny config (CPU smoke)")
  ap.add_argument("--max-minutes", type=float, default=1e9)
  ap.add_argument("--precisions", default="bf16",
                  help="comma list of kernel precisions to run our modes at, each SPARSE or "
                       "SPARSE/DENSE (the warm-up, map and refresh steps' precision; default "
                       "bf16), e.g. bf16,int8_fp8,int8_fp8/int8_fp8; dense_cudnn runs once, bf16")
  ap.add_argument("--run-steps", type=int, default=None,
                  help="run only this many steps per mode and project the --steps run")
  args = ap.parse_args()
  run_steps = args.run_steps or args.steps
  if not 4 <= run_steps <= args.steps:
    raise SystemExit(f"--run-steps must be in [4, --steps={args.steps}], got {run_steps}")
  short = run_steps < args.steps
  precisions = []
  for item in args.precisions.split(","):
    sparse, _, dense = item.partition("/")
    for p in (sparse, dense or "bf16"):
      if p not in pk_quantize.PRECISIONS:
        raise SystemExit(f"--precisions: {p!r} is not one of {pk_quantize.PRECISIONS}")
    precisions.append((sparse, dense or "bf16"))
  start = time.perf_counter()
  model = build_model(args.model, args.tiny)
  if args.checkpoint:
    if not args.model.startswith("wan"):
      raise SystemExit("--checkpoint loads a diffusers Wan transformer folder")
    config, params = wan.load_diffusers_transformer(args.checkpoint, param_dtype="bfloat16",
                                                    dtype="bfloat16")
    model = dataclasses.replace(model, family=wan.WanFamily(config))
  else:
    params = random_params(model.param_shapes, jax.random.key(0))
  rows = []
  result = dict(kind="e2e", card=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.date.today().isoformat(), model=args.model, rows=rows)
  kc, kn = jax.random.split(jax.random.key(1))
  context, neg = model.context(kc), model.context(kn)
  for shape in args.shapes.split(","):
    frames, height, width = SHAPES["tiny" if args.tiny else shape]
    latent = model.latent(frames, height, width)
    layout = model.family.attention_layout(*latent)
    tokens = layout.seq_len
    block = 64 if args.tiny else 128
    geom = policies.Geometry.from_layout(layout, batch=1, block_size=block)
    video_blocks = geom.num_blocks
    runs = [(name, p) for p in precisions for name in args.modes.split(",")
            if name != "dense_cudnn" or p == precisions[0]]
    for name, (precision, dense_precision) in runs:
      if (time.perf_counter() - start) / 60 > args.max_minutes:
        print(f"time budget reached, skipping {shape}/{name}")
        continue
      attention = modes(video_blocks, args.density, run_steps, short)[name]
      if hasattr(attention, "block_size"):
        attention = dataclasses.replace(attention, block_size=block)
      quantized = (precision, dense_precision) != ("bf16", "bf16")
      if quantized and name == "dense_cudnn":
        precision = dense_precision = "bf16"   # the baseline: cuDNN, bf16
      elif quantized:
        attention = with_precision(attention, precision, dense_precision)
      if args.tiny and name == "dense_cudnn":
        attention = modjax.DenseConfig()  # cuDNN needs a GPU
      try:
        r = run_mode(model, params, context, neg, latent, attention, run_steps)
        if short:
          full = modes(video_blocks, args.density, args.steps)[name]
          if hasattr(full, "block_size"):
            full = dataclasses.replace(full, block_size=block)
          if quantized:
            full = with_precision(full, precision, dense_precision)
          r["projected_total_s"] = project(r["per_step_ms_by_kind"],
                                           full_step_kinds(full, geom, args.steps))
      except Exception as e:  # keep going: one failing mode must not lose the others
        r = dict(error=repr(e)[:400])
      stats = jax.devices()[0].memory_stats() or {}
      rows.append(dict(mode=name, precision=precision, dense_precision=dense_precision,
                       model=args.model, frames=frames, height=height, width=width,
                       tokens=tokens, video_tokens=layout.video_tokens, steps=args.steps,
                       run_steps=run_steps,
                       peak_mem_gb=stats.get("peak_bytes_in_use", 0) / 2**30, **r))
      print(json.dumps(rows[-1]), flush=True)
      with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
  total = "projected_total_s" if short else "total_s"
  base = {r["height"]: r for r in rows if r["mode"] == "dense_cudnn" and r.get(total)}
  print(f"{'mode':20s} {'tokens':>7s} {total:>17s} {'ms/step':>8s} {'sparsity':>8s} {'speedup':>7s}")
  for r in rows:
    if r.get(total):
      b = base.get(r["height"])
      sp = b[total] / r[total] if b else float("nan")
      print(f"{mode_label(r):20s} {r['tokens']:7d} {r[total]:17.1f} {r['per_step_ms']:8.0f} "
            f"{r['sparsity']:8.1%} {sp:7.2f}x")


if __name__ == "__main__":
  main()

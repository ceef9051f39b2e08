"""End-to-end sampling speed at Wan2.1-1.3B shapes: MOD-DiT vs dense, one GPU.

Random bf16 weights by default (pass --checkpoint for a diffusers Wan folder),
a 512-token text context, classifier-free guidance (batch 2), 50 steps. Each
mode is compiled once (compile time reported apart), then run end to end once
with a host timestamp after every step, which gives the 50-step total and the
per-step time of each step kind from the same run. Writes an "e2e" JSON.

Random weights make MOD's predicted masks meaningless for quality, so the
"fixed_lines" mode runs a fixed MOD-shaped mask at the target density from
step 0 to isolate system speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import wan
import modjax
from modjax import callbacks, sampler as sampler_lib
from modjax.schedule import StepKind

SHAPES = {  # name: (video frames, height, width) -> latent (F, H, W) with the Wan VAE (4x temporal, 8x spatial)
    "480p": (81, 480, 832),
    "720p": (69, 768, 1280),
}


def latent_size(frames, height, width):
  return (frames - 1) // 4 + 1, height // 8, width // 8


def modes(n_blocks: int, target_density: float):
  # Random weights give near-uniform maps: about half of the kept lines land in
  # a row (columns first, then short diagonals), so 2 x density x n lines.
  top_k = max(1, int(round(2 * target_density * n_blocks)))
  mod = dict(top_k=top_k, warmup_steps=12, interval=10)
  return {
      "dense_cudnn": modjax.DenseConfig(implementation="cudnn"),
      "dense_pallas": modjax.StaticMaskConfig(density=1.0, pattern="lines", warmup_steps=0),
      "mod_refresh_dense": modjax.MODConfig(refresh="dense", **mod),
      "mod_refresh_sparse": modjax.MODConfig(refresh="sparse", **mod),
      "fixed_lines": modjax.StaticMaskConfig(density=target_density, pattern="lines", warmup_steps=0),
  }


def run_mode(config, params, context, neg, latent, attention, steps):
  settings = modjax.SamplerSettings(frames=latent[0], height=latent[1], width=latent[2],
                                    num_inference_steps=steps, guidance_scale=5.0, shift=5.0,
                                    attention=attention)
  timer = callbacks.StepTimer()
  sampler = modjax.Sampler(wan.WanFamily(config), settings, callbacks=(timer,))
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
  ap.add_argument("--checkpoint", default=None, help="diffusers Wan transformer folder")
  ap.add_argument("--max-minutes", type=float, default=1e9)
  args = ap.parse_args()
  start = time.perf_counter()
  if args.checkpoint:
    config, params = wan.load_diffusers_transformer(args.checkpoint, param_dtype="bfloat16",
                                                      dtype="bfloat16")
  else:
    config = wan.WanConfig.wan2_1_1_3b(param_dtype="bfloat16")
    params = None
  rows = []
  result = dict(kind="e2e", card=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.date.today().isoformat(), model="wan2_1_1_3b", rows=rows)
  kc, kn = jax.random.split(jax.random.key(1))
  context = jax.random.normal(kc, (1, 512, config.text_dim), jnp.bfloat16)
  neg = jax.random.normal(kn, (1, 512, config.text_dim), jnp.bfloat16)
  for shape in args.shapes.split(","):
    frames, height, width = SHAPES[shape]
    latent = latent_size(frames, height, width)
    if params is None:
      params = wan.init_params(config, jax.random.key(0), *latent, 512)
    tokens = config.tokens(*latent)
    n_blocks = -(-tokens // 128)
    for name in args.modes.split(","):
      if (time.perf_counter() - start) / 60 > args.max_minutes:
        print(f"time budget reached, skipping {shape}/{name}")
        continue
      attention = modes(n_blocks, args.density)[name]
      try:
        r = run_mode(config, params, context, neg, latent, attention, args.steps)
      except Exception as e:  # keep going: one failing mode must not lose the others
        r = dict(error=repr(e)[:400])
      stats = jax.devices()[0].memory_stats() or {}
      rows.append(dict(mode=name, frames=frames, height=height, width=width, tokens=tokens,
                       steps=args.steps, peak_mem_gb=stats.get("peak_bytes_in_use", 0) / 2**30, **r))
      print(json.dumps(rows[-1]), flush=True)
      with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
  base = {r["height"]: r for r in rows if r["mode"] == "dense_cudnn" and "total_s" in r}
  print(f"{'mode':20s} {'tokens':>7s} {'total s':>8s} {'ms/step':>8s} {'sparsity':>8s} {'speedup':>7s}")
  for r in rows:
    if "total_s" in r:
      b = base.get(r["height"])
      sp = b["total_s"] / r["total_s"] if b else float("nan")
      print(f"{r['mode']:20s} {r['tokens']:7d} {r['total_s']:8.1f} {r['per_step_ms']:8.0f} "
            f"{r['sparsity']:8.1%} {sp:7.2f}x")


if __name__ == "__main__":
  main()

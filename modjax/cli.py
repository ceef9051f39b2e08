"""`python -m modjax sample ...`: sample a video and write it (a thin CLI).

Argument names follow diffusers (height, width, num_frames, num_inference_steps,
guidance_scale). Compile time and run time are printed separately.
"""

from __future__ import annotations

import argparse
import sys
import time

from modjax import config as cfg_lib
from modjax import video as video_lib


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m modjax")
  sub = p.add_subparsers(dest="command", required=True)
  s = sub.add_parser("sample", help="sample a video with a named model")
  s.add_argument("--model", default="demo", help="demo | tiny | path of a demo export (.safetensors)")
  s.add_argument("--frames", "--num-frames", dest="frames", type=int, default=None)
  s.add_argument("--height", type=int, default=None)
  s.add_argument("--width", type=int, default=None)
  s.add_argument("--steps", "--num-inference-steps", dest="steps", type=int, default=None)
  s.add_argument("--guidance-scale", type=float, default=None)
  s.add_argument("--shift", type=float, default=None)
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--label", type=int, default=None, help="class label (demo model)")
  s.add_argument("--attention", default="dense", choices=("dense", "mod", "static_window", "oracle"))
  s.add_argument("--top-k", type=float, default=None,
                 help="MOD lines kept: an int, or a fraction in (0, 1) of the 3n-1 lines")
  s.add_argument("--warmup-steps", type=int, default=None)
  s.add_argument("--interval", type=int, default=None)
  s.add_argument("--refresh", default="dense", choices=cfg_lib.REFRESH_MODES)
  s.add_argument("--density", type=float, default=0.25, help="budget of the baselines")
  s.add_argument("--block-size", type=int, default=None)
  s.add_argument("--fps", type=int, default=8)
  s.add_argument("--no-progress", action="store_true")
  s.add_argument("--out", default="sample.gif", help="output video, .mp4 or .gif")
  return p


def attention_config(args, defaults, num_steps: int):
  """Build the attention config from CLI flags, scaling the schedule to short runs."""
  block = args.block_size or defaults.block_size
  warmup = args.warmup_steps if args.warmup_steps is not None else max(2, round(num_steps * 12 / 50))
  if args.attention == "dense":
    return cfg_lib.DenseConfig()
  if args.attention == "static_window":
    return cfg_lib.StaticWindowConfig(density=args.density, block_size=block, warmup_steps=warmup)
  if args.attention == "oracle":
    return cfg_lib.OracleConfig(density=args.density, block_size=block, warmup_steps=warmup)
  interval = args.interval if args.interval is not None else max(1, round(num_steps * 10 / 50))
  top_k = 0.15 if args.top_k is None else args.top_k
  top_k = int(top_k) if top_k >= 1 else float(top_k)
  return cfg_lib.MODConfig(block_size=block, warmup_steps=warmup, interval=interval,
                           top_k=top_k, refresh=args.refresh)


def sample_command(args) -> int:
  import jax
  import numpy as np

  from modjax import callbacks, pipelines, sampler as sampler_lib

  video_lib.check_output_path(args.out)
  model = pipelines.load_model(args.model, seed=args.seed)
  d = model.defaults
  steps = args.steps or d.num_inference_steps
  settings = sampler_lib.SamplerSettings(
      frames=args.frames or d.frames, height=args.height or d.height, width=args.width or d.width,
      num_inference_steps=steps,
      guidance_scale=d.guidance_scale if args.guidance_scale is None else args.guidance_scale,
      shift=d.shift if args.shift is None else args.shift,
      attention=attention_config(args, d, steps))
  key = jax.random.key(args.seed)
  kctx, knoise = jax.random.split(key)
  context, neg_context = model.make_context(1, kctx, args.label)
  progress = () if args.no_progress else (callbacks.TqdmProgress(),)
  sampler = sampler_lib.Sampler(model.family, settings, callbacks=progress)

  t0 = time.perf_counter()
  compiled = sampler.lower(model.params, context, neg_context, knoise).compile()
  t1 = time.perf_counter()
  out = compiled(model.params, context, neg_context, knoise)
  latents = np.asarray(jax.block_until_ready(out.latents))
  t2 = time.perf_counter()

  frames = video_lib.to_frames(latents[0])
  path = video_lib.write_video(frames, args.out, fps=args.fps)
  sparsity = sampler_lib.sparsity(out)
  print(f"model={model.name} video={settings.frames}x{settings.height}x{settings.width} "
        f"steps={steps} attention={args.attention} sparsity={sparsity:.1%}")
  print(f"compile {t1 - t0:.1f} s, run {t2 - t1:.1f} s on {jax.devices()[0].platform}")
  print(f"wrote {path}")
  return 0


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    return sample_command(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

"""`python -m modjax sample ...`: sample a video and write it (a thin CLI).

Two sources of a model:
  --checkpoint FOLDER --prompt "..."   a diffusers pipeline folder, by its model_index.json:
                                       Wan2.1 (text encoder, VAE, UniPC) writes a video;
                                       CogVideoX (T5, DDIM/DPM, its VAE) writes a video, or
                                       latents with --out x.npy; HunyuanVideo takes
                                       --prompt-embeds FILE.npz instead of --prompt (its text
                                       encoders are not ported) and writes latents (.npy);
  --model demo | tiny | PATH           the shipped pixel-space demo (label-conditioned),
                                       a random tiny smoke model, or a demo export.
Argument names follow diffusers (height, width, num_frames, num_inference_steps,
guidance_scale); sizes are pixels and frames of the output video. Every
argument is checked before any model is loaded; a bad one prints one `error:`
line and exits 2. Stage times (encode, compile, denoise, decode) are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from modjax import config as cfg_lib
from modjax import video as video_lib

ATTENTION = ("dense", "mod", "static_window", "oracle")
# model_index.json _class_name of a --checkpoint -> the model it holds; the latent ones
# write .npy latents (HunyuanVideo always: no JAX VAE; CogVideoX when its folder has no
# vae/ or --out ends in .npy).
CHECKPOINTS = {"WanPipeline": "Wan2.1", "CogVideoXPipeline": "CogVideoX",
               "HunyuanVideoPipeline": "HunyuanVideo"}
LATENT_CHECKPOINTS = ("CogVideoXPipeline", "HunyuanVideoPipeline")
PROMPT_EMBEDS_KEYS = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
  return value


def _nonnegative_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}") from None
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be an int >= 0, got {value}")
  return value


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
  if not value > 0:
    raise argparse.ArgumentTypeError(f"must be a number > 0, got {value}")
  return value


def _top_k(text: str):
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be an int >= 1 or a fraction in (0, 1), got {text!r}") from None
  if value >= 1 and value == int(value):
    return int(value)
  if 0 < value < 1:
    return value
  raise argparse.ArgumentTypeError(f"must be an int >= 1 or a fraction in (0, 1), got {text!r}")


class _HelpFormatter(argparse.HelpFormatter):
  """Shows "(default: X)" after the help of every argument with a default value
  (arguments whose default depends on the model say so in their own help)."""

  def _get_help_string(self, action):
    help_text = action.help or ""
    if (action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in help_text
        and action.option_strings):
      help_text += " (default: %(default)s)"
    return help_text


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2 (argparse's own usage block is noise here)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
  fmt = _HelpFormatter
  p = _Parser(prog="python -m modjax", formatter_class=fmt)
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
  s = sub.add_parser("sample", help="sample a video and write it", formatter_class=fmt,
                     description=__doc__.split("\n\n")[1] if "\n\n" in __doc__ else None)
  src = s.add_argument_group("model")
  src.add_argument("--checkpoint", default=None, metavar="FOLDER",
                   help="diffusers pipeline folder (model_index.json, transformer/, scheduler/, "
                        "...): Wan2.1 or CogVideoX (needs --prompt), HunyuanVideo (needs "
                        "--prompt-embeds)")
  src.add_argument("--model", default=None,
                   help="without --checkpoint: demo | tiny | path of a demo export (.safetensors); "
                        "default demo")
  src.add_argument("--prompt", default=None, help="text prompt (with --checkpoint)")
  src.add_argument("--prompt-embeds", default=None, metavar="FILE.npz",
                   help="HunyuanVideo: precomputed prompt_embeds, prompt_attention_mask and "
                        "pooled_prompt_embeds (e.g. from diffusers' "
                        "HunyuanVideoPipeline.encode_prompt) in one .npz")
  src.add_argument("--negative-prompt", default=None,
                   help="negative prompt (with --checkpoint; default '' as diffusers)")
  src.add_argument("--label", type=_nonnegative_int, default=None,
                   help="class label of the demo model, 0..27 (default: the export's showcase "
                        "label, else one drawn from the seed; the label drawn is printed)")
  src.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="weights and compute of a --checkpoint (default: bfloat16 on GPU/TPU, "
                        "float32 on CPU)")
  size = s.add_argument_group("video (pixels and frames of the output)")
  size.add_argument("--height", type=_positive_int, default=None,
                    help="pixels (Wan: multiple of 16, default 480; CogVideoX: the transformer's "
                         "sample size; HunyuanVideo: 720; demo: 32)")
  size.add_argument("--width", type=_positive_int, default=None,
                    help="pixels (Wan: multiple of 16, default 832; CogVideoX: the transformer's "
                         "sample size; HunyuanVideo: 1280; demo: 32)")
  size.add_argument("--num-frames", "--frames", dest="num_frames", type=_positive_int, default=None,
                    help="frames (Wan: 4k+1, default 81; CogVideoX: the transformer's sample "
                         "frames; HunyuanVideo: 129; demo: 16)")
  size.add_argument("--fps", type=_positive_int, default=None,
                    help="frames per second of the written file (default 16 Wan, 8 CogVideoX "
                         "and demo)")
  size.add_argument("--out", default=None,
                    help="output file: a video .mp4 or .gif (default: sample.gif), or .npy "
                         "latents (CogVideoX); HunyuanVideo and a CogVideoX folder without vae/ "
                         "write latents to .npy (default sample.npy)")
  smp = s.add_argument_group("sampling")
  smp.add_argument("--steps", "--num-inference-steps", dest="steps", type=_positive_int,
                   default=None, help="denoising steps (default 50 Wan, 25 demo); 50 CogVideoX "
                                      "and HunyuanVideo")
  smp.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale, >= 1 (default 5.0 Wan, 4.0 demo, 6.0 "
                        "CogVideoX); HunyuanVideo: the embedded guidance (default 6.0)")
  smp.add_argument("--flow-shift", "--shift", dest="flow_shift", type=_positive_float, default=None,
                   help="flow-matching shift (Wan default: 3.0 at 480p, 5.0 at 720p; demo 2.0; "
                        "HunyuanVideo: its scheduler config's)")
  smp.add_argument("--seed", type=_nonnegative_int, default=None,
                   help="noise seed (default 0; demo without --label: the export's showcase seed)")
  att = s.add_argument_group("attention")
  att.add_argument("--attention", default="dense", choices=ATTENTION,
                   help="dense, MOD-DiT, or a baseline")
  att.add_argument("--top-k", type=_top_k, default=None,
                   help="MOD lines kept per head: an int, or a fraction in (0, 1) of the 3n-1 "
                        "lines (default 350 Wan, 0.15 demo, 0.45 CogVideoX and HunyuanVideo)")
  att.add_argument("--warmup-steps", type=_nonnegative_int, default=None,
                   help="dense warm-up steps (default 12/50 of --steps, at least 2)")
  att.add_argument("--interval", type=_positive_int, default=None,
                   help="steps between MOD refreshes (default 10/50 of --steps, at least 2)")
  att.add_argument("--refresh", default="dense", choices=cfg_lib.REFRESH_MODES,
                   help="how MOD refresh steps measure the map")
  att.add_argument("--density", type=_positive_float, default=0.25,
                   help="share of blocks kept by the oracle and static-window baselines, in (0, 1]")
  att.add_argument("--block-size", type=_positive_int, default=None,
                   help="attention block size in tokens, 64 or 128 (default 128)")
  par = s.add_argument_group("devices")
  par.add_argument("--devices", type=_positive_int, default=None,
                   help="devices to run the denoising loop on (sequence parallel: Ulysses over "
                        "the heads; the degree must divide the head count); default 1")
  par.add_argument("--cfg-parallel", action="store_true",
                   help="put the conditional and unconditional passes of guidance on different "
                        "devices (needs an even --devices and --guidance-scale > 1)")
  par.add_argument("--shard-weights", action="store_true",
                   help="split the big weights over the devices (FSDP), for models that do not "
                        "fit on one device")
  s.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def mesh_from_args(args):
  """The `modjax.sharding.Parallel` of --devices / --cfg-parallel / --shard-weights."""
  from modjax import sharding  # pylint: disable=import-outside-toplevel
  cfg = 2 if args.cfg_parallel else 1
  mesh = sharding.make_mesh(args.devices or 1, cfg=cfg)
  return sharding.Parallel(mesh, shard_weights=args.shard_weights)


def attention_config(args, num_steps: int, block_size: int, default_top_k):
  """The attention config of the flags, the MOD schedule scaled to short runs."""
  block = args.block_size or block_size
  warmup = (args.warmup_steps if args.warmup_steps is not None
            else max(2, round(num_steps * 12 / 50)))
  if args.attention == "dense":
    return cfg_lib.DenseConfig()
  if args.attention == "static_window":
    return cfg_lib.StaticWindowConfig(density=args.density, block_size=block, warmup_steps=warmup)
  if args.attention == "oracle":
    return cfg_lib.OracleConfig(density=args.density, block_size=block, warmup_steps=warmup)
  # at least 2: with interval 1 every step after the warm-up is a refresh, none sparse
  interval = args.interval if args.interval is not None else max(2, round(num_steps * 10 / 50))
  top_k = default_top_k if args.top_k is None else args.top_k
  return cfg_lib.MODConfig(block_size=block, warmup_steps=warmup, interval=interval,
                           top_k=top_k, refresh=args.refresh)


def checkpoint_class(folder: str) -> str:
  """The `_class_name` of folder/model_index.json, one of CHECKPOINTS; "WanPipeline" when
  there is no such file (the Wan loader then says what the folder lacks)."""
  index = os.path.join(folder, "model_index.json")
  if not os.path.isfile(index):
    return "WanPipeline"
  try:
    with open(index) as f:
      name = json.load(f).get("_class_name")
  except (OSError, ValueError, AttributeError) as e:
    raise ValueError(f"--checkpoint: cannot read {index!r}: {e}") from None
  if name not in CHECKPOINTS:
    raise ValueError(f"--checkpoint: {index!r} holds a {name!r}; supported: "
                     f"{', '.join(CHECKPOINTS)}")
  return name


def _check_prompt_embeds(path: str) -> None:
  if not path.endswith(".npz"):
    raise ValueError(f"--prompt-embeds must be a .npz file, got {path!r}")
  if not os.path.isfile(path):
    raise ValueError(f"--prompt-embeds file does not exist: {path!r}")


def load_prompt_embeds(path: str) -> dict:
  """The three arrays of a --prompt-embeds .npz, by name."""
  import numpy as np
  with np.load(path) as data:
    missing = [k for k in PROMPT_EMBEDS_KEYS if k not in data.files]
    if missing:
      raise ValueError(f"--prompt-embeds {path!r} lacks the arrays {missing} (has "
                       f"{data.files}); it needs {', '.join(PROMPT_EMBEDS_KEYS)}")
    return {k: data[k] for k in PROMPT_EMBEDS_KEYS}


def _check_checkpoint_args(args, kind: str) -> None:
  name = CHECKPOINTS[kind]
  if args.model is not None:
    raise ValueError("--model and --checkpoint are exclusive: --checkpoint takes a diffusers "
                     "pipeline folder (Wan2.1, CogVideoX, HunyuanVideo), --model the demo or "
                     "tiny model")
  if kind == "HunyuanVideoPipeline":
    for flag, value in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
      if value is not None:
        raise ValueError(f"{flag}: HunyuanVideo's text encoders are not ported to modjax; pass "
                         f"--prompt-embeds FILE.npz ({', '.join(PROMPT_EMBEDS_KEYS)})")
    if args.prompt_embeds is None:
      raise ValueError(f"a HunyuanVideo --checkpoint needs --prompt-embeds FILE.npz "
                       f"({', '.join(PROMPT_EMBEDS_KEYS)}, e.g. from diffusers' "
                       f"HunyuanVideoPipeline.encode_prompt)")
    _check_prompt_embeds(args.prompt_embeds)
    if args.cfg_parallel:
      raise ValueError("--cfg-parallel needs classifier-free guidance; HunyuanVideo's guidance "
                       "is embedded (one pass per step)")
  else:
    if args.prompt_embeds is not None:
      raise ValueError(f"--prompt-embeds applies to HunyuanVideo checkpoints; a {name} "
                       f"checkpoint takes --prompt")
    if args.prompt is None:
      raise ValueError("--checkpoint needs --prompt")
  if args.label is not None:
    raise ValueError(f"--label applies to the demo model only; a {name} checkpoint takes "
                     f"{'--prompt-embeds' if kind == 'HunyuanVideoPipeline' else '--prompt'}")
  if args.out.endswith(".npy") and args.fps is not None:
    raise ValueError(f"--fps: --out {args.out!r} writes latents (.npy), not a video")
  if kind == "CogVideoXPipeline" and args.flow_shift is not None:
    raise ValueError("--flow-shift does not apply to CogVideoX (its DDIM / DPM scheduler has "
                     "no shift)")


def _decodes_video(args) -> bool:
  """A CogVideoX folder with vae/ decodes frames (HunyuanVideo: no JAX VAE)."""
  return (args.pipeline == "CogVideoXPipeline"
          and os.path.isdir(os.path.join(args.checkpoint, "vae")))


def _check_args(args) -> None:
  """What argparse cannot see: combinations, checked before any model loads. Sets
  args.pipeline (the checkpoint's class, or None) and args.out when not given."""
  args.pipeline = None if args.checkpoint is None else checkpoint_class(args.checkpoint)
  if args.pipeline in LATENT_CHECKPOINTS and not _decodes_video(args):
    name = CHECKPOINTS[args.pipeline]
    why = (" (modjax has no HunyuanVideo VAE: it writes the latents)"
           if args.pipeline == "HunyuanVideoPipeline" else
           f" (the {name} folder has no vae/: it writes the latents)")
    args.out = "sample.npy" if args.out is None else args.out
    video_lib.check_output_path(args.out, (".npy",), why)
  elif args.pipeline in LATENT_CHECKPOINTS:  # CogVideoX with its VAE: a video, or latents
    args.out = "sample.gif" if args.out is None else args.out
    video_lib.check_output_path(args.out, video_lib.VIDEO_SUFFIXES + (".npy",))
  else:
    args.out = "sample.gif" if args.out is None else args.out
    video_lib.check_output_path(args.out)
  if args.density > 1:
    raise ValueError(f"--density must be in (0, 1], got {args.density}")
  if args.guidance_scale is not None and not args.guidance_scale >= 1:
    raise ValueError(f"--guidance-scale must be >= 1 (1 disables guidance), got {args.guidance_scale}")
  if args.cfg_parallel:
    if (args.devices or 1) % 2:
      raise ValueError(f"--cfg-parallel needs an even --devices, got {args.devices or 1}")
    if args.guidance_scale == 1:
      raise ValueError("--cfg-parallel needs classifier-free guidance (--guidance-scale > 1)")
  if args.checkpoint is not None:
    _check_checkpoint_args(args, args.pipeline)
  else:
    for flag, value in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt),
                        ("--prompt-embeds", args.prompt_embeds), ("--dtype", args.dtype)):
      if value is not None:
        raise ValueError(f"{flag} needs --checkpoint (a diffusers pipeline folder)")


def _print_run(kind, out, settings_text, t_compile, t_run, platform, path):
  from modjax import sampler as sampler_lib
  print(f"{settings_text} sparsity={sampler_lib.sparsity(out):.1%} "
        f"(after warm-up {sampler_lib.post_warmup_sparsity(out):.1%})")
  print(f"compile {t_compile:.1f} s, run {t_run:.1f} s on {platform}")
  print(f"wrote {path}")


def _where(args) -> str:
  import jax
  n = args.devices or 1
  return jax.devices()[0].platform + (f" x {n}" + (" (cfg parallel)" if args.cfg_parallel else "")
                                      if n > 1 else "")


def sample_demo(args) -> int:
  """--model demo | tiny | export: label-conditioned pixel-space sampling."""
  import jax
  import numpy as np

  from modjax import callbacks, pipelines, sampler as sampler_lib

  name = args.model or "demo"
  model = pipelines.load_model(name, seed=args.seed or 0)
  d = model.defaults
  if args.label is not None and not model.num_labels:
    raise ValueError(f"--label: model {model.name!r} takes no label (only the demo model does)")
  label, seed = args.label, args.seed
  if model.num_labels and label is None and d.default_label is not None:
    label = d.default_label                  # the export's showcase sample
    if seed is None and d.default_seed is not None:
      seed = d.default_seed
  seed = 0 if seed is None else seed
  steps = args.steps or d.num_inference_steps
  attention = attention_config(args, steps, d.block_size, default_top_k=0.15)
  settings = sampler_lib.SamplerSettings(
      frames=args.num_frames or d.frames, height=args.height or d.height,
      width=args.width or d.width, num_inference_steps=steps,
      guidance_scale=d.guidance_scale if args.guidance_scale is None else args.guidance_scale,
      shift=d.shift if args.flow_shift is None else args.flow_shift, attention=attention)
  key = jax.random.key(seed)
  kctx, knoise = jax.random.split(key)
  if model.num_labels and label is None:
    # the draw make_context would make, done here so that it can be printed
    label = int(jax.random.randint(kctx, (1,), 0, model.num_labels)[0])
  context, neg_context = model.make_context(1, kctx, label)
  if model.num_labels:
    print(f"label {label} ({model.describe_label(label)}), seed {seed}")
  progress = () if args.no_progress else (callbacks.TqdmProgress(),)
  sampler = sampler_lib.Sampler(model.family, settings, callbacks=progress,
                                mesh=mesh_from_args(args))

  t0 = time.perf_counter()
  placed = sampler.place(model.params, context, neg_context, knoise)
  compiled = sampler.lower(*placed).compile()
  t1 = time.perf_counter()
  out = compiled(*placed)
  latents = np.asarray(jax.block_until_ready(out.latents))
  t2 = time.perf_counter()
  frames = video_lib.to_frames(latents[0])
  path = video_lib.write_video(frames, args.out, fps=args.fps or 8)
  _print_run("demo", out, f"model={model.name} video={settings.frames}x{settings.height}x"
             f"{settings.width} steps={steps} attention={args.attention}",
             t1 - t0, t2 - t1, _where(args), path)
  return 0


def sample_wan(args) -> int:
  """--checkpoint FOLDER --prompt: the Wan2.1 pipeline, prompt to video."""
  from modjax import callbacks
  from modjax.pipelines import wan as wan_pipeline

  def log(line):
    print(line, flush=True)

  height = args.height or 480
  width = args.width or 832
  num_frames = args.num_frames or 81
  steps = args.steps or 50
  t0 = time.perf_counter()
  pipe = wan_pipeline.WanPipeline.from_pretrained(args.checkpoint, dtype=args.dtype,
                                                  mesh=mesh_from_args(args))
  log(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f} s")
  attention = attention_config(args, steps, 128, default_top_k=350)
  progress = () if args.no_progress else (callbacks.TqdmProgress(),)
  out = pipe(args.prompt, args.negative_prompt, height=height, width=width,
             num_frames=num_frames, num_inference_steps=steps,
             guidance_scale=5.0 if args.guidance_scale is None else args.guidance_scale,
             attention=attention, seed=args.seed or 0, flow_shift=args.flow_shift,
             callbacks=progress, log=log)
  path = video_lib.write_video(out.frames, args.out, fps=args.fps or 16)
  t = out.timings
  print(f"video={num_frames}x{height}x{width} steps={steps} attention={args.attention} "
        f"sparsity={out.sparsity:.1%} flow_shift={out.flow_shift}")
  print(f"encode {t['text_encode']:.1f} s, compile {t['compile']:.1f} s, denoise "
        f"{t['denoise']:.1f} s, decode {t['vae_decode']:.1f} s on {_where(args)}")
  print(f"wrote {path}")
  return 0


def sample_latents(args) -> int:
  """--checkpoint of a CogVideoX or HunyuanVideo folder: latents to .npy, or (CogVideoX with
  its VAE) the video."""
  import numpy as np

  from modjax import callbacks
  from modjax.pipelines import cogvideox as cogvideox_pipeline
  from modjax.pipelines import hunyuan as hunyuan_pipeline

  def log(line):
    print(line, flush=True)

  steps = args.steps or 50
  cls = (cogvideox_pipeline.CogVideoXPipeline if args.pipeline == "CogVideoXPipeline"
         else hunyuan_pipeline.HunyuanVideoPipeline)
  t0 = time.perf_counter()
  pipe = cls.from_pretrained(args.checkpoint, dtype=args.dtype, mesh=mesh_from_args(args))
  log(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f} s")
  attention = attention_config(args, steps, 128, default_top_k=0.45)
  progress = () if args.no_progress else (callbacks.TqdmProgress(),)
  common = dict(num_inference_steps=steps,
                guidance_scale=6.0 if args.guidance_scale is None else args.guidance_scale,
                attention=attention, seed=args.seed or 0, callbacks=progress, log=log)
  if args.pipeline == "CogVideoXPipeline":
    out = pipe(args.prompt, args.negative_prompt, height=args.height, width=args.width,
               num_frames=args.num_frames, **common)
  else:
    out = pipe(**load_prompt_embeds(args.prompt_embeds), height=args.height or 720,
               width=args.width or 1280, num_frames=args.num_frames or 129,
               flow_shift=args.flow_shift, **common)
  t = out.timings
  if not args.out.endswith(".npy"):  # CogVideoX with its VAE
    path = video_lib.write_video(out.frames, args.out, fps=args.fps or 8)
    print(f"video={'x'.join(map(str, out.frames.shape))} steps={steps} "
          f"attention={args.attention} sparsity={out.sparsity:.1%}")
    print(f"encode {t['text_encode']:.1f} s, compile {t['compile']:.1f} s, denoise "
          f"{t['denoise']:.1f} s, VAE decode {t['vae_decode']:.1f} s on {_where(args)}")
    print(f"wrote {path}")
    return 0
  np.save(args.out, out.latents)
  encode = f"encode {t['text_encode']:.1f} s, " if "text_encode" in t else ""
  print(f"latents={'x'.join(map(str, out.latents.shape))} steps={steps} "
        f"attention={args.attention} sparsity={out.sparsity:.1%}")
  print(f"{encode}compile {t['compile']:.1f} s, denoise {t['denoise']:.1f} s on {_where(args)}")
  print(f"wrote latents to {args.out}" + (f" ({out.note})" if out.note else ""))
  return 0


def main(argv=None) -> int:
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  try:
    _check_args(args)
    if args.pipeline in LATENT_CHECKPOINTS:
      return sample_latents(args)
    return sample_wan(args) if args.checkpoint else sample_demo(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

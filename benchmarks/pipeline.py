"""The Wan2.1 pipeline stage by stage on one GPU: text encoding, denoising (dense and
MOD-DiT) and VAE decode, with peak memory, and our VAE decode beside diffusers' torch
decode of the same weights and latents.

Random weights at the real sizes (Wan2.1-T2V-1.3B transformer, UMT5-XXL encoder, the
Wan2.1 VAE), bfloat16 transformer and encoder, float32 VAE, 50 UniPC steps with CFG
at diffusers' recommended flow_shift; a made-up tokenizer (the ids, not the words,
matter for timing). Each shape runs the WanPipeline end to end once per attention
mode; the first call's stage times include compiles (text encoder, VAE), so the
stages are also timed again on their own. Writes a "pipeline" JSON
(docs/benchmarks.md), one row per (stage, impl, shape, mode).

  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python benchmarks/pipeline.py \\
      --out benchmarks/results/pipeline-<card>-<date>.json --shapes 480p,720p
  PYTHONPATH=. python benchmarks/pipeline.py --tiny --out /tmp/p.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import modjax
from models import text as text_lib
from models import wan
from models.wan import vae as vae_lib
from modjax.pipelines import wan as wan_pipeline

SHAPES = {"480p": (81, 480, 832), "720p": (81, 720, 1280), "tiny": (5, 32, 48)}
PROMPT = "a corgi surfing a wave at sunset, cinematic, slow motion"


def _random_tree(shapes, key, scale=0.02):
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(key, len(leaves))
  out = [(scale * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype)
         if len(s.shape) > 1 else jnp.ones(s.shape, s.dtype) for k, s in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


def _tokenizer(folder: Path, vocab_size: int):
  """A word-level tokenizer.json with T5's special tokens (pad 0, </s> 1, <unk> 2)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  words = sorted(set(PROMPT.replace(",", " ").split() + ["blurry", "low", "quality"]))
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(words)}}
  assert len(vocab) <= vocab_size
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  return text_lib.Tokenizer.from_folder(folder)


def _analysis_gb(compiled) -> dict:
  """XLA's own memory analysis of a compiled stage (GiB): what that stage needs alone."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return {}
  if m is None:
    return {}
  parts = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
               temp=m.temp_size_in_bytes, alias=getattr(m, "alias_size_in_bytes", 0))
  total = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
  return {"xla_total_gb": total / 2**30, **{f"xla_{k}_gb": v / 2**30 for k, v in parts.items()}}


def _peak_gb():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 2**30, stats.get("bytes_in_use", 0) / 2**30


def build(tiny: bool, workdir: Path, with_diffusers_vae: bool):
  """(WanPipeline with random weights, the torch VAE with the same weights or None)."""
  key = jax.random.key(0)
  kt, ke = jax.random.split(key)
  if tiny:
    tcfg = wan.WanConfig.tiny(text_dim=32)
    ecfg = text_lib.T5EncoderConfig.tiny(d_model=32)
  else:
    tcfg = wan.WanConfig.wan2_1_1_3b(param_dtype="bfloat16")
    ecfg = text_lib.T5EncoderConfig.umt5_xxl()
  tparams = _random_tree(wan.param_shapes(tcfg), kt)
  eparams = _random_tree(text_lib.param_shapes(ecfg), ke, scale=0.05)
  vcfg_kwargs = dict(base_dim=8, z_dim=tcfg.in_channels, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                     latents_mean=[0.0] * tcfg.in_channels, latents_std=[1.0] * tcfg.in_channels
                     ) if tiny else None
  torch_vae = None
  if with_diffusers_vae:
    import torch
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    torch_vae = (AutoencoderKLWan(**vcfg_kwargs) if tiny else AutoencoderKLWan()).eval()
    torch_vae.save_pretrained(str(workdir / "vae"))
    vcfg, vparams = wan.load_diffusers_vae(workdir / "vae")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_vae = torch_vae.to(device)
  else:
    vcfg = vae_lib.WanVAEConfig.tiny() if tiny else vae_lib.WanVAEConfig.wan2_1()
    vparams = vae_lib.init_params(vcfg, jax.random.key(2))
  sched = modjax.schedulers.FlowUniPC(1, flow_shift=3.0)
  scheduler_config = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                      "use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": sched.solver_order}
  pipe = wan_pipeline.WanPipeline(
      transformer_config=tcfg, transformer_params=tparams, text_config=ecfg, text_params=eparams,
      tokenizer=_tokenizer(workdir / "tokenizer", ecfg.vocab_size), vae_config=vcfg,
      vae_params=vparams, scheduler_config=scheduler_config, name="wan2_1_1_3b-random")
  return pipe, torch_vae


def mod_config(tokens: int, steps: int, density: float = 0.2) -> modjax.MODConfig:
  """The reference schedule (12/50 warm-up, interval 10/50) scaled to `steps`, sparse
  refresh. Random weights give near-uniform maps: ~2 x density x n lines land ~density
  of the blocks."""
  n = -(-tokens // 128)
  return modjax.MODConfig(top_k=max(1, int(round(2 * density * n))),
                          warmup_steps=max(2, round(steps * 12 / 50)),
                          interval=max(1, round(steps * 10 / 50)), refresh="sparse")


def time_torch_decode(torch_vae, z: np.ndarray):
  import torch
  device = next(torch_vae.parameters()).device
  zt = torch.from_numpy(np.array(z, np.float32)).to(device)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  with torch.no_grad():
    torch_vae.decode(zt[:, :, :2]).sample  # warm-up (kernels, allocator)
    if device.type == "cuda":
      torch.cuda.synchronize()
      torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    video = torch_vae.decode(zt).sample
    if device.type == "cuda":
      torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
  peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
  return video.float().cpu().numpy(), seconds, peak


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--shapes", default="480p,720p")
  ap.add_argument("--modes", default="dense,mod")
  ap.add_argument("--vae-shapes", default="",
                  help="shapes whose VAE decode alone is timed (ours and diffusers') on random latents")
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke)")
  ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers' torch VAE")
  ap.add_argument("--max-minutes", type=float, default=1e9)
  args = ap.parse_args()
  start = time.perf_counter()
  workdir = Path(tempfile.mkdtemp())
  with_diffusers = not args.no_diffusers
  if with_diffusers:
    try:
      import diffusers  # noqa: F401
    except ImportError:
      print("diffusers not importable: skipping its VAE decode")
      with_diffusers = False
  pipe, torch_vae = build(args.tiny, workdir, with_diffusers)
  rows = []
  result = dict(kind="pipeline", card=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.date.today().isoformat(),
                model="wan2_1_1_3b (random weights)" if not args.tiny else "tiny", rows=rows,
                note="bf16 transformer and UMT5-XXL encoder, f32 VAE; CFG; UniPC; stage times "
                     "of the end-to-end call include compiles where marked")

  def save(row):
    rows.append(row)
    print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))

  calls = []  # stage times of the first call include the text encoder's and VAE's compiles
  for shape in args.shapes.split(","):
    frames, height, width = SHAPES["tiny" if args.tiny else shape]
    base = dict(frames=frames, height=height, width=width, shape=shape)
    tokens = pipe.family.config.tokens(*pipe.latent_size(height, width, frames))
    for mode in args.modes.split(","):
      if (time.perf_counter() - start) / 60 > args.max_minutes:
        print(f"time budget reached: skipping {shape}/{mode}")
        continue
      attention = modjax.DenseConfig() if mode == "dense" else mod_config(tokens, args.steps)
      estimate = pipe.memory_estimate(height=height, width=width, num_frames=frames,
                                      attention=attention)
      try:
        out = pipe(PROMPT, "blurry, low quality", height=height, width=width, num_frames=frames,
                   num_inference_steps=args.steps, guidance_scale=5.0, attention=attention,
                   seed=0, log=print)
      except Exception as e:  # keep the other rows
        save(dict(stage="pipeline", impl="modjax", mode=mode, error=repr(e)[:400], **base))
        continue
      peak, live = _peak_gb()
      t = out.timings
      first = not calls
      calls.append(mode)
      for stage in ("text_encode", "compile", "denoise", "vae_decode"):
        save(dict(stage=stage, impl="modjax", mode=mode, time_s=t[stage], tokens=tokens,
                  steps=args.steps, sparsity=out.sparsity, peak_mem_gb=peak, live_mem_gb=live,
                  estimate_gb=estimate.total / 2**30, estimate=estimate.describe(),
                  first_call=first, **base))
      finite = bool(np.isfinite(out.latents).all())
      # What each compiled stage needs by itself (the process-wide peak above also holds
      # the random-weight generation and the other stages' buffers).
      sampler_compiled = list(pipe._samplers.values())[-1][0]  # (compiled, sampler)
      save(dict(stage="denoise_memory", impl="modjax", mode=mode,
                estimate_gb=estimate.stages["denoise"] / 2**30,
                **_analysis_gb(sampler_compiled), **base))
      # Stages again on their own, compiled: text encoding and VAE decode.
      t0 = time.perf_counter()
      jax.block_until_ready((pipe.encode_prompt([PROMPT]), pipe.encode_prompt(["blurry"])))
      save(dict(stage="text_encode_warm", impl="modjax", mode=mode,
                time_s=time.perf_counter() - t0, **base))
      z = vae_lib.denormalize_latents(pipe.vae_config, jnp.asarray(out.latents))
      if mode == args.modes.split(",")[0]:
        save(dict(stage="vae_decode_memory", impl="modjax", estimate_gb=estimate.stages[
            "vae_decode"] / 2**30, **_analysis_gb(pipe._decode.lower(pipe.vae_params, z).compile()),
            **base))
      t0 = time.perf_counter()
      ours = np.asarray(jax.block_until_ready(pipe._decode(pipe.vae_params, z)))
      save(dict(stage="vae_decode_warm", impl="modjax", mode=mode, finite=finite,
                time_s=time.perf_counter() - t0, peak_mem_gb=_peak_gb()[0], **base))
      if torch_vae is not None and mode == args.modes.split(",")[0]:
        try:
          theirs, seconds, tpeak = time_torch_decode(torch_vae, np.asarray(z))
          err = float(np.abs(theirs - ours).max())
          save(dict(stage="vae_decode_warm", impl="diffusers", time_s=seconds, peak_mem_gb=tpeak,
                    max_abs_diff_vs_modjax=err, **base))
        except Exception as e:
          save(dict(stage="vae_decode_warm", impl="diffusers", error=repr(e)[:400], **base))
  for shape in filter(None, args.vae_shapes.split(",")):
    if (time.perf_counter() - start) / 60 > args.max_minutes:
      print(f"time budget reached: skipping the VAE decode at {shape}")
      continue
    frames, height, width = SHAPES["tiny" if args.tiny else shape]
    base = dict(frames=frames, height=height, width=width, shape=shape)
    latent = pipe.latent_size(height, width, frames)
    z = jax.random.normal(jax.random.key(5), (1, pipe.vae_config.z_dim, *latent), jnp.float32)
    estimate = vae_lib.decode_memory_bytes(pipe.vae_config, z.shape, pipe.vae_config.dtype)
    try:
      t0 = time.perf_counter()
      jax.block_until_ready(pipe._decode(pipe.vae_params, z))
      first = time.perf_counter() - t0
      t0 = time.perf_counter()
      ours = np.asarray(jax.block_until_ready(pipe._decode(pipe.vae_params, z)))
      save(dict(stage="vae_decode_warm", impl="modjax", time_s=time.perf_counter() - t0,
                first_call_s=first, peak_mem_gb=_peak_gb()[0], estimate_gb=estimate / 2**30,
                finite=bool(np.isfinite(ours).all()), **base))
    except Exception as e:
      save(dict(stage="vae_decode_warm", impl="modjax", error=repr(e)[:400], **base))
      continue
    if torch_vae is not None:
      try:
        theirs, seconds, tpeak = time_torch_decode(torch_vae, np.asarray(z))
        save(dict(stage="vae_decode_warm", impl="diffusers", time_s=seconds, peak_mem_gb=tpeak,
                  max_abs_diff_vs_modjax=float(np.abs(theirs - ours).max()), **base))
      except Exception as e:
        save(dict(stage="vae_decode_warm", impl="diffusers", error=repr(e)[:400], **base))
  print(f"{'stage':18s} {'impl':9s} {'mode':6s} {'shape':6s} {'time s':>8s} {'peak GB':>8s}")
  for r in rows:
    if "time_s" in r:
      print(f"{r['stage']:18s} {r['impl']:9s} {r.get('mode', ''):6s} {r['shape']:6s} "
            f"{r['time_s']:8.2f} {r.get('peak_mem_gb', 0):8.2f}")


if __name__ == "__main__":
  main()

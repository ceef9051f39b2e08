"""Sampler scaling over devices: Wan2.1 1.3B / 14B shapes, dense and MOD, 1..8 devices.

Random weights (bf16), a 512-token text context, classifier-free guidance,
50 steps by default. For every (model, shape, device count) it runs each mesh
layout the heads allow (cfg 1 or 2 x sequence degree dividing the heads; e.g.
1.3B's 12 heads on 8 devices only as cfg=2 x seq=4), compiles once (compile
time apart), runs the whole schedule with a host timestamp after every step
(the total and the median step time of each step kind come from the same run),
and times one layer's Ulysses all-to-alls on their own (q, k, v forward and
the output back, same shapes and shardings as inside the sampler). MOD rows
report the head imbalance (max/mean per-device active blocks, modjax.sharding)
with heads in natural order and in the balanced layout. Writes a "scaling"
JSON (docs/benchmarks.md, /PERF.md).

    python -m benchmarks.scaling --out benchmarks/results/scaling-<card>-<date>.json
    python -m benchmarks.scaling --tiny --out /tmp/scaling-tiny.json   # CPU, 8 virtual devices

--baseline (devices=1 only) also runs the sampler as it was before the mesh
(modjax/sampler.py at BASELINE_REV, read with git) in the same process, alternating
runs, and prints the mesh-of-size-1 overhead.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv:  # before JAX starts its backend
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import modjax  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.e2e import SHAPES, latent_size, modes as e2e_modes  # noqa: E402
from models import wan  # noqa: E402
from modjax import callbacks, sharding  # noqa: E402
from modjax import sampler as sampler_lib  # noqa: E402
from modjax.schedule import StepKind  # noqa: E402

MODELS = {"wan2_1_1_3b": wan.WanConfig.wan2_1_1_3b, "wan2_1_14b": wan.WanConfig.wan2_1_14b}
TEXT_LEN = 512
TINY = dict(config=lambda: wan.WanConfig.tiny(num_heads=4), latent=(5, 18, 18), text_len=8,
            steps=6)


def layouts(devices: int, heads: int, cfg_choice: str):
  """(cfg, seq) mesh shapes of `devices` devices that split these heads."""
  out = []
  for cfg in (1, 2):
    if cfg_choice == "off" and cfg == 2 or cfg_choice == "on" and cfg == 1 and devices > 1:
      continue
    if devices % cfg == 0 and heads % (devices // cfg) == 0:
      out.append((cfg, devices // cfg))
  return out


def attention_modes(n_blocks: int, density: float, tiny: bool):
  if tiny:
    return {"dense": modjax.DenseConfig(implementation="xla"),
            "mod": modjax.MODConfig(block_size=64, warmup_steps=3, interval=2, top_k=4,
                                    implementation="xla")}
  m = e2e_modes(n_blocks, density)
  return {"dense": m["dense_cudnn"], "mod": m["mod_refresh_dense"],
          "fixed_lines": m["fixed_lines"]}


def time_all_to_all(par, rows: int, seq_len: int, heads: int, head_dim: int, dtype, reps: int):
  """ms of one layer's Ulysses all-to-alls: q, k, v in (one call) and the output back."""
  if par.seq == 1:
    return {"qkv_ms": 0.0, "out_ms": 0.0}
  s_pad = par.padded(seq_len)
  tokens = par.sharding(sharding.TOKENS)
  heads_spec = jax.sharding.PartitionSpec(sharding.CFG, None, sharding.SEQ)
  x = jax.device_put(jnp.ones((rows, s_pad, heads, head_dim), dtype), tokens)
  fwd = jax.jit(sharding.shard_map(
      lambda q, k, v: tuple(par.seq_to_heads(t) for t in (q, k, v)), mesh=par.mesh,
      in_specs=(sharding.TOKENS,) * 3, out_specs=(heads_spec,) * 3))
  back = jax.jit(sharding.shard_map(par.heads_to_seq, mesh=par.mesh, in_specs=heads_spec,
                                    out_specs=sharding.TOKENS))
  y = fwd(x, x, x)[0]
  return {"qkv_ms": timing.median_ms(fwd, x, x, x, reps=reps),
          "out_ms": timing.median_ms(back, y, reps=reps)}


def prepare(make_sampler, settings, params, context, neg, *, place):
  """A compiled sampler, its placed arguments, its step timer and compile seconds."""
  timer = callbacks.StepTimer()
  sampler = make_sampler(settings, (timer,))
  args = place(sampler, (params, context, neg, jax.random.key(0)))
  t0 = time.perf_counter()
  compiled = sampler.lower(*args).compile()
  return dict(compiled=compiled, args=args, timer=timer, compile_s=time.perf_counter() - t0)


def execute(prepared):
  """total_s, per_step_ms_by_kind and the output of one whole run."""
  t0 = time.perf_counter()
  out = prepared["compiled"](*prepared["args"])
  jax.block_until_ready(out.latents)
  jax.effects_barrier()
  total = time.perf_counter() - t0
  stamps = np.asarray(prepared["timer"].times)
  per_step = np.diff(np.concatenate([[t0], stamps])) * 1e3
  kinds = np.asarray(out.step_kinds)
  by_kind = ({StepKind(k).name.lower(): float(np.median(per_step[kinds == k]))
              for k in np.unique(kinds)} if len(per_step) == len(kinds) else {})
  return dict(compile_s=prepared["compile_s"], total_s=total, per_step_ms_by_kind=by_kind,
              per_step_ms=float(np.median(per_step)) if len(per_step) else None), out


BASELINE_REV = "9d4f106"  # the last commit whose sampler had no mesh


def _baseline_module(rev: str = BASELINE_REV):
  """modjax/sampler.py as it was at `rev` (read with git, not kept in the tree), imported
  beside today's modules, for side-by-side timing."""
  import subprocess
  import tempfile
  root = Path(__file__).resolve().parent.parent
  try:
    source = subprocess.run(["git", "-C", str(root), "show", f"{rev}:modjax/sampler.py"],
                            check=True, capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise SystemExit(f"--baseline needs the git history of this checkout (revision {rev}): {e}")
  path = Path(tempfile.mkdtemp()) / "sampler_before_mesh.py"
  path.write_text(source)
  spec = importlib.util.spec_from_file_location("modjax_sampler_before_mesh", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--models", default="wan2_1_1_3b,wan2_1_14b")
  ap.add_argument("--shapes", default="480p,720p")
  ap.add_argument("--devices", default="1,2,4,8", help="device counts (those available are run)")
  ap.add_argument("--modes", default="dense,mod")
  ap.add_argument("--cfg-parallel", default="both", choices=("both", "on", "off"),
                  help="mesh layouts: with cfg=2, without, or both where the heads allow")
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--density", type=float, default=0.2, help="MOD target density (random weights)")
  ap.add_argument("--no-balance", action="store_true", help="MOD without head balancing")
  ap.add_argument("--shard-weights", action="store_true", help="FSDP weights")
  ap.add_argument("--baseline", action="store_true",
                  help="devices=1: also time the pre-mesh sampler in this process")
  ap.add_argument("--repeats", type=int, default=1, help="whole runs per mode (median reported)")
  ap.add_argument("--a2a-reps", type=int, default=20)
  ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, 8 virtual devices")
  ap.add_argument("--max-minutes", type=float, default=1e9)
  args = ap.parse_args()
  start = time.perf_counter()
  available = len(jax.devices())
  counts = [d for d in (int(x) for x in args.devices.split(",")) if d <= available]
  rows = []
  result = dict(kind="scaling", card=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.date.today().isoformat(), device_count=available,
                platform=jax.devices()[0].platform, rows=rows)
  baseline = _baseline_module() if args.baseline else None
  models = ["tiny"] if args.tiny else args.models.split(",")
  shapes = ["tiny"] if args.tiny else args.shapes.split(",")
  steps = TINY["steps"] if args.tiny else args.steps
  for model_name in models:
    if args.tiny:
      config, text_len = TINY["config"](), TINY["text_len"]
    else:
      config, text_len = MODELS[model_name](param_dtype="bfloat16"), TEXT_LEN
    params = None
    kc, kn = jax.random.split(jax.random.key(1))
    context = jax.random.normal(kc, (1, text_len, config.text_dim), config.dtype)
    neg = jax.random.normal(kn, (1, text_len, config.text_dim), config.dtype)
    family = wan.WanFamily(config)
    for shape in shapes:
      if args.tiny:
        latent, video = TINY["latent"], None
      else:
        video = SHAPES[shape]
        latent = latent_size(*video)
      if params is None:
        params = wan.init_params(config, jax.random.key(0), *latent, text_len)
      tokens = config.tokens(*latent)
      block = 64 if args.tiny else 128
      n_blocks = -(-tokens // block)
      attentions = attention_modes(n_blocks, args.density, args.tiny)
      for devices in counts:
        for cfg, seq in layouts(devices, config.num_heads, args.cfg_parallel):
          par = sharding.Parallel(sharding.make_mesh(devices, cfg=cfg),
                                  balance_heads=not args.no_balance,
                                  shard_weights=args.shard_weights)
          placed_params = par.place_params(params)
          a2a = time_all_to_all(par, 2, tokens, config.num_heads, config.head_dim, config.dtype,
                                args.a2a_reps)
          for mode in args.modes.split(","):
            if (time.perf_counter() - start) / 60 > args.max_minutes:
              print(f"time budget reached, skipping {model_name}/{shape}/{devices}/{mode}")
              continue
            settings_kw = dict(frames=latent[0], height=latent[1], width=latent[2],
                               num_inference_steps=steps, guidance_scale=5.0, shift=5.0,
                               attention=attentions[mode])
            row = dict(model=model_name, shape=shape, tokens=tokens, devices=devices, cfg=cfg,
                       seq=seq, mode=mode, steps=steps, balance_heads=not args.no_balance,
                       shard_weights=args.shard_weights,
                       all_to_all_ms_per_layer=a2a["qkv_ms"] + a2a["out_ms"],
                       all_to_all_breakdown=a2a)
            if video is not None:
              row.update(frames=video[0], height=video[1], width=video[2])
            try:
              mine = prepare(
                  lambda st, cb: sampler_lib.Sampler(family, st, callbacks=cb, mesh=par),
                  sampler_lib.SamplerSettings(**settings_kw), placed_params, context, neg,
                  place=lambda smp, a: smp.place(*a))
              before = None
              if baseline is not None and devices == 1:
                before = prepare(lambda st, cb: baseline.Sampler(family, st, callbacks=cb),
                                 baseline.SamplerSettings(**settings_kw), params, context, neg,
                                 place=lambda smp, a: a)
              runs = []
              for _ in range(args.repeats):   # alternating, so drift hits both alike
                if before is not None:
                  row.setdefault("baseline_runs", []).append(execute(before)[0])
                r, out = execute(mine)
                runs.append(r)
              best = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]
              row.update(best, sparsity=sampler_lib.sparsity(out),
                         finite=bool(np.isfinite(np.asarray(out.latents)).all()))
              if "baseline_runs" in row:
                base_total = float(np.median([b["total_s"] for b in row["baseline_runs"]]))
                row["baseline_total_s"] = base_total
                row["mesh1_overhead"] = row["total_s"] / base_total - 1.0
              if getattr(out.state, "mask", None) is not None:
                row["imbalance"] = sharding.head_imbalance(out.state.mask, par, out.head_order)
              else:
                row["imbalance"] = None
              stats = jax.devices()[0].memory_stats() or {}
              row["peak_mem_gb"] = stats.get("peak_bytes_in_use", 0) / 2**30
            except Exception as e:  # keep going: one failing row must not lose the others
              row["error"] = repr(e)[:600]
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
              json.dump(result, f, indent=1)
  print(f"{'model':12s} {'shape':6s} {'dev':>3s} {'cfg':>3s} {'seq':>3s} {'mode':12s} "
        f"{'total s':>8s} {'speedup':>7s} {'a2a ms':>7s} {'imbal':>11s}")
  base = {(r["model"], r["shape"], r["mode"]): r["total_s"] for r in rows
          if r["devices"] == 1 and "total_s" in r}
  for r in rows:
    if "total_s" not in r:
      print(f"{r['model']:12s} {r['shape']:6s} {r['devices']:3d} {r['cfg']:3d} {r['seq']:3d} "
            f"{r['mode']:12s} error: {r.get('error', '')[:60]}")
      continue
    b = base.get((r["model"], r["shape"], r["mode"]))
    imb = r["imbalance"]
    imb_text = f"{imb['natural']:.2f}->{imb['balanced']:.2f}" if imb else "-"
    print(f"{r['model']:12s} {r['shape']:6s} {r['devices']:3d} {r['cfg']:3d} {r['seq']:3d} "
          f"{r['mode']:12s} {r['total_s']:8.2f} {b / r['total_s'] if b else float('nan'):7.2f} "
          f"{r['all_to_all_ms_per_layer']:7.2f} {imb_text:>11s}"
          + (f"  mesh1 overhead {r['mesh1_overhead']:+.2%}" if "mesh1_overhead" in r else ""))


if __name__ == "__main__":
  main()

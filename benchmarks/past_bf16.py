"""Issue #17 device probe: quantized block-sparse attention, the Mosaic map pass
and head_dim 64, checked and timed side by side in one process per stage.

Stages (each its own process on the device, so a hang or crash in one leaves
the others; every row is written to JSON as soon as it exists):

  check    every new kernel variant on small fresh random inputs (odd lengths,
           empty rows, outlier keys 50x): quantized attention vs the quantized
           and the float32 references (rel err, cos sim), lse-only, the Mosaic
           map vs the reference counts, D=64 configs (stages, tiles per CTA,
           polynomial exp2);
  time128  D=128, S in {16384, 32760, 69120}, densities {1, 0.25, 0.1}
           (random blocks + diagonal): cuDNN bf16 dense, cuDNN FP8 dense,
           FlexAttention on the same mask, ours per precision (public call,
           quantization included; int8_fp8 also kernel-only), the quantization
           alone, the map pass (Mosaic vs Triton, same lse) and the lse pass;
           accuracy on the first 256 query rows of 2 heads vs float32;
  time64   D=64: 17550 tokens x 30 heads at d=0.2 with a config sweep, and
           16384 / 32760 tokens at d {0.1, 0.25}; cuDNN and Flex alongside.

  PYTHONPATH=. python benchmarks/past_bf16.py --stage check --out $OUT
  PYTHONPATH=. python benchmarks/past_bf16.py --stage time128 --quick --out /tmp/p
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from pallas_kernels import attention_mosaic_gpu as mg  # noqa: E402
from pallas_kernels import map_mosaic_gpu as mm  # noqa: E402
from pallas_kernels import quantize as qz  # noqa: E402
from benchmarks.kernels import random_block_mask, rel_err, time_jax, time_torch  # noqa: E402

START = time.perf_counter()
QUANT = ("int8_fp8", "fp8", "int8_bf16")
REF_ROWS = 256
REF_HEADS = 2


# ----------------------------------------------------------------------------
# Accuracy helpers.

def cos_rows(out, ref) -> float:
  """Mean over (row, head) of the cosine similarity of out and ref vectors."""
  o = np.asarray(out, np.float64).reshape(-1, out.shape[-1])
  r = np.asarray(ref, np.float64).reshape(-1, ref.shape[-1])
  num = (o * r).sum(-1)
  den = np.linalg.norm(o, axis=-1) * np.linalg.norm(r, axis=-1)
  ok = den > 0
  return float(np.mean(num[ok] / den[ok])) if ok.any() else float("nan")


def accuracy(out, ref) -> dict:
  out = np.asarray(out, np.float32)
  finite = bool(np.isfinite(out).all())
  return {"rel_err": rel_err(out, ref) if finite else float("nan"),
          "cos_sim": cos_rows(out, ref) if finite else float("nan"), "finite": finite}


def partial_reference(q, k, v, mask, rows=REF_ROWS, heads=REF_HEADS, block=128):
  """float32 attention of the first `rows` queries of the first `heads` heads."""
  qs = q[:, :rows, :heads].astype(jnp.float32)
  ks = k[:, :, :heads].astype(jnp.float32)
  vs = v[:, :, :heads].astype(jnp.float32)
  s = k.shape[1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", qs, ks, precision="highest") / math.sqrt(q.shape[-1])
  if mask is not None:
    m = jnp.broadcast_to(mask, (q.shape[0], mask.shape[1], *mask.shape[2:]))[:, :heads]
    qb = jnp.arange(rows) // block
    kb = jnp.arange(s) // block
    allowed = m[:, :, qb][:, :, :, kb]
    logits = jnp.where(allowed, logits, -jnp.inf)
  mx = jnp.max(logits, -1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  p = jnp.exp(logits - mx)
  l = p.sum(-1, keepdims=True)
  out = jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(l > 0, l, 1), vs, precision="highest")
  return np.asarray(out)


def make_qkv(seed, b, s, h, d, outliers=0, k_bias=0.5):
  keys = jax.random.split(jax.random.key(seed), 3)
  q, k, v = (jax.random.normal(x, (b, s, h, d), jnp.float32) for x in keys)
  k = k + k_bias
  if outliers:
    idx = np.random.default_rng(seed).choice(s, outliers, replace=False)
    k = k.at[:, jnp.asarray(idx)].multiply(50.0)
  return tuple(x.astype(jnp.bfloat16) for x in (q, k, v))


# ----------------------------------------------------------------------------
# Output.

class Out:

  def __init__(self, path, stage, args):
    self.path = path
    dev = jax.devices()[0]
    self.doc = {"kind": "kernel", "card": getattr(dev, "device_kind", str(dev)),
                "jax": jax.__version__, "date": datetime.date.today().isoformat(),
                "stage": stage, "argv": sys.argv[1:], "rows": []}
    self.t0 = time.perf_counter()
    self.args = args

  def add(self, **row):
    self.doc["rows"].append(row)
    self.doc["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.doc, f, indent=1, default=float)
    os.replace(tmp, self.path)
    keys = ("impl", "precision", "seq_len", "heads", "head_dim", "density", "config", "variant")
    head = " ".join(f"{row[k]}" if not isinstance(row.get(k), float) else f"{row[k]:.3f}"
                    for k in keys if k in row)
    rest = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items() if k not in keys and k != "error")
    print(f"[{time.perf_counter() - self.t0:6.1f}s] {head} {rest}"
          + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)

  def over(self) -> bool:
    return self.args.deadline_s and time.perf_counter() - START > self.args.deadline_s

  def guarded(self, fn, **base):
    if self.over():
      print(f"[deadline] skipped {base}", flush=True)
      return None
    try:
      more = fn()
      if more is not None:
        self.add(**base, **more)
      return more
    except Exception as e:  # pylint: disable=broad-except
      msg = f"{type(e).__name__}: {str(e)[:400]}"
      if self.args.verbose:
        traceback.print_exc()
      self.add(**base, error=msg)
      return None


# ----------------------------------------------------------------------------
# Stage: check.

def stage_check(out: Out, args):
  every = ("bf16",) + QUANT
  cases = [
      # b, s, h, d, density, empty rows, outliers, precisions, lse+map for
      (2, 1000, 3, 128, 0.3, (2,), 0, every, every),
      (1, 4100, 2, 64, 0.4, (0, 32), 0, every, ("bf16", "int8_fp8")),
      (1, 1920, 2, 128, 1.0, (), 3, every, ("bf16", "int8_fp8")),
      (1, 1000, 2, 128, 0.5, (), 3, QUANT, ()),
      (1, 100, 2, 64, 1.0, (), 0, ("bf16", "int8_fp8"), ("bf16", "int8_fp8")),
  ]
  for ci, (b, s, h, d, density, empty, outliers, precs, map_precs) in enumerate(cases):
    n = -(-s // 128)
    q, k, v = make_qkv(100 + ci, b, s, h, d, outliers)
    rng = np.random.default_rng(ci)
    mask = None
    if density < 1.0:
      m = (rng.random((b, h, n, n)) < density) | np.eye(n, dtype=bool)
      for r in empty:
        m[..., r, :] = False
      mask = jnp.asarray(m)
    f32 = np.asarray(pk.block_sparse_attention_reference(q, k, v, mask))
    base = dict(seq_len=s, heads=h, head_dim=d, batch=b, density=density, outliers=outliers,
                empty_rows=list(empty))
    for precision in precs:
      def run(precision=precision):
        o = pk.block_sparse_attention(q, k, v, mask, implementation=args.impl,
                                      precision=precision)
        o = np.asarray(o, np.float32)
        res = accuracy(o, f32)
        if precision != "bf16":
          qref = pk.quantized_attention_reference(q, k, v, mask, precision=precision)
          res["rel_err_vs_quantized_ref"] = rel_err(o, qref)
        for r in empty:
          rows = slice(r * 128, min(s, (r + 1) * 128))
          res["empty_rows_zero"] = bool(not o[:, rows].any())
        if precision not in map_precs:
          return res
        # lse-only kernel vs the reference lse (of the smoothed scores).
        table = None if mask is None else pk.compact_block_mask(mask)
        if args.impl == "mosaic_gpu":
          lse = mg.block_sparse_lse(q, k, table, block_size=128, precision=precision)
        else:      # CPU dry run of this script
          lse = None
        if precision == "bf16":
          _, lref = pk.block_sparse_attention_reference(q, k, k, mask, return_lse=True)
        else:
          _, lref = pk.quantized_attention_reference(q, k, v, mask, precision=precision,
                                                     return_lse=True)
        if lse is not None:
          lse, lref = np.asarray(lse), np.asarray(lref)
          fin = np.isfinite(lref)
          res["lse_inf_pattern_ok"] = bool((np.isfinite(lse) == fin).all())
          res["lse_max_abs"] = float(np.abs(lse[fin] - lref[fin]).max()) if fin.any() else 0.0
        # The map of the same pass vs the reference map of the same scores.
        _, smap = pk.block_sparse_attention_with_map(q, k, v, mask, implementation=args.impl,
                                                     precision=precision, threshold=1e-3)
        sref = pk.quantized_sparsity_map_reference(q, k, precision=precision, block_size=128,
                                                   threshold=1e-3, block_mask=mask)
        smap, sref = np.asarray(smap), np.asarray(sref)
        res["map_nan_ok"] = bool((np.isnan(smap) == np.isnan(sref)).all())
        ok = ~np.isnan(sref)
        diff = np.abs(smap[ok] - sref[ok]) * 128 * 128
        res["map_max_count_diff"] = float(diff.max()) if diff.size else 0.0
        res["map_blocks_differing"] = int((diff > 0.5).sum())
        return res
      out.guarded(run, impl="ours_mosaic_gpu", precision=precision, **base)
    if d == 64:
      for label, cfg in (("stages3", mg.MosaicConfig(stages=3)),
                         ("stages4", mg.MosaicConfig(stages=4)),
                         ("k2", mg.MosaicConfig(tiles_per_cta=2)),
                         ("poly4", mg.MosaicConfig(exp2_poly_groups=4)),
                         ("poly4_stages3", mg.MosaicConfig(stages=3, exp2_poly_groups=4))):
        def run_cfg(cfg=cfg):
          table = None if mask is None else pk.compact_block_mask(mask)
          o, _ = mg.block_sparse_attention_fwd(q, k, v, table, block_size=128, config=cfg)
          return accuracy(o, f32)
        out.guarded(run_cfg, impl="ours_mosaic_gpu", precision="bf16", config=label, **base)
      def run_qpoly():
        table = None if mask is None else pk.compact_block_mask(mask)
        o, _ = mg.block_sparse_attention_fwd(q, k, v, table, block_size=128,
                                             precision="int8_fp8",
                                             config=mg.MosaicConfig(exp2_poly_groups=4))
        return accuracy(o, f32)
      out.guarded(run_qpoly, impl="ours_mosaic_gpu", precision="int8_fp8", config="poly4", **base)
    for label, cfg in (("fp8_stages4", mg.MosaicConfig(stages=4)),):
      def run_q4(cfg=cfg):
        table = None if mask is None else pk.compact_block_mask(mask)
        o, _ = mg.block_sparse_attention_fwd(q, k, v, table, block_size=128,
                                             precision="int8_fp8", config=cfg)
        return accuracy(o, f32)
      out.guarded(run_q4, impl="ours_mosaic_gpu", precision="int8_fp8", config=label, **base)


# ----------------------------------------------------------------------------
# Timing.

class Flex:

  def __init__(self):
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    self.torch = torch
    self.BlockMask = BlockMask
    self.fn = torch.compile(flex_attention, dynamic=False)

  def time(self, q, k, v, table, mask_np, runs, block=128):
    torch = self.torch
    b, s, h, d = q.shape
    n = -(-s // block)
    tq, tk, tv = (torch.from_dlpack(x).permute(0, 2, 1, 3).contiguous() for x in (q, k, v))
    counts = torch.from_dlpack(jnp.broadcast_to(table.counts, (b, h, n))).to(torch.int32).contiguous()
    idx = torch.from_dlpack(jnp.broadcast_to(table.indices, (b, h, n, table.width)))
    idx = idx.to(torch.int32).contiguous()
    dense_mask = torch.from_numpy(np.broadcast_to(mask_np, (b, h, n, n)).copy()).to(tq.device)

    def block_mod(bb, hh, qi, ki):
      return dense_mask[bb, hh, qi // block, ki // block]
    zeros_n, zeros_i = torch.zeros_like(counts), torch.zeros_like(idx)
    try:
      bm = self.BlockMask.from_kv_blocks(zeros_n, zeros_i, counts, idx, BLOCK_SIZE=block,
                                         mask_mod=block_mod, seq_lengths=(s, s))
    except TypeError:
      bm = self.BlockMask.from_kv_blocks(zeros_n, zeros_i, counts, idx, BLOCK_SIZE=block,
                                         mask_mod=block_mod)
    ms, comp, o = time_torch(lambda: self.fn(tq, tk, tv, block_mask=bm, scale=d ** -0.5), runs)
    res = np.asarray(o.permute(0, 2, 1, 3)[:, :REF_ROWS, :REF_HEADS].float().cpu().numpy())
    return ms, comp, res


def _cudnn_fp8(q, k, v):
  from jax._src.cudnn import fused_attention_stablehlo as fa
  names = list(fa.FP8Params.__annotations__)
  params = {name: jnp.ones((1, 1, 1, 1), jnp.float32) for name in names}
  scale = 1.0 / math.sqrt(q.shape[-1])

  @jax.jit
  def f(q, k, v):
    o, _, _ = fa.dot_product_attention(q.astype(qz.FP8), k.astype(qz.FP8), v.astype(qz.FP8),
                                       fp8_params=params, scale=scale, use_fp8=True)
    return o
  return f


def time_shape(out: Out, args, s, h, d, densities, precisions, configs=None, kernel_only=(),
               map_densities=(), do_fp8_cudnn=False, flex=None, triton_lse=False,
               kernel_configs=(("default", None),), quant_cost=True):
  b = 1
  n = -(-s // 128)
  q, k, v = make_qkv(s + h + d, b, s, h, d)
  sets = [(q, k, v)]
  flops = 4.0 * b * h * s * s * d
  base = dict(seq_len=s, heads=h, head_dim=d, batch=b, dtype="bfloat16")
  dense_ref = partial_reference(q, k, v, None)
  cudnn_ms = {}

  def cudnn():
    fn = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"))
    ms, comp, o = time_jax(fn, sets, args.runs)
    cudnn_ms["bf16"] = ms
    return dict(time_ms=ms, compile_s=round(comp, 2), tflops=flops / ms * 1e-9,
                **accuracy(np.asarray(o)[:, :REF_ROWS, :REF_HEADS], dense_ref))
  out.guarded(cudnn, impl="cudnn_dense", precision="bf16", mask="dense", density=1.0, **base)
  if do_fp8_cudnn:
    def cudnn8():
      ms, comp, o = time_jax(_cudnn_fp8(q, k, v), sets, args.runs)
      return dict(time_ms=ms, compile_s=round(comp, 2), tflops=flops / ms * 1e-9,
                  vs_cudnn_bf16=cudnn_ms.get("bf16", float("nan")) / ms,
                  **accuracy(np.asarray(o, np.float32)[:, :REF_ROWS, :REF_HEADS], dense_ref))
    out.guarded(cudnn8, impl="cudnn_fp8_dense", precision="fp8", mask="dense", density=1.0,
                **base)

  for target in densities:
    rng = np.random.default_rng(s * 7 + h + int(target * 100))
    mask_np = random_block_mask(rng, h, n, target)
    density = float(mask_np.mean())
    dense = target >= 1.0
    mask = None if dense else jnp.asarray(mask_np)
    table = pk.compact_block_mask(jnp.asarray(mask_np))
    ref = dense_ref if dense else partial_reference(q, k, v, jnp.asarray(mask_np))
    row = dict(base, mask="dense" if dense else "random", density=density, target_density=target)
    c = cudnn_ms.get("bf16")

    def record(ms, comp, o, **extra):
      res = dict(time_ms=ms, compile_s=round(comp, 2), tflops_effective=flops * density / ms * 1e-9,
                 **accuracy(np.asarray(o, np.float32)[:, :REF_ROWS, :REF_HEADS], ref), **extra)
      if c:
        res["speedup_vs_cudnn"] = c / ms
        res["effective_vs_cudnn"] = c * density / ms
      return res

    for precision in precisions:
      for label, cfg in (configs or [("default", None)]):
        def ours(precision=precision, cfg=cfg):
          if cfg is None:
            fn = functools.partial(pk.block_sparse_attention, block_mask=mask,
                                   implementation="mosaic_gpu", precision=precision)
          else:
            t = None if dense else table
            fn = jax.jit(lambda q, k, v: mg.block_sparse_attention_fwd(
                q, k, v, t, block_size=128, precision=precision, config=cfg)[0])
          ms, comp, o = time_jax(fn, sets, args.runs)
          return record(ms, comp, o)
        out.guarded(ours, impl="ours_mosaic_gpu", precision=precision, config=label,
                    variant="public_call" if cfg is None else "fwd", **row)
    for precision in kernel_only:
      for label, kcfg in kernel_configs:
        def kern(precision=precision, kcfg=kcfg):
          qq = qz.quantize_qkv(q, k, v, precision=precision)
          t = None if dense else table
          fn = jax.jit(lambda qq: mg.quantized_attention_fwd(qq, t, block_size=128,
                                                             sm_scale=d ** -0.5, config=kcfg)[0])
          ms, comp, o = time_jax(fn, [(qq,)], args.runs)
          return record(ms, comp, o)
        out.guarded(kern, impl="ours_mosaic_gpu", precision=precision, variant="kernel_only",
                    config=label, **row)
        if kcfg is not None:
          def public(precision=precision, kcfg=kcfg):
            t = None if dense else table
            fn = jax.jit(lambda q, k, v: mg.quantized_attention_fwd(
                qz.quantize_qkv(q, k, v, precision=precision), t, block_size=128,
                sm_scale=d ** -0.5, config=kcfg)[0])
            ms, comp, o = time_jax(fn, sets, args.runs)
            return record(ms, comp, o)
          out.guarded(public, impl="ours_mosaic_gpu", precision=precision,
                      variant="public_call", config=label, **row)
    if flex is not None:
      def run_flex():
        ms, comp, o = flex.time(q, k, v, table, mask_np, args.runs)
        return record(ms, comp, o)
      out.guarded(run_flex, impl="flex", precision="bf16", **row)
    if target in map_densities:
      time_map(out, args, q, k, v, None if dense else table, row, c, triton_lse=triton_lse)
  if kernel_only and quant_cost:
    def quant_cost():
      fn = jax.jit(functools.partial(qz.quantize_qkv, precision=kernel_only[0]))
      ms, comp, _ = time_jax(fn, sets, args.runs)
      return dict(time_ms=ms, compile_s=round(comp, 2), vs_cudnn=(ms / c) if c else None)
    out.guarded(quant_cost, impl="quantize_qkv", precision=kernel_only[0], **base)


def time_map(out: Out, args, q, k, v, table, row, cudnn_ms, triton_lse=False):
  from pallas_kernels import attention_triton, map_triton
  d = q.shape[-1]
  scale = d ** -0.5
  thr = 1e-4
  b, _, h, _ = q.shape
  mtable = None if table is None else table.broadcast_to((b, h))
  if out.over():
    return
  try:
    lse = mg.block_sparse_lse(q, k, table, block_size=128)
  except Exception as e:  # pylint: disable=broad-except
    out.add(impl="lse_pass", precision="bf16", error=f"{type(e).__name__}: {str(e)[:300]}", **row)
    return
  counts = {}

  def ratio(ms):
    return dict(ratio_vs_cudnn=ms / cudnn_ms) if cudnn_ms else {}

  def mosaic_map():
    fn = jax.jit(lambda q, k, l: mm.sparsity_map_from_lse(q, k, l, mtable, block_size=128,
                                                          threshold=thr, sm_scale=scale))
    ms, comp, o = time_jax(fn, [(q, k, lse)], args.runs)
    counts["mosaic"] = np.asarray(o)
    return dict(time_ms=ms, compile_s=round(comp, 2), **ratio(ms))
  out.guarded(mosaic_map, impl="sparsity_map", precision="bf16", variant="mosaic_given_lse", **row)

  def triton_map():
    fn = jax.jit(lambda q, k, l: map_triton.sparsity_map_from_lse(
        q, k, l, mtable, block_size=128, threshold=thr, sm_scale=scale))
    ms, comp, o = time_jax(fn, [(q, k, lse)], args.runs)
    o = np.asarray(o)
    res = dict(time_ms=ms, compile_s=round(comp, 2), **ratio(ms))
    if "mosaic" in counts:
      a = counts["mosaic"]
      res["nan_pattern_same"] = bool((np.isnan(a) == np.isnan(o)).all())
      ok = ~np.isnan(o)
      diff = np.abs(a[ok] - o[ok]) * 128 * 128
      res["max_count_diff_vs_mosaic"] = float(diff.max())
      res["blocks_differing"] = int((diff > 0.5).sum())
    return res
  out.guarded(triton_map, impl="sparsity_map", precision="bf16", variant="triton_given_lse",
              **row)

  def lse_pass():
    fn = jax.jit(lambda q, k: mg.block_sparse_lse(q, k, table, block_size=128))
    ms, comp, o = time_jax(fn, [(q, k)], args.runs)
    return dict(time_ms=ms, compile_s=round(comp, 2), **ratio(ms))
  out.guarded(lse_pass, impl="lse_pass", precision="bf16", variant="mosaic", **row)

  def lse_triton():
    fn = jax.jit(lambda q, k: attention_triton.block_sparse_lse(q, k, table, block_size=128))
    ms, comp, o = time_jax(fn, [(q, k)], args.runs)
    return dict(time_ms=ms, compile_s=round(comp, 2), **ratio(ms))
  if triton_lse:
    out.guarded(lse_triton, impl="lse_pass", precision="bf16", variant="triton", **row)

  for precision in ("int8_fp8",):
    def qmap(precision=precision):
      qq = qz.quantize_qkv(q, k, None, precision=precision)
      qlse = mg.quantized_lse(qq, table, block_size=128, sm_scale=scale)
      fn = jax.jit(lambda qq, l: mm.quantized_map_from_lse(qq, l, mtable, block_size=128,
                                                           threshold=thr, sm_scale=scale))
      ms, comp, _ = time_jax(fn, [(qq, qlse)], args.runs)
      return dict(time_ms=ms, compile_s=round(comp, 2), **ratio(ms))
    out.guarded(qmap, impl="sparsity_map", precision=precision, variant="mosaic_given_lse",
                **row)


def _flex(args):
  if args.no_torch:
    return None
  try:
    return Flex()
  except Exception as e:  # pylint: disable=broad-except
    print(f"FlexAttention unavailable: {e}", flush=True)
    return None


HEADS_128 = {16384: 16, 32760: 16, 69120: 12}


def stage_time128(out: Out, args):
  flex = _flex(args)
  seq_lens = args.seq_lens or ([4096] if args.quick else [16384, 32760, 69120])
  for i, s in enumerate(seq_lens):
    h = HEADS_128.get(s, 4 if args.quick else 16)
    first = i == 0
    time_shape(out, args, s, h, 128, (1.0, 0.25, 0.1),
               ("int8_fp8", "fp8", "bf16") + (("int8_bf16",) if first else ()),
               kernel_only=("int8_fp8",), map_densities=(1.0, 0.25) if first else (1.0,),
               do_fp8_cudnn=True, flex=flex, triton_lse=first)


def stage_time64(out: Out, args):
  flex = _flex(args)
  sweep = [("default", mg.MosaicConfig()), ("lane", mg.MosaicConfig(lowering="lane")),
           ("stages3", mg.MosaicConfig(stages=3)),
           ("stages4", mg.MosaicConfig(stages=4)), ("k2", mg.MosaicConfig(tiles_per_cta=2)),
           ("poly4", mg.MosaicConfig(exp2_poly_groups=4)),
           ("poly4_stages3", mg.MosaicConfig(stages=3, exp2_poly_groups=4)),
           ("poly2", mg.MosaicConfig(exp2_poly_groups=2)),
           ("poly6_stages3", mg.MosaicConfig(stages=3, exp2_poly_groups=6))]
  if args.quick:
    time_shape(out, args, 4096, 4, 64, (0.2,), ("bf16",), configs=sweep[:2], flex=flex)
    return
  time_shape(out, args, 17550, 30, 64, (0.2,), ("bf16",), configs=sweep, flex=flex)
  time_shape(out, args, 17550, 30, 64, (0.2,), ("int8_fp8",),
             configs=[("default", mg.MosaicConfig()), ("poly4", mg.MosaicConfig(exp2_poly_groups=4))])
  best = [c for c in sweep if c[0] in args.d64_configs]
  for s in (16384, 32760):
    time_shape(out, args, s, 30, 64, (0.25, 0.1), ("bf16",), configs=best, flex=flex)


VARIANTS = [
    ("int8_fp8", "base", mg.MosaicConfig()),
    ("int8_fp8", "magic", mg.MosaicConfig(int8_magic=True)),
    ("int8_fp8", "magic_1lvl", mg.MosaicConfig(int8_magic=True, pv_two_level=False)),
    ("int8_fp8", "magic_poly4", mg.MosaicConfig(int8_magic=True, exp2_poly_groups=4)),
    ("int8_fp8", "magic_1lvl_poly4", mg.MosaicConfig(int8_magic=True, pv_two_level=False,
                                                      exp2_poly_groups=4)),
    ("int8_fp8", "magic_1lvl_poly6_s3", mg.MosaicConfig(int8_magic=True, pv_two_level=False,
                                                         exp2_poly_groups=6, stages=3)),
    ("int8_fp8", "magic_1lvl_s4", mg.MosaicConfig(int8_magic=True, pv_two_level=False,
                                                   stages=4)),
    ("fp8", "1lvl_poly4", mg.MosaicConfig(pv_two_level=False, exp2_poly_groups=4)),
    ("int8_bf16", "magic", mg.MosaicConfig(int8_magic=True)),
]


def sweep_variants(out: Out, args, s, h, d, densities):
  """Kernel-only timing of the quantized variants; returns the best int8_fp8 one."""
  b = 1
  n = -(-s // 128)
  q, k, v = make_qkv(s + h + d, b, s, h, d)
  flops = 4.0 * b * h * s * s * d
  base = dict(seq_len=s, heads=h, head_dim=d, batch=b, dtype="bfloat16", sweep=True)
  def cudnn():
    fn = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"))
    ms, comp, _ = time_jax(fn, [(q, k, v)], args.runs)
    return dict(time_ms=ms, compile_s=round(comp, 2))
  c = (out.guarded(cudnn, impl="cudnn_dense", precision="bf16", mask="dense", density=1.0,
                   **base) or {}).get("time_ms")
  best = {}
  for target in densities:
    rng = np.random.default_rng(s * 7 + h + int(target * 100))
    mask_np = random_block_mask(rng, h, n, target)
    density = float(mask_np.mean())
    table = pk.compact_block_mask(jnp.asarray(mask_np))
    ref = partial_reference(q, k, v, jnp.asarray(mask_np))
    row = dict(base, mask="random", density=density, target_density=target)
    quantized = {p: qz.quantize_qkv(q, k, v, precision=p) for p in QUANT}
    for precision, label, cfg in VARIANTS:
      def kern(precision=precision, cfg=cfg):
        fn = jax.jit(lambda qq: mg.quantized_attention_fwd(qq, table, block_size=128,
                                                           sm_scale=d ** -0.5, config=cfg)[0])
        ms, comp, o = time_jax(fn, [(quantized[precision],)], args.runs)
        acc = accuracy(np.asarray(o, np.float32)[:, :REF_ROWS, :REF_HEADS], ref)
        return dict(time_ms=ms, compile_s=round(comp, 2),
                    tflops_effective=flops * density / ms * 1e-9,
                    effective_vs_cudnn=c * density / ms if c else None, **acc)
      res = out.guarded(kern, impl="ours_mosaic_gpu", precision=precision,
                        variant="kernel_only", config=label, **row)
      if res and precision == "int8_fp8" and res["finite"] and res["rel_err"] < 0.05:
        best.setdefault(label, 0.0)
        best[label] += res["time_ms"]
  if not best:
    return "base", mg.MosaicConfig()
  label = min(best, key=best.get)
  return label, next(cfg for p, l, cfg in VARIANTS if l == label and p == "int8_fp8")


def stage_run2(out: Out, args):
  flex = _flex(args)
  label, cfg = sweep_variants(out, args, 16384, 16, 128, (0.25, 0.1))
  print(f"best int8_fp8 variant: {label} {cfg}", flush=True)
  out.doc["best_int8_fp8_variant"] = label
  kcfgs = (("default", None), (label, cfg)) if label != "base" else (("default", None),)
  time_shape(out, args, 16384, 16, 128, (1.0,), (), kernel_only=("int8_fp8",),
             kernel_configs=kcfgs[1:], quant_cost=False)
  for s, h in ((32760, 16), (69120, 12)):
    time_shape(out, args, s, h, 128, (1.0, 0.25, 0.1), ("int8_fp8", "bf16", "fp8"),
               kernel_only=("int8_fp8",), kernel_configs=kcfgs, map_densities=(1.0,),
               do_fp8_cudnn=True, flex=flex)
  d64 = [("default", mg.MosaicConfig()), ("lane", mg.MosaicConfig(lowering="lane"))]
  for s in (16384, 32760):
    time_shape(out, args, s, 30, 64, (0.25, 0.1), ("bf16",), configs=d64, flex=flex)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--stage", choices=("check", "time128", "time64", "run2"), required=True)
  p.add_argument("--deadline-s", type=float, default=0.0,
                 help="skip the remaining rows once this many seconds have passed")
  p.add_argument("--out", default="/tmp")
  p.add_argument("--runs", type=int, default=20)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--verbose", action="store_true")
  p.add_argument("--impl", default="mosaic_gpu",
                 help="backend of the check stage's public calls (xla: a CPU dry run)")
  p.add_argument("--d64-configs", nargs="+", default=["default", "poly4", "stages3"])
  p.add_argument("--seq-lens", type=int, nargs="+", default=None,
                 help="time128: sequence lengths (default 16384 32760 69120)")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  dev = jax.devices()[0]
  card = getattr(dev, "device_kind", "cpu").lower().replace(" ", "-")
  path = os.path.join(args.out, f"kernel-{card}-{datetime.date.today().isoformat()}-"
                                f"past-bf16-{args.stage}.json")
  out = Out(path, args.stage, args)
  print(f"card={out.doc['card']} jax={jax.__version__} stage={args.stage} -> {path}", flush=True)
  {"check": stage_check, "time128": stage_time128, "time64": stage_time64,
   "run2": stage_run2}[args.stage](out, args)
  print(f"done in {time.perf_counter() - out.t0:.1f} s", flush=True)


if __name__ == "__main__":
  main()

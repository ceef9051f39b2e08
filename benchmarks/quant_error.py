"""How far the quantized attention precisions are from float32, on iid random inputs
and on a trained DiT's own Q, K, V (the shipped demo model).

Issue #17 asks for SageAttention-grade accuracy (relative error <= 3e-2). On iid
random inputs the FP8 P V product alone sets a floor: e4m3 keeps 3 mantissa bits,
so each probability is off by a relative error uniform in +-2^-4 (RMS
2^-4 / sqrt(3) = 3.6%), and with values of zero mean the output error is that
same fraction of the output. Real activations are not iid: V carries per-channel
offsets and attention rows are peaked. This script measures both, and splits the
error by what is quantized (Q K^T in int8 only, P only, V only):

  inputs   "random"   q, k, v ~ N(0, 1), bf16
           "outliers" the same with 1% of the keys 50x larger (as real models have)
           "demo"     Q, K, V captured from every self-attention layer of the demo
                      model (bf16) denoising data videos of several labels at
                      t in {0.9, 0.5, 0.1}
  masks    dense, and 25% random blocks + the diagonal
  metrics  rel err ||o - o_f32|| / ||o_f32|| over the whole output, per-row
           cosine similarity (mean, min) and per-row relative error (median,
           99th percentile), finiteness

Each precision runs through `pallas_kernels.block_sparse_attention` on the
device's backend (the Mosaic kernel on Hopper); on CPU the quantized function in
its reference form (`quantize.quantized_attention_reference`, P rounded as the
kernel rounds it). The split is always the reference form.

  PYTHONPATH=. python benchmarks/quant_error.py --out /tmp/quant-error.json   # CPU or GPU
  PYTHONPATH=. python benchmarks/quant_error.py --quick                        # CPU smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# --strict-precision: XLA's default lets it drop float round trips (f32 -> e4m3 ->
# f32) in one program; the reference forms guard theirs (quantize._exact), and this
# flag turns the rule off for everything else too (a cross-check of the guard).
if "--strict-precision" in sys.argv:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_allow_excess_precision=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import struct  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from pallas_kernels import attention_reference as ar  # noqa: E402
from pallas_kernels import quantize as qz  # noqa: E402

PRECISIONS = ("int8_fp8", "fp8", "int8_bf16")
BLOCK = 128


# ----------------------------------------------------------------- metrics

def accuracy(out, ref) -> dict:
  """Whole-output rel err and per-row (query, head) cosine / rel err of out vs ref [B, S, H, D]."""
  o = np.asarray(out, np.float64).reshape(-1, out.shape[-1])
  r = np.asarray(ref, np.float64).reshape(-1, ref.shape[-1])
  finite = bool(np.isfinite(o).all())
  if not finite:
    return dict(finite=False, rel_err=float("nan"))
  rn, on = np.linalg.norm(r, axis=-1), np.linalg.norm(o, axis=-1)
  ok = rn > 0
  cos = (o * r).sum(-1)[ok] / np.maximum(on[ok] * rn[ok], 1e-300)
  row_err = np.linalg.norm(o - r, axis=-1)[ok] / rn[ok]
  return dict(finite=True, rel_err=float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-300)),
              cos_mean=float(cos.mean()), cos_min=float(cos.min()),
              row_rel_err_median=float(np.median(row_err)),
              row_rel_err_p99=float(np.quantile(row_err, 0.99)))


# ------------------------------------------------------------------ inputs

def random_inputs(key, batch: int, seq: int, heads: int, dim: int, outliers: bool):
  kq, kk, kv, ko = jax.random.split(key, 4)
  shape = (batch, seq, heads, dim)
  q, k, v = (jax.random.normal(x, shape, jnp.float32) for x in (kq, kk, kv))
  if outliers:
    rows = jax.random.bernoulli(ko, 0.01, (batch, seq, heads, 1))
    k = jnp.where(rows, 50.0 * k, k)
  return tuple(x.astype(jnp.bfloat16) for x in (q, k, v))


@struct.dataclass
class CaptureControl:
  """An attention hook that runs dense attention and hands back its inputs as stats
  (stacked over layers by the model's scan)."""

  def self_attention(self, q, k, v):
    from models import attention
    return attention.dense_attention(q, k, v), {"q": q, "k": k, "v": v}

  def cross_attention(self, q, k, v):
    from models import attention
    return attention.dense_attention(q, k, v)


def demo_inputs(labels, ts, seed: int = 0):
  """[(name, q, k, v)] of every self-attention layer of the shipped demo model (bf16
  compute) at each noise level t, on data videos of `labels` (one batch)."""
  from models import wan
  from models.demo import checkpoint, data
  config, params, meta = checkpoint.load_demo_params(checkpoint.DEMO_CHECKPOINT, dtype="bfloat16")
  f, h, w = meta["frames"], meta["height"], meta["width"]
  keys = jax.random.split(jax.random.key(seed), len(labels) + 1)
  videos = jnp.stack([data.video_for_label(kk, int(l), f, h, w) for kk, l in zip(keys, labels)])
  noise = jax.random.normal(keys[-1], videos.shape, jnp.float32)
  context = checkpoint.label_context(params, jnp.asarray(labels))

  @jax.jit
  def capture(t):
    x_t = (1.0 - t) * videos + t * noise
    _, stats = wan.apply(config, params["dit"], x_t, jnp.full((len(labels),), 1000.0 * t), context,
                         CaptureControl())
    return stats
  out = []
  for t in ts:
    stats = capture(jnp.float32(t))
    for layer in range(config.num_layers):
      out.append((f"demo t={t:g} layer {layer}",
                  *(stats[name][layer].astype(jnp.bfloat16) for name in ("q", "k", "v"))))
  return out


def sparse_mask(key, batch: int, heads: int, n: int, density: float = 0.25):
  mask = jax.random.bernoulli(key, density, (batch, heads, n, n))
  return mask | jnp.eye(n, dtype=bool)[None, None]


# ----------------------------------------------------------------- the split

def split_errors(q, k, v, mask, ref) -> dict:
  """rel err of quantizing one thing at a time (reference form, float32 otherwise)."""
  f32 = lambda x: x.astype(jnp.float32)
  out = {}
  qd, kd, vd = qz.dequantize(qz.quantize_qkv(q, k, v, precision="int8_fp8"))
  out["qk_int8_only"] = ar.block_sparse_attention_reference(
      qd, kd, f32(v), mask, block_size=BLOCK)
  out["p_e4m3_only"] = ar.block_sparse_attention_reference(
      f32(q), f32(k), f32(v), mask, block_size=BLOCK, p_round=qz.round_p)
  out["v_e4m3_only"] = ar.block_sparse_attention_reference(
      f32(q), f32(k), vd, mask, block_size=BLOCK)
  return {name: accuracy(o, ref)["rel_err"] for name, o in out.items()}


def quantized(q, k, v, mask, precision: str, on_gpu: bool):
  if on_gpu:
    return pk.block_sparse_attention(q, k, v, mask, block_size=BLOCK, precision=precision)
  return qz.quantized_attention_reference(q, k, v, mask, precision=precision, block_size=BLOCK)


def measure(name, q, k, v, key, *, on_gpu: bool, log=print) -> list:
  rows = []
  b, s, h, _ = q.shape
  n = -(-s // BLOCK)
  for mask_name, mask in (("dense", None), ("d0.25", sparse_mask(key, b, h, n))):
    ref = ar.block_sparse_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                              v.astype(jnp.float32), mask, block_size=BLOCK)
    row = dict(inputs=name, mask=mask_name, shape=list(q.shape),
               split=split_errors(q, k, v, mask, ref))
    row["bf16"] = accuracy(ar.block_sparse_attention_reference(q, k, v, mask, block_size=BLOCK)
                           .astype(q.dtype), ref)
    for p in PRECISIONS:
      row[p] = accuracy(jax.block_until_ready(quantized(q, k, v, mask, p, on_gpu)), ref)
    rows.append(row)
    log(f"{name:24s} {mask_name:5s} " + " ".join(
        f"{p} {row[p]['rel_err']:.2e}" for p in ("bf16",) + PRECISIONS)
        + " | split " + " ".join(f"{k} {v:.2e}" for k, v in row["split"].items()))
  return rows


def summary(rows: list) -> dict:
  """Worst whole-output rel err per (input kind, precision), and whether it is <= 3e-2."""
  out = {}
  for kind in ("random", "outliers", "demo"):
    mine = [r for r in rows if r["inputs"].startswith(kind)]
    if not mine:
      continue
    out[kind] = {p: dict(worst_rel_err=max(r[p]["rel_err"] for r in mine),
                         mean_rel_err=float(np.mean([r[p]["rel_err"] for r in mine])),
                         worst_cos_min=min(r[p]["cos_min"] for r in mine),
                         all_finite=all(r[p]["finite"] for r in mine),
                         within_3e_2=max(r[p]["rel_err"] for r in mine) <= 3e-2)
                 for p in PRECISIONS}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None, help="JSON path")
  p.add_argument("--quick", action="store_true", help="CPU smoke: small random inputs, 1 demo step")
  p.add_argument("--strict-precision", action="store_true",
                 help="run with XLA_FLAGS --xla_allow_excess_precision=false")
  args = p.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  t0 = time.perf_counter()
  key = jax.random.key(0)
  rows = []
  shapes = [(1, 1000, 2, 64)] if args.quick else [(1, 4096, 4, 128), (1, 4096, 4, 64),
                                                   (1, 16384, 2, 128)]
  for i, (b, s, h, d) in enumerate(shapes):
    for outliers in (False, True):
      q, k, v = random_inputs(jax.random.fold_in(key, 2 * i + outliers), b, s, h, d, outliers)
      rows += measure(f"{'outliers' if outliers else 'random'} S{s} D{d}", q, k, v,
                      jax.random.fold_in(key, 100 + i), on_gpu=on_gpu)
  labels = [5, 26] if args.quick else [5, 10, 19, 26]
  ts = (0.5,) if args.quick else (0.9, 0.5, 0.1)
  demo = demo_inputs(labels, ts)
  if args.quick:
    demo = demo[:1]
  for i, (name, q, k, v) in enumerate(demo):
    rows += measure(name, q, k, v, jax.random.fold_in(key, 1000 + i), on_gpu=on_gpu)
  result = dict(kind="quant_error", card=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.date.today().isoformat(), backend=jax.default_backend(),
                strict_precision=args.strict_precision,
                implementation="mosaic_gpu kernel" if on_gpu else "reference form",
                demo_labels=labels, demo_ts=list(ts), block_size=BLOCK, rows=rows,
                summary=summary(rows), seconds=round(time.perf_counter() - t0, 1))
  for kind, per in result["summary"].items():
    print(f"{kind:9s} " + " ".join(f"{p}: worst {v['worst_rel_err']:.2e} mean {v['mean_rel_err']:.2e}"
                                   for p, v in per.items()))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Quick GPU check of the Pallas backends: correctness vs the f32 reference and
one timing point against cuDNN dense. Prints a table; writes JSON to --out."""

import argparse
import json
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import map_reference
from pallas_kernels.attention_mosaic_gpu import is_supported_device
from benchmarks.timing import median_ms


def rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))




def main():
  ap = argparse.ArgumentParser(); ap.add_argument("--out", default="/tmp/smoke.json")
  args = ap.parse_args()
  rows = []
  key = jax.random.key(0)
  gpu_impls = (["mosaic_gpu"] if is_supported_device() else []) + ["triton"]
  for impl in gpu_impls + ["xla"]:
    for (s, h, d, bs, dtype) in [(1000, 2, 64, 64, jnp.bfloat16), (4096, 4, 128, 128, jnp.bfloat16),
                                 (2000, 2, 128, 128, jnp.float16)]:
      if impl == "mosaic_gpu" and bs != 128:
        continue                      # the Hopper kernel's mask blocks are 128
      try:
        kq, kk, kv, km = jax.random.split(jax.random.fold_in(key, s), 4)
        q = (jax.random.normal(kq, (2, s, h, d)) * 2).astype(dtype)
        k = (jax.random.normal(kk, (2, s, h, d)) * 2).astype(dtype)
        v = jax.random.normal(kv, (2, s, h, d)).astype(dtype)
        n = -(-s // bs)
        mask = jax.random.bernoulli(km, 0.3, (2, h, n, n)) | jnp.eye(n, dtype=bool)
        out = pk.block_sparse_attention(q, k, v, mask, block_size=bs, implementation=impl)
        ref = pk.block_sparse_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                                  v.astype(jnp.float32), mask, block_size=bs)
        o2, smap = pk.block_sparse_attention_with_map(q, k, v, mask, block_size=bs, implementation=impl)
        sref = map_reference.sparsity_map_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                                    block_size=bs, threshold=1e-4, block_mask=mask)
        sm = np.asarray(smap); sr = np.asarray(sref)
        nan_ok = bool((np.isnan(sm) == np.isnan(sr)).all())
        map_err = float(np.nanmax(np.abs(sm - sr)))
        dense_map = pk.sparsity_map(q, k, block_size=bs, implementation=impl)
        dref = map_reference.sparsity_map_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                                    block_size=bs, threshold=1e-4)
        rows.append(dict(impl=impl, s=s, h=h, d=d, bs=bs, dtype=jnp.dtype(dtype).name,
                         rel_err=rel(out, ref), with_map_rel_err=rel(o2, ref), map_nan_ok=nan_ok,
                         map_max_abs=map_err,
                         dense_map_max_abs=float(np.abs(np.asarray(dense_map) - np.asarray(dref)).max()),
                         nan=bool(np.isnan(np.asarray(out, np.float32)).any())))
      except Exception as e:
        traceback.print_exc()
        rows.append(dict(impl=impl, s=s, error=repr(e)[:500]))
      print(rows[-1], flush=True)
  # timing point
  s, h, d, bs = 16384, 16, 128, 128
  kq, kk, kv, km = jax.random.split(key, 4)
  q, k, v = (jax.random.normal(x, (1, s, h, d)).astype(jnp.bfloat16) for x in (kq, kk, kv))
  n = s // bs
  cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
  t_cudnn = median_ms(cud, q, k, v, reps=10)
  rows.append(dict(impl="cudnn_dense", s=s, time_ms=t_cudnn))
  for dens in (1.0, 0.25, 0.1):
    mask = jax.random.bernoulli(km, dens, (1, h, n, n)) | jnp.eye(n, dtype=bool)
    for impl in gpu_impls:
      try:
        f = jax.jit(lambda q, k, v, m: pk.block_sparse_attention(q, k, v, m, implementation=impl))
        t = median_ms(f, q, k, v, mask, reps=10)
        fm = jax.jit(lambda q, k: pk.sparsity_map(q, k, implementation=impl))
        tm = median_ms(fm, q, k, reps=10) if dens == 1.0 else None
        rows.append(dict(impl=impl, s=s, density=float(jnp.mean(mask)), time_ms=t, map_ms=tm,
                         speedup_vs_cudnn=t_cudnn / t))
      except Exception as e:
        traceback.print_exc(); rows.append(dict(impl=impl, density=dens, error=repr(e)[:500]))
      print(rows[-1], flush=True)
  out = dict(kind="smoke", card=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows)
  json.dump(out, open(args.out, "w"), indent=1)


if __name__ == "__main__":
  main()

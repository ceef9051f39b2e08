"""MOD-DiT bookkeeping per refresh, against one dense attention call.

Per layer at a Wan shape (B=1 video, H heads, D=128, bf16), a dense refresh
costs: the flash pass with its row log-sum-exp (needed anyway, replaces the
cuDNN call), the map pass, and for the whole model once: the ridge fit, the
prediction, the mask and its compaction. We report each piece, and
  overhead = (with_map - attention_only) + (fit + predict + compact) / layers
against one dense cuDNN call. Writes an "overhead" JSON (docs/benchmarks.md schema).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from modjax import features, predict
from benchmarks.timing import median_ms




def measure(seq_len, heads, layers, tokens_per_frame, top_k, block=128, batch=2):
  key = jax.random.key(seq_len)
  kq, kk, kv, ks = jax.random.split(key, 4)
  shape = (1, seq_len, heads, 128)
  q, k, v = (jax.random.normal(x, shape, jnp.bfloat16) for x in (kq, kk, kv))
  n = -(-seq_len // block)
  bpf = max(tokens_per_frame // block, 1)
  cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn" if jax.default_backend() == "gpu" else "xla"))
  ours = jax.jit(lambda q, k, v: pk.block_sparse_attention(q, k, v, None, block_size=block))
  with_map = jax.jit(lambda q, k, v: pk.block_sparse_attention_with_map(q, k, v, None, block_size=block))
  t_cudnn = median_ms(cudnn, q, k, v)
  t_ours = median_ms(ours, q, k, v)
  t_with_map = median_ms(with_map, q, k, v)
  # Model-wide bookkeeping: fit + predict + compaction for all (layer, row, head) at once.
  smap = jax.random.uniform(ks, (layers, batch, heads, n, n), jnp.float32).astype(jnp.bfloat16)
  width = predict.max_row_width(predict.resolve_top_k(top_k, n), n, bpf)

  @jax.jit
  def bookkeeping(smap, prev_feats):
    fitted = features.fit_pattern_features(smap, bpf, 1.0)
    mask = predict.predict_mask(prev_feats, fitted, interval=10, top_k=top_k, blocks_per_frame=bpf,
                                block_diagonal=fitted.block <= 1.0)
    flat = mask.reshape((-1,) + mask.shape[-3:])
    table = jax.vmap(functools.partial(pk.compact_block_mask, max_width=width))(flat)
    return fitted, table

  prev = features.fit_pattern_features(smap, bpf, 1.0)
  t_book = median_ms(bookkeeping, smap, prev, reps=10)
  per_layer_book = t_book / (layers * batch)
  map_extra = t_with_map - t_ours
  rows = []
  for what, t in [("attention_cudnn_dense", t_cudnn), ("attention_ours_dense", t_ours),
                  ("attention_with_map", t_with_map), ("map_pass_extra", map_extra),
                  ("fit_predict_compact_all_layers", t_book),
                  ("fit_predict_compact_per_layer_video", per_layer_book),
                  ("total_per_refresh_per_layer", map_extra + per_layer_book)]:
    rows.append(dict(what=what, seq_len=seq_len, heads=heads, layers=layers, batch=batch,
                     top_k=top_k, time_ms=t, dense_attention_ms=t_cudnn, ratio=t / t_cudnn))
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--seq-lens", default="16384,32760")
  args = ap.parse_args()
  rows = []
  for s in [int(x) for x in args.seq_lens.split(",")]:
    # Wan2.1-1.3B: 12 heads, 30 layers; 32760 = 21 frames x 1560 tokens.
    tpf = 1560 if s % 1560 == 0 else 1024
    rows += measure(s, heads=12, layers=30, tokens_per_frame=tpf, top_k=350)
  result = dict(kind="overhead", card=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.date.today().isoformat(), rows=rows)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  for r in rows:
    print(f"{r['seq_len']:6d} {r['what']:40s} {r['time_ms']:8.3f} ms  {r['ratio']:.3f}x dense")


if __name__ == "__main__":
  main()

"""Where one denoising step's time goes, at Wan2.1-1.3B shapes (CFG batch 2).

Times one jitted model forward per variant: cuDNN dense attention, our dense
flash (+ map pass, as on map/refresh steps), our block-sparse kernel on a fixed
MOD-shaped mask, and self-attention removed (returns v) to measure everything
outside attention. Writes an "e2e" JSON with one row per variant.
"""

from __future__ import annotations

import argparse
import datetime
import json

import jax
import jax.numpy as jnp
from flax import struct

import pallas_kernels as pk
from benchmarks.e2e import SHAPES, latent_size
from benchmarks.timing import median_ms
from models import attention, wan
from modjax import masks
from modjax.control import AttentionControl


@struct.dataclass
class _SkipSelfAttention:
  """An attention hook that returns v for self-attention: the rest of the forward."""

  def self_attention(self, q, k, v):
    return v, {}

  def cross_attention(self, q, k, v):
    return attention.dense_attention(q, k, v)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--shape", default="720p")
  ap.add_argument("--density", type=float, default=0.2)
  args = ap.parse_args()
  config = wan.WanConfig.wan2_1_1_3b(param_dtype="bfloat16")
  frames, height, width = SHAPES[args.shape]
  latent = latent_size(frames, height, width)
  params = wan.init_params(config, jax.random.key(0), *latent, 512)
  kx, kc = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (2, config.in_channels) + latent, jnp.bfloat16)
  ctx = jax.random.normal(kc, (2, 512, config.text_dim), jnp.bfloat16)
  t = jnp.full((2,), 500.0)
  tokens = config.tokens(*latent)
  n = -(-tokens // 128)
  bpf = max(config.tokens_per_frame(*latent[1:]) // 128, 1)
  mask = jnp.asarray(masks.lines_mask_for_density(n, bpf, args.density))
  table = pk.compact_block_mask(jnp.broadcast_to(mask, (2, config.num_heads, n, n)))
  dense_table = pk.dense_block_table((config.num_layers, 2, config.num_heads), n)
  layer_table = jax.tree.map(lambda a: jnp.broadcast_to(a, (config.num_layers,) + a.shape), table)
  variants = {
      "forward_cudnn_dense": AttentionControl(mode="dense", implementation="cudnn"),
      "forward_dense_map": AttentionControl(mode="dense_map"),
      "forward_ours_dense": AttentionControl(mode="sparse", block_mask=dense_table),
      f"forward_sparse_d{args.density}": AttentionControl(mode="sparse", block_mask=layer_table),
  }
  # The default sparse backend side by side with the portable Triton kernel.
  default_impl = pk.default_implementation(jnp.bfloat16, config.head_dim)
  if default_impl != "triton":
    variants["forward_ours_dense_triton"] = AttentionControl(
        mode="sparse", block_mask=dense_table, sparse_implementation="triton")
    variants[f"forward_sparse_d{args.density}_triton"] = AttentionControl(
        mode="sparse", block_mask=layer_table, sparse_implementation="triton")
  rows = []
  # Return the stats too: a dropped sparsity map would be dead code to XLA.
  fwd = jax.jit(lambda p, x, c, ctl: wan.apply(config, p, x, t, c, ctl))
  for name, control in variants.items():
    rows.append(dict(mode=name, time_ms=median_ms(fwd, params, x, ctx, control, reps=3)))
    print(rows[-1], flush=True)
  no_attn = jax.jit(lambda p, x, c: wan.apply(config, p, x, t, c, _SkipSelfAttention())[0])
  rows.append(dict(mode="forward_without_self_attention",
                   time_ms=median_ms(no_attn, params, x, ctx, reps=3)))
  print(rows[-1], flush=True)
  for r in rows:
    r.update(frames=frames, height=height, width=width, tokens=tokens, batch=2,
             layers=config.num_layers, sparse_implementation=(
                 "triton" if r["mode"].endswith("_triton") else default_impl))
  result = dict(kind="e2e", subkind="step_breakdown", card=jax.devices()[0].device_kind,
                jax=jax.__version__, date=datetime.date.today().isoformat(),
                model="wan2_1_1_3b", rows=rows)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()

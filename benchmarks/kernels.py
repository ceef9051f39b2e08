"""Kernel benchmark: block-sparse attention and the sparsity map vs baselines.

One process, one card, side by side on identical inputs and masks:
  cudnn_dense      jax.nn.dot_product_attention(implementation="cudnn")
  pallas_dense     jax's Pallas Triton flash attention (ops/gpu/attention.mha)
  jax_fa3_dense    jax's Pallas Mosaic GPU FlashAttention-3
                   (ops/gpu/attention_mgpu.attention; Hopper only)
  flex             torch FlexAttention (torch.compile) on the identical block
                   mask, built with BlockMask.from_kv_blocks from our table
  ours_<backend>   pallas_kernels.block_sparse_attention for each backend
  sparsity_map     the map pass given the lse ("given_lse") and the full
                   sparsity_map() with its lse-only flash pass ("with_lse")
  attention_with_map  block_sparse_attention_with_map (flash + map)
  cudnn_fp8_dense  jax's cuDNN FP8 attention (fused_attention_stablehlo,
                   use_fp8=True, unit scales), with --cudnn-fp8 or a quantized
                   precision in --precisions

Every row carries "precision" (--precisions: "bf16" and/or the quantized
modes of pallas_kernels.quantize; the sparse rows of a quantized precision
time the public call, quantization included) and, beside rel_err, "cos_sim":
the mean over query rows and heads of the cosine similarity with the float32
reference. --outliers N multiplies N random key tokens by 50 in every input
set (the check set real models need: K token outliers). --family NAME takes a
family's attention shape (FAMILIES: CogVideoX 1.0 and 1.5 with head_dim 64,
HunyuanVideo 720p with 24 heads of 128; the whole joint sequence, text included;
"mod" masks use the family's tokens per latent frame); --cogvideo is --family
cogvideox.

Every timed row has rel_err = ||out - ref|| / ||ref|| against a float32
reference on the same mask (computed for the first --ref-heads heads, query
chunked). Timing: compile (first call) reported apart, a few warm-up calls,
then the median of >= --runs samples; each sample is a burst of calls long
enough (>= 10 ms) to hide dispatch, closed by block_until_ready; inputs are
rotated when a set is small enough to sit in L2. Torch is timed with
triton.testing.do_bench (median).

GPU (lead engineer):
  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python benchmarks/kernels.py \
      --out benchmarks/results/kernel-h100-$(date +%F).json
CPU smoke test:
  PYTHONPATH=. python benchmarks/kernels.py --quick --interpret --out /tmp/k.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
import zlib
from typing import Callable, Optional

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from pallas_kernels import api as pk_api  # noqa: E402
from pallas_kernels import attention_mosaic_gpu as mosaic_gpu  # noqa: E402

# Named shapes: Wan2.1 latent token counts (frames x tokens per frame).
SEQ_LENS = (4096, 16384, 32760)
LONG_SEQ_LEN = 69120
HEADS = (12, 16)
DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)
MASKS = ("random", "mod")
L2_BYTES = 50 * 2**20          # H100/H200 L2; smaller input sets are rotated

# Triton tiling variants tried in the sweep (block_k, num_warps, num_stages).
TRITON_SWEEP = ((64, 8, 3), (64, 4, 3), (64, 8, 2), (64, 4, 2), (64, 8, 4), (128, 8, 3), (128, 4, 3), (128, 8, 2))


def _tiling_list(text: str):
  return tuple(tuple(int(x) for x in item.split(",")) for item in text.split(";") if item)


# ----------------------------------------------------------------------------
# Masks.

# --family shapes: (joint sequence length, heads, head_dim, tokens per latent frame).
FAMILIES = {
    "cogvideox": (17550, 30, 64, 1350),        # CogVideoX-5B, 49 frames 480x720 (video only)
    "cogvideox1.5": (45106, 48, 64, 4080),     # CogVideoX-1.5-5B, 81 frames 768x1360 (+226 text)
    "hunyuan720p": (119056, 24, 128, 3600),    # HunyuanVideo, 129 frames 720x1280 (+256 text)
}
_FRAME_TOKENS = {seq: frame for seq, _, _, frame in FAMILIES.values()}


def tokens_per_frame(seq_len: int) -> int:
  return _FRAME_TOKENS.get(seq_len, 1560 if seq_len <= 40000 else 3600)


def random_block_mask(rng, heads: int, n: int, density: float) -> np.ndarray:
  """Random blocks plus the diagonal, ~density of the n x n blocks, per head."""
  if density >= 1.0:
    return np.ones((1, heads, n, n), bool)
  p = max(0.0, (density * n - 1.0) / max(n - 1, 1))
  mask = rng.random((heads, n, n)) < p
  mask |= np.eye(n, dtype=bool)
  return mask[None]


def mod_block_mask(rng, heads: int, n: int, bpf: int, density: float) -> np.ndarray:
  """MOD-DiT-shaped mask: frame blocks, a few diagonals and columns, per head.

  Diagonals at offsets near multiples of blocks_per_frame (same position in
  neighbouring frames) and columns (first-frame "sink" columns first) are added
  alternately until the target density is reached.
  """
  if density >= 1.0:
    return np.ones((1, heads, n, n), bool)
  target = density * n * n
  idx = np.arange(n)
  frame = np.zeros((n, n), bool)
  if bpf >= 1:
    for f in range(n // bpf):
      frame[f * bpf:(f + 1) * bpf, f * bpf:(f + 1) * bpf] = True
  offsets = [1, -1, 2, -2]
  for kf in range(1, n // max(bpf, 1) + 1):
    for e in (0, 1, -1, 2, -2):
      offsets += [kf * bpf + e, -(kf * bpf + e)]
  offsets = [o for o in dict.fromkeys(offsets) if 0 < abs(o) < n]
  out = []
  for _ in range(heads):
    m = np.eye(n, dtype=bool)
    if frame.sum() <= 0.6 * target:
      m |= frame
    sinks = rng.permutation(min(bpf, n)) if bpf >= 1 else np.array([], int)
    rest = rng.permutation(np.arange(min(bpf, n), n))
    columns = list(sinks) + list(rest)
    diag = list(offsets)
    # Jitter the diagonal order a little per head.
    for i in range(0, len(diag) - 1, 2):
      if rng.random() < 0.5:
        diag[i], diag[i + 1] = diag[i + 1], diag[i]
    while m.sum() < target and (diag or columns):
      if diag:
        o = diag.pop(0)
        rows = idx[(idx + o >= 0) & (idx + o < n)]
        m[rows, rows + o] = True
      if columns and m.sum() < target:
        m[:, columns.pop(0)] = True
    out.append(m)
  return np.stack(out)[None]


def make_mask(kind: str, rng, heads: int, n: int, block: int, seq_len: int,
              density: float) -> np.ndarray:
  if kind == "random":
    return random_block_mask(rng, heads, n, density)
  if kind == "mod":
    return mod_block_mask(rng, heads, n, tokens_per_frame(seq_len) // block, density)
  raise ValueError(f"mask kind must be one of {MASKS}, got {kind!r}")


# ----------------------------------------------------------------------------
# Timing.

def _block(x):
  return jax.block_until_ready(x)


BURST_S = 10e-3


def burst_length(one_call_s: float) -> int:
  """Calls per timed sample: enough for a burst of >= BURST_S (at most 200).

  Calls are dispatched asynchronously, so within a burst the host's dispatch
  of the next call overlaps the device's work and the one sync at the end is
  paid once. Sampling single calls instead adds the host round trip (seen at
  ~0.05-0.4 ms per call on the H200 machine) to every kernel under ~10 ms.
  """
  return max(1, min(200, math.ceil(BURST_S / max(one_call_s, 1e-6))))


def time_jax(fn: Callable, arg_sets: list, runs: int, warmup: int = 3):
  """Returns (median ms, compile s, last output)."""
  t0 = time.perf_counter()
  out = _block(fn(*arg_sets[0]))
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    out = _block(fn(*arg_sets[i % len(arg_sets)]))
  t0 = time.perf_counter()
  out = _block(fn(*arg_sets[0]))
  one = time.perf_counter() - t0
  inner = burst_length(one)
  samples = []
  k = 0
  for _ in range(runs):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*arg_sets[k % len(arg_sets)])
      k += 1
    _block(out)
    samples.append((time.perf_counter() - t0) / inner)
  # The checked output must come from set 0, the set the reference was computed on.
  out = _block(fn(*arg_sets[0]))
  return statistics.median(samples) * 1e3, compile_s, out


def time_torch(fn: Callable, runs: int, warmup: int = 3):
  """Same protocol as time_jax (bursts, wall clock, synchronize), for torch."""
  import torch
  t0 = time.perf_counter()
  out = fn()
  torch.cuda.synchronize()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    fn()
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  fn()
  torch.cuda.synchronize()
  one = time.perf_counter() - t0
  inner = burst_length(one)
  samples = []
  for _ in range(runs):
    t0 = time.perf_counter()
    for _ in range(inner):
      fn()
    torch.cuda.synchronize()
    samples.append((time.perf_counter() - t0) / inner)
  return statistics.median(samples) * 1e3, compile_s, out


def rel_err(out, ref) -> Optional[float]:
  if out is None or ref is None:
    return None
  out = np.asarray(out, np.float32)
  ref = np.asarray(ref, np.float32)
  if np.isnan(out).any():
    return float("nan")
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def cos_sim(out, ref) -> Optional[float]:
  """Mean over (query row, head) of cos(out, ref) along head_dim."""
  if out is None or ref is None:
    return None
  o = np.asarray(out, np.float64).reshape(-1, np.shape(out)[-1])
  r = np.asarray(ref, np.float64).reshape(-1, np.shape(ref)[-1])
  den = np.linalg.norm(o, axis=-1) * np.linalg.norm(r, axis=-1)
  ok = den > 0
  if not np.isfinite(o).all():
    return float("nan")
  return float(np.mean((o * r).sum(-1)[ok] / den[ok])) if ok.any() else None


def accuracy(out, ref) -> tuple:
  """(rel_err, {"cos_sim": ...}) of an output against the float32 reference."""
  return rel_err(out, ref), {"cos_sim": cos_sim(out, ref)}


def cudnn_fp8_attention(head_dim: int):
  """jax's cuDNN FP8 attention (unit scales) as a function of 16-bit q, k, v."""
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=import-outside-toplevel
  params = {name: jnp.ones((1, 1, 1, 1), jnp.float32) for name in fa.FP8Params.__annotations__}
  scale = 1.0 / math.sqrt(head_dim)
  fp8 = jnp.float8_e4m3fn

  def f(q, k, v):
    out, _, _ = fa.dot_product_attention(q.astype(fp8), k.astype(fp8), v.astype(fp8),
                                         fp8_params=params, scale=scale, use_fp8=True)
    return out.astype(q.dtype)
  return jax.jit(f)


def map_rel_err(smap, ref) -> Optional[float]:
  smap = np.asarray(smap, np.float32)
  ref = np.asarray(ref, np.float32)
  if not np.array_equal(np.isnan(smap), np.isnan(ref)):
    return float("nan")
  ok = ~np.isnan(ref)
  return float(np.linalg.norm(smap[ok] - ref[ok]) / max(np.linalg.norm(ref[ok]), 1e-30))


# ----------------------------------------------------------------------------
# Runner.

@dataclasses.dataclass
class Shape:
  seq_len: int
  heads: int
  head_dim: int = 128
  batch: int = 1
  dtype: str = "bfloat16"
  block: int = 128

  @property
  def n(self) -> int:
    return -(-self.seq_len // self.block)

  def flops(self, density: float) -> float:
    return 4.0 * self.batch * self.heads * self.seq_len ** 2 * self.head_dim * density


class Bench:

  def __init__(self, args):
    self.args = args
    self.rows: list[dict] = []
    self.start = time.perf_counter()
    self.platform = jax.default_backend()
    self.on_gpu = self.platform == "gpu"
    self.interpret = bool(args.interpret)
    dev = jax.devices()[0]
    self.card = getattr(dev, "device_kind", str(dev))
    self.meta = {
        "kind": "kernel",
        "card": self.card,
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "platform": self.platform,
        "interpret": self.interpret,
        "argv": sys.argv[1:],
    }
    self.torch = None
    if self.on_gpu and not args.no_torch:
      try:
        import torch
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        self.torch = torch
        self.BlockMask = BlockMask
        self.flex = torch.compile(flex_attention, dynamic=False)
        self.meta["torch"] = torch.__version__
        try:
          import triton
          self.meta["triton"] = triton.__version__
        except ImportError:
          pass
      except Exception as e:  # pylint: disable=broad-except
        print(f"[bench] torch FlexAttention unavailable: {e}", flush=True)
    self.truncated = False

  # -- bookkeeping -----------------------------------------------------------

  def out_of_time(self) -> bool:
    if (time.perf_counter() - self.start) / 60.0 > self.args.max_minutes:
      if not self.truncated:
        print(f"[bench] --max-minutes={self.args.max_minutes} reached, stopping",
              flush=True)
      self.truncated = True
    return self.truncated

  def add(self, shape: Shape, impl: str, mask: str, density: float,
          time_ms: Optional[float], err: Optional[float], **extra):
    row = {
        "impl": impl, "seq_len": shape.seq_len, "heads": shape.heads,
        "head_dim": shape.head_dim, "dtype": shape.dtype, "density": density,
        "mask": mask, "time_ms": time_ms, "rel_err": err, "batch": shape.batch,
        "block_size": shape.block, "precision": "bf16",
    }
    if self.args.outliers:
      row["outliers"] = self.args.outliers
    if time_ms:
      row["tflops_effective"] = shape.flops(density) / (time_ms * 1e-3) / 1e12
    row.update(extra)
    self.rows.append(row)
    t = "      -" if time_ms is None else f"{time_ms:8.3f}"
    e = "-" if err is None else f"{err:.1e}"
    print(f"[bench] S={shape.seq_len:6d} H={shape.heads:2d} {mask:7s} "
          f"d={density:.3f} {impl:22s} {t} ms  rel_err={e} "
          + " ".join(f"{k}={v}" for k, v in extra.items() if k not in ("error",))
          + (f" ERROR: {extra['error']}" if "error" in extra else ""), flush=True)
    return row

  def write(self):
    doc = dict(self.meta, truncated=self.truncated,
               elapsed_s=round(time.perf_counter() - self.start, 1), rows=self.rows)
    os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
    tmp = self.args.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(doc, f, indent=1, default=float)
    os.replace(tmp, self.args.out)

  def guarded(self, shape, impl, mask, density, fn, **extra):
    """Runs fn() -> (time_ms, rel_err, extra dict); records errors as rows."""
    try:
      time_ms, err, more = fn()
      return self.add(shape, impl, mask, density, time_ms, err, **extra, **more)
    except Exception as e:  # pylint: disable=broad-except
      msg = f"{type(e).__name__}: {str(e)[:300]}"
      if self.args.verbose:
        traceback.print_exc()
      return self.add(shape, impl, mask, density, None, None, error=msg, **extra)

  # -- inputs ----------------------------------------------------------------

  def inputs(self, shape: Shape, seed: int):
    dtype = jnp.dtype(shape.dtype)
    set_bytes = 3 * shape.batch * shape.seq_len * shape.heads * shape.head_dim * dtype.itemsize
    num_sets = 3 if (self.on_gpu and set_bytes <= L2_BYTES) else 1
    sets = []
    for i in range(num_sets):
      keys = jax.random.split(jax.random.key(seed + i), 3)
      q, k, v = (jax.random.normal(x, (shape.batch, shape.seq_len, shape.heads, shape.head_dim),
                                   jnp.float32) for x in keys)
      if self.args.outliers:
        idx = np.random.default_rng(seed + i).choice(shape.seq_len, self.args.outliers,
                                                     replace=False)
        k = k.at[:, jnp.asarray(idx)].multiply(50.0)
      sets.append(tuple(x.astype(dtype) for x in (q, k, v)))
    return sets

  def reference(self, shape: Shape, qkv, mask):
    """f32 reference on the first --ref-heads heads (query-chunked)."""
    hr = min(self.args.ref_heads, shape.heads)
    q, k, v = (x[:, :, :hr] for x in qkv)
    m = None if mask is None else mask[:, :hr]
    chunk = None
    if shape.seq_len > 2048:
      chunk = max(shape.block, (2**28 // (4 * hr * shape.seq_len)) // shape.block * shape.block)
    return np.asarray(pk.block_sparse_attention_reference(
        q, k, v, m, block_size=shape.block, query_chunk=chunk)), hr

  # -- one shape -------------------------------------------------------------

  def backends(self) -> list[str]:
    if self.args.backends:
      return self.args.backends
    if self.on_gpu:
      hopper = ["mosaic_gpu"] if mosaic_gpu.is_supported_device() else []
      return hopper + ["triton"] + (["xla"] if self.args.with_xla else [])
    if self.platform == "tpu":
      return ["tpu"] + (["xla"] if self.args.with_xla else [])
    return ["xla", "triton", "tpu"] if self.interpret else ["xla"]

  def run_shape(self, shape: Shape):
    args = self.args
    sets = self.inputs(shape, seed=shape.seq_len + shape.heads)
    qkv0 = sets[0]
    sm_scale = 1.0 / math.sqrt(shape.head_dim)
    dense_ref, hr = self.reference(shape, qkv0, None)
    dense_ms = {}

    # Dense baselines (mask independent).
    if self.on_gpu:
      def cudnn():
        fn = jax.jit(functools.partial(jax.nn.dot_product_attention,
                                       implementation="cudnn"))
        ms, comp, out = time_jax(fn, sets, args.runs)
        err, more = accuracy(out[:, :, :hr], dense_ref)
        return ms, err, {"compile_s": round(comp, 2), **more}
      row = self.guarded(shape, "cudnn_dense", "dense", 1.0, cudnn)
      if row["time_ms"]:
        dense_ms["cudnn"] = row["time_ms"]

      if args.cudnn_fp8 or any(p != "bf16" for p in args.precisions):
        def cudnn_fp8():
          ms, comp, out = time_jax(cudnn_fp8_attention(shape.head_dim), sets, args.runs)
          err, more = accuracy(out[:, :, :hr], dense_ref)
          return ms, err, {"compile_s": round(comp, 2), **more}
        self.guarded(shape, "cudnn_fp8_dense", "dense", 1.0, cudnn_fp8, precision="fp8")

      def pallas_dense():
        from jax.experimental.pallas.ops.gpu import attention as jax_attention
        bs = jax_attention.BlockSizes(block_q=128, block_k=64)
        fn = jax.jit(lambda q, k, v: jax_attention.mha(
            q, k, v, None, sm_scale=sm_scale, block_sizes=bs))
        return self._time_padded(fn, shape, sets, dense_ref, hr)
      self.guarded(shape, "pallas_dense", "dense", 1.0, pallas_dense)

      if mosaic_gpu.is_supported_device():
        def fa3_dense():
          from jax.experimental.pallas.ops.gpu import attention_mgpu
          cfg = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2)
          # FA3 has no softmax scale (folded into q here) and stages tiles in
          # float16 whatever the input: timed on float16 copies (same speed).
          fn = jax.jit(lambda q, k, v: attention_mgpu.attention(q * sm_scale, k, v, cfg))
          f16 = [tuple(x.astype(jnp.float16) for x in st) for st in sets]
          return self._time_padded(fn, shape, f16, dense_ref, hr)
        self.guarded(shape, "jax_fa3_dense", "dense", 1.0, fa3_dense)

    ref_dense_ms = dense_ms.get("cudnn")
    for mask_kind in args.masks:
      for target in args.densities:
        if self.out_of_time():
          return
        rng = np.random.default_rng(zlib.crc32(f"{shape.seq_len}/{shape.heads}/{mask_kind}/{target}".encode()))
        mask_np = make_mask(mask_kind, rng, shape.heads, shape.n, shape.block,
                            shape.seq_len, target)
        density = float(mask_np.mean())
        mask = jnp.asarray(mask_np)
        table = pk.compact_block_mask(mask)
        ref, _ = (dense_ref, hr) if density >= 1.0 else self.reference(shape, qkv0, mask)
        extra = {"target_density": target}

        for impl in self.backends():
          for precision in args.precisions:
            def ours(impl=impl, precision=precision):
              # pk.block_sparse_attention is jitted (static config, global cache):
              # the table is an argument, so masks of one shape compile once.
              # Dense mode is block_mask=None (what a dense step passes).
              fn = functools.partial(
                  pk.block_sparse_attention, block_mask=None if density >= 1.0 else table,
                  block_size=shape.block, implementation=impl, interpret=self.interpret,
                  precision=precision)
              ms, comp, out = time_jax(fn, sets, args.runs)
              err, more = accuracy(out[:, :, :hr], ref)
              more["compile_s"] = round(comp, 2)
              if ref_dense_ms:
                more["speedup_vs_cudnn"] = round(ref_dense_ms / ms, 3)
                more["effective_vs_cudnn"] = round(ref_dense_ms * density / ms, 3)
              return ms, err, more
            self.guarded(shape, f"ours_{impl}", mask_kind, density, ours, precision=precision,
                         **extra)

        if self.torch is not None:
          self.guarded(shape, "flex", mask_kind, density,
                       lambda: self.run_flex(shape, sets, mask, table, ref, hr, sm_scale),
                       **extra)

        if args.sweep and self.on_gpu and mask_kind == args.masks[0] and target in args.sweep_densities \
            and shape.seq_len in args.sweep_seq_lens:
          self.run_triton_sweep(shape, sets, table, ref, hr, mask_kind, density, extra)
        if args.mosaic_sweep and "mosaic_gpu" in self.backends() \
            and target in args.sweep_densities and shape.seq_len in args.sweep_seq_lens:
          self.run_mosaic_sweep(shape, sets, table, ref, hr, mask_kind, density, extra)

        if not args.no_map and mask_kind == args.map_mask:
          self.run_map(shape, sets, mask, table, mask_kind, density, ref_dense_ms, extra)
        self.write()

  def _time_padded(self, fn, shape, sets, dense_ref, hr):
    """Times a dense kernel that needs S % 128 == 0 (jax's mha and FA3)."""
    pad = -shape.seq_len % 128
    if not pad:
      ms, comp, out = time_jax(fn, sets, self.args.runs)
      return ms, rel_err(out[:, :, :hr], dense_ref), {"compile_s": round(comp, 2)}
    # Timed on zero-padded inputs (no rel_err: the padded keys change the result).
    padded = [tuple(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in st)
              for st in sets]
    ms, comp, _ = time_jax(fn, padded, self.args.runs)
    return ms, None, {"compile_s": round(comp, 2), "padded_to": shape.seq_len + pad}

  def run_flex(self, shape, sets, mask, table, ref, hr, sm_scale):
    torch = self.torch
    to_t = lambda x: torch.from_dlpack(x)
    tsets = [tuple(to_t(x).permute(0, 2, 1, 3).contiguous() for x in s) for s in sets]
    counts = to_t(jnp.broadcast_to(table.counts, (shape.batch, shape.heads, shape.n)))
    indices = to_t(jnp.broadcast_to(table.indices,
                                    (shape.batch, shape.heads, shape.n, table.width)))
    counts = counts.to(torch.int32).contiguous()
    indices = indices.to(torch.int32).contiguous()
    zeros_n = torch.zeros_like(counts)
    zeros_i = torch.zeros_like(indices)
    # Every listed block is "full" (no mask_mod calls in the compiled kernel;
    # unlisted blocks are skipped). mask_mod states the same mask token-wise
    # for the paths that do evaluate it (eager / partial blocks).
    dense_mask = to_t(jnp.broadcast_to(mask, (shape.batch, shape.heads, shape.n, shape.n)))
    dense_mask = dense_mask.to(torch.bool).contiguous()
    block = shape.block

    def block_mod(b, h, q_idx, kv_idx):
      return dense_mask[b, h, q_idx // block, kv_idx // block]

    try:
      block_mask = self.BlockMask.from_kv_blocks(
          zeros_n, zeros_i, counts, indices, BLOCK_SIZE=shape.block,
          mask_mod=block_mod, seq_lengths=(shape.seq_len, shape.seq_len))
    except TypeError:
      block_mask = self.BlockMask.from_kv_blocks(zeros_n, zeros_i, counts, indices,
                                                 BLOCK_SIZE=shape.block, mask_mod=block_mod)
    state = {"i": 0}

    def call():
      q, k, v = tsets[state["i"] % len(tsets)]
      state["i"] += 1
      return self.flex(q, k, v, block_mask=block_mask, scale=sm_scale)

    ms, comp, out = time_torch(call, self.args.runs)
    out = out.permute(0, 2, 1, 3)[:, :, :hr].float().cpu().numpy()
    # `out` came from the set used by the first (compile) call: set 0.
    err, more = accuracy(out, ref)
    more["compile_s"] = round(comp, 2)
    tsets.clear()  # free the torch copies
    return ms, err, more

  def run_triton_sweep(self, shape, sets, table, ref, hr, mask_kind, density, extra):
    from pallas_kernels import attention_triton as at
    configs = [(f"bk{block_k}_w{warps}_s{stages}",
                at.TritonConfig(block_k=block_k, num_warps=warps, num_stages=stages))
               for block_k, warps, stages in self.args.sweep_configs]
    self._run_sweep("triton", at.block_sparse_attention_fwd, configs, shape, sets, table,
                    ref, hr, mask_kind, density, extra)

  def run_mosaic_sweep(self, shape, sets, table, ref, hr, mask_kind, density, extra):
    configs = [(f"stages{stages}_regs{registers}_hf{heads_fastest}_k{per_cta}_lpt{lpt}",
                mosaic_gpu.MosaicConfig(stages=stages, compute_registers=registers,
                                        heads_fastest=bool(heads_fastest),
                                        tiles_per_cta=per_cta, longest_first=bool(lpt)))
               for stages, registers, heads_fastest, per_cta, lpt in
               (tuple(c) + (1, 0)[len(c) - 3:] for c in self.args.mosaic_sweep)]
    if density >= 1.0:
      # Dense mode (table=None, the static loop) is the same for every mask kind.
      if mask_kind != self.args.masks[0]:
        return
      configs, table = [(label + "_static", cfg) for label, cfg in configs], None
    self._run_sweep("mosaic_gpu", mosaic_gpu.block_sparse_attention_fwd, configs, shape, sets,
                    table, ref, hr, mask_kind, density, extra)

  def _run_sweep(self, backend, fwd, configs, shape, sets, table, ref, hr, mask_kind, density,
                 extra):
    """Times `fwd(q, k, v, table, config=...)` for each (label, config)."""
    for label, cfg in configs:
      if self.out_of_time():
        return
      def run(cfg=cfg):
        fn = jax.jit(lambda q, k, v, t: fwd(q, k, v, t, block_size=shape.block, config=cfg)[0])
        ms, comp, out = time_jax(fn, [(*st, table) for st in sets], self.args.runs)
        return ms, rel_err(out[:, :, :hr], ref), {"compile_s": round(comp, 2)}
      self.guarded(shape, f"ours_{backend}", mask_kind, density, run,
                   config=label, sweep=True, **extra)

  def run_map(self, shape, sets, mask, table, mask_kind, density, dense_ms, extra):
    args = self.args
    impl = pk_api.default_implementation(shape.dtype, shape.head_dim) \
        if not self.interpret else "triton"
    if args.backends:
      impl = args.backends[0]
    q0, k0, v0 = sets[0]
    dense = density >= 1.0
    bm = None if dense else table
    map_table = None if dense else table.broadcast_to((shape.batch, shape.heads))
    kw = dict(block_size=shape.block, threshold=args.threshold, implementation=impl,
              interpret=self.interpret)
    map_ref = None
    if shape.seq_len <= args.map_ref_max_seq:
      from pallas_kernels.map_reference import sparsity_map_reference
      hr = min(args.ref_heads, shape.heads)
      map_ref = sparsity_map_reference(
          q0[:, :, :hr], k0[:, :, :hr], block_size=shape.block, threshold=args.threshold,
          block_mask=None if dense else mask[:, :hr])
      hr_map = hr

    def err_of(smap):
      return None if map_ref is None else map_rel_err(smap[:, :hr_map], map_ref)

    extra = dict(extra, map_impl=impl)
    if dense_ms:
      extra["dense_attention_ms"] = dense_ms

    computed = {}

    def given_lse():
      lse = computed["lse"] = pk_api._attention_module(impl).block_sparse_lse(
          q0, k0, None if dense else table,
          block_size=shape.block, sm_scale=1.0 / math.sqrt(shape.head_dim),
          interpret=self.interpret)
      mod = pk_api._map_module(impl)
      fn = jax.jit(lambda q, k, l, t: mod.sparsity_map_from_lse(
          q, k, l, t, block_size=shape.block, threshold=args.threshold,
          sm_scale=1.0 / math.sqrt(shape.head_dim), interpret=self.interpret))
      ms, comp, out = time_jax(fn, [(q0, k0, lse, map_table)], args.runs)
      return ms, err_of(out), self._vs_dense(ms, dense_ms, comp)
    self.guarded(shape, "sparsity_map", mask_kind, density, given_lse,
                 variant="given_lse", **extra)
    if "lse" in computed and impl != "xla" and shape.seq_len in args.sweep_seq_lens \
        and extra["target_density"] in args.sweep_densities:
      self.run_map_sweep(shape, q0, k0, computed["lse"], map_table, mask_kind, density,
                         dense_ms, extra)

    for precision in args.precisions:
      # Quantized maps are checked against the bf16 reference map (quantization
      # moves a few entries across the threshold): rel_err is indicative there.
      def with_lse(precision=precision):
        fn = lambda q, k, m: pk.sparsity_map(q, k, block_mask=m, precision=precision, **kw)
        ms, comp, out = time_jax(fn, [(q, k, bm) for q, k, _ in sets], args.runs)
        return ms, err_of(out), self._vs_dense(ms, dense_ms, comp)
      self.guarded(shape, "sparsity_map", mask_kind, density, with_lse,
                   variant="with_lse_pass", precision=precision, **extra)

      def with_map(precision=precision):
        fn = functools.partial(pk.block_sparse_attention_with_map, block_mask=bm,
                               precision=precision, **kw)
        ms, comp, out = time_jax(fn, sets, args.runs)
        return ms, err_of(out[1]), self._vs_dense(ms, dense_ms, comp)
      self.guarded(shape, "attention_with_map", mask_kind, density, with_map,
                   precision=precision, **extra)

  def run_map_sweep(self, shape, q0, k0, lse, map_table, mask_kind, density, dense_ms,
                    extra):
    """Triton map-kernel launch configs (--map-sweep) on the lse run_map computed."""
    from pallas_kernels import map_triton
    scale = 1.0 / math.sqrt(shape.head_dim)
    seen = set()
    for warps, stages, *dense in self.args.map_sweep:
      if self.out_of_time():
        return
      label = f"w{warps}_s{stages}"
      if dense and map_table is None:   # the chunking applies to the dense map only
        label += f"_k{dense[0] or 'auto'}" + (f"_g{dense[1]}" if len(dense) > 1 else "")
      if label in seen:
        continue
      seen.add(label)
      def run(warps=warps, stages=stages, dense=dense):
        cfg = map_triton.MapBlockConfig(    # inside guarded(): a bad config is an error row
            num_warps=warps, num_stages=stages,
            key_splits=(dense[0] or None) if dense else None,
            count_group=dense[1] if len(dense) > 1 else map_triton.MapBlockConfig.count_group)
        fn = jax.jit(lambda q, k, l, t: map_triton.sparsity_map_triton(
            q, k, l, t, block_size=shape.block, threshold=self.args.threshold,
            sm_scale=scale, interpret=self.interpret, config=cfg))
        ms, comp, _ = time_jax(fn, [(q0, k0, lse, map_table)], self.args.runs)
        return ms, None, self._vs_dense(ms, dense_ms, comp)
      self.guarded(shape, "sparsity_map", mask_kind, density, run, variant="given_lse",
                   config=label, sweep=True, **extra)

  @staticmethod
  def _vs_dense(ms, dense_ms, comp):
    more = {"compile_s": round(comp, 2)}
    if dense_ms:
      more["ratio_vs_dense"] = round(ms / dense_ms, 4)
    return more

  # -- summary ---------------------------------------------------------------

  def print_table(self):
    rows = [r for r in self.rows if not r.get("sweep")]
    keys = sorted({(r["seq_len"], r["heads"]) for r in rows})
    print("\n=== block-sparse attention, time ms (rel_err) ===")
    impls = [i for i in ("cudnn_dense", "jax_fa3_dense", "pallas_dense", "flex")
             if any(r["impl"] == i for r in rows)]
    for r in rows:
      if r["impl"].startswith("ours_") and r.get("precision", "bf16") != "bf16" \
          and not r["impl"].endswith(r["precision"]):
        r["impl"] = f"{r['impl']}:{r['precision']}"
    impls += sorted({r["impl"] for r in rows if r["impl"].startswith("ours_")})
    header = f"{'S':>6} {'H':>3} {'mask':>7} {'dens':>6} " + "".join(f"{i:>20}" for i in impls)
    header += f"{'vs cudnn':>10}{'vs flex':>9}"
    print(header)
    for s, h in keys:
      dense = {r["impl"]: r for r in rows if r["seq_len"] == s and r["heads"] == h
               and r["mask"] == "dense"}
      groups = sorted({(r["mask"], r["density"]) for r in rows if r["seq_len"] == s
                       and r["heads"] == h and r["mask"] != "dense"
                       and r["impl"].startswith(("ours_", "flex"))},
                      key=lambda x: (x[0], -x[1]))
      for mask, dens in groups:
        cells = []
        by = {r["impl"]: r for r in rows if r["seq_len"] == s and r["heads"] == h
              and r["mask"] == mask and r["density"] == dens}
        for i in impls:
          r = by.get(i) or (dense.get(i) if i.endswith("_dense") else None)
          if r is None or r["time_ms"] is None:
            cells.append(f"{'-':>20}")
          else:
            e = r["rel_err"]
            cells.append(f"{r['time_ms']:>10.3f} ({'-' if e is None else f'{e:.0e}'})".rjust(20))
        ours = [by[i]["time_ms"] for i in impls if i.startswith("ours_") and i in by
                and by[i]["time_ms"]]
        best = min(ours) if ours else None
        c = dense.get("cudnn_dense", {}).get("time_ms")
        f = by.get("flex", {}).get("time_ms")
        vs_c = f"{c / best:>9.2f}x" if best and c else f"{'-':>10}"
        vs_f = f"{f / best:>8.2f}x" if best and f else f"{'-':>9}"
        print(f"{s:>6} {h:>3} {mask:>7} {dens:>6.3f} " + "".join(cells) + vs_c + vs_f)
    maps = [r for r in self.rows if r["impl"] in ("sparsity_map", "attention_with_map")
            and not r.get("sweep")]
    if maps:
      print("\n=== sparsity map, time ms (ratio to one dense attention call) ===")
      for r in maps:
        ratio = r.get("ratio_vs_dense")
        t = "-" if r["time_ms"] is None else f"{r['time_ms']:.3f}"
        print(f"{r['seq_len']:>6} {r['heads']:>3} {r['mask']:>7} {r['density']:>6.3f} "
              f"{r['impl'] + ':' + r.get('variant', ''):>32} {t:>10} "
              f"{'' if ratio is None else f'{ratio:.3f}':>8} rel_err={r['rel_err']}")
    sweep = [r for r in self.rows if r.get("sweep")]
    if sweep:
      print("\n=== tiling sweep, time ms ===")
      for r in sweep:
        t = "-" if r["time_ms"] is None else f"{r['time_ms']:.3f}"
        print(f"{r['seq_len']:>6} {r['heads']:>3} {r['mask']:>7} {r['density']:>6.3f} "
              f"{r['impl']:>16} {r['config']:>30} {t:>10}")


def _slug(s: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/kernel-<card>-<date>.json)")
  p.add_argument("--quick", action="store_true", help="small subset (smoke test)")
  p.add_argument("--interpret", action="store_true",
                 help="run the Pallas backends in interpret mode (CPU smoke test)")
  p.add_argument("--seq-lens", type=int, nargs="+", default=None)
  p.add_argument("--long", action="store_true", help=f"also S={LONG_SEQ_LEN}")
  p.add_argument("--heads", type=int, nargs="+", default=None)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--block-size", type=int, default=128, choices=(64, 128))
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
  p.add_argument("--densities", type=float, nargs="+", default=None)
  p.add_argument("--masks", nargs="+", default=None, choices=MASKS)
  p.add_argument("--backends", nargs="+", default=None, choices=pk.IMPLEMENTATIONS)
  p.add_argument("--with-xla", action="store_true", help="also time the XLA backend on GPU")
  p.add_argument("--precisions", nargs="+", default=["bf16"], choices=pk.PRECISIONS,
                 help="precisions of our rows (quantized ones also time cuDNN FP8 dense)")
  p.add_argument("--cudnn-fp8", action="store_true", help="time jax's cuDNN FP8 attention")
  p.add_argument("--outliers", type=int, default=0,
                 help="key tokens multiplied by 50 in every input set")
  p.add_argument("--family", default=None, choices=sorted(FAMILIES),
                 help="a family's attention shape: " + ", ".join(
                     f"{k} {s} tokens x {h} heads of {d}" for k, (s, h, d, _) in FAMILIES.items()))
  p.add_argument("--cogvideo", dest="family", action="store_const", const="cogvideox",
                 help="--family cogvideox")
  p.add_argument("--runs", type=int, default=20)
  p.add_argument("--ref-heads", type=int, default=2,
                 help="heads checked against the f32 reference")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--no-map", action="store_true")
  p.add_argument("--map-mask", default="mod", choices=MASKS)
  p.add_argument("--map-ref-max-seq", type=int, default=16384)
  p.add_argument("--threshold", type=float, default=1e-4)
  p.add_argument("--no-sweep", dest="sweep", action="store_false")
  p.add_argument("--sweep-configs", type=_tiling_list, default=TRITON_SWEEP,
                 help="Triton tilings to sweep, 'block_k,warps,stages;...'")
  p.add_argument("--mosaic-sweep", type=_tiling_list, default=(),
                 help="Mosaic GPU configs to sweep (every mask kind), "
                      "'stages,registers,heads_fastest[,tiles_per_cta[,longest_first]];...' "
                      "(e.g. '2,232,1;2,232,0,2;2,232,0,1,1')")
  p.add_argument("--map-sweep", type=_tiling_list, default=(),
                 help="Triton map-kernel configs to sweep, "
                      "'warps,stages[,key_splits[,count_group]];...' (the last two: dense "
                      "map only; key_splits 0 = auto)")
  p.add_argument("--sweep-seq-lens", type=int, nargs="+", default=[16384, 32760])
  p.add_argument("--sweep-densities", type=float, nargs="+", default=[1.0, 0.25])
  p.add_argument("--max-minutes", type=float, default=45.0)
  p.add_argument("--verbose", action="store_true")
  args = p.parse_args(argv)

  if args.quick:
    if args.interpret or jax.default_backend() == "cpu":
      args.seq_lens = args.seq_lens or [300]
      args.heads = args.heads or [2]
      args.head_dim = 64
      args.block_size = 64 if args.block_size == 128 else args.block_size
      args.runs = min(args.runs, 3)
      args.densities = args.densities or [1.0, 0.5]
      args.map_ref_max_seq = 4096
    else:
      args.seq_lens = args.seq_lens or [4096, 16384]
      args.heads = args.heads or [16]
      args.densities = args.densities or [1.0, 0.25, 0.1]
      args.sweep_seq_lens = [16384]
      args.sweep_densities = [0.25]
  if args.family:
    seq, heads, args.head_dim, _ = FAMILIES[args.family]
    args.seq_lens = args.seq_lens or [seq]
    args.heads = args.heads or [heads]
    args.densities = args.densities or [1.0, 0.25, 0.2, 0.1]
  args.seq_lens = args.seq_lens or list(SEQ_LENS) + ([LONG_SEQ_LEN] if args.long else [])
  args.heads = args.heads or list(HEADS)
  args.densities = args.densities or list(DENSITIES)
  args.masks = args.masks or list(MASKS)
  if args.map_mask not in args.masks:
    args.map_mask = args.masks[0]
  if args.out is None:
    dev = jax.devices()[0]
    card = _slug(getattr(dev, "device_kind", "cpu"))
    args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            f"kernel-{card}-{datetime.date.today().isoformat()}.json")
  return args


def main(argv=None):
  args = parse_args(argv)
  bench = Bench(args)
  print(f"[bench] card={bench.card} jax={jax.__version__} platform={bench.platform} "
        f"interpret={bench.interpret} out={args.out}", flush=True)
  try:
    for s in args.seq_lens:
      for h in args.heads:
        if bench.out_of_time():
          break
        shape = Shape(seq_len=s, heads=h, head_dim=args.head_dim, batch=args.batch,
                      dtype=args.dtype, block=args.block_size)
        bench.run_shape(shape)
        bench.write()
        if bench.torch is not None:
          bench.torch.cuda.empty_cache()
  finally:
    bench.write()
    bench.print_table()
    print(f"\n[bench] wrote {len(bench.rows)} rows to {args.out}", flush=True)


if __name__ == "__main__":
  main()

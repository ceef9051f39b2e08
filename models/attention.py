"""Self-attention dispatch for the DiT: dense backends and the block-sparse hooks.

The model never decides how attention is computed. Each block hands its q, k, v
and one layer's slice of an `AttentionControl` to `self_attention`, which picks
the backend and returns the output plus per-layer statistics (the sparsity map
when the control asks for one). MOD-DiT and the baselines only change the
control, never the model code.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

DENSE_IMPLEMENTATIONS = ("xla", "cudnn")
MODES = ("dense", "dense_map", "sparse", "sparse_map", "oracle")


@struct.dataclass
class AttentionControl:
  """How every self-attention layer runs in one model call.

  mode:
    "dense"       full attention through `implementation` (xla | cudnn | None=auto);
    "dense_map"   full attention plus the sparsity map S of every block;
    "sparse"      block-sparse attention with `block_mask`;
    "sparse_map"  block-sparse attention plus S on the active blocks only;
    "oracle"      measure the exact S of this call, keep the `oracle_keep`
                  lowest-S blocks per head (plus the diagonal), attend sparsely.
  block_mask: bool [L, B, H, n, n] (one slice per layer), or a
    `pallas_kernels.BlockTable` with the same leading axes; None for dense modes.
  """

  block_mask: Optional[Any] = None
  mode: str = struct.field(pytree_node=False, default="dense")
  implementation: Optional[str] = struct.field(pytree_node=False, default=None)
  sparse_implementation: Optional[str] = struct.field(pytree_node=False, default=None)
  block_size: int = struct.field(pytree_node=False, default=128)
  threshold: float = struct.field(pytree_node=False, default=1e-4)
  oracle_keep: int = struct.field(pytree_node=False, default=0)
  # Diagnostic: also return "mask_recall" [B, H], the share of the dense softmax
  # mass inside the mask used (sparse modes only; costs a dense pass).
  record_recall: bool = struct.field(pytree_node=False, default=False)

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"AttentionControl.mode must be one of {MODES}, got {self.mode!r}")
    if self.implementation not in (None,) + DENSE_IMPLEMENTATIONS:
      raise ValueError(
          f"AttentionControl.implementation must be None or one of {DENSE_IMPLEMENTATIONS}, "
          f"got {self.implementation!r}")
    if self.mode.startswith("sparse") and self.block_mask is None:
      raise ValueError(f"AttentionControl(mode={self.mode!r}) needs a block_mask")

  @property
  def measures_map(self) -> bool:
    return self.mode.endswith("_map")


def dense_attention(q, k, v, *, implementation: Optional[str] = None):
  """Full softmax attention, q/k/v [B, S, H, D] -> [B, S, H, D]."""
  if implementation is None:
    on_gpu = jax.default_backend() == "gpu"
    implementation = "cudnn" if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
  if implementation not in DENSE_IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {DENSE_IMPLEMENTATIONS}, got {implementation!r}")
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def self_attention(q, k, v, control: Optional[AttentionControl] = None):
  """Attention for one layer. Returns (out [B, S, H, D], stats dict).

  stats holds "sparsity_map" (float32 [B, H, n, n]) for the *_map modes and is
  empty otherwise, so scanned layers stack it into [L, B, H, n, n].
  """
  control = control or AttentionControl()
  if control.mode == "dense":
    return dense_attention(q, k, v, implementation=control.implementation), {}

  import pallas_kernels  # the kernels package is optional for dense-only use

  if control.mode == "oracle":
    from modjax import masks  # the oracle's block choice lives with the other baselines
    smap = pallas_kernels.sparsity_map(
        q, k, block_size=control.block_size, threshold=control.threshold,
        implementation=control.sparse_implementation)
    mask = masks.topk_blocks_mask(smap, control.oracle_keep)
    out = pallas_kernels.block_sparse_attention(
        q, k, v, mask, block_size=control.block_size,
        implementation=control.sparse_implementation)
    return out, _recall_stats(q, k, mask, control)
  if control.mode == "sparse":
    out = pallas_kernels.block_sparse_attention(
        q, k, v, control.block_mask, block_size=control.block_size,
        implementation=control.sparse_implementation)
    return out, _recall_stats(q, k, control.block_mask, control)
  # Both *_map modes run our flash pass (which yields the row log-sum-exp the
  # map needs) and the QK-only map pass; dense_map passes no mask.
  block_mask = control.block_mask if control.mode == "sparse_map" else None
  out, smap = pallas_kernels.block_sparse_attention_with_map(
      q, k, v, block_mask, block_size=control.block_size,
      threshold=control.threshold, implementation=control.sparse_implementation)
  stats = {"sparsity_map": smap}
  if block_mask is not None:
    stats.update(_recall_stats(q, k, block_mask, control))
  return out, stats


def _recall_stats(q, k, block_mask, control: AttentionControl) -> dict:
  if not control.record_recall:
    return {}
  from pallas_kernels.attention_reference import mask_recall
  return {"mask_recall": mask_recall(q, k, block_mask, block_size=control.block_size)}

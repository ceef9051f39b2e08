"""What one denoising step asks of attention: `AttentionControl`.

The sampler builds one control per model call from the attention policy's
state; the model hands each layer's slice of it (under `nn.scan`) to
`models.attention`, which calls the two methods below. MOD-DiT and the
baselines only change the control, never the model code.
"""

from __future__ import annotations

from typing import Any, Optional

from flax import struct

import pallas_kernels
from models.attention import DENSE_IMPLEMENTATIONS, dense_attention
from modjax import masks

MODES = ("dense", "dense_map", "sparse", "sparse_map", "oracle")


@struct.dataclass
class AttentionControl:
  """How every self-attention layer runs in one model call (an `AttentionHook`).

  mode:
    "dense"       full attention through `implementation` (xla | cudnn | None=auto);
    "dense_map"   full attention plus the sparsity map S of every block;
    "sparse"      block-sparse attention with `block_mask`;
    "sparse_map"  block-sparse attention plus S on the active blocks only;
    "oracle"      measure the exact block mass map of this call, keep in every
                  query-block row the `oracle_keep` key blocks with the most
                  mass (the diagonal among them), attend sparsely.
  block_mask: bool [L, B, H, n, n] (one slice per layer), or a
    `pallas_kernels.BlockTable` with the same leading axes; None for dense modes.
    In "oracle" mode an optional bool mask of blocks forced on (dense layers).
  Cross-attention is always dense, through `implementation`, unquantized.
  precision: kernel precision of the sparse and oracle modes; dense_precision: of
    "dense" and "dense_map" (pallas_kernels.PRECISIONS). A quantized "dense" runs
    our kernel with no mask (through `sparse_implementation`), not cuDNN / XLA.
  parallel: a `modjax.sharding.Parallel` (static): both attentions run under its
    mesh (Ulysses all-to-alls around self-attention); None calls the kernels
    directly. head_order: int32 [L, B, H] (slot -> head) under head balancing:
    block_mask and the sparsity map are in slot order (see modjax.sharding).
  """

  block_mask: Optional[Any] = None
  mode: str = struct.field(pytree_node=False, default="dense")
  implementation: Optional[str] = struct.field(pytree_node=False, default=None)
  sparse_implementation: Optional[str] = struct.field(pytree_node=False, default=None)
  block_size: int = struct.field(pytree_node=False, default=128)
  threshold: float = struct.field(pytree_node=False, default=1e-4)
  oracle_keep: int = struct.field(pytree_node=False, default=0)
  # (v0, v1): the whole video blocks of a text + video sequence; the oracle chooses
  # among video-video blocks only (text rows and columns stay on). None: all video.
  video_blocks: Optional[tuple] = struct.field(pytree_node=False, default=None)
  # Diagnostic: also return "mask_recall" [B, H], the share of the dense softmax
  # mass inside the mask used (sparse modes only; costs a dense pass).
  record_recall: bool = struct.field(pytree_node=False, default=False)
  head_order: Optional[Any] = None
  parallel: Optional[Any] = struct.field(pytree_node=False, default=None)
  precision: str = struct.field(pytree_node=False, default="bf16")
  dense_precision: str = struct.field(pytree_node=False, default="bf16")

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

  def cross_attention(self, q, k, v):
    attend = lambda q, k, v: dense_attention(q, k, v, implementation=self.implementation)
    if self.parallel is not None:
      return self.parallel.cross_attention(attend, q, k, v)
    return attend(q, k, v)

  def self_attention(self, q, k, v):
    """(out [B, S, H, D], stats): stats holds "sparsity_map" (float32 [B, H, n, n])
    for the *_map modes and "mask_recall" when asked, so scanned layers stack
    them into [L, ...]."""
    if self.parallel is not None:
      order = None if self.mode == "dense" else self.head_order
      return self.parallel.self_attention(self._self_attention, q, k, v, self.block_mask, order)
    return self._self_attention(q, k, v, self.block_mask)

  def _self_attention(self, q, k, v, block_mask):
    """self_attention on the heads at hand, with their block_mask (not self's)."""
    if self.mode == "dense":
      if self.dense_precision != "bf16":
        return pallas_kernels.block_sparse_attention(
            q, k, v, None, block_size=self.block_size, implementation=self.sparse_implementation,
            precision=self.dense_precision), {}
      return dense_attention(q, k, v, implementation=self.implementation), {}
    if self.mode == "oracle":
      if self.video_blocks is None:
        mask = masks.mass_oracle_mask(q, k, self.oracle_keep, block_size=self.block_size,
                                      implementation=self.sparse_implementation)
      else:
        mask = masks.joint_mass_oracle_mask(q, k, self.oracle_keep, self.video_blocks,
                                            block_size=self.block_size,
                                            implementation=self.sparse_implementation)
      if block_mask is not None:  # blocks forced on (dense layers)
        mask = mask | block_mask
      out = pallas_kernels.block_sparse_attention(
          q, k, v, mask, block_size=self.block_size, implementation=self.sparse_implementation,
          precision=self.precision)
      return out, self._recall_stats(q, k, mask)
    if self.mode == "sparse":
      out = pallas_kernels.block_sparse_attention(
          q, k, v, block_mask, block_size=self.block_size,
          implementation=self.sparse_implementation, precision=self.precision)
      return out, self._recall_stats(q, k, block_mask)
    # Both *_map modes run our flash pass (which yields the row log-sum-exp the
    # map needs) and the QK-only map pass; dense_map passes no mask.
    block_mask = block_mask if self.mode == "sparse_map" else None
    precision = self.precision if self.mode == "sparse_map" else self.dense_precision
    out, smap = pallas_kernels.block_sparse_attention_with_map(
        q, k, v, block_mask, block_size=self.block_size, threshold=self.threshold,
        implementation=self.sparse_implementation, precision=precision)
    stats = {"sparsity_map": smap}
    if block_mask is not None:
      stats.update(self._recall_stats(q, k, block_mask))
    return out, stats

  def _recall_stats(self, q, k, block_mask) -> dict:
    if not self.record_recall:
      return {}
    from pallas_kernels.attention_reference import mask_recall
    return {"mask_recall": mask_recall(q, k, block_mask, block_size=self.block_size)}

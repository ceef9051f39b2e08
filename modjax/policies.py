"""Attention policies: what each denoising step asks of attention, and how the
carried state evolves. One policy per config (dense, MOD-DiT, baselines).

A policy is static (hashable, built from a config and the video geometry). The
sampler asks it for the per-step kinds before the scan, and inside the scan for
the `AttentionControl` of a step kind and the state update after the model
call. All per-layer state is stacked with the layer axis first
([L, B, H, ...]) because the model scans over layers on axis 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import pallas_kernels
from modjax import config as cfg_lib
from modjax import features as features_lib
from modjax import masks as masks_lib
from modjax.control import AttentionControl
from modjax import predict as predict_lib
from modjax.schedule import StepKind, mod_step_kinds, warmup_step_kinds


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static sizes of the attention problem the policy works on.

  The self-attention sequence holds seq_len tokens on a grid of `total_blocks`
  blocks; the video tokens are [video_start, video_start + video_tokens)
  (docs/algorithm.md section 10). MOD-DiT's map, fit, prediction and history
  cover the blocks that hold video tokens only, `video_blocks` = [v0, v1):
  n = v1 - v0 of them (`num_blocks`). Every other block -- a text block, or a
  block where text and video meet when the video region does not start or end
  on a block boundary -- is a text block: its row and its column are always
  computed, so attention stays exact whatever the alignment. Wan's sequence is
  all video: [v0, v1) is the whole grid and nothing changes.
  """
  num_layers: int
  batch: int            # rows of the model batch (2 x videos with CFG)
  heads: int
  seq_len: int
  tokens_per_frame: int
  block_size: int
  video_start: int = 0
  video_tokens: Optional[int] = None   # None: the whole sequence

  def __post_init__(self):
    if self.video_tokens is None:
      object.__setattr__(self, "video_tokens", self.seq_len - self.video_start)
    end = self.video_start + self.video_tokens
    if self.video_start < 0 or self.video_tokens < 1 or end > self.seq_len:
      raise ValueError(f"video tokens [{self.video_start}, {end}) must lie inside the "
                       f"{self.seq_len}-token sequence")

  def check_sparse(self) -> None:
    """A block-sparse policy needs at least one whole video block."""
    v0, v1 = self.video_blocks
    if v1 <= v0:
      raise ValueError(
          f"the video tokens [{self.video_start}, {self.video_start + self.video_tokens}) "
          f"fill no whole block of {self.block_size} tokens: nothing to make sparse (use "
          f"dense attention{' or block_size 64' if self.block_size > 64 else ''})")

  @classmethod
  def from_layout(cls, layout, *, batch: int, block_size: int) -> "Geometry":
    """From a family's `models.family.AttentionLayout` at some latent sizes."""
    return cls(num_layers=layout.num_layers, batch=batch, heads=layout.num_heads,
               seq_len=layout.seq_len, tokens_per_frame=layout.tokens_per_frame,
               block_size=block_size, video_start=layout.video_start,
               video_tokens=layout.video_tokens)

  @property
  def total_blocks(self) -> int:
    """Blocks of the whole sequence (the kernel's grid)."""
    return -(-self.seq_len // self.block_size)

  @property
  def video_blocks(self) -> tuple[int, int]:
    """[v0, v1): the blocks that hold video tokens only (a short last block of the
    sequence counts, as the kernels take ragged tails)."""
    b, end = self.block_size, self.video_start + self.video_tokens
    v0 = -(-self.video_start // b)
    v1 = self.total_blocks if end == self.seq_len else end // b
    return v0, v1

  @property
  def joint(self) -> bool:
    """True when some blocks are text blocks (always computed)."""
    return self.video_blocks != (0, self.total_blocks)

  @property
  def num_blocks(self) -> int:
    """n: MOD-DiT's blocks per side (the video blocks)."""
    v0, v1 = self.video_blocks
    return v1 - v0

  def kernel_mask(self, video_mask: jax.Array) -> jax.Array:
    """The kernel's [..., N, N] mask of a video-video mask [..., n, n]."""
    return masks_lib.embed_video_mask(video_mask, self.total_blocks, self.video_blocks)

  def video_part(self, full: jax.Array) -> jax.Array:
    """[..., n, n]: the video-video blocks of a whole-sequence [..., N, N] map."""
    if not self.joint:
      return full
    v0, v1 = self.video_blocks
    return full[..., v0:v1, v0:v1]

  def kernel_width(self, video_width: int) -> int:
    """Table width of kernel_mask(...): text rows hold every block."""
    return self.total_blocks if self.joint else video_width

  @property
  def blocks_per_frame(self) -> int:
    return max(self.tokens_per_frame // self.block_size, 1)

  @property
  def lead(self):
    return (self.num_layers, self.batch, self.heads)


@struct.dataclass
class MODState:
  """MOD-DiT's history, carried through the denoising scan.

  prev_map: [L, B, H, n, n] in the config's history_dtype (float16 by default),
    last measured sparsity of each block (blocks skipped since keep their older
    value).
  x_prev, x_cur: the last two fitted PatternFeatures.
  block_diagonal: bool [L, B, H], fixed at the end of warm-up.
  mask: bool [L, B, H, n, n]; table: its compacted form for the kernel.
  """
  prev_map: jax.Array
  x_prev: features_lib.PatternFeatures
  x_cur: features_lib.PatternFeatures
  block_diagonal: jax.Array
  mask: jax.Array
  table: Any


@struct.dataclass
class FixedMaskState:
  """A mask that does not change over steps (static window baseline)."""
  mask: jax.Array
  table: Any


def _layer_dense(geom: Geometry, dense_layers: int) -> np.ndarray:
  """bool [L, 1, 1, 1, 1]: layers that always run dense."""
  return (np.arange(geom.num_layers) < dense_layers).reshape(-1, 1, 1, 1, 1)


def _compact(mask: jax.Array, width: int):
  flat = mask.reshape((-1,) + mask.shape[-3:])
  table = jax.vmap(functools.partial(pallas_kernels.compact_block_mask, max_width=width))(flat)
  return jax.tree.map(lambda a: a.reshape(mask.shape[:-3] + a.shape[1:]), table)


def _mean_density(mask: jax.Array) -> jax.Array:
  """Per-layer fraction of computed blocks, float32 [L]."""
  return jnp.mean(mask, axis=tuple(range(1, mask.ndim)), dtype=jnp.float32)


class DensePolicy:
  """Full attention every step; no state."""

  def __init__(self, config: cfg_lib.DenseConfig, geom: Geometry):
    self.config, self.geom = config, geom

  def step_kinds(self, num_steps: int) -> np.ndarray:
    return np.full((num_steps,), StepKind.DENSE, np.int32)

  def init(self):
    return ()

  def control(self, state, kind: StepKind) -> AttentionControl:
    c = self.config
    return AttentionControl(mode="dense", implementation=c.implementation,
                            dense_precision=c.precision)

  def update(self, state, stats, kind: StepKind):
    return state

  def density(self, state, kind: StepKind) -> jax.Array:
    return jnp.ones((self.geom.num_layers,), jnp.float32)


class _SparsePolicy:
  """Shared plumbing of the policies that run the block-sparse kernel."""

  def __init__(self, config, geom: Geometry):
    geom.check_sparse()
    self.config, self.geom = config, geom

  def _control(self, mode: str, block_mask=None, **extra) -> AttentionControl:
    c = self.config
    return AttentionControl(
        mode=mode, block_mask=block_mask, implementation=c.dense_implementation,
        sparse_implementation=c.implementation, block_size=c.block_size,
        threshold=getattr(c, "threshold", 1e-4), precision=c.precision,
        dense_precision=c.dense_precision, **extra)

  def _with_dense_layers(self, mask: jax.Array) -> jax.Array:
    return mask | _layer_dense(self.geom, self.config.dense_layers)

  def density(self, state, kind: StepKind) -> jax.Array:
    if kind in (StepKind.DENSE, StepKind.MAP) or (
        kind == StepKind.REFRESH and self.config.refresh == "dense"):
      return jnp.ones((self.geom.num_layers,), jnp.float32)
    return _mean_density(state.mask)


class MODPolicy(_SparsePolicy):
  """MOD-DiT, docs/algorithm.md sections 2-4 (and 10 for text tokens)."""

  def __init__(self, config: cfg_lib.MODConfig, geom: Geometry):
    super().__init__(config, geom)
    n, bpf = geom.num_blocks, geom.blocks_per_frame
    self.top_k = predict_lib.resolve_top_k(config.top_k, n)
    self.width = geom.kernel_width(predict_lib.max_row_width(self.top_k, n, bpf))

  @property
  def history_dtype(self):
    return jnp.dtype(self.config.history_dtype)

  def step_kinds(self, num_steps: int) -> np.ndarray:
    c = self.config
    kinds = mod_step_kinds(num_steps, c.warmup_steps, c.interval, refresh=c.refresh != "none")
    if c.first_mask == "last_map" and c.warmup_steps >= 2 and num_steps > c.warmup_steps - 2:
      # The authors' fit returns zeros at step W-2, so its map is never used:
      # run that step plain dense and extrapolate X(W-1) from zero features.
      kinds[c.warmup_steps - 2] = StepKind.DENSE
    return kinds

  def init(self) -> MODState:
    g = self.geom
    n = g.num_blocks
    zeros = lambda *s: jnp.zeros(g.lead + s, jnp.float32)
    feats = features_lib.PatternFeatures(diag=zeros(2 * n - 1), col=zeros(n), block=zeros())
    mask = jnp.ones(g.lead + (n, n), bool)
    return MODState(
        prev_map=jnp.ones(g.lead + (n, n), self.history_dtype), x_prev=feats, x_cur=feats,
        block_diagonal=jnp.zeros(g.lead, bool), mask=mask,
        table=_compact(g.kernel_mask(mask), self.width))

  def control(self, state: MODState, kind: StepKind) -> AttentionControl:
    if kind == StepKind.DENSE:
      return self._control("dense")
    if kind == StepKind.MAP or (kind == StepKind.REFRESH and self.config.refresh == "dense"):
      return self._control("dense_map")
    if kind == StepKind.REFRESH:
      return self._control("sparse_map", state.table)
    return self._control("sparse", state.table)

  def _predict(self, x_prev, x_cur, block_diagonal):
    mask = predict_lib.predict_mask(
        x_prev, x_cur, interval=self.config.interval, top_k=self.top_k,
        blocks_per_frame=self.geom.blocks_per_frame, block_diagonal=block_diagonal,
        tail_block_diagonal=self.config.tail_block_diagonal)
    return self._with_dense_layers(mask)

  def update(self, state: MODState, stats, kind: StepKind) -> MODState:
    if kind not in (StepKind.MAP, StepKind.REFRESH):
      return state
    c, bpf = self.config, self.geom.blocks_per_frame
    smap = self.geom.video_part(stats["sparsity_map"]).astype(self.history_dtype)
    if kind == StepKind.MAP:
      merged = smap
    else:  # history: blocks skipped under the current mask keep their older value
      merged = jnp.where(state.mask, smap, state.prev_map)
    fitted = features_lib.fit_pattern_features(merged, bpf, c.ridge)
    block_diagonal = (predict_lib.block_diagonal_mode(fitted, c.e_max)
                      if kind == StepKind.MAP else state.block_diagonal)
    mask = self._predict(state.x_cur, fitted, block_diagonal)
    return MODState(prev_map=merged, x_prev=state.x_cur, x_cur=fitted,
                    block_diagonal=block_diagonal, mask=mask,
                    table=_compact(self.geom.kernel_mask(mask), self.width))


class StaticMaskPolicy(_SparsePolicy):
  """Dense warm-up, then one fixed mask (window or MOD-shaped lines) for every layer and head."""

  def __init__(self, config: cfg_lib.StaticMaskConfig, geom: Geometry):
    super().__init__(config, geom)

  def step_kinds(self, num_steps: int) -> np.ndarray:
    return warmup_step_kinds(num_steps, self.config.warmup_steps)

  def init(self) -> FixedMaskState:
    g = self.geom
    build = {"window": masks_lib.static_window_for_density,
             "lines": masks_lib.lines_mask_for_density}[self.config.pattern]
    band = build(g.num_blocks, g.blocks_per_frame, self.config.density)
    mask = self._with_dense_layers(jnp.broadcast_to(jnp.asarray(band), g.lead + band.shape))
    return FixedMaskState(mask=mask, table=_compact(g.kernel_mask(mask), g.total_blocks))

  def control(self, state, kind: StepKind) -> AttentionControl:
    if kind == StepKind.DENSE:
      return self._control("dense")
    return self._control("sparse", state.table)

  def update(self, state, stats, kind):
    return state

  def density(self, state, kind):
    if kind == StepKind.DENSE:
      return jnp.ones((self.geom.num_layers,), jnp.float32)
    return _mean_density(state.mask)


class OraclePolicy(_SparsePolicy):
  """Dense warm-up, then every query-block row keeps the key blocks with the most
  softmax mass of that very step (`masks.mass_oracle_mask`), the same number of
  blocks in every row; layers below dense_layers run dense."""

  def __init__(self, config: cfg_lib.OracleConfig, geom: Geometry):
    super().__init__(config, geom)
    self.keep = masks_lib.resolve_row_count(config.density, geom.num_blocks)

  def step_kinds(self, num_steps: int) -> np.ndarray:
    return warmup_step_kinds(num_steps, self.config.warmup_steps)

  def init(self):
    return ()

  def control(self, state, kind: StepKind) -> AttentionControl:
    if kind == StepKind.DENSE:
      return self._control("dense")
    forced = None
    g = self.geom
    if self.config.dense_layers:  # blocks forced on: every block of the dense layers
      forced = jnp.broadcast_to(jnp.asarray(_layer_dense(g, self.config.dense_layers)),
                                g.lead + (g.total_blocks, g.total_blocks))
    return self._control("oracle", block_mask=forced, oracle_keep=self.keep,
                         video_blocks=g.video_blocks if g.joint else None)

  def update(self, state, stats, kind):
    return state

  def density(self, state, kind):
    if kind == StepKind.DENSE:
      return jnp.ones((self.geom.num_layers,), jnp.float32)
    dense = _layer_dense(self.geom, self.config.dense_layers).reshape(-1)
    return jnp.asarray(np.where(dense, 1.0, self.keep / self.geom.num_blocks), jnp.float32)


def make_policy(attention: cfg_lib.AttentionConfig, geom: Geometry):
  """The policy object for an attention config."""
  table = {cfg_lib.DenseConfig: DensePolicy, cfg_lib.MODConfig: MODPolicy,
           cfg_lib.StaticMaskConfig: StaticMaskPolicy, cfg_lib.OracleConfig: OraclePolicy}
  if type(attention) not in table:
    raise ValueError(
        f"attention must be 'dense', 'mod' or one of {[t.__name__ for t in table]}, "
        f"got {attention!r}")
  return table[type(attention)](attention, geom)
